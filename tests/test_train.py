"""The whole slice on a tiny config: compose, train a few steps, check the MLflow run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pocketgpt.train import train

from .conftest import TINY

pytestmark = pytest.mark.slow  # every test here trains or spawns the command


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def _only_run(uri, experiment="pocketgpt"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_train_logs_a_complete_run(compose_cfg, tmp_path, store):
    (tmp_path / "mlruns").mkdir()
    cfg = compose_cfg(
        *TINY,
        f"tracking.uri={store}",
        f"cache_dir={tmp_path / 'cache'}",
        "tracking.system_metrics_interval=0.1",
    )
    val_loss = train(cfg)

    client, run = _only_run(store)
    assert run.info.status == "FINISHED"
    _check_mlflow_conventions(client, run, tmp_path / "cache")
    params = run.data.params
    assert params["model.d_model"] == "32"
    assert params["tokenizer.kind"] == "bpe"
    assert params["optim.lr"] == "0.003"
    assert params["derived.vocab_size"] == "300"
    metrics = run.data.metrics
    assert metrics["val_loss"] == pytest.approx(val_loss)
    for key in (
        "train_loss",
        "lr",
        "tokens_per_sec",
        "grad_norm",
        "val_ppl",
        "val_bpb",
        "test_loss",
        "test_bpb",
        "best_val_loss",
    ):
        assert key in metrics, key
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [2, 4, 6]
    # Step 0: the untrained model, before any update (trainer.eval_at_start).
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in val] == [0, 3, 6]
    assert val[0].value == pytest.approx(math.log(300), abs=0.1)  # ln(vocab): uniform guesses
    assert run.data.tags["pocketgpt.version"]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "sample.txt", "sample_greedy.txt", "tokenizer"} <= artifacts
    # The final model is an MLflow LoggedModel linked to the run (tests/test_mlflow_model.py).
    (output,) = run.outputs.model_outputs
    model_files = {a.path for a in client.list_logged_model_artifacts(output.model_id, "artifacts")}
    assert {"artifacts/model.safetensors", "artifacts/model_config.json"} <= model_files
    # The artifacts live beside the SQLite database, not in a cwd-relative folder.
    assert (tmp_path / "mlruns" / "artifacts").is_dir()


def _check_mlflow_conventions(client, run, cache_dir):
    """What the MLflow UI reads: experiment kind, dataset inputs, source, system metrics."""
    from pocketgpt.config import DataConfig
    from pocketgpt.data import embedded_corpus_dir, load_corpus

    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "pocketgpt.train"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert len(tags["mlflow.source.git.commit"]) == 40  # the tests run in the git checkout
    inputs = {
        {t.key: t.value for t in d.tags}["mlflow.data.context"]: d.dataset
        for d in run.inputs.dataset_inputs
    }
    assert sorted(inputs) == ["test", "train", "validation"]
    fingerprint = load_corpus(DataConfig(), cache_dir).fingerprint
    assert {d.digest for d in inputs.values()} == {fingerprint[:16]}
    train_ds = inputs["train"]
    assert train_ds.name == "wikitext2_mini/train"
    assert json.loads(train_ds.source)["uri"] == str(embedded_corpus_dir() / "train.txt.gz")
    profile = json.loads(train_ds.profile)
    assert profile["tokens"] == int(run.data.params["derived.train_tokens"])
    assert profile["bytes"] > profile["lines"] > 0
    assert train_ds.source_type == "local"
    # MLflow's system metrics sampler ran while the run was live (interval 0.1 s).
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_training_lowers_the_loss(compose_cfg, tmp_path, store):
    cfg = compose_cfg(
        *TINY,
        f"tracking.uri={store}",
        f"cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=40",
        "trainer.eval_interval=40",
        "optim.lr=3e-3",
        "trainer.batch_size=8",
        "tracking.log_model=false",
    )
    train(cfg)
    client, run = _only_run(store)
    val = client.get_metric_history(run.info.run_id, "val_loss")
    train_loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert train_loss[-1].value < train_loss[0].value - 0.5
    assert val[0].step == 0 and val[-1].step == 40
    assert val[-1].value < val[0].value - 0.2 and val[-1].value < 5.5  # ln(300) = 5.70


def _run_cli(*args, cwd, env_extra=None):
    env = {**os.environ, "POCKETGPT_CACHE_DIR": str(cwd / "cache"), **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "pocketgpt.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_uses_local_store_and_logs_hydra_folder(tmp_path):
    proc = _run_cli(
        *TINY,
        "trainer.max_steps=2",
        "trainer.eval_interval=2",
        "trainer.eval_at_start=false",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MLflow:" in proc.stdout and "sample:" in proc.stdout
    assert "step 0:" not in proc.stdout + proc.stderr
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client, run = _only_run(uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [2]
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, ".hydra")}
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"} <= hydra_files
    assert "trainer.max_steps=2" in run.data.tags["hydra.overrides"]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.n_heads=3", "model.d_model=128 is not divisible by model.n_heads=3"),
        ("model.d_modle=3", "Key 'd_modle' not in 'ModelConfig'"),
    ],
)
def test_cli_bad_config_exits_nonzero_with_one_line(tmp_path, override, needle):
    proc = _run_cli(override, cwd=tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # nothing started, nothing written


def test_cfg_job_prints_resolved_config(tmp_path):
    proc = _run_cli("--cfg", "job", "model.d_model=64", cwd=tmp_path)
    assert proc.returncode == 0
    assert "d_model: 64" in proc.stdout
