"""pocketgpt-export: the transformers and ONNX folders give our logits, tokens and token ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pocketgpt.config import ModelConfig, SamplingConfig
from pocketgpt.errors import ExportError
from pocketgpt.export import export
from pocketgpt.export.variants import check_exportable, unsupported_setting
from pocketgpt.model import GPTMini
from pocketgpt.sampling import generate, generate_rows
from tests.tiny_trained import corpus_text, shared_tiny_model

TEXTS = [
    "The river rose in the spring of 1843 , flooding the town .",
    " = = History = = \n",
    "Ünïcödé, 日本語 and emoji 🙂 too — plus   spaces\tand tabs\n\n",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


def real_batch(tokenizer, rows: int, length: int) -> torch.Tensor:
    """(rows, length) ids of consecutive stretches of the test split."""
    ids = tokenizer.encode(corpus_text("test")[:20000])
    return torch.tensor([ids[i * length : (i + 1) * length] for i in range(rows)])


LLAMA = {"position": "rope", "norm": "rmsnorm", "activation": "swiglu"}


def test_the_variant_check_reads_the_config_dict():
    for fmt in ("hf", "onnx"):
        assert unsupported_setting({"d_model": 64, "bias": False}, fmt) is None
        defaults = {"position": "learned", "norm": "layernorm", "activation": "gelu"}
        assert (
            unsupported_setting({**defaults, "qk_norm": False, "logit_softcap": None}, fmt) is None
        )
        assert unsupported_setting({"zero_init_proj": True, "tie_embeddings": False}, fmt) is None
        assert unsupported_setting({"qk_norm": True}, fmt) == "qk_norm=true"
        assert unsupported_setting({"logit_softcap": 30.0}, fmt) == "logit_softcap=30.0"
        assert unsupported_setting({"moe_experts": 4}, fmt) == "moe_experts=4"  # unknown: refused
    assert unsupported_setting({"position": "rope", "norm": "rmsnorm"}, "onnx") == "position=rope"
    assert unsupported_setting({"activation": "swiglu"}, "onnx") == "activation=swiglu"
    assert unsupported_setting(LLAMA, "onnx") == "position=rope"
    with pytest.raises(ExportError, match=r"^cannot export this variant to onnx: norm=rmsnorm;"):
        check_exportable({"norm": "rmsnorm"}, "onnx")

    # hf: GPT-2's layout or Llama's; a mix names a key of the nearer one
    assert check_exportable({"d_model": 64}, "hf") == "gpt2"
    assert check_exportable({**LLAMA, "bias": True, "tie_embeddings": False}, "hf") == "llama"
    assert check_exportable({**LLAMA, "rope_base": 5e5, "qk_norm": False}, "hf") == "llama"
    assert unsupported_setting({"position": "rope"}, "hf") == "position=rope"  # rope + LayerNorm
    assert unsupported_setting({"position": "rope", "norm": "rmsnorm"}, "hf") == "activation=gelu"
    assert unsupported_setting({**LLAMA, "activation": "relu2"}, "hf") == "activation=relu2"
    assert unsupported_setting({**LLAMA, "position": "alibi"}, "hf") == "position=alibi"
    assert unsupported_setting({**LLAMA, "qk_norm": True}, "hf") == "qk_norm=true"
    assert unsupported_setting({**LLAMA, "logit_softcap": 15.0}, "hf") == "logit_softcap=15.0"
    assert unsupported_setting({**LLAMA, "moe_experts": 4}, "hf") == "moe_experts=4"
    with pytest.raises(ExportError, match=r"^cannot export this variant to hf: norm=layernorm;"):
        check_exportable({**LLAMA, "norm": "layernorm"}, "hf")
    with pytest.raises(ExportError, match=r"^format='gguf' is unknown"):
        check_exportable({}, "gguf")


@pytest.mark.slow
def test_hf_export_matches_our_logits_greedy_tokens_and_token_ids(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model, tokenizer = tiny
    out = export(str(folder), "hf", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "GPT2LMHeadModel"

    x = real_batch(tokenizer, 4, model.config.max_len)  # (4, 96)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    # greedy, 50 tokens, two prompts of different lengths in one left-padded batch
    prompts = ["The river rose in the spring of", " = Robert Boulter = \n"]
    ours_rows = generate_rows(model, tokenizer, prompts, SamplingConfig(max_new_tokens=50))
    enc = hf_tok(prompts, return_tensors="pt", padding=True)
    assert hf_tok.padding_side == "left"
    gen = hf.generate(**enc, max_new_tokens=50, do_sample=False)[:, enc["input_ids"].shape[1] :]
    for ours_row, row in zip(ours_rows, gen.tolist()):
        row = row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
        assert row == ours_row and len(row) == 50

    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
        assert hf_tok.decode(tokenizer.encode(text)) == text
    names = tokenizer.special_tokens
    assert hf_tok.bos_token == names[tokenizer.bos_id] and hf_tok.eos_token_id == tokenizer.eos_id
    assert hf_tok.pad_token_id == tokenizer.pad_id and hf_tok.unk_token_id == tokenizer.unk_id


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape", [{"bias": False}, {"tie_embeddings": False}], ids=["no-bias", "untied-head"]
)
def test_a_model_without_biases_or_with_its_own_head_exports_alike(tmp_path, shape):
    from transformers import AutoModelForCausalLM

    from pocketgpt.export.hf import write_hf
    from pocketgpt.tokenizer import BPETokenizer

    tokenizer = BPETokenizer(vocab_size=300)
    tokenizer.train(TEXTS * 3)
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_heads=2, d_ff=64, num_layers=2, **shape)
    model = GPTMini(cfg).eval()
    if not cfg.tie_embeddings:  # a head that differs from the embedding, so a mix-up shows
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    write_hf(model, tokenizer, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_rope_rmsnorm_swiglu_exports_as_llama_with_our_logits_and_greedy_tokens(
    tmp_path, bias, tied
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pocketgpt.model_io import save_model
    from pocketgpt.tokenizer import BPETokenizer

    tokenizer = BPETokenizer(vocab_size=300)
    tokenizer.train(TEXTS * 3)
    cfg = ModelConfig(
        vocab_size=300, d_model=32, n_heads=2, d_ff=48, num_layers=2, max_len=96, rope_base=500.0,
        bias=bias, tie_embeddings=tied, **LLAMA,
    )  # fmt: skip
    torch.manual_seed(1)
    model = GPTMini(cfg).eval()
    with torch.no_grad():  # every weight, bias and norm scale random and large: a mix-up shows,
        for p in model.parameters():  # and greedy's top two logits are far apart
            p.normal_(0.0, 0.3)
    tokenizer.save(save_model(model, tmp_path / "model") / "tokenizer.json")
    out = export(str(tmp_path / "model"), "hf", tmp_path / "hf")  # the command's path
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_act"] == "silu"
    assert config["rope_theta"] == 500.0 and config["rms_norm_eps"] == 1e-5
    assert (config["intermediate_size"], config["num_key_value_heads"]) == (48, 2)
    assert config["max_position_embeddings"] == 96 and config["tie_word_embeddings"] is tied
    assert config["attention_bias"] is bias and config["mlp_bias"] is bias

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 300, (3, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() < 1e-4

    prompts = ["The river rose in the spring of", " = History"]
    ours_rows = generate_rows(model, tokenizer, prompts, SamplingConfig(max_new_tokens=50))
    enc = hf_tok(prompts, return_tensors="pt", padding=True)
    assert not enc["attention_mask"].bool().all()  # one row is left-padded
    gen = hf.generate(**enc, max_new_tokens=50, do_sample=False)[:, enc["input_ids"].shape[1] :]
    for ours_row, row in zip(ours_rows, gen.tolist()):
        row = row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
        assert row == ours_row and len(row) == 50


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_with_our_logits_and_tokens(tiny, tmp_path):
    from pocketgpt.export.onnx import OnnxRunner

    folder, model, tokenizer = tiny
    out = export(str(folder), "onnx", tmp_path / "onnx")
    assert {p.name for p in out.iterdir()} == {"model.onnx", "onnx_config.json", "tokenizer.json"}
    runner = OnnxRunner(out / "model.onnx", threads=1)

    x = real_batch(tokenizer, 2, 40)
    mask = np.ones((2, 40), dtype=np.int64)
    pos = np.tile(np.arange(40), (2, 1))
    logits, presents = runner.forward(x.numpy(), pos, mask, runner.empty_past(2))
    with torch.no_grad():
        assert np.abs(logits - model(x).numpy()).max() < 1e-4
    assert presents[0].shape == (2, 4, 40, 12)  # (B, nh, P + T, hs)

    prompts = [tokenizer.encode("The river rose in the spring of"), tokenizer.encode(" = R")]
    greedy = SamplingConfig(max_new_tokens=50, stop_at_eos=False)
    assert runner.generate(prompts, 50).tolist() == generate(model, prompts, greedy).tolist()
    sampled = SamplingConfig(max_new_tokens=30, temperature=0.9, top_k=40, seed=7)
    ours = generate(model, prompts, sampled, eos_id=tokenizer.eos_id)
    theirs = runner.generate(prompts, 30, sampling=sampled, eos_id=tokenizer.eos_id)
    assert theirs.tolist() == ours.tolist()


def _export_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI")
    }
    return subprocess.run(
        [sys.executable, "-m", "pocketgpt.export", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_export_refuses_an_existing_folder_and_replaces_it_with_overwrite(tiny, tmp_path):
    folder = tiny[0]
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _export_cli(f"model_uri={folder}", "format=hf", f"out={out}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {out} already exists; pass overwrite=true to replace it, or pick another out="
    ]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    export(str(folder), "hf", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


@pytest.mark.slow
def test_export_command_names_a_variant_it_cannot_express_and_writes_nothing(tiny, tmp_path):
    variant = tmp_path / "variant"
    shutil.copytree(tiny[0], variant)
    config = json.loads((variant / "model_config.json").read_text())
    (variant / "model_config.json").write_text(json.dumps({**config, "position": "alibi"}))
    r = _export_cli(f"model_uri={variant}", "format=hf", f"out={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: cannot export this variant to hf: position=alibi; only GPT-2's architecture "
        "(learned positions, LayerNorm, GELU) or Llama's (RoPE, RMSNorm, SwiGLU), without qk_norm "
        "or logit_softcap, exports"
    ]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variant"]


@pytest.mark.slow
def test_export_log_true_logs_the_folder_into_the_source_run(tiny, tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(tiny[0]), "model")
    client.set_terminated(run.info.run_id)
    uri = f"runs:/{run.info.run_id}/model"
    out = export(uri, "hf", tmp_path / "hf", log=True, tracking_uri=store)
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "export/hf")}
    assert logged == {f"export/hf/{p.name}" for p in out.iterdir()}

    with pytest.raises(ExportError, match="log=true needs a model logged in MLflow"):
        export(str(tiny[0]), "hf", tmp_path / "never", log=True)
    assert not (tmp_path / "never").exists()


def test_a_failed_export_leaves_the_old_folder_and_no_temporary_one(tmp_path):
    from pocketgpt.atomic import atomic_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(out, replace=True) as staging:
        (staging / "half.bin").write_bytes(b"half")
        raise RuntimeError("the exporter failed")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_folder(out, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_a_required_setting_left_out_is_one_line(tmp_path):
    r = _export_cli("model_uri=runs:/abc/model", "format=hf", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == "error: out is missing; add out=exported/hf\n"
    assert list(tmp_path.iterdir()) == []  # nothing written, not even Hydra's output folder
