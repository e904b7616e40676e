"""``pocketgpt-train +rerun=RUN_ID``: a logged run again from its MLflow record alone, bit for
bit on the CPU; what changed in the environment named; bad input one line, exit 2, no run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pocketgpt.tracking.environment import parse_requirements, pip_freeze
from pocketgpt.tracking.rerun import (
    DIFFERENCES_TAG,
    RERUN_TAG,
    SourceRun,
    environment_differences,
    split_rerun_arg,
)

from .conftest import TINY, compose

EXPERIMENT = "rerun"
SOURCE_ARGS = [
    *TINY,
    "trainer.threads=1",  # the same threads in both runs, whatever the machine has
    "tracking.log_model=false",
    "tracking.system_metrics=false",
    f"tracking.experiment_name={EXPERIMENT}",
]


def _not_timing(key: str) -> bool:
    """Metrics that are functions of the config and seed (not of the clock or the machine)."""
    return not key.startswith(("time_", "system/")) and key != "tokens_per_sec"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rerun")
    (root / "store").mkdir()
    return root


def _cli(root: Path, folder: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m pocketgpt.train ARGS`` in ``root/folder``, tracking to ``root/store``."""
    cwd = root / folder
    cwd.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": _uri(root),
        "POCKETGPT_CACHE_DIR": str(root / "cache"),
    }
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "pocketgpt.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _uri(root: Path) -> str:
    return f"sqlite:///{root / 'store' / 'mlflow.db'}"


def _history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in sorted(run.data.metrics)
        if _not_timing(key)
    }


def _newest_run(client):
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


@pytest.fixture(scope="module")
def source(root) -> str:
    """A tiny run, trained in its own folder (the reruns run elsewhere)."""
    proc = _cli(root, "source", *SOURCE_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _newest_run(MlflowClient(_uri(root))).info.run_id


@pytest.fixture(scope="module")
def rerun(root, source) -> tuple[subprocess.CompletedProcess, str]:
    proc = _cli(root, "rerun", f"+rerun={source}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, _newest_run(MlflowClient(_uri(root))).info.run_id


@pytest.mark.slow
def test_rerun_logs_the_same_metrics_bit_for_bit(root, source, rerun):
    proc, rerun_id = rerun
    client = MlflowClient(_uri(root))
    assert rerun_id != source
    first, again = client.get_run(source), client.get_run(rerun_id)
    assert again.data.tags[RERUN_TAG] == source
    assert again.info.run_name == f"{first.info.run_name}-rerun"
    assert again.info.status == "FINISHED"

    expected = _history(client, source)
    assert {"train_loss", "val_loss", "lr", "grad_norm", "test_loss"} <= set(expected)
    assert _history(client, rerun_id) == expected  # every key, step and value, exactly

    # The same config (its run name aside), so the same numbers; and the same environment,
    # so nothing to report.
    params = {k: v for k, v in again.data.params.items() if k != "tracking.run_name"}
    assert params == {k: v for k, v in first.data.params.items() if k != "tracking.run_name"}
    assert "rerun of" not in proc.stdout + proc.stderr
    assert DIFFERENCES_TAG not in again.data.tags


@pytest.mark.slow
def test_a_run_records_its_environment(root, source):
    client = MlflowClient(_uri(root))
    run = client.get_run(source)
    tags, params = run.data.tags, run.data.params
    assert tags["env.torch"] == torch.__version__
    assert tags["env.python"] == ".".join(map(str, sys.version_info[:3]))
    assert tags["env.device"] == "cpu" and tags["env.torch_threads"] == "1"
    for key in ("env.mlflow", "env.hydra", "env.datasets", "env.tokenizers", "env.cpu_count"):
        assert tags[key] and tags[key] != "not installed", key
    assert len(params["derived.corpus_fingerprint"]) == 64
    assert len(params["derived.tokenizer_fingerprint"]) == 64
    path = client.download_artifacts(source, "environment/requirements.txt", str(root))
    logged = parse_requirements(Path(path).read_text())
    assert logged["torch"] == torch.__version__ and logged == parse_requirements(pip_freeze())


@pytest.mark.slow
def test_rerun_of_a_rerun_applies_overrides_and_names_a_changed_environment(root, rerun):
    _, rerun_id = rerun
    client = MlflowClient(_uri(root))
    client.set_tag(rerun_id, "env.torch", "0.0.1-old")  # as if it ran on another torch

    proc = _cli(
        root, "again", f"+rerun={rerun_id}", "trainer.max_steps=2", "trainer.eval_interval=2"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    warning = f"rerun of {rerun_id}: env.torch: 0.0.1-old then, {torch.__version__} now"
    assert warning in output
    assert sum("rerun of" in line for line in output.splitlines()) == 1  # only what differs

    run = _newest_run(client)
    assert run.data.tags[RERUN_TAG] == rerun_id
    assert "env.torch: 0.0.1-old then" in run.data.tags[DIFFERENCES_TAG]
    assert run.data.params["trainer.max_steps"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2]


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A store with runs pocketgpt-train did not make: one without a config.yaml, one whose
    config.yaml has a key this pocketgpt does not know (as from an older version)."""
    root = tmp_path_factory.mktemp("handmade")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("by-hand", artifact_location=(root / "artifacts").as_uri())
    runs = {}
    runs["no_config"] = client.create_run(exp).info.run_id
    client.set_terminated(runs["no_config"])

    config = OmegaConf.to_container(compose("train", *TINY), resolve=True, enum_to_str=True)
    config["model"]["d_modle"] = 64  # a key this pocketgpt does not have
    (root / "config.yaml").write_text(OmegaConf.to_yaml(config))
    runs["stale"] = client.create_run(exp).info.run_id
    client.log_artifact(runs["stale"], str(root / "config.yaml"))
    client.set_terminated(runs["stale"])
    return uri, runs


def _store_contents(uri: str) -> tuple[list[str], list[str]]:
    client = MlflowClient(uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    return sorted(e.name for e in experiments), sorted(r.info.run_id for r in runs)


def _main(monkeypatch, capsys, *args: str) -> str:
    """The real entry point, in-process (bad input fails before Hydra starts): its stderr."""
    from pocketgpt.cli.train import main

    monkeypatch.setattr(sys, "argv", ["pocketgpt-train", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize(
    "run,needle",
    [
        ("0123456789abcdef0123456789abcdef", "has no such run"),
        ("no_config", "logged no config.yaml (it was not made by pocketgpt-train)"),
        ("stale", "no longer composes with this pocketgpt's settings (Key 'd_modle' not in"),
    ],
)
def test_rerun_bad_run_is_one_line_and_records_nothing(
    handmade, monkeypatch, capsys, tmp_path, run, needle
):
    uri, runs = handmade
    run_id = runs.get(run, run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    before = _store_contents(uri)
    err = _main(monkeypatch, capsys, f"+rerun={run_id}", *TINY)
    assert f"+rerun={run_id}" in err and needle in err
    assert _store_contents(uri) == before
    assert not list(tmp_path.iterdir())  # no Hydra output folder either


def test_rerun_against_a_store_without_the_run_is_one_line(handmade, monkeypatch, capsys, tmp_path):
    _, runs = handmade
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "elsewhere" / "mlflow.db"
    # tracking.uri names the store; then the default ./mlruns, which does not exist here.
    for args in ([f"tracking.uri=sqlite:///{missing}"], []):
        err = _main(monkeypatch, capsys, f"+rerun={runs['stale']}", *args)
        assert "no MLflow store at" in err and "+rerun reads the run from" in err
    assert not list(tmp_path.iterdir())  # no store created, no output folder


def test_rerun_arguments():
    assert split_rerun_arg(["a=1", "+rerun=abc", "b=2"]) == ("abc", ["a=1", "b=2"])
    assert split_rerun_arg(["a=1"]) == (None, ["a=1"])
    assert split_rerun_arg(["+rerun='1e5'"]) == ("1e5", [])
    for bad in (["+rerun="], ["+rerun=a", "+rerun=b"]):
        with pytest.raises(ValueError, match=r"\+rerun needs one run id"):
            split_rerun_arg(bad)


def test_environment_differences_name_each_change():
    # What is installed now, but PyYAML older, torch older and a package since removed.
    then = {**parse_requirements(pip_freeze()), "pyyaml": "1.0", "torch": "1.0", "old-thing": "3"}
    then_packages = "".join(f"{name}=={version}\n" for name, version in then.items())
    source = SourceRun(
        run_id="r",
        name="n",
        uri="u",
        tags={"env.torch": "2.0", "env.device": "cpu"},
        params={"derived.corpus_fingerprint": "a" * 64},
        config={},
        requirements=then_packages,
    )
    now = {"env.torch": "2.1", "env.device": "cpu", "env.cpu": "x"}
    lines = environment_differences(source, now, {"derived.corpus_fingerprint": "b" * 64})
    assert "env.torch: 2.0 then, 2.1 now" in lines
    assert "env.cpu: not recorded by the source run, x now" in lines
    assert not [line for line in lines if line.startswith("env.device")]
    assert any(line.startswith("derived.corpus_fingerprint: aaaaaaaaaaaa then") for line in lines)
    (packages,) = [line for line in lines if line.startswith("environment/requirements.txt")]
    assert packages.startswith("environment/requirements.txt: 2 packages differ: ")
    assert "old-thing 3 -> (absent)" in packages and "pyyaml 1.0 -> " in packages
    assert "torch" not in packages  # named by its env.* tag

    bare = SourceRun("r", "n", "u", {}, {}, {}, None)
    (line,) = environment_differences(bare, now, {})
    assert "recorded no environment" in line
