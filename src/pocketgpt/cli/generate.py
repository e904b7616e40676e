"""``pocketgpt-generate`` (``python -m pocketgpt.generate``): text from a logged or saved model.

    pocketgpt-generate model_uri=runs:/RUN_ID/model prompt="The meaning of life is"
    pocketgpt-generate model_uri=models:/pocketgpt@best temperature=0.8 top_p=0.95 seed=1
    pocketgpt-generate model_uri=best:pocketgpt metric=val_bpb max_new_tokens=40
    pocketgpt-generate model_uri=models:/pocketgpt/3 'prompts=[Once upon,The river]'

Settings: ``config.GenerateConfig``; ``model_uri`` takes every form ``pocketgpt.load`` does. A
single prompt streams to the terminal token by token; a batch prints each prompt's text when all
are done. Timing goes to stderr.
"""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from pocketgpt.cli import CONFIG_PACKAGE, one_line_errors, run_hydra_command
from pocketgpt.config import GenerateConfig, SamplingConfig


def run(cfg: GenerateConfig, out=None, err=None) -> list[str]:
    """Load the model, generate for each prompt, print; returns the generated continuations."""
    import torch

    from pocketgpt.loading import load
    from pocketgpt.sampling import generate_rows
    from pocketgpt.tracking.registry import best_model_uri

    out, err = out or sys.stdout, err or sys.stderr
    sampling = SamplingConfig.from_settings(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    uri = cfg.model_uri
    if uri.startswith("best:"):
        uri, run_id, value = best_model_uri(uri[5:], cfg.metric, cfg.mode, cfg.tracking_uri)
        print(f"best run by {cfg.metric} ({cfg.mode}): {run_id} ({value:.4f}), {uri}", file=err)
    model, tokenizer = load(uri, cfg.device, tracking_uri=cfg.tracking_uri)
    sampling.check(model.config.max_len)
    prompts = list(cfg.prompts) or [cfg.prompt]
    streaming = cfg.stream and len(prompts) == 1

    def on_text(row: int, text: str) -> None:
        out.write(text)
        out.flush()

    if streaming:
        out.write(prompts[0])
        out.flush()
    start = time.perf_counter()
    rows = generate_rows(
        model, tokenizer, prompts, sampling, on_text=on_text if streaming else None
    )
    seconds = time.perf_counter() - start
    texts = [tokenizer.decode(row) for row in rows]
    if streaming:
        out.write("\n")
    else:
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            out.write(f"[{i}] {prompt}{text}\n")
    out.flush()
    n = sum(len(row) for row in rows)
    print(
        f"{n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.0f} tokens/s), "
        f"{model.num_params():,} parameters on {cfg.device}",
        file=err,
    )
    return texts


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="generate")
def _hydra_main(dcfg: DictConfig) -> None:
    if OmegaConf.is_missing(dcfg, "model_uri"):
        print(
            "error: model_uri is missing; add model_uri=runs:/RUN_ID/model (or models:/NAME@ALIAS,"
            " models:/NAME/VERSION, best:EXPERIMENT, a folder)",
            file=sys.stderr,
        )
        sys.exit(2)
    with one_line_errors():
        run(OmegaConf.to_object(dcfg))


def main() -> None:
    run_hydra_command(_hydra_main)


if __name__ == "__main__":
    main()
