"""One training job, from a composed config to a finished MLflow run.

``train(cfg)`` builds the pieces (corpus, tokenizer, model, trainer, tracker) and runs them,
recording everything in one MLflow run; it returns the final validation loss, which Hydra
sweepers minimize. The command line (``pocketgpt-train``, ``python -m pocketgpt.train``) is
``pocketgpt.cli.train``.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pocketgpt import __version__
from pocketgpt.checkpoint import (
    CheckpointError,
    config_hash,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from pocketgpt.config import TrainConfig, validate


def hydra_context() -> dict:
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
    from pocketgpt.model import GPTMini
    from pocketgpt.runtime import resolve_device
    from pocketgpt.sampling import SamplingConfig, generate
    from pocketgpt.tokenizer import build_tokenizer
    from pocketgpt.tracking.run import Tracker
    from pocketgpt.tracking.sweep import child_run_kwargs
    from pocketgpt.trainer import Trainer, evaluate

    cfg: TrainConfig = OmegaConf.to_object(dcfg)
    validate(cfg)
    hydra_ctx = hydra_context()
    device = resolve_device(cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)

    resolved = OmegaConf.to_container(dcfg, resolve=True, enum_to_str=True)
    cfg_hash = config_hash(resolved)
    tracker = Tracker(cfg.tracking)
    tracker.check_reachable()  # before any slow work: a server that is down fails at once
    resume_path = _find_resume(cfg, cfg_hash, tracker)
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt is not None and ckpt["meta"].get("config_hash") != cfg_hash:
        raise CheckpointError(
            f"checkpoint {resume_path} was written by a different config; resume with the "
            f"overrides it was trained with, or set trainer.resume=null to start fresh"
        )

    corpus = load_corpus(cfg.data, cfg.cache_dir)
    tokenizer, tokenizer_path = build_tokenizer(cfg.tokenizer, corpus.train, cfg.cache_dir)
    splits = tokenize_corpus(corpus, tokenizer, cfg.cache_dir)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    model = GPTMini(model_cfg).to(device)

    # A resumed run keeps writing beside the checkpoint it came from (where resume=auto will
    # look next time), unless that was a copy downloaded from MLflow (no meta.json beside it).
    if resume_path and (resume_path.parent / "meta.json").exists():
        checkpoint_dir = resume_path.parent
    else:
        checkpoint_dir = _checkpoint_dir(cfg, hydra_ctx)
    # Built before the MLflow run starts, so that a corpus too small for one batch fails
    # without leaving a run behind.
    trainer = Trainer(
        model,
        splits["train"],
        splits["validation"],
        cfg.optim,
        cfg.trainer,
        cfg.data.block_size,
        cfg.data.stride,
        device,
        checkpoint_dir=checkpoint_dir,
        checkpoint_meta={"config_hash": cfg_hash, "tracking_uri": tracker.uri},
        resume=ckpt,
    )

    tags = {
        "pocketgpt.version": __version__,
        "hydra.overrides": " ".join(hydra_ctx["overrides"]) or "(none)",
    }
    if hydra_ctx["job_num"] is not None:
        tags["hydra.job.num"] = str(hydra_ctx["job_num"])
    if checkpoint_dir is not None:
        tags["pocketgpt.checkpoint_dir"] = str(checkpoint_dir.resolve())
    resumed = ckpt is not None and tracker.resume(ckpt["meta"].get("mlflow_run_id", ""))
    if not resumed:
        # In a multirun, a child of the sweep's parent run (pocketgpt.sweep).
        tracker.start(**child_run_kwargs(cfg.tracking.run_name, tags, hydra_ctx))
    status = "FAILED"
    try:
        if resumed:
            print(f"resuming MLflow run {tracker.run_id} from {resume_path}", flush=True)
        else:
            _log_run_inputs(tracker, resolved, hydra_ctx, tokenizer_path)
            tracker.log_params(
                {
                    "derived.vocab_size": tokenizer.vocab_size,
                    "derived.n_params": model.num_params(),
                    "derived.device": str(device),
                    "derived.train_tokens": len(splits["train"].tokens),
                    "derived.corpus": corpus.name,
                }
            )

        print(
            f"pocketgpt {__version__}: {model.num_params():,} parameters, vocab "
            f"{tokenizer.vocab_size}, {len(splits['train'].tokens):,} train tokens, on {device}",
            flush=True,
        )
        trainer.log_metrics = tracker.log_metrics
        trainer.checkpoint_meta["mlflow_run_id"] = tracker.run_id
        trainer.on_checkpoint = _mlflow_checkpoint_copier(tracker, cfg.trainer)
        result = trainer.fit()
        test = evaluate(
            model,
            splits["test"],
            cfg.data.block_size,
            cfg.trainer.batch_size,
            device,
            cfg.trainer.precision,
            cfg.trainer.eval_max_batches,
        )
        # time_*: seconds of training spent on data, compute, tracking, progress, eval, ...
        timings = {f"time_{k}": v for k, v in result.timings.items()}
        tracker.log_metrics(
            {**test.as_metrics("test"), "best_val_loss": result.best_val_loss, **timings},
            result.steps,
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
        logged = None
        if cfg.tracking.log_model:
            # An MLflow Model (pyfunc from code, safetensors weights) linked to this run.
            from pocketgpt.tracking.pyfunc import log_model

            logged = log_model(
                tracker.client,
                tracker.run_id,
                model,
                tokenizer_path,
                step=result.steps,
                register_as=cfg.tracking.register_as,
            )
        status = "FINISHED"
        final = result.final_val
        print(
            f"\nfinal: val loss {final.loss:.4f} (bpb {final.bpb:.4f}), test loss {test.loss:.4f} "
            f"(bpb {test.bpb:.4f}) after {result.steps} steps, {result.train_time:.0f} s\n"
            f"sample: {sample!r}\n"
            f"MLflow: {tracker.run_url()}" + (f"\nmodel: {logged.describe()}" if logged else ""),
            flush=True,
        )
        return final.loss
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)


def _checkpoint_dir(cfg: TrainConfig, hydra_ctx: dict) -> Path | None:
    if cfg.trainer.checkpoint_dir:
        return Path(cfg.trainer.checkpoint_dir)
    if hydra_ctx["output_dir"]:
        return Path(hydra_ctx["output_dir"]) / "checkpoints"
    return None  # called outside Hydra without a checkpoint_dir: no checkpoints


def _find_resume(cfg: TrainConfig, cfg_hash: str, tracker) -> Path | None:
    """trainer.resume -> a checkpoint file, or None to start fresh."""
    resume = cfg.trainer.resume
    if not resume:
        return None
    if re.fullmatch(r"[0-9a-f]{32}", resume):  # an MLflow run id
        return _checkpoint_of_run(tracker, resume)
    roots = [Path("outputs"), Path("multirun")]
    if cfg.trainer.checkpoint_dir:
        roots.insert(0, Path(cfg.trainer.checkpoint_dir))
    path = find_resume_checkpoint(resume, roots, cfg_hash)
    if path is None:
        print("trainer.resume=auto: no unfinished run of this config; starting fresh", flush=True)
    return path


def _checkpoint_of_run(tracker, run_id: str) -> Path:
    """The newest checkpoint of an MLflow run: its local folder, else its artifacts."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = tracker.client.get_run(run_id)
    except MlflowException:
        raise CheckpointError(
            f"trainer.resume={run_id}: no such run in {tracker.uri}; check the run id or "
            f"tracking.uri"
        ) from None
    local = run.data.tags.get("pocketgpt.checkpoint_dir")
    if local and list_checkpoints(local):
        return list_checkpoints(local)[-1]
    names = sorted(a.path for a in tracker.client.list_artifacts(run_id, "checkpoints"))
    if not names:
        raise CheckpointError(
            f"trainer.resume={run_id}: the run has no checkpoints (locally or in MLflow); "
            f"train with trainer.checkpoint_to_mlflow=true to keep them in the store"
        )
    target = Path(tempfile.mkdtemp(prefix="pocketgpt-resume-"))
    local_file = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=names[-1], dst_path=str(target), tracking_uri=tracker.uri
    )
    return Path(local_file)


def _mlflow_checkpoint_copier(tracker, trainer_cfg):
    if not trainer_cfg.checkpoint_to_mlflow:
        return None

    def copy(path: Path) -> None:
        tracker.log_artifact(path, "checkpoints")
        tracker.keep_newest_artifacts("checkpoints", trainer_cfg.keep_checkpoints)

    return copy


def _log_run_inputs(tracker, resolved: dict, hydra_ctx: dict, tokenizer_path: Path) -> None:
    """Params (the flattened config) and the input artifacts of a new run."""
    from pocketgpt.tracking.run import flatten

    tracker.log_params(flatten(resolved))
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(OmegaConf.to_yaml(resolved))
        tracker.log_artifact(config_file)
    if hydra_ctx["output_dir"] and (Path(hydra_ctx["output_dir"]) / ".hydra").is_dir():
        tracker.log_artifact(Path(hydra_ctx["output_dir"]) / ".hydra", ".hydra")
    tracker.log_artifact(tokenizer_path, "tokenizer")


if __name__ == "__main__":
    from pocketgpt.cli.train import main

    main()
