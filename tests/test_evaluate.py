"""pocketgpt-evaluate: lm-eval runs our model offline on local WikiText files, its bits per byte
agrees with ours, and every task metric lands in the model's MLflow run."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from pocketgpt.config import SamplingConfig
from pocketgpt.evaluate.local_tasks import documents
from pocketgpt.sampling import generate
from tests.tiny_trained import corpus_text, shared_tiny_model

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may reach the Hub; lm-eval's and datasets' caches stay in the test's folder."""
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest so, above all on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


def test_the_test_split_cuts_into_articles_that_rejoin_to_it():
    text = corpus_text("test")
    docs = documents(text)
    assert "".join(docs) == text
    assert len(docs) > 10 and all(d.startswith(" = ") and not d.startswith(" = = ") for d in docs)


@pytest.mark.slow
def test_lm_eval_scores_our_model_like_its_own_requests_say(tiny):
    """loglikelihood and generate_until against the model computed by hand."""
    from lm_eval.api.instance import Instance

    from pocketgpt.evaluate.harness import PocketGPTLM

    _, model, tokenizer = tiny
    lm = PocketGPTLM(model, tokenizer, batch_size=2)
    pairs = [("The river rose in the", " spring"), ("", "Hello"), ("A long one " * 40, "end")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (ll, _) in zip(pairs, got):
        ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()) :] + cont  # lm-eval's space rule
        whole = tokenizer.encode(ctx + cont)
        n = len(whole) - len(tokenizer.encode(ctx))
        ids = ([tokenizer.eos_id] if not ctx else []) + whole
        ids = ids[-(model.config.max_len + 1) :]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)
        ref = sum(logp[len(ids) - 1 - n + j, ids[len(ids) - n + j]].item() for j in range(n))
        assert ll == pytest.approx(ref, abs=1e-4)
    kwargs = {"until": ["\n", " ,"], "max_gen_toks": 30}
    (text,) = lm.generate_until([Instance("generate_until", {}, (" = Robert", kwargs), 0)])
    prompt, eos = [tokenizer.encode(" = Robert")], tokenizer.eos_id
    new = generate(model, prompt, SamplingConfig(max_new_tokens=30), eos_id=eos)[0].tolist()
    full = tokenizer.decode(new[: new.index(eos)] if eos in new else new)
    cut = min([full.index(s) for s in kwargs["until"] if s in full], default=len(full))
    assert text == full[:cut]


@pytest.mark.slow
def test_lm_eval_bits_per_byte_agree_with_ours_and_are_logged_into_the_run(tiny, tmp_path):
    from mlflow.tracking import MlflowClient

    from pocketgpt.data import TokenizedSplit
    from pocketgpt.evaluate import evaluate
    from pocketgpt.evaluation import evaluate as own_evaluate

    folder, model, tokenizer = tiny
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    client.log_artifacts(run_id, str(folder), "model")
    client.set_terminated(run_id)

    limit = 5
    report = evaluate(f"runs:/{run_id}/model", ["wikitext2_local"], limit=limit, tracking_uri=store)
    got = report.metrics["wikitext2_local"]
    assert set(got) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert report.logged_to == run_id
    logged = client.get_run(run_id).data.metrics
    for metric, value in got.items():
        assert logged[f"lm_eval/wikitext2_local/{metric}"] == pytest.approx(value)

    # Ours: the same articles as one stream in windows of max_len (encoded line by line, as
    # training does). lm-eval: each article alone, its first token predicted from <eos>.
    text = "".join(documents(corpus_text("test"))[:limit])
    ids = [t for row in tokenizer.encode_batch(text.splitlines(keepends=True)) for t in row]
    split = TokenizedSplit(np.array(ids), len(text.encode("utf-8")))
    ours = own_evaluate(model, split, model.config.max_len, 16, torch.device("cpu"))
    assert got["bits_per_byte"] == pytest.approx(ours.bpb, rel=0.01)
    assert got["byte_perplexity"] == pytest.approx(2 ** got["bits_per_byte"])
    words = sum(len(re.split(r"\s+", d)) for d in documents(text))  # as lm-eval counts
    nats = got["bits_per_byte"] * math.log(2) * len(text.encode("utf-8"))
    assert got["word_perplexity"] == pytest.approx(math.exp(nats / words), rel=1e-3)


def _evaluate_cli(*args: str, cwd, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR",)}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pocketgpt.evaluate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_an_unknown_task_is_named_before_the_model_loads():
    from pocketgpt.errors import EvaluationError
    from pocketgpt.evaluate import evaluate

    with pytest.raises(EvaluationError, match=r"^unknown task 'wikitxt'; local tasks: wikitext2_l"):
        evaluate("no/such/model", ["wikitext2_local", "wikitxt"], log=False)


@pytest.mark.slow
def test_evaluate_command_without_lm_eval_says_how_to_install_it(tiny, tmp_path):
    shadow = tmp_path / "shadow"
    (shadow / "lm_eval").mkdir(parents=True)
    (shadow / "lm_eval" / "__init__.py").write_text('raise ImportError("No module named lm_eval")')
    r = _evaluate_cli(f"model_uri={tiny[0]}", cwd=tmp_path, pythonpath=str(shadow))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: lm-eval is not installed (No module named lm_eval); "
        "pip install 'pocketgpt[eval]' (or lm-eval)"
    ]
