"""One training job, from a composed config to a finished MLflow run.

``build(cfg)`` makes and checks every piece (runtime, resume checkpoint, corpus, tokenizer,
model, trainer) before anything is recorded, so bad input leaves no MLflow run behind;
``run(job)`` starts (or resumes) the run, trains, evaluates the test split, samples and logs the
model. ``train(cfg)`` does both and returns the final validation loss, which Hydra sweepers
minimize. The command line (``pocketgpt-train``, ``python -m pocketgpt.train``) is
``pocketgpt.cli.train``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pocketgpt import __version__
from pocketgpt.atomic import atomic_write_text
from pocketgpt.checkpoint import CheckpointWriter, Resume, config_hash, resolve_resume
from pocketgpt.config import SamplingConfig, TrainConfig, TrainerConfig, validate
from pocketgpt.data import Corpus, TokenizedSplit, load_corpus, split_sources, tokenize_corpus
from pocketgpt.errors import ConfigError, SamplingError
from pocketgpt.evaluation import EvalResult, evaluate
from pocketgpt.model import GPTMini
from pocketgpt.model_io import save_model
from pocketgpt.progress import say
from pocketgpt.runtime import Runtime
from pocketgpt.sampling import generate
from pocketgpt.tokenizer import Tokenizer, build_tokenizer
from pocketgpt.tracking.environment import (
    REQUIREMENTS_DIR,
    REQUIREMENTS_FILE,
    environment_tags,
    pip_freeze,
)
from pocketgpt.tracking.outbox import IMPORT_COMMAND
from pocketgpt.tracking.rerun import check_rerun, pop_rerun
from pocketgpt.tracking.run import (
    CHECKPOINT_DIR_TAG,
    Tracker,
    end_orphaned_runs,
    flatten,
    process_tags,
)
from pocketgpt.tracking.sweep import child_run_kwargs
from pocketgpt.trainer import TrainData, Trainer, TrainerHooks, TrainResult


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


log = logging.getLogger(__name__)


@dataclass
class TrainingJob:
    """The pieces of one job, built and checked; nothing recorded yet."""

    cfg: TrainConfig
    resolved: dict  # the composed config as plain values (logged as params and config.yaml)
    hydra: dict  # hydra_context()
    runtime: Runtime
    tracker: Tracker  # its MLflow run not started yet
    resume: Resume | None
    corpus: Corpus
    tokenizer: Tokenizer
    tokenizer_path: Path
    splits: dict[str, TokenizedSplit]
    model: GPTMini
    trainer: Trainer
    checkpoint_dir: Path | None
    tags: dict[str, str] = field(default_factory=dict)  # more tags of its run (a rerun's source)


@dataclass
class TrainOutcome:
    """What a finished job produced."""

    result: TrainResult
    test: EvalResult | None  # None: the data had no test split
    sample: str
    logged_model: Any | None  # tracking.pyfunc's LoggedModelInfo, with tracking.log_model


def train(dcfg: DictConfig) -> float:
    """Run one training job from a composed config; returns the final validation loss."""
    return run(build(dcfg)).result.final_val.loss


def build(dcfg: DictConfig) -> TrainingJob:
    """Check the config and make every piece of the job, in a fixed order (the seed is set
    before the model is built, so the same config gives the same numbers).

    A config with ``rerun: RUN_ID`` (``pocketgpt-train +rerun=RUN_ID``) is a rerun of that run:
    what differs from its environment is logged as warnings, and the new run tagged with it."""
    dcfg, rerun_of = pop_rerun(dcfg)
    cfg: TrainConfig = OmegaConf.to_object(dcfg)
    validate(cfg)
    hydra_ctx = hydra_context()
    runtime = Runtime.from_config(cfg.trainer)  # joins the process group under torchrun
    dist = runtime.dist
    # Rank 0's output folder is the job's (other ranks' Hydra writes nothing there).
    hydra_ctx["output_dir"] = dist.broadcast(hydra_ctx["output_dir"])
    torch.manual_seed(cfg.trainer.seed)

    resolved = OmegaConf.to_container(dcfg, resolve=True, enum_to_str=True)
    cfg_hash = config_hash(resolved)
    tracker = Tracker(cfg.tracking)
    resume = None
    if dist.is_main:  # rank 0 alone talks to the tracking store
        tracker.check_reachable()  # before any slow work: a server that is down fails at once
        # resume=auto looks in this job's own output folder first (hydra.run.dir reused).
        resume = resolve_resume(cfg.trainer, cfg_hash, tracker, hydra_ctx["output_dir"])
        if resume is None and cfg.trainer.resume == "auto":
            say(log, "trainer.resume=auto: no unfinished run of this config; starting fresh")
    # Every rank continues from the checkpoint rank 0 found.
    resume = dist.broadcast(resume)

    if not dist.is_main:
        dist.barrier()  # rank 0 fills the corpus, tokenizer and token caches first
    corpus = load_corpus(cfg.data, cfg.cache_dir)
    tokenizer, tokenizer_path = build_tokenizer(cfg.tokenizer, corpus.train, cfg.cache_dir)
    splits = tokenize_corpus(corpus, tokenizer, cfg.cache_dir)
    if dist.is_main:
        dist.barrier()
    if cfg.model.vocab_size not in (None, tokenizer.vocab_size):
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} differs from the tokenizer's "
            f"{tokenizer.vocab_size}; leave model.vocab_size null (it is the tokenizer's)"
        )
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    resolved["model"]["vocab_size"] = tokenizer.vocab_size  # logged as it was trained
    model = GPTMini(model_cfg).to(runtime.device)

    # A resumed run keeps writing beside the checkpoint it came from (where resume=auto will
    # look next time), unless that was a copy downloaded from MLflow.
    checkpoint_dir = (resume and resume.directory) or _checkpoint_dir(cfg, hydra_ctx)
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = CheckpointWriter(
            checkpoint_dir,
            cfg.trainer.keep_checkpoints,
            # Read at each write: the run id exists once run() has started the run.
            meta=lambda: {
                "config_hash": cfg_hash,
                "tracking_uri": tracker.uri,
                "mlflow_run_id": tracker.run_id,
            },
        )
    hooks = TrainerHooks()  # other ranks: figures are all-reduced, rank 0 logs them
    if dist.is_main:
        hooks = TrainerHooks(
            log_metrics=tracker.log_metrics,
            before_checkpoint=tracker.settle,
            on_checkpoint=_mlflow_checkpoint_copier(tracker, cfg.trainer),
        )
    # Built before the MLflow run starts, so that a corpus too small for one batch fails
    # without leaving a run behind.
    trainer = Trainer(
        model,
        TrainData(splits["train"], splits["validation"], cfg.data.block_size, cfg.data.stride),
        cfg.trainer,
        cfg.optim,
        runtime,
        hooks=hooks,
        checkpoints=checkpoints,
        resume=resume.checkpoint if resume else None,
    )
    tags = {}
    if rerun_of is not None and dist.is_main:  # read-only: still nothing recorded
        env = environment_tags(runtime)
        tags = check_rerun(rerun_of, tracker.uri, env, _fingerprints(corpus, tokenizer))
    return TrainingJob(
        cfg=cfg,
        resolved=resolved,
        hydra=hydra_ctx,
        runtime=runtime,
        tracker=tracker,
        resume=resume,
        corpus=corpus,
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
        splits=splits,
        model=model,
        trainer=trainer,
        checkpoint_dir=checkpoint_dir,
        tags=tags,
    )


def run(job: TrainingJob) -> TrainOutcome:
    """Start (or resume) the MLflow run and train, test, sample and log the model in it; the
    run ends FINISHED, FAILED or KILLED (Ctrl-C) whatever happens."""
    cfg, tracker, model, runtime = job.cfg, job.tracker, job.model, job.runtime
    if not runtime.dist.is_main:
        return _run_other_rank(job)
    tags = {
        "pocketgpt.version": __version__,
        "hydra.overrides": " ".join(job.hydra["overrides"]) or "(none)",
        **process_tags(),
        **job.tags,
    }
    if job.hydra["job_num"] is not None:
        tags["hydra.job.num"] = str(job.hydra["job_num"])
    if job.checkpoint_dir is not None:
        tags[CHECKPOINT_DIR_TAG] = str(job.checkpoint_dir.resolve())
    outputs = job.hydra["output_dir"] or job.checkpoint_dir
    tracker.journal_dir = Path(outputs) if outputs else None  # where figures go in an outage
    resumed = job.resume is not None and tracker.resume(job.resume.run_id)
    if resumed:
        tracker.set_tags(process_tags())  # the process now writing to the run
    else:
        # In a multirun, a child of the sweep's parent run (pocketgpt.sweep).
        tracker.start(**child_run_kwargs(cfg.tracking.run_name, tags, job.hydra))
    runtime.dist.broadcast(tracker.run_id)  # every rank's checkpoints name the run
    status = "FAILED"
    try:
        if job.checkpoint_dir is not None:
            # Runs of earlier jobs in this checkpoint folder killed before they could end
            # (kill -9 before any checkpoint) would otherwise say RUNNING forever.
            for orphan in end_orphaned_runs(tracker, job.checkpoint_dir, tracker.run_id):
                say(log, f"marked MLflow run {orphan} KILLED (its job was killed)")
        train_tokens = len(job.splits["train"].tokens)
        if resumed:
            say(log, f"resuming MLflow run {tracker.run_id} from {job.resume.path}")
        else:
            _log_run_inputs(tracker, job)
            _log_corpus(tracker, job)
            tracker.log_params(
                {
                    "derived.vocab_size": job.tokenizer.vocab_size,
                    "derived.n_params": model.num_params(),
                    "derived.device": str(runtime.device),
                    "derived.train_tokens": train_tokens,
                    "derived.corpus": job.corpus.name,
                }
            )
        say(
            log,
            f"pocketgpt {__version__}: {model.num_params():,} parameters, vocab "
            f"{job.tokenizer.vocab_size}, {train_tokens:,} train tokens, on {runtime.device}",
        )
        result = job.trainer.fit()
        test = _test(job)
        model = job.model = job.trainer.final_model()  # FSDP: gathered from the shards
        if test is None:
            say(log, "no test split (data.test not given): skipping the test evaluation")
        # time_*: seconds of training spent on data, compute, tracking, progress, eval, ...
        timings = {f"time_{k}": v for k, v in result.timings.items()}
        tracker.log_metrics(
            {
                **(test.as_metrics("test") if test else {}),
                "best_val_loss": result.best_val_loss,
                **timings,
            },
            result.steps,
        )
        # Training is over: wait (tracking.outage_timeout) for a server that went away, else
        # the rest of the run (samples, model, status) goes to the journal.
        online = tracker.flush()
        sample = _sample(job)
        logged = None
        if cfg.tracking.log_model and not online:
            _journal_model(job, result.steps)
        elif cfg.tracking.log_model:
            # An MLflow Model (pyfunc from code, safetensors weights) linked to this run.
            from pocketgpt.tracking.pyfunc import log_model

            logged = log_model(
                tracker.client,
                tracker.run_id,
                model,
                job.tokenizer_path,
                step=result.steps,
                register_as=cfg.tracking.register_as,
            )
        status = "FINISHED"
        final = result.final_val
        say(
            log,
            f"\nfinal: val loss {final.loss:.4f} (bpb {final.bpb:.4f}), "
            + (f"test loss {test.loss:.4f} (bpb {test.bpb:.4f})" if test else "no test split")
            + f" after {result.steps} steps, {result.train_time:.0f} s\n"
            f"sample: {sample!r}\n"
            f"MLflow: {tracker.run_url()}" + (f"\nmodel: {logged.describe()}" if logged else ""),
        )
        return TrainOutcome(result, test, sample, logged)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
        if tracker.journal is not None:
            say(
                log,
                f"tracking server {tracker.uri} still unreachable after "
                f"{cfg.tracking.outage_timeout:.0f} s: the run's unsent figures are in "
                f"{tracker.journal}; once it answers, send them with: "
                f"{IMPORT_COMMAND} {tracker.journal}",
            )


def _journal_model(job: TrainingJob, step: int) -> None:
    """The server is away: save the final model beside the journal, for its import to log."""
    folder = save_model(job.model, Path(job.tracker.journal.parent) / "final_model")
    job.tracker.journal_model(folder, job.tokenizer_path, step, job.cfg.tracking.register_as)


def _test(job: TrainingJob) -> EvalResult | None:
    """The test split's figures (sharded over the ranks), or None without a test split."""
    if "test" not in job.splits:
        return None
    cfg, runtime = job.cfg, job.runtime
    return evaluate(
        job.trainer.eval_model,
        job.splits["test"],
        cfg.data.block_size,
        cfg.trainer.batch_size,
        runtime.device,
        runtime.precision,
        cfg.trainer.eval_max_batches,
        dist=runtime.dist,
    )


def _run_other_rank(job: TrainingJob) -> TrainOutcome:
    """A rank other than 0: train and test in step with rank 0, which tracks and samples."""
    job.tracker.run_id = job.runtime.dist.broadcast(None)
    try:
        result = job.trainer.fit()
        test = _test(job)
        job.trainer.final_model()  # its part of gathering FSDP's shards for rank 0
    except Exception as e:
        # Rank 0 will see only a broken collective: the run keeps this rank's own reason.
        first_line = (str(e).splitlines() or [""])[0]
        with contextlib.suppress(Exception):
            job.tracker.client.set_tag(
                job.tracker.run_id,
                f"error.rank{job.runtime.dist.rank}",
                f"{type(e).__name__}: {first_line}"[:5000],
            )
        raise
    return TrainOutcome(result, test, "", None)


def _sample(job: TrainingJob) -> str:
    """A continuation of trainer.sample_prompt with the trainer's sample settings, logged as
    sample.txt (and the greedy one as sample_greedy.txt); returns the former."""
    cfg = job.cfg.trainer
    prompt = torch.tensor([job.tokenizer.encode(cfg.sample_prompt)], device=job.runtime.device)
    settings = {
        "sample.txt": SamplingConfig(
            max_new_tokens=cfg.sample_tokens,
            temperature=cfg.sample_temperature,
            top_p=cfg.sample_top_p,
            seed=cfg.sample_seed,
        ),
        "sample_greedy.txt": SamplingConfig(max_new_tokens=cfg.sample_tokens),
    }
    texts = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = job.tracker.journal_dir or Path(tmp)  # the job's output folder keeps them
        for name, sampling in settings.items():
            try:
                new = generate(job.model, prompt, sampling, eos_id=job.tokenizer.eos_id)
            except SamplingError as e:  # the run's figures are logged already: keep them
                texts[name] = f"(no sample: {e})"
            else:
                texts[name] = cfg.sample_prompt + job.tokenizer.decode(new[0].tolist())
            atomic_write_text(folder / name, texts[name] + "\n")
            job.tracker.log_artifact(folder / name)
    return texts["sample.txt"]


def _log_corpus(tracker: Tracker, job: TrainingJob) -> None:
    """The corpus's splits as the run's MLflow dataset inputs."""
    source_type, sources = split_sources(job.cfg.data)
    profiles = {}
    for split, tokenized in job.splits.items():
        text = getattr(job.corpus, split)
        profiles[split] = {
            "source": sources[split],
            "bytes": len(text.encode("utf-8")),
            "lines": text.count("\n"),
            "tokens": len(tokenized.tokens),
        }
    tracker.log_corpus(job.corpus.name, job.corpus.fingerprint, source_type, profiles)


def _checkpoint_dir(cfg: TrainConfig, hydra_ctx: dict) -> Path | None:
    if cfg.trainer.checkpoint_dir:
        return Path(cfg.trainer.checkpoint_dir)
    if hydra_ctx["output_dir"]:
        return Path(hydra_ctx["output_dir"]) / "checkpoints"
    return None  # called outside Hydra without a checkpoint_dir: no checkpoints


def _mlflow_checkpoint_copier(tracker: Tracker, trainer_cfg: TrainerConfig):
    if not trainer_cfg.checkpoint_to_mlflow:
        return None

    def copy(path: Path) -> None:
        tracker.log_artifact(path, "checkpoints", buffered=True)  # never waits for the server
        tracker.keep_newest_artifacts("checkpoints", trainer_cfg.keep_checkpoints)

    return copy


def _fingerprints(corpus: Corpus, tokenizer: Tokenizer) -> dict[str, str]:
    return {
        "derived.corpus_fingerprint": corpus.fingerprint,
        "derived.tokenizer_fingerprint": tokenizer.fingerprint,
    }


def _log_run_inputs(tracker: Tracker, job: TrainingJob) -> None:
    """What a new run is made of: params (the flattened config, the corpus and tokenizer
    fingerprints), the config (config.yaml: what +rerun=RUN_ID reads back), Hydra's folder,
    the tokenizer, and the environment it runs in (env.* tags, environment/requirements.txt)."""
    tracker.log_params({**flatten(job.resolved), **_fingerprints(job.corpus, job.tokenizer)})
    tracker.set_tags(environment_tags(job.runtime))
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(OmegaConf.to_yaml(job.resolved))
        tracker.log_artifact(config_file)
        freeze = Path(tmp) / REQUIREMENTS_FILE
        freeze.write_text(pip_freeze())
        tracker.log_artifact(freeze, REQUIREMENTS_DIR)
    output_dir = job.hydra["output_dir"]
    if output_dir and (Path(output_dir) / ".hydra").is_dir():
        tracker.log_artifact(Path(output_dir) / ".hydra", ".hydra")
    tracker.log_artifact(job.tokenizer_path, "tokenizer")


if __name__ == "__main__":
    from pocketgpt.cli.train import main

    main()
