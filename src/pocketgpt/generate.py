"""Generate text from a logged or saved model: ``python -m pocketgpt.generate model_uri=... [overrides]``.

    python -m pocketgpt.generate model_uri=runs:/RUN_ID/model prompt="The meaning of life is"
    python -m pocketgpt.generate model_uri=models:/pocketgpt@best temperature=0.8 top_p=0.95 seed=1
    python -m pocketgpt.generate model_uri=best:pocketgpt metric=val_bpb max_new_tokens=40
    python -m pocketgpt.generate model_uri=models:/pocketgpt/3 'prompts=[Once upon,The river]'

Settings live in ``conf/generate.yaml`` (schema: ``GenerateConfig``); ``model_uri`` takes every
form ``pocketgpt.load`` does. A single prompt streams to the terminal token by token; a batch
prints each prompt's text when all are done. Timing goes to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, fields

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pocketgpt.sampling import SamplingConfig
from pocketgpt.train import config_dir


@dataclass
class GenerateConfig(SamplingConfig):
    """The sampling settings (SamplingConfig's fields) plus where the model comes from."""

    model_uri: str = MISSING  # runs:/RUN_ID/model | models:/NAME/VERSION | models:/NAME@ALIAS |
    # models:/m-ID | m-ID | best:EXPERIMENT | a local folder
    prompt: str = "The meaning of life is"
    prompts: list[str] = field(default_factory=list)  # a batch; when given, replaces prompt
    metric: str = "val_bpb"  # best:EXPERIMENT ranks the experiment's finished runs by this
    mode: str = "min"  # min | max: whether lower or higher metric is better
    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else ./mlruns
    device: str = "cpu"  # cpu | cuda | mps | auto
    # torch intra-op threads. 1: a model this small decodes fastest on one thread (its ops are
    # too small to split, and on a busy machine extra threads wait on each other; see
    # BENCHMARKS.md); null = torch's default.
    threads: int | None = 1
    stream: bool = True  # print a single prompt's tokens as they come


def register_configs(cs: ConfigStore | None = None) -> None:
    (cs or ConfigStore.instance()).store(name="generate_schema", node=GenerateConfig)


def sampling_config(cfg: GenerateConfig) -> SamplingConfig:
    return SamplingConfig(**{f.name: getattr(cfg, f.name) for f in fields(SamplingConfig)})


def run(cfg: GenerateConfig, out=None, err=None) -> list[str]:
    """Load the model, generate for each prompt, print; returns the generated continuations."""
    import torch

    from pocketgpt.loading import best_model_uri, load
    from pocketgpt.sampling import check_sampling, generate_rows

    out, err = out or sys.stdout, err or sys.stderr
    check_sampling(sampling_config(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    uri = cfg.model_uri
    if uri.startswith("best:"):
        uri, run_id, value = best_model_uri(uri[5:], cfg.metric, cfg.mode, cfg.tracking_uri)
        print(f"best run by {cfg.metric} ({cfg.mode}): {run_id} ({value:.4f}), {uri}", file=err)
    model, tokenizer = load(uri, cfg.device, tracking_uri=cfg.tracking_uri)
    scfg = sampling_config(cfg)
    check_sampling(scfg, model.config.max_len)
    prompts = list(cfg.prompts) or [cfg.prompt]
    streaming = cfg.stream and len(prompts) == 1

    def on_text(row: int, text: str) -> None:
        out.write(text)
        out.flush()

    if streaming:
        out.write(prompts[0])
        out.flush()
    start = time.perf_counter()
    rows = generate_rows(model, tokenizer, prompts, scfg, on_text=on_text if streaming else None)
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


def _known_errors() -> tuple[type[Exception], ...]:
    from pocketgpt.loading import ModelURIError
    from pocketgpt.model_io import ModelFileError
    from pocketgpt.sampling import SamplingError
    from pocketgpt.tokenizer import TokenizerError

    return (ModelURIError, ModelFileError, SamplingError, TokenizerError)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="generate")
def _hydra_main(dcfg: DictConfig) -> None:
    if OmegaConf.is_missing(dcfg, "model_uri"):
        print(
            "error: model_uri is missing; add model_uri=runs:/RUN_ID/model (or models:/NAME@ALIAS,"
            " models:/NAME/VERSION, best:EXPERIMENT, a folder)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        run(OmegaConf.to_object(dcfg))
    except _known_errors() as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
