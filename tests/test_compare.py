"""`pocketgpt-compare` on a real store that a real 3-job sweep wrote."""

from __future__ import annotations

import stat
import time

import pytest
from mlflow.tracking import MlflowClient

from pocketgpt.atomic import default_file_mode
from pocketgpt.cli import compare as compare_cli
from pocketgpt.config import TrackingConfig
from pocketgpt.tracking.compare import compare, plot_figure
from pocketgpt.tracking.run import Tracker

from .conftest import run_multirun, sweep_overrides

pytestmark = pytest.mark.slow

EXPERIMENT = "sweeps"


@pytest.fixture(scope="module")
def swept(tmp_path_factory, shared_cache):
    """A store with one sweep of 3 jobs (lr 1e-3, 3e-3 and 1e30, which fails) and one lone run."""
    root = tmp_path_factory.mktemp("compare")
    proc = run_multirun(*sweep_overrides(), "optim.lr=1e-3,3e-3,1e30", cwd=root, cache=shared_cache)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the 1e30 job fails, as intended
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    lone = Tracker(TrackingConfig(uri=uri, experiment_name=EXPERIMENT))
    lone.start(run_name="lone")
    lone.log_params({"optim.lr": "0.5"})
    lone.log_metrics({"val_loss": 9.0, "val_bpb": 9.5}, 1)
    lone.end("FINISHED")
    return root, uri, lone.run_id


def main(argv: list[str]) -> int:
    """The command's exit status: what main returns, or what a one-line error exits with."""
    try:
        return compare_cli.main(argv)
    except SystemExit as e:
        return e.code


def _rows(out: str) -> list[list[str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    return [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines]


def test_table_lists_the_sweep_sorted_by_the_metric(swept, capsys, tmp_path):
    root, uri, lone_id = swept
    code = main([EXPERIMENT, "--sweep", "latest", "--tracking-uri", uri, "--no-plot"])
    out = capsys.readouterr().out
    assert code == 0, out
    header, *rows = _rows(out)
    assert header[:3] == ["run", "job", "optim.lr"]  # the only param the sweep varied
    assert "model.d_model" not in header
    for column in ("best val_loss", "final val_loss", "best val_bpb", "final val_bpb"):
        assert column in header
    assert header[-3:] == ["tokens/s", "duration", "status"]
    assert len(rows) == 3 and lone_id[:8] not in out  # only this sweep's jobs
    lr = header.index("optim.lr")
    bpb = header.index("best val_bpb")
    assert [r[lr] for r in rows] == ["0.003", "0.001", "1e+30"]  # 3e-3 learns faster in 2 steps
    assert float(rows[0][bpb]) < float(rows[1][bpb])
    assert [r[-1] for r in rows] == ["FINISHED", "FINISHED", "FAILED"]
    # The failed run's only evaluation is the untrained model's, at step 0: above both others.
    assert float(rows[2][bpb]) > float(rows[1][bpb])
    assert "failed: " in out and "NonFiniteLossError" in out
    assert "best: " in out

    # Without --sweep: every run of the experiment, the lone one included; sorted by val_loss.
    c = compare(EXPERIMENT, metric="val_loss", tracking_uri=uri)
    assert len(c.runs) == 4 and c.runs[-2].run_id == lone_id and c.runs[-1].status == "FAILED"


def test_plot_shows_the_validation_curves(swept, capsys, tmp_path):
    _, uri, _ = swept
    png = tmp_path / "curves.png"
    assert main([EXPERIMENT, "--sweep", "latest", "--tracking-uri", uri, "--plot", str(png)]) == 0
    assert f"plot: {png}" in capsys.readouterr().out
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert list(tmp_path.iterdir()) == [png]  # written atomically: no temp file left
    assert stat.S_IMODE(png.stat().st_mode) == default_file_mode()  # not mkstemp's 0600


def test_plot_has_one_labelled_curve_per_run_and_key(swept):
    import matplotlib.pyplot as plt

    _, uri, _ = swept
    c = compare(EXPERIMENT, sweep="latest", tracking_uri=uri)
    fig = plot_figure(c)
    try:
        axes = fig.axes
        assert [ax.get_title() for ax in axes] == ["val_loss", "val_bpb"]
        assert fig.texts[0].get_text().startswith(f"{EXPERIMENT}: sweep {c.sweep_id[:8]}")
        for ax in axes:
            key = ax.get_title()
            runs = [r for r in c.runs if key in r.curves]
            lines = ax.get_lines()
            # all three jobs evaluated at least once (the failed one at step 0)
            assert len(runs) == len(lines) == 3
            labels = [line.get_label() for line in lines]
            assert labels == [f"#{r.job} lr={r.params['optim.lr']}" for r in runs]
            for line, r in zip(lines, runs):
                steps, values = zip(*r.curves[key])
                assert list(line.get_xdata()) == list(steps)
                assert list(line.get_ydata()) == pytest.approx(list(values))
        legend = axes[0].get_legend()
        assert sorted(t.get_text() for t in legend.get_texts()) == sorted(labels)
        lrs = sorted(label.split("lr=")[1] for label in labels)
        assert lrs == ["0.001", "0.003", "1e+30"]
    finally:
        plt.close(fig)


def test_alias_goes_to_the_best_runs_model_version(swept, capsys):
    _, uri, _ = swept
    c = compare(EXPERIMENT, sweep="latest", tracking_uri=uri)
    best = c.best_run.run_id

    alias = [EXPERIMENT, "--sweep", "latest", "--tracking-uri", uri, "--no-plot"]
    alias += ["--alias", "champion"]
    assert main(alias) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the best run {best} has no registered model version")
    assert len(err.strip().splitlines()) == 1

    client = MlflowClient(uri)
    client.create_registered_model("tiny")
    client.create_model_version("tiny", source=f"runs:/{best}/model", run_id=best)
    assert main(alias) == 0
    assert "alias: models:/tiny@champion -> version 1" in capsys.readouterr().out
    assert client.get_model_version_by_alias("tiny", "champion").run_id == best


@pytest.mark.parametrize(
    "args,needle",
    [
        (["nope"], "error: no MLflow experiment 'nope' in sqlite:"),
        ([EXPERIMENT, "--sweep", "2099-01-01/00-00-00"], "error: no sweep matches --sweep"),
        ([EXPERIMENT, "--metric", "val_acc"], "error: no run logged the metric 'val_acc'"),
    ],
)
def test_bad_input_is_one_line(swept, capsys, args, needle):
    _, uri, _ = swept
    assert main([*args, "--tracking-uri", uri, "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(needle) and len(err.strip().splitlines()) == 1


def test_default_store_is_mlruns_in_the_current_folder(swept, capsys, monkeypatch):
    root, _, _ = swept
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([EXPERIMENT, "--sweep", "latest"]) == 0
    assert "3 runs, sorted by val_bpb" in capsys.readouterr().out
    assert list(root.glob("compare-sweeps-*.png"))

    monkeypatch.chdir(root / "multirun")  # no store here: an error, and no empty store created
    assert main([EXPERIMENT]) == 2
    assert capsys.readouterr().err.startswith("error: no MLflow store at ")
    assert not (root / "multirun" / "mlruns").exists()


def test_an_unreachable_server_fails_fast(capsys):
    """Nothing listens on port 9: one error line at once, not MLflow's minutes of retries."""
    server = "http://127.0.0.1:9"
    start = time.monotonic()
    assert main([EXPERIMENT, "--tracking-uri", server, "--no-plot"]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert err.startswith(f"error: the MLflow tracking server at {server} does not answer")
    assert len(err.strip().splitlines()) == 1
