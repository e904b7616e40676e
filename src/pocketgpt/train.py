"""Training entry point: ``python -m pocketgpt.train [overrides]`` or ``pocketgpt-train``.

Composes ``conf/train.yaml``, builds the pieces, trains, and records everything in one MLflow
run. Returns the final validation loss, which Hydra sweepers minimize.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pocketgpt import __version__
from pocketgpt.config import ConfigError, TrainConfig, register_configs, validate
from pocketgpt.data import DataError


def config_dir() -> str:
    """The Hydra config folder: $POCKETGPT_CONFIG_DIR, else the checkout's ``conf/``."""
    if os.environ.get("POCKETGPT_CONFIG_DIR"):
        return os.path.abspath(os.environ["POCKETGPT_CONFIG_DIR"])
    return str(Path(__file__).resolve().parents[2] / "conf")


def _hydra_context() -> dict:
    """What Hydra knows of this job: overrides, output folder, multirun or not."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {"overrides": [], "output_dir": None, "multirun": False, "job_num": None}
    hc = HydraConfig.get()
    return {
        "overrides": list(hc.overrides.task),
        "output_dir": hc.runtime.output_dir,
        "multirun": str(hc.mode) == "RunMode.MULTIRUN",
        "job_num": hc.job.get("num"),
    }


def train(dcfg: DictConfig) -> float:
    """Run one training job from a composed config; returns the final validation loss."""
    import torch

    from pocketgpt.data import load_corpus, tokenize_corpus
    from pocketgpt.model import GPTConfig, GPTMini
    from pocketgpt.model_io import save_model
    from pocketgpt.sampling import SamplingConfig, generate
    from pocketgpt.tokenizer import build_tokenizer
    from pocketgpt.tracking import Tracker, flatten
    from pocketgpt.trainer import Trainer, evaluate, resolve_device

    cfg: TrainConfig = OmegaConf.to_object(dcfg)
    validate(cfg)
    hydra_ctx = _hydra_context()
    device = resolve_device(cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)

    corpus = load_corpus(cfg.data, cfg.cache_dir)
    tokenizer, tokenizer_path = build_tokenizer(cfg.tokenizer, corpus.train, cfg.cache_dir)
    splits = tokenize_corpus(corpus, tokenizer, cfg.cache_dir)
    model_cfg = GPTConfig(vocab_size=tokenizer.vocab_size, **vars(cfg.model))
    model = GPTMini(model_cfg).to(device)

    tracker = Tracker(cfg.tracking)
    tags = {
        "pocketgpt.version": __version__,
        "hydra.overrides": " ".join(hydra_ctx["overrides"]) or "(none)",
    }
    if hydra_ctx["job_num"] is not None:
        tags["hydra.job.num"] = str(hydra_ctx["job_num"])
    tracker.start(run_name=cfg.tracking.run_name, tags=tags)
    status = "FAILED"
    try:
        resolved = OmegaConf.to_container(dcfg, resolve=True)
        tracker.log_params(
            {
                **flatten(resolved),
                "derived.vocab_size": tokenizer.vocab_size,
                "derived.n_params": model.num_params(),
                "derived.device": str(device),
                "derived.train_tokens": len(splits["train"].tokens),
                "derived.corpus": corpus.name,
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            config_file = Path(tmp) / "config.yaml"
            config_file.write_text(OmegaConf.to_yaml(resolved))
            tracker.log_artifact(config_file)
        if hydra_ctx["output_dir"] and (Path(hydra_ctx["output_dir"]) / ".hydra").is_dir():
            tracker.log_artifact(Path(hydra_ctx["output_dir"]) / ".hydra", ".hydra")
        tracker.log_artifact(tokenizer_path, "tokenizer")

        print(
            f"pocketgpt {__version__}: {model.num_params():,} parameters, vocab "
            f"{tokenizer.vocab_size}, {len(splits['train'].tokens):,} train tokens, on {device}",
            flush=True,
        )
        trainer = Trainer(
            model,
            splits["train"],
            splits["validation"],
            cfg.optim,
            cfg.trainer,
            cfg.data.block_size,
            cfg.data.stride,
            device,
            log_metrics=tracker.log_metrics,
        )
        result = trainer.fit()
        test = evaluate(
            model,
            splits["test"],
            cfg.data.block_size,
            cfg.trainer.batch_size,
            device,
            cfg.trainer.precision,
        )
        tracker.log_metrics(
            {**test.as_metrics("test"), "best_val_loss": result.best_val_loss}, result.steps
        )

        prompt = torch.tensor([tokenizer.encode(cfg.trainer.sample_prompt)], device=device)
        new = generate(
            model,
            prompt,
            SamplingConfig(max_new_tokens=cfg.trainer.sample_tokens),
            eos_id=tokenizer.eos_id,
        )
        sample = cfg.trainer.sample_prompt + tokenizer.decode(new[0].tolist())
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "sample.txt").write_text(sample + "\n")
            tracker.log_artifact(Path(tmp) / "sample.txt")
            if cfg.tracking.log_model:
                model_dir = Path(tmp) / "model"
                save_model(model, model_dir)
                tracker.log_artifact(model_dir, "model")
        status = "FINISHED"
        final = result.final_val
        print(
            f"\nfinal: val loss {final.loss:.4f} (bpb {final.bpb:.4f}), test loss {test.loss:.4f} "
            f"(bpb {test.bpb:.4f}) after {result.steps} steps, {result.train_time:.0f} s\n"
            f"sample: {sample!r}\n"
            f"MLflow: {tracker.run_url()}",
            flush=True,
        )
        return final.loss
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)


KNOWN_ERRORS = (ConfigError, DataError)


def _known_errors() -> tuple[type[Exception], ...]:
    from pocketgpt.tokenizer import TokenizerError
    from pocketgpt.tracking import TrackingError

    return (*KNOWN_ERRORS, TokenizerError, TrackingError)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(dcfg: DictConfig) -> float:
    try:
        return train(dcfg)
    except _known_errors() as e:
        if _hydra_context()["multirun"] or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # a sweep records the failed job and goes on
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
