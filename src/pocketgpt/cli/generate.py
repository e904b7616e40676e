"""``pocketgpt-generate`` (``python -m pocketgpt.generate``): text from a logged or saved model.

    pocketgpt-generate model_uri=runs:/RUN_ID/model prompt="The meaning of life is"
    pocketgpt-generate model_uri=models:/pocketgpt@best temperature=0.8 top_p=0.95 seed=1
    pocketgpt-generate model_uri=best:pocketgpt metric=val_bpb max_new_tokens=40
    pocketgpt-generate model_uri=models:/pocketgpt/3 'prompts=[Once upon,The river]'
    pocketgpt-generate model_uri=models:/pocketgpt@best interactive=true

Settings: ``config.GenerateConfig``; ``model_uri`` takes every form ``pocketgpt.load`` does.
``engine=auto`` (the default) generates on the native C++ engine where it can run the model
(``engine=native|torch``, ``quantize=int8``, ``kernels=naive|optimized``: docs/native.md). A
single prompt streams to the terminal token by token; a batch prints each prompt's text when all
are done. ``interactive=true`` loads the model once and answers each line typed on the terminal
(a blank line or Ctrl-D ends; Ctrl-C stops an answer, and at the prompt ends the session).
Timing goes to stderr.

A cold start is mostly imports: this module imports only Hydra at the top, torch when the model
loads, and MLflow not at all for a model on a SQLite store or a folder (``tracking.registry``).
"""

from __future__ import annotations

import sys
import time

# When the command started, before its imports: the first token's time counts from here
# (Python's own start, some 20 ms, comes before it).
STARTED = time.perf_counter()

import hydra  # noqa: E402  (after STARTED, on purpose)
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pocketgpt.cli import CONFIG_PACKAGE, one_line_errors, require_settings, run_hydra_command  # noqa: E402
from pocketgpt.config import EngineConfig, GenerateConfig, SamplingConfig  # noqa: E402
from pocketgpt.errors import ConfigError, PocketGPTError  # noqa: E402

PROMPT_MARK = "> "  # the interactive prompt, on stderr so stdout holds only generated text


def run(cfg: GenerateConfig, out=None, err=None, inp=None) -> list[str]:
    """Load the model, generate for each prompt (or each line typed, ``interactive``), print;
    returns the generated continuations."""
    out, err, inp = out or sys.stdout, err or sys.stderr, inp or sys.stdin
    if cfg.interactive and not inp.isatty():
        # Checked before anything loads or prints: a pipe or file would be read without the
        # prompts and timing a person needs, and a script is better served by prompts=[...].
        raise ConfigError(
            "interactive=true needs a terminal on stdin, and stdin is not one; run it in a "
            "terminal, or pass prompt=... or prompts=[...] for scripted input"
        )
    sampling = SamplingConfig.from_settings(cfg)
    model, tokenizer = _load(cfg, err)
    sampling.check(model.config.max_len)
    if cfg.interactive:
        return chat(model, tokenizer, sampling, inp, out, err)
    return _batch(model, tokenizer, sampling, list(cfg.prompts) or [cfg.prompt], cfg, out, err)


def _load(cfg: GenerateConfig, err):
    """-> (model, tokenizer) of ``cfg.model_uri``; torch is imported here, not before."""
    import torch

    from pocketgpt.loading import load
    from pocketgpt.tracking.registry import best_model_uri

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    uri = cfg.model_uri
    if uri.startswith("best:"):
        uri, run_id, value = best_model_uri(uri[5:], cfg.metric, cfg.mode, cfg.tracking_uri)
        print(f"best run by {cfg.metric} ({cfg.mode}): {run_id} ({value:.4f}), {uri}", file=err)
    e = EngineConfig.from_settings(cfg)
    return load(
        uri,
        cfg.device,
        tracking_uri=cfg.tracking_uri,
        engine=e.engine,
        quantize=e.quantize,
        kernels=e.kernels,
        quantize_head=e.quantize_head,
        threads=e.threads,
    )


class _Stream:
    """Writes each new piece of text to ``out`` at once, and notes when the first one came."""

    def __init__(self, out):
        self.out, self.first = out, None

    def __call__(self, row: int, text: str) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.out.write(text)
        self.out.flush()


def _timing(n: int, start: float, stream: _Stream | None) -> str:
    seconds = time.perf_counter() - start
    line = f"{n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.0f} tokens/s)"
    if stream is not None and stream.first is not None:
        line += f", first after {stream.first - start:.2f} s"
    return line


def _engine_name(model, cfg: GenerateConfig) -> str:
    """Where the tokens were computed: 'cpu (native optimized, int8)' or 'cpu (torch)'."""
    from pocketgpt.model import GPTMini

    if isinstance(model, GPTMini):
        return f"{cfg.device} (torch)"
    e = model.engine_config
    quant = f", {e.quantize.value}" if e.quantize != "none" else ""
    return f"{cfg.device} (native {e.kernels.value}{quant})"


def _batch(model, tokenizer, sampling, prompts, cfg, out, err) -> list[str]:
    from pocketgpt.sampling import generate_rows

    stream = _Stream(out) if cfg.stream and len(prompts) == 1 else None
    if stream:
        out.write(prompts[0])
        out.flush()
    start = time.perf_counter()
    rows = generate_rows(model, tokenizer, prompts, sampling, on_text=stream)
    timing = _timing(sum(len(row) for row in rows), start, stream)
    texts = [tokenizer.decode(row) for row in rows]
    if stream:
        out.write("\n")
    else:
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            out.write(f"[{i}] {prompt}{text}\n")
    out.flush()
    line = f"{timing}, {model.num_params():,} parameters on {_engine_name(model, cfg)}"
    if stream is not None and stream.first is not None:
        line += f"; first token {stream.first - STARTED:.2f} s after start"
    print(line, file=err)
    return texts


def chat(model, tokenizer, sampling: SamplingConfig, inp, out, err) -> list[str]:
    """Answer each line read from ``inp`` by streaming its continuation to ``out``, until a
    blank line or end of input; Ctrl-C stops the answer under way. -> the continuations."""
    from pocketgpt.sampling import generate_rows

    print("a prompt per line; a blank line or Ctrl-D ends, Ctrl-C stops an answer", file=err)
    texts = []
    while True:
        err.write(PROMPT_MARK)
        err.flush()
        line = inp.readline()  # Ctrl-C here ends the session (KeyboardInterrupt, see main)
        prompt = line.rstrip("\r\n")
        if not prompt.strip():
            if not line:  # Ctrl-D: end the prompt's line
                err.write("\n")
            return texts
        stream = _Stream(out)
        start = time.perf_counter()
        try:
            rows = generate_rows(model, tokenizer, [prompt], sampling, on_text=stream)
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
            print("(stopped)", file=err)
            continue
        except PocketGPTError as e:  # this prompt cannot be answered; the next may
            print(f"error: {e}", file=err)
            continue
        out.write("\n")
        out.flush()
        texts.append(tokenizer.decode(rows[0]))
        print(_timing(len(rows[0]), start, stream), file=err)


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="generate")
def _hydra_main(dcfg: DictConfig) -> None:
    uris = "runs:/RUN_ID/model (or models:/NAME@ALIAS, models:/NAME/VERSION, best:EXPERIMENT, "
    uris += "a folder)"
    require_settings(dcfg, {"model_uri": uris})
    with one_line_errors():
        try:
            run(OmegaConf.to_object(dcfg))
        except KeyboardInterrupt:  # Ctrl-C: end quietly, with the shell's status for it
            print(file=sys.stderr)
            sys.exit(130)


def main() -> None:
    run_hydra_command(_hydra_main)


if __name__ == "__main__":
    main()
