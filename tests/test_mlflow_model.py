"""The logged MLflow model of a real (tiny) training run: linked to its run, registered, loadable
from every URI form, through ``mlflow.pyfunc`` and ``mlflow models serve``, never unpickled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pocketgpt.config import register_configs
from pocketgpt.errors import ModelURIError
from pocketgpt.loading import load
from pocketgpt.model_io import ModelFileError, model_files
from pocketgpt.sampling import SamplingConfig, generate_text
from pocketgpt.tracking.registry import resolve
from pocketgpt.train import train

from .conftest import TINY, compose

pytestmark = pytest.mark.slow
PROMPTS = ["The meaning of life is", "Once upon a time"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny runs in one SQLite store; the second registers as tiny@best. -> dict of facts."""
    import gzip

    from pocketgpt.data import embedded_corpus_dir

    tmp = tmp_path_factory.mktemp("mlflow_model")
    with gzip.open(embedded_corpus_dir() / "train.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    splits = {"train": (0, 300), "validation": (300, 330), "test": (330, 345)}  # small: fast evals
    for name, (a, b) in splits.items():
        (tmp / f"{name}.txt").write_text("".join(lines[a:b]), encoding="utf-8")
    store = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    (tmp / "mlruns").mkdir()
    register_configs()
    common = [
        *TINY,
        "data=files",
        *(f"data.{s}={tmp / f'{s}.txt'}" for s in splits),
        f"tracking.uri={store}",
        f"cache_dir={tmp / 'cache'}",
    ]
    train(compose("train", *common, "tracking.run_name=first", "trainer.max_steps=2"))
    train(compose("train", *common, "tracking.run_name=second", "tracking.register_as=tiny@best"))
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("pocketgpt")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    second = runs["second"]
    model_id = second.outputs.model_outputs[0].model_id
    return {"tmp": tmp, "store": store, "client": client, "run": second, "model_id": model_id}


def test_logged_model_is_linked_to_its_run_and_never_pickled(trained):
    client, run, model_id = trained["client"], trained["run"], trained["model_id"]
    logged = client.get_logged_model(model_id)
    assert logged.name == "model" and logged.source_run_id == run.info.run_id
    assert str(logged.status).endswith("READY")
    assert logged.params["model.d_model"] == "32"
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["val_bpb"] == pytest.approx(run.data.metrics["val_bpb"])
    assert "test_loss" in linked
    # Linking the metrics to the model adds no points to the run's own history.
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == [2, 4, 6]

    import mlflow.artifacts

    folder = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=logged.artifact_location, dst_path=str(trained["tmp"] / "dl")
        )
    )
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {
        "MLmodel",
        "pyfunc_entry.py",
        "artifacts/model.safetensors",
        "artifacts/model_config.json",
        "artifacts/tokenizer.json",
        "code/pocketgpt/tracking/pyfunc.py",
        "requirements.txt",
        "serving_input_example.json",
    } <= names
    assert not [n for n in names if n.endswith((".pkl", ".pt", ".pth", ".bin"))]
    assert not [n for n in names if "corpus" in n]
    mlmodel = (folder / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel
    assert f"model_id: {model_id}" in mlmodel and f"run_id: {run.info.run_id}" in mlmodel


def test_registered_version_and_alias(trained):
    client = trained["client"]
    version = client.get_model_version_by_alias("tiny", "best")
    assert str(version.version) == "1"
    assert version.run_id == trained["run"].info.run_id
    assert version.source == f"models:/{trained['model_id']}"  # linked to the logged model


def test_every_uri_form_loads_the_same_model(trained):
    run_id, model_id, store = trained["run"].info.run_id, trained["model_id"], trained["store"]
    reference, tok = load(f"models:/{model_id}", tracking_uri=store)
    cfg = SamplingConfig(max_new_tokens=8)
    expected = generate_text(reference, tok, PROMPTS, cfg)
    local = trained["tmp"] / "local_copy"
    shutil.copytree(resolve(f"runs:/{run_id}/model", trained["tmp"] / "dl_run", store), local)
    for uri in [
        f"runs:/{run_id}/model",
        "models:/tiny/1",
        "models:/tiny@best",
        model_id,
        "best:pocketgpt",
        str(local),
    ]:
        model, tokenizer = load(uri, "cpu", tracking_uri=store)
        assert torch.equal(model.tok_emb.weight, reference.tok_emb.weight), uri
        assert generate_text(model, tokenizer, PROMPTS, cfg) == expected, uri


def test_best_picks_by_metric_and_mode(trained, monkeypatch):
    from pocketgpt.tracking.registry import best_model_uri

    client, store = trained["client"], trained["store"]
    runs = client.search_runs([trained["run"].info.experiment_id])
    by_bpb = sorted(runs, key=lambda r: r.data.metrics["val_bpb"])
    uri, run_id, value = best_model_uri("pocketgpt", "val_bpb", "min", store)
    assert run_id == by_bpb[0].info.run_id and value == by_bpb[0].data.metrics["val_bpb"]
    assert best_model_uri("pocketgpt", "val_bpb", "max", store)[1] == by_bpb[-1].info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert load("best:pocketgpt", metric="val_loss").model.config.vocab_size == 300


def test_bad_uris_and_missing_artifacts_are_one_line_errors(trained):
    store, run_id = trained["store"], trained["run"].info.run_id
    cases = [
        ("models:/tiny/99", "cannot load 'models:/tiny/99'"),
        ("models:/tiny@nope", "cannot load 'models:/tiny@nope'"),
        ("models:/nosuchmodel/1", "cannot load 'models:/nosuchmodel/1'"),
        (f"runs:/{run_id}/nothing", "cannot load"),
        ("runs:/0123456789abcdef/model", "cannot load"),
        ("m-00000000000000000000000000000000", "cannot load 'models:/m-0000"),
        ("best:no_such_experiment", "experiment 'no_such_experiment' not found"),
    ]
    for uri, text in cases:
        with pytest.raises(ModelURIError) as e:
            load(uri, tracking_uri=store)
        assert text in str(e.value), (uri, str(e.value))
        assert "\n" not in str(e.value), uri
    with pytest.raises(ModelURIError, match="no finished run .* metric 'nope'"):
        load("best:pocketgpt", tracking_uri=store, metric="nope")

    broken = trained["tmp"] / "broken"
    shutil.copytree(resolve("models:/tiny/1", trained["tmp"] / "dl_broken", store), broken)
    (broken / "artifacts" / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError, match="tokenizer.json is missing from the logged model"):
        model_files(broken)
    mlmodel = (broken / "MLmodel").read_text()
    (broken / "MLmodel").write_text(mlmodel.replace("artifacts/tokenizer.json", "../../x.json"))
    with pytest.raises(ModelFileError, match="outside the model folder"):
        load(broken)
    (broken / "MLmodel").write_text("flavors: {}\n")
    with pytest.raises(ModelFileError, match="is not a pocketgpt model"):
        load(broken)


def test_pyfunc_predict(trained):
    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(trained["store"])
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/tiny@best")
    finally:
        mlflow.set_tracking_uri(None)
    model, tok = load("models:/tiny@best", tracking_uri=trained["store"])
    greedy = generate_text(model, tok, PROMPTS, SamplingConfig(max_new_tokens=40))
    assert pyfunc.predict(PROMPTS) == greedy  # default params: max_new_tokens=40, greedy
    frame = pd.DataFrame({"prompt": PROMPTS})
    params = {"max_new_tokens": 6, "temperature": 0.9, "top_p": 0.95, "seed": 11}
    sampled = pyfunc.predict(frame, params=params)
    assert len(sampled) == 2 and all(isinstance(t, str) for t in sampled)
    assert pyfunc.predict(frame, params=params) == sampled  # seeded: reproducible
    expected = generate_text(model, tok, PROMPTS, SamplingConfig(**params))
    assert sampled == expected


def test_pyfunc_engine_params(trained):
    """engine/quantize/kernels are per-request params (serving too); default auto = native."""
    import mlflow.pyfunc

    from pocketgpt.errors import ConfigError
    from pocketgpt.native import extension_error

    mlflow.set_tracking_uri(trained["store"])
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/tiny@best")
    finally:
        mlflow.set_tracking_uri(None)
    params = pyfunc.metadata.get_params_schema().to_dict()
    assert {p["name"]: p["default"] for p in params}["engine"] == "auto"
    torch_text = pyfunc.predict(PROMPTS, params={"engine": "torch", "max_new_tokens": 8})
    if extension_error() is None:
        native = pyfunc.predict(PROMPTS, params={"engine": "native", "max_new_tokens": 8})
        assert native == torch_text  # greedy: the same text
        int8 = pyfunc.predict(PROMPTS, params={"engine": "native", "quantize": "int8"})
        assert len(int8) == 2 and all(isinstance(t, str) for t in int8)
    with pytest.raises(ConfigError, match="quantize=int8 needs the native engine"):
        pyfunc.predict(PROMPTS, params={"engine": "torch", "quantize": "int8"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_mlflow_models_serve_answers_invocations(trained, tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["store"]}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = (tmp_path / "serve.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny@best"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    server = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)

        params = {"max_new_tokens": 5, "temperature": 0.0}
        out = _post(f"{base}/invocations", {"inputs": PROMPTS, "params": params})
        model, tok = load("models:/tiny@best", tracking_uri=trained["store"])
        expected = generate_text(model, tok, PROMPTS, SamplingConfig(max_new_tokens=5))
        assert out == {"predictions": expected}
        records = [{"prompt": p} for p in PROMPTS]
        out = _post(f"{base}/invocations", {"dataframe_records": records, "params": params})
        assert out == {"predictions": expected}
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_generate_command_config_and_best_run(trained, capsys):
    from omegaconf import OmegaConf

    from pocketgpt.cli.generate import run
    from pocketgpt.config import GenerateConfig, register_configs

    register_configs()
    dcfg = compose(
        "generate", "model_uri=best:pocketgpt", f"tracking_uri={trained['store']}", "stream=true"
    )
    cfg: GenerateConfig = OmegaConf.to_object(dcfg)
    assert cfg.max_new_tokens == 40 and cfg.metric == "val_bpb" and cfg.threads == 1
    cfg.max_new_tokens, cfg.threads = 7, None  # leave this test process's threads alone
    texts = run(cfg)
    out, err = capsys.readouterr()
    assert out == cfg.prompt + texts[0] + "\n"
    assert "best run by val_bpb (min)" in err and "tokens/s" in err
