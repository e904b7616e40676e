"""Compare the runs of an experiment (or of one sweep) side by side.

    pocketgpt-compare EXPERIMENT [--sweep ID] [--metric val_bpb] [--plot PATH]
                      [--alias NAME [--model NAME]] [--tracking-uri URI]

Prints a Markdown table of the runs: the params that differ between them, best and final
validation loss and bits per byte, median tokens/s, duration and status, sorted by the metric
(best first; failed runs last). Writes a PNG of the validation curves, and can point a registry
alias at the best run's registered model version. Reads the same store as training
(``pocketgpt.tracking.store``: $MLFLOW_TRACKING_URI, else ./mlruns).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketgpt.atomic import atomic_path
from pocketgpt.errors import CompareError
from pocketgpt.tracking.sweep import ERROR_TAG, ROLE_TAG

# Params that name places or runs rather than settings: never worth a column.
IGNORED_PARAMS = frozenset({"cache_dir", "tracking.run_name", "trainer.checkpoint_dir"})
MAX_RUNS = 5000


@dataclass
class RunSummary:
    """One run reduced to what the comparison shows."""

    run_id: str
    name: str
    job: str
    status: str
    params: dict[str, str]
    duration_s: float
    tokens_per_sec: float | None
    error: str | None = None  # the `error` tag of a failed sweep job
    best: dict[str, float] = field(default_factory=dict)  # metric -> min over its history
    final: dict[str, float] = field(default_factory=dict)  # metric -> value at the last step
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Comparison:
    experiment: str
    sweep_id: str | None
    metric: str
    runs: list[RunSummary]  # sorted: best first
    differing: list[str]  # param keys whose values differ between runs

    @property
    def best_run(self) -> RunSummary | None:
        first = self.runs[0] if self.runs else None
        ok = first is not None and first.status == "FINISHED" and self.metric in first.best
        return first if ok else None


# --------------------------------------------------------------------------- loading


def _client(uri: str | None) -> tuple[Any, str]:
    from pocketgpt.tracking.store import check_reachable, make_client, tracking_uri

    uri = tracking_uri(
        uri,
        create=False,
        error=CompareError,
        hint="run from the folder you trained in, or pass --tracking-uri URI",
    )
    check_reachable(uri, error=CompareError, hint="start it, or pass --tracking-uri URI")
    return make_client(uri), uri


def _experiment(client: Any, name: str, uri: str) -> Any:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise CompareError(
            f"no MLflow experiment {name!r} in {uri}; known: {', '.join(known) or '(none)'}"
        )
    return exp


def _find_sweep(client: Any, experiment_id: str, sweep: str) -> Any:
    """A sweep's parent run by id, id prefix, run name, sweep folder (or its end), or 'latest'."""
    parents = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=MAX_RUNS,
    )
    if not parents:
        raise CompareError("this experiment has no sweeps; launch one with -m, or drop --sweep")
    if sweep == "latest":
        return parents[0]
    wanted = sweep.rstrip("/")
    matches = [
        r
        for r in parents
        if r.info.run_id == wanted
        or (len(wanted) >= 4 and r.info.run_id.startswith(wanted))
        or r.info.run_name == wanted
        or r.data.tags.get("sweep.dir", "").rstrip("/").endswith(wanted)
    ]
    if len(matches) != 1:
        listing = ", ".join(
            f"{r.info.run_id[:8]} ({r.data.tags.get('sweep.dir', '?')})" for r in parents[:5]
        )
        what = "no sweep matches" if not matches else f"{len(matches)} sweeps match"
        raise CompareError(f"{what} --sweep {sweep!r}; latest sweeps: {listing}")
    return matches[0]


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    points = client.get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(points, key=lambda m: (m.step, m.timestamp))]


def _summarize(client: Any, run: Any, metrics: Sequence[str]) -> RunSummary:
    info, data = run.info, run.data
    end = info.end_time or int(time.time() * 1000)
    summary = RunSummary(
        run_id=info.run_id,
        name=info.run_name or "",
        job=data.tags.get("hydra.job.num", "-"),
        status=info.status,
        params=dict(data.params),
        duration_s=max(0.0, (end - info.start_time) / 1000.0),
        tokens_per_sec=None,
        error=data.tags.get(ERROR_TAG),
    )
    for key in metrics:
        curve = [(s, v) for s, v in _history(client, info.run_id, key) if math.isfinite(v)]
        if curve:
            summary.curves[key] = curve
            summary.best[key] = min(v for _, v in curve)
            summary.final[key] = curve[-1][1]
    speeds = [v for _, v in _history(client, info.run_id, "tokens_per_sec")]
    if speeds:
        summary.tokens_per_sec = statistics.median(speeds)
    return summary


def compare(
    experiment: str,
    sweep: str | None = None,
    metric: str = "val_bpb",
    tracking_uri: str | None = None,
) -> Comparison:
    """Collect and sort the runs of ``experiment`` (only the children of ``sweep`` if given)."""
    client, uri = _client(tracking_uri)
    exp = _experiment(client, experiment, uri)
    if sweep is not None:
        parent = _find_sweep(client, exp.experiment_id, sweep)
        sweep_id = parent.info.run_id
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{sweep_id}'",
            max_results=MAX_RUNS,
        )
    else:
        sweep_id = None
        runs = [
            r
            for r in client.search_runs([exp.experiment_id], max_results=MAX_RUNS)
            if r.data.tags.get(ROLE_TAG) != "sweep"
        ]
    if not runs:
        raise CompareError(f"no runs to compare in experiment {experiment!r}")
    keys = list(dict.fromkeys(["val_loss", "val_bpb", metric]))
    summaries = [_summarize(client, r, keys) for r in runs]
    known = {k for r in runs for k in r.data.metrics}
    if metric not in known:
        raise CompareError(
            f"no run logged the metric {metric!r}; logged: {', '.join(sorted(known)) or '(none)'}"
        )

    def order(s: RunSummary) -> tuple:
        # Finished runs first, by the metric; then failed or killed ones (which may have logged
        # it, if only the untrained model's step-0 figure); runs without it last.
        has = metric in s.best
        job = int(s.job) if s.job.isdigit() else math.inf
        return (not has, s.status != "FINISHED", s.best.get(metric, math.inf), job, s.run_id)

    summaries.sort(key=order)
    return Comparison(experiment, sweep_id, metric, summaries, _differing(summaries))


def _differing(runs: Sequence[RunSummary]) -> list[str]:
    """Param keys with more than one value among the runs that logged them."""
    values: dict[str, set[str]] = {}
    for r in runs:
        for k, v in r.params.items():
            values.setdefault(k, set()).add(v)
    return sorted(k for k, vs in values.items() if len(vs) > 1 and k not in IGNORED_PARAMS)


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_table(c: Comparison) -> str:
    """A Markdown table: readable in a terminal, pasteable into a README."""
    metric_cols = ["val_loss", "val_bpb"] + (
        [c.metric] if c.metric not in ("val_loss", "val_bpb") else []
    )
    header = ["run", "job", *c.differing]
    for m in metric_cols:
        header += [f"best {m}", f"final {m}"]
    header += ["tokens/s", "duration", "status"]
    rows = []
    for r in c.runs:
        row = [r.run_id[:8], r.job, *(r.params.get(k, "-") for k in c.differing)]
        for m in metric_cols:
            row += [_fmt(r.best.get(m)), _fmt(r.final.get(m))]
        row += [
            _fmt(r.tokens_per_sec, 0),
            f"{r.duration_s:.0f} s",
            r.status,
        ]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |" for row in rows
    ]
    return "\n".join(lines)


def _label(r: RunSummary, differing: Sequence[str]) -> str:
    parts = [f"{k.split('.')[-1]}={r.params[k]}" for k in differing if k in r.params]
    head = f"#{r.job}" if r.job != "-" else r.run_id[:8]
    return " ".join([head, *parts])[:60]


def plot_figure(c: Comparison) -> Any:
    """The validation-curve figure: one panel per key (val_loss, and the metric when it is
    another one), one line per run that logged the key, labelled by the run's differing params.

    The caller closes it (``matplotlib.pyplot.close``); ``write_plot`` saves and closes it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(["val_loss", c.metric]))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in c.runs:
            curve = r.curves.get(key)
            if curve:
                steps, values = zip(*curve)
                ax.plot(steps, values, marker="o", markersize=3, label=_label(r, c.differing))
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    what = f"sweep {c.sweep_id[:8]}" if c.sweep_id else "all runs"
    fig.suptitle(f"{c.experiment}: {what}")
    fig.tight_layout()
    return fig


def write_plot(c: Comparison, path: str | os.PathLike) -> Path:
    """``plot_figure`` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = plot_figure(c)
    out = Path(path)
    try:
        with atomic_path(out, suffix=".png") as tmp:  # savefig picks the format by the name
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out


def set_best_alias(
    c: Comparison, alias: str, model_name: str | None = None, tracking_uri: str | None = None
) -> tuple[str, str]:
    """Point ``alias`` at the registered model version made from the best run; (name, version)."""
    best = c.best_run
    if best is None:
        raise CompareError(f"no run has {c.metric}; there is no best run to alias")
    client, _ = _client(tracking_uri)
    versions = client.search_model_versions(f"run_id = '{best.run_id}'")
    if model_name:
        versions = [v for v in versions if v.name == model_name]
    if not versions:
        raise CompareError(
            f"the best run {best.run_id} has no registered model version"
            + (f" of {model_name!r}" if model_name else "")
            + "; train with tracking.register_as=NAME, or register runs:/RUN_ID/model first"
        )
    names = sorted({v.name for v in versions})
    if len(names) > 1:
        raise CompareError(
            f"the best run {best.run_id} is registered as {', '.join(names)}; pick one with --model"
        )
    version = max(versions, key=lambda v: int(v.version))
    client.set_registered_model_alias(version.name, alias, version.version)
    return version.name, str(version.version)
