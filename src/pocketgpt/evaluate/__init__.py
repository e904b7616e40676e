"""Evaluate a model with EleutherAI's lm-evaluation-harness and log the metrics into its run.

    pocketgpt-evaluate model_uri=runs:/RUN_ID/model                      # wikitext2_local
    pocketgpt-evaluate model_uri=models:/pocketgpt@best 'tasks=[wikitext2_local,lambada_openai]'

The model runs inside lm-eval through ``harness.PocketGPTLM`` (registered as ``pocketgpt``).
``local_tasks`` defines WikiText-2 tasks from local files (offline); any other name is one of
lm-eval's own tasks, which download their data from the Hugging Face Hub. Each task metric is
logged into the model's source run as ``lm_eval/<task>/<metric>``, linked to the logged model
(MLflow 3 lists it on the model's page); a model given as a plain folder has no run to log to.
lm-eval is an optional dependency: ``pip install 'pocketgpt[eval]'``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketgpt.errors import EvaluationError
from pocketgpt.evaluate.local_tasks import LOCAL_TASKS

INSTALL_HINT = "pip install 'pocketgpt[eval]' (or lm-eval)"


@dataclass
class EvaluationReport:
    metrics: dict[str, dict[str, float]]  # task -> metric -> value (lm-eval's filter dropped)
    logged_to: str | None = None  # the run the metrics went into
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # lm-eval's results


def require_lm_eval() -> None:
    """Raise EvaluationError with the install command when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise EvaluationError(f"lm-eval is not installed ({e}); {INSTALL_HINT}") from None


def task_manager(tasks: list[str]) -> Any:
    """lm-eval's TaskManager for ``tasks``, having checked every name: EvaluationError for the
    first one neither local nor lm-eval's own. lm-eval's task index takes seconds to build
    (thousands of YAML files), so it is built only when a task needs it, and only once."""
    from lm_eval.tasks import TaskManager

    remote = [t for t in tasks if t not in LOCAL_TASKS]
    manager = TaskManager(include_defaults=bool(remote))
    known = set(manager.all_tasks) if remote else set()
    for task in remote:
        if task not in known:
            raise EvaluationError(
                f"unknown task {task!r}; local tasks: {', '.join(LOCAL_TASKS)}; lm-eval's own "
                "(which need network): wikitext, lambada_openai, hellaswag, ... (lm-eval ls tasks)"
            )
    return manager


def metrics_of(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` -> {task: {metric: value}}, standard errors as ``<metric>_stderr``,
    filters other than ``none`` kept as ``<metric>_<filter>``."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue  # alias, sample counts, "N/A" standard errors
            metric, _, filt = key.partition(",")
            name = metric if filt == "none" else f"{metric}_{filt}"
            if math.isfinite(value):
                row[name] = float(value)
        out[task] = row
    return out


def evaluate(
    model_uri: str,
    tasks: list[str],
    *,
    local_file: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    log: bool = True,
    tracking_uri: str | None = None,
    output: str | None = None,
) -> EvaluationReport:
    """Run lm-eval's ``tasks`` on the model at ``model_uri``; log the metrics into its run."""
    require_lm_eval()
    tasks = list(tasks)
    if all(t in LOCAL_TASKS for t in tasks):
        # Nothing to download: make sure nothing tries (datasets reads these when imported).
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pocketgpt.evaluate.local_tasks import task_config

    specs: list[Any] = [task_config(t, local_file) if t in LOCAL_TASKS else t for t in tasks]
    manager = task_manager(tasks)
    source = None
    if log:
        from pocketgpt.tracking.source import source_of

        source = source_of(model_uri, tracking_uri)  # checked before the (long) evaluation
    from lm_eval import simple_evaluate

    from pocketgpt.evaluate.harness import PocketGPTLM
    from pocketgpt.loading import load

    model, tokenizer = load(model_uri, device, tracking_uri=tracking_uri)
    lm = PocketGPTLM(model, tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=specs,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,  # perplexities have no standard error; others: lm-eval's default off
    )
    if results is None:  # a non-zero rank under torch.distributed: rank 0 reports
        return EvaluationReport({})
    report = EvaluationReport(metrics_of(results["results"]), raw=results["results"])
    if output:
        from pocketgpt.atomic import atomic_write_text

        text = json.dumps(results["results"], indent=2, default=str)
        atomic_write_text(Path(output), text + "\n")
    if source is not None:
        from pocketgpt.tracking.source import log_metrics

        flat = {
            f"lm_eval/{task}/{metric}": value
            for task, row in report.metrics.items()
            for metric, value in row.items()
        }
        log_metrics(source, flat)
        report.logged_to = source.run_id
    return report
