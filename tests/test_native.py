"""The native C++ engine (pocketgpt.native) against the PyTorch GPTMini it must reproduce:
logits for prefill and 100 decoding steps, greedy and seeded tokens, int8 within tolerance,
corrupt model files, the engine=auto fallback, the command and the threads setting."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
import torch

import pocketgpt
from pocketgpt.config import EngineConfig, ModelConfig
from pocketgpt.errors import ConfigError, ModelFileError
from pocketgpt.model import GPTMini
from pocketgpt.model_io import save_model
from pocketgpt.native import extension_error, open_engine, unsupported_reason
from pocketgpt.sampling import SamplingConfig, generate

from .conftest import ROOT

needs_engine = pytest.mark.skipif(
    extension_error() is not None, reason=f"native engine not built: {extension_error()}"
)

# max_len 128: a 12-token prompt plus 100 decoding steps fit without sliding.
CFG = ModelConfig(vocab_size=300, d_model=32, n_heads=4, d_ff=64, num_layers=2, max_len=128)
PADS = [0, 2, 5, 11]  # batch 4: left padding per row
TOL = 1e-4  # max abs difference of fp32 logits (the bound)


def random_model(bias: bool = True, max_len: int = 128) -> GPTMini:
    """Every parameter random, biases and norms included (GPT-2's init zeroes biases and makes
    LayerNorm the identity, which would hide a misplaced one), and sharp logits (no near-ties)."""
    torch.manual_seed(7)
    m = GPTMini(replace(CFG, bias=bias, max_len=max_len)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif ".ln" in name or name.startswith("ln_f"):
                p.normal_(1.0, 0.1)
        m.tok_emb.weight.normal_(0, 1.0)
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{bias: (PyTorch model, its saved folder)}"""
    out = {}
    for bias in (True, False):
        m = random_model(bias)
        out[bias] = (m, save_model(m, tmp_path_factory.mktemp(f"native_bias{bias}")))
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The PyTorch reference on one thread, as generate runs it: on a busy shared machine two
    spinning thread pools (torch's and OpenMP's) make every call many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def native(folder, **settings):
    return open_engine(folder, "cpu", EngineConfig(engine="native", **settings))


@needs_engine
@pytest.mark.parametrize(
    "kernels,threads,batch",
    [
        ("naive", 1, 1),
        ("naive", 1, 4),
        ("optimized", 1, 1),
        ("optimized", 1, 4),
        ("optimized", 2, 4),
    ],
)
def test_logits_match_pytorch_for_prefill_and_100_steps(models, kernels, threads, batch):
    for bias in (True, False) if batch == 4 else (True,):
        model, folder = models[bias]
        engine = native(folder, kernels=kernels, threads=threads)
        gen = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, CFG.vocab_size, (batch, 12), generator=gen)
        pads = torch.tensor(PADS[:batch]) if batch > 1 else None
        ours, ref = engine.new_kv_cache(batch).reset(pads), model.new_kv_cache(batch).reset(pads)
        with torch.inference_mode():
            want = model(prompt, input_pos=0, cache=ref)  # (B, T, V)
            got = engine(prompt, input_pos=0, cache=ours)
            assert got.shape == want.shape
            assert (got - want).abs().max() < TOL, "prefill"
            ids = want[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            for t in range(12, 112):
                want = model.last_logits(ids, input_pos=t, cache=ref)  # (B, V)
                got = engine.last_logits(ids, input_pos=t, cache=ours)
                assert (got - want).abs().max() < TOL, f"decoding step {t - 11}, bias={bias}"
                ids = want.argmax(-1, keepdim=True)


@needs_engine
@pytest.mark.parametrize("kernels", ["naive", "optimized"])
def test_greedy_tokens_equal_pytorch_over_200_tokens(tmp_path, kernels):
    # max_len 64: the window slides after 64 tokens, so re-prefills are covered too.
    model = random_model(max_len=64)
    engine = native(save_model(model, tmp_path), kernels=kernels)
    prompts = [[5, 17, 42, 9], [3], [250, 1, 2, 3, 4, 5, 6, 7]]  # ragged: left padding
    cfg = SamplingConfig(max_new_tokens=200, stop_at_eos=False)
    want = generate(model, prompts, cfg)
    assert want.shape == (3, 200)
    assert torch.equal(generate(engine, prompts, cfg), want)
    seeded = SamplingConfig(max_new_tokens=50, temperature=0.9, top_k=50, seed=3)
    assert torch.equal(generate(engine, prompts, seeded), generate(model, prompts, seeded))


@needs_engine
def test_int8_weights_stay_close_to_fp32(models):
    model, folder = models[True]
    x = torch.randint(0, CFG.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0))
    fp32 = native(folder)(x[:, :-1], x[:, 1:])[1]
    with torch.no_grad():
        assert abs(float(fp32) - float(model(x[:, :-1], x[:, 1:])[1])) < 1e-4
    for kernels in ("naive", "optimized"):
        for head in (False, True):
            int8 = native(folder, kernels=kernels, quantize="int8", quantize_head=head)
            logits, loss = int8(x[:, :-1], x[:, 1:])
            # Per-channel int8 moves the loss by well under 1% (measured ~0.1%); logits of
            # magnitude ~10 move by ~0.1.
            assert abs(float(loss) / float(fp32) - 1) < 0.01, (kernels, head)
            with torch.no_grad():
                assert 0 < (logits - model(x[:, :-1])).abs().max() < 0.5
    # greedy continuations agree for a while (int8 is not exact: no claim beyond that)
    prompts = [[5, 17, 42, 9]]
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    int8 = native(folder, quantize="int8")
    assert torch.equal(generate(int8, prompts, cfg)[:, :4], generate(model, prompts, cfg)[:, :4])


@needs_engine
def test_threads_do_not_change_a_bit(models):
    _, folder = models[True]
    x = torch.randint(0, CFG.vocab_size, (4, 40), generator=torch.Generator().manual_seed(1))
    one = native(folder, threads=1)(x)
    assert torch.equal(native(folder, threads=2)(x), one)
    assert torch.equal(native(folder, threads=None)(x), one)  # null: one per core


@needs_engine
def test_interface_matches_gptmini(models):
    model, folder = models[True]
    engine = native(folder)
    assert engine.num_params() == model.num_params()
    assert engine.num_params(False) == model.num_params(False)
    assert engine.config == model.config and engine.device == torch.device("cpu")
    assert engine.eval() is engine and not engine.training
    with pytest.raises(ConfigError, match="inference only"):
        engine.train()
    cache = engine.new_kv_cache(2)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than max_len=128"):
        engine(ids, input_pos=126, cache=cache)
    with pytest.raises(ValueError, match="1 rows given to a KV cache made for 2"):
        engine(ids[:1], input_pos=0, cache=cache)
    with pytest.raises(ValueError, match="input_pos=3 without a cache"):
        engine(ids, input_pos=3)
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary 0..299"):
        engine(ids + 300, input_pos=0, cache=cache)
    assert "native" in repr(engine).lower() or "NativeGPT" in repr(engine)


@needs_engine
def test_concurrent_generations_on_one_engine(models):
    model, folder = models[True]
    engine = native(folder, threads=1)
    prompts = [[[i, i + 1, i + 2]] for i in range(4)]
    cfg = SamplingConfig(max_new_tokens=30, stop_at_eos=False)
    want = [generate(model, p, cfg) for p in prompts]
    got = [None] * 4

    def work(i):
        got[i] = generate(engine, prompts[i], cfg)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@needs_engine
def test_corrupt_or_truncated_weights_are_one_line_errors(models, tmp_path):
    _, folder = models[True]
    good = (folder / "model.safetensors").read_bytes()
    config = (folder / "model_config.json").read_text()

    def broken(name: str, weights: bytes, cfg: str = config):
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(weights)
        (d / "model_config.json").write_text(cfg)
        return d

    header_len = int.from_bytes(good[:8], "little")
    fp16 = GPTMini(CFG).half()
    save_model(fp16, tmp_path / "fp16-source")
    cases = {
        "truncated": (good[: len(good) // 2], "is truncated: tensor"),
        "tiny": (good[:5], r"is truncated \(5 bytes"),
        "header-length": ((10**12).to_bytes(8, "little") + good[8:], "truncated or corrupt"),
        "header-json": (good[:8] + b"{" * header_len + good[8 + header_len :], "corrupt"),
        "garbage": (bytes(range(256)) * 4, "truncated or corrupt"),
        "fp16": ((tmp_path / "fp16-source" / "model.safetensors").read_bytes(), "is F16"),
    }
    for name, (weights, message) in cases.items():
        with pytest.raises(ModelFileError, match=message) as e:
            native(broken(name, weights))
        assert "\n" not in str(e.value) and "model.safetensors" in str(e.value), name
    wrong = json.loads(config) | {"d_ff": 128}
    with pytest.raises(
        ModelFileError,
        match=r"blocks.0.ff.fc.bias has shape \(64,\) but model_config.json implies \(128,\)",
    ):
        native(broken("shape", good, json.dumps(wrong)))
    # The C++ reader refuses an architecture it does not implement (issue 16's keys).
    rope = json.loads(config) | {"position": "rope"}
    from pocketgpt.native._engine import Engine, EngineFileError

    with pytest.raises(EngineFileError, match="position is not learned"):
        Engine(str(broken("rope", good, json.dumps(rope))))
    # pocketgpt.load says the same through its own path
    d = broken("load", good[:100])
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelFileError, match="truncated"):
        pocketgpt.load(d, engine="native")


def test_auto_falls_back_to_pytorch_with_a_notice(models, monkeypatch, caplog):
    model, folder = models[True]
    # Model variants the engine does not implement (ModelConfig's variant keys).
    for key, value in [("position", "rope"), ("norm", "rmsnorm"), ("qk_norm", True)]:
        variant = dataclasses.replace(model.config, **{key: value})
        assert unsupported_reason(variant) == f"{key}={getattr(variant, key)}"
    assert unsupported_reason(model.config) is None
    # A machine where the extension could not be built: importing it fails.
    monkeypatch.setitem(sys.modules, "pocketgpt.native._engine", None)
    assert "not built" in extension_error()
    with caplog.at_level(logging.WARNING, logger="pocketgpt.native"):
        auto = open_engine(folder, "cpu", EngineConfig(engine="auto", quantize="int8"))
    assert auto is None
    (notice,) = [r.getMessage() for r in caplog.records if r.name == "pocketgpt.native"]
    assert notice.startswith("engine=auto: generating with PyTorch (quantize=int8 not applied)")
    assert "not built" in notice and "\n" not in notice
    with pytest.raises(ConfigError, match="engine=native cannot run this model: the C") as e:
        open_engine(folder, "cpu", EngineConfig(engine="native"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="device=cuda: the native engine runs on the CPU"):
        open_engine(folder, "cuda", EngineConfig(engine="native"))
    assert open_engine(folder, "cpu", EngineConfig(engine="torch")) is None  # no notice needed


def test_engine_settings_are_checked():
    with pytest.raises(ConfigError, match="quantize=int8 needs the native engine"):
        EngineConfig(engine="torch", quantize="int8")
    with pytest.raises(ConfigError, match="engine='onnx' is not one of auto, native, torch"):
        EngineConfig(engine="onnx")
    with pytest.raises(ConfigError, match="quantize_head=true needs quantize=int8"):
        EngineConfig(engine="native", quantize_head=True)
    with pytest.raises(ConfigError, match="threads=0 must be a positive integer"):
        EngineConfig(threads=0)


@needs_engine
@pytest.mark.slow  # spawns the command twice
def test_command_runs_native_and_int8(models, tmp_path, compose_cfg):
    from omegaconf import OmegaConf

    from pocketgpt.sampling import generate_text
    from pocketgpt.tokenizer import BPETokenizer

    model, _ = models[True]
    folder = save_model(model, tmp_path / "model")
    tok = BPETokenizer(vocab_size=300)
    tok.train(["The meaning of life is to train a small model.\n"] * 5 + ["Once upon a time\n"])
    tok.save(folder / "tokenizer.json")
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "pocketgpt.generate", f"model_uri={folder}", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=env,
        )

    prompt = "The meaning of life is"
    native_run = cli("engine=native", "max_new_tokens=20", "stream=false", f"prompt={prompt}")
    assert native_run.returncode == 0, native_run.stderr
    expected = generate_text(model, tok, [prompt], SamplingConfig(20))[0]  # PyTorch, greedy
    assert native_run.stdout == f"[0] {prompt}{expected}\n"
    assert "(native optimized)" in native_run.stderr
    int8 = cli("engine=native", "quantize=int8", "kernels=naive", "max_new_tokens=5")
    assert int8.returncode == 0 and "(native naive, int8)" in int8.stderr, int8.stderr
    # The settings check themselves as the command composes them: one line, before any load.
    with pytest.raises(ConfigError, match="quantize=int8 needs the native engine") as e:
        OmegaConf.to_object(
            compose_cfg("model_uri=x", "engine=torch", "quantize=int8", name="generate")
        )
    assert "\n" not in str(e.value)
