"""Generation: the KV cache against full recomputation, sampling settings, batches, local loading
and the ``python -m pocketgpt.generate`` command on a local model folder."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import pocketgpt
from pocketgpt import errors, sampling
from pocketgpt.config import ModelConfig
from pocketgpt.errors import ConfigError, ModelFileError, ModelURIError, PocketGPTError
from pocketgpt.loading import load
from pocketgpt.model import GPTMini
from pocketgpt.model_io import save_model
from pocketgpt.runtime import resolve_device
from pocketgpt.sampling import (
    SamplingConfig,
    SamplingError,
    apply_repetition_penalty,
    filter_logits,
    generate,
    generate_text,
)
from pocketgpt.tracking.registry import resolve

from .conftest import ROOT

CFG = ModelConfig(vocab_size=300, d_model=32, n_heads=4, d_ff=64, num_layers=2, max_len=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPTMini(CFG).eval()
    # Sharper, more varied logits than the N(0, 0.02) init, so greedy paths have no near-ties.
    with torch.no_grad():
        m.tok_emb.weight.normal_(0, 1.0)
    return m


@pytest.fixture(scope="module")
def tokenizer():
    from pocketgpt.tokenizer import BPETokenizer

    tok = BPETokenizer(vocab_size=300)
    tok.train(["The meaning of life is to train a small model.\n"] * 5 + ["Once upon a time\n"])
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer):
    d = tmp_path_factory.mktemp("local_model")
    save_model(model, d)
    tokenizer.save(d / "tokenizer.json")
    return d


def reference_greedy(model, prompt, n):
    """No cache: every step re-runs the last max_len tokens (as nanoGPT does)."""
    ids, logits = prompt, []
    for _ in range(n):
        step = model(ids[:, -model.config.max_len :])[:, -1]
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.size(1) :], logits


def recorded_logits(monkeypatch):
    """Record every logits tensor the model's forward returns to generate()'s sampling."""
    seen = []
    original = sampling._next_logits

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(sampling, "_next_logits", wrapper)
    return seen


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("prompt_len", [5, 31, 32, 45], ids=["short", "fills-1", "fills", "long"])
def test_kv_cache_matches_recomputing_the_whole_context(model, monkeypatch, prompt_len, rows):
    torch.manual_seed(prompt_len)
    prompt = torch.randint(0, CFG.vocab_size, (rows, prompt_len))
    n = 40  # runs well past max_len=32: the window slides in every case
    expected, ref_logits = reference_greedy(model, prompt, n)
    seen = recorded_logits(monkeypatch)
    got = generate(model, prompt, SamplingConfig(max_new_tokens=n))
    assert torch.equal(got, expected)
    assert len(seen) == n
    for step, (a, b) in enumerate(zip(seen, ref_logits)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"step {step}: {(a - b).abs().max()}"


# This model's logits reach +-40 (the sharpened embedding), where one fp32 ulp is 4e-6 and a
# different summation order (attention over a cache slice instead of a causal window) moves a
# logit by a few: 1e-5 plus one part in a million of the value.
CLOSE = dict(atol=1e-5, rtol=1e-6)


def model_with_random_biases(bias: bool) -> GPTMini:
    """GPT-2's init zeroes biases and sets LayerNorm to identity, which would hide a misplaced
    bias or affine: here they are random too."""
    torch.manual_seed(4)
    m = GPTMini(replace(CFG, bias=bias)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif ".ln" in name or name.startswith("ln_f"):
                p.normal_(1.0, 0.1)
        m.tok_emb.weight.normal_(0, 1.0)  # as the `model` fixture
    return m


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_cached_logits_match_forward_at_every_position(batch, bias):
    model = model_with_random_biases(bias)
    ids = torch.randint(
        0, CFG.vocab_size, (batch, CFG.max_len), generator=torch.Generator().manual_seed(batch)
    )
    with torch.inference_mode():  # as generate() runs
        full = model(ids)  # (B, L, V)
        cache = model.new_kv_cache(batch)
        assert torch.allclose(model(ids[:, :4], input_pos=0, cache=cache), full[:, :4], **CLOSE)
        for t in range(4, CFG.max_len):
            step = model(ids[:, t : t + 1], input_pos=t, cache=cache)  # (B, 1, V)
            assert torch.allclose(step[:, 0], full[:, t], **CLOSE), t
        # the sampler's own call: the last position's logits only
        cache.reset()
        last = sampling._next_logits(model, ids[:, :9], 0, cache)
        assert torch.allclose(last, full[:, 8], **CLOSE)
        with pytest.raises(ValueError, match="longer than max_len=32"):
            model(ids[:, :1], input_pos=CFG.max_len, cache=cache)  # the cache is full


def test_without_cache_and_with_a_wide_slide(model):
    prompt = torch.randint(0, CFG.vocab_size, (1, 10))
    cached = generate(model, prompt, SamplingConfig(max_new_tokens=40))
    uncached = generate(model, prompt, SamplingConfig(max_new_tokens=40, use_cache=False))
    assert torch.equal(cached, uncached)
    # slide=8 re-prefills less often; before the first slide (22 tokens fit) it is identical.
    wide = generate(model, prompt, SamplingConfig(max_new_tokens=40, slide=8))
    assert wide.shape == (1, 40)
    assert torch.equal(wide[:, :23], cached[:, :23])


def test_ragged_batch_matches_each_prompt_alone(model):
    prompts = [[5, 6, 7], list(range(10, 40)), [9] * 12, [1]]
    cfg = SamplingConfig(max_new_tokens=12)
    batched = generate(model, prompts, cfg)
    for row, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), cfg)
        assert torch.equal(batched[row], alone[0]), row


def test_seeded_sampling_is_reproducible(model):
    prompt = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    sharp = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=123)
    flat = SamplingConfig(max_new_tokens=30, temperature=3.0, seed=123)
    for cfg in (sharp, flat):
        assert torch.equal(generate(model, prompt, cfg), generate(model, prompt, cfg))
    # Other seeds draw other tokens (not every seed: this model repeats some tokens surely).
    runs = {
        tuple(generate(model, prompt, replace(flat, seed=s)).flatten().tolist()) for s in range(4)
    }
    assert len(runs) > 1


def test_top_k_1_and_top_p_0_equal_greedy(model):
    prompt = torch.randint(0, CFG.vocab_size, (2, 6))
    greedy = generate(model, prompt, SamplingConfig(max_new_tokens=20))
    for extra in ({"top_k": 1}, {"top_p": 0.0}):
        cfg = SamplingConfig(max_new_tokens=20, temperature=1.5, seed=0, **extra)
        assert torch.equal(generate(model, prompt, cfg), greedy), extra


def test_top_p_1_is_plain_sampling(model):
    prompt = torch.randint(0, CFG.vocab_size, (1, 6))
    plain = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7)
    full = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7, top_p=1.0, top_k=0)
    assert torch.equal(generate(model, prompt, plain), generate(model, prompt, full))


def test_filter_logits_edges():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)
    assert torch.isfinite(filter_logits(logits, top_p=1e-9)).tolist() == [
        [True, False, False, False]
    ]
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.equal(filter_logits(logits, top_k=10), logits)  # k >= vocab: nothing dropped
    # p(3.0) ~ 0.64: 0.5 keeps one token, 0.7 keeps two
    assert int(torch.isfinite(filter_logits(logits, top_p=0.5)).sum()) == 1
    assert int(torch.isfinite(filter_logits(logits, top_p=0.7)).sum()) == 2


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_repetition_penalty_discourages_repeats(model):
    prompt = torch.tensor([[7] * 8])
    plain = generate(model, prompt, SamplingConfig(max_new_tokens=24))
    penalized = generate(model, prompt, SamplingConfig(max_new_tokens=24, repetition_penalty=50.0))
    assert len(set(penalized[0].tolist())) > len(set(plain[0].tolist()))


def test_stops_at_eos_per_row(model):
    prompts = torch.randint(0, CFG.vocab_size, (3, 5))
    free = generate(model, prompts, SamplingConfig(max_new_tokens=10))
    eos = int(free[0, 2])  # row 0 emits it by step 3
    first = free[0].tolist().index(eos)
    out = generate(model, prompts, SamplingConfig(max_new_tokens=10), eos_id=eos)
    assert out[0, : first + 1].tolist() == free[0, : first + 1].tolist()
    assert (out[0, first:] == eos).all()  # finished rows are filled with eos
    keep = generate(model, prompts, SamplingConfig(max_new_tokens=10, stop_at_eos=False), eos)
    assert torch.equal(keep, free)
    one = generate(model, prompts[:1], SamplingConfig(max_new_tokens=10), eos_id=eos)
    first = free[0].tolist().index(eos)
    assert one.tolist() == [free[0, : first + 1].tolist()]  # one row stops right after eos


def test_on_token_streams_every_step(model):
    prompt = torch.randint(0, CFG.vocab_size, (2, 4))
    got = []
    out = generate(model, prompt, SamplingConfig(max_new_tokens=6), on_token=got.append)
    assert torch.equal(torch.cat(got, dim=1), out)


def test_bad_settings_and_prompts_are_one_line_errors(model):
    prompt = torch.zeros(1, 3, dtype=torch.long)
    cases = [
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_k": -2}, "top_k=-2"),
        ({"max_new_tokens": -1}, "max_new_tokens=-1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty=0.0"),
        ({"slide": 33}, "slide=33"),
    ]
    for kwargs, text in cases:
        with pytest.raises(SamplingError, match=text) as e:
            generate(model, prompt, SamplingConfig(**kwargs))
        assert "\n" not in str(e.value)
    with pytest.raises(SamplingError, match="token id 300 is outside"):
        generate(model, [[1, 300]], SamplingConfig())
    with pytest.raises(SamplingError, match="empty"):
        generate(model, [[1], []], SamplingConfig())
    assert generate(model, prompt, SamplingConfig(max_new_tokens=0)).shape == (1, 0)


def test_generate_text_streams_whole_characters(model, tokenizer):
    pieces: dict[int, list[str]] = {0: [], 1: []}
    cfg = SamplingConfig(max_new_tokens=15, temperature=1.0, seed=3)
    prompts = ["The meaning of life is", "Once"]
    texts = generate_text(model, tokenizer, prompts, cfg, on_text=lambda r, t: pieces[r].append(t))
    assert len(texts) == 2
    for row, text in enumerate(texts):
        assert "".join(pieces[row]) == text.rstrip("\ufffd")
    with pytest.raises(SamplingError, match="encodes to no tokens"):
        generate_text(model, tokenizer, [""], cfg)


def test_load_a_local_folder(model, model_dir):
    loaded, tok = pocketgpt.load(model_dir)
    assert not loaded.training
    ids = torch.randint(0, CFG.vocab_size, (1, 9))
    assert torch.equal(loaded(ids), model(ids))
    assert tok.vocab_size == CFG.vocab_size
    again = load(str(model_dir), device="cpu")
    assert torch.equal(again.model.tok_emb.weight, model.tok_emb.weight)


def test_bad_uris_and_missing_files_are_one_line_errors(tmp_path, model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./mlruns here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cases = [
        ("", ModelURIError, "empty"),
        ("/no/such/folder", ModelURIError, "neither a folder nor a model URI"),
        ("s3://bucket/model", ModelURIError, "unsupported scheme 's3'"),
        ("models:/onlyname", ModelURIError, "needs a version or alias"),
        ("runs:/abc", ModelURIError, "needs a run id and a path"),
        ("runs:/abc/model", ModelURIError, "no MLflow store at"),
        ("best:", ModelURIError, "needs an experiment name"),
    ]
    for uri, err, text in cases:
        with pytest.raises(err, match=text) as e:
            load(uri)
        assert "\n" not in str(e.value), uri
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match="holds no pocketgpt model"):
        load(empty)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_config.json").write_text((model_dir / "model_config.json").read_text())
    with pytest.raises(ModelFileError, match="tokenizer.json is missing"):
        load(partial)
    (partial / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    with pytest.raises(ModelFileError, match="model.safetensors is missing"):
        load(partial)
    with pytest.raises(ConfigError, match="device='tpu' is not a torch device"):
        resolve_device("tpu", "device")
    assert resolve(str(model_dir), tmp_path) == model_dir


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "pocketgpt.generate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd or ROOT,
        env=env,
    )


@pytest.mark.slow  # spawns the command
def test_command_on_a_local_folder(model_dir, tmp_path, model, tokenizer):
    r = _cli(f"model_uri={model_dir}", "prompt=The meaning of life is", "max_new_tokens=12")
    assert r.returncode == 0, r.stderr
    expected = generate_text(model, tokenizer, ["The meaning of life is"], SamplingConfig(12))[0]
    assert r.stdout == "The meaning of life is" + expected + "\n"  # streamed, then a newline
    assert "tokens/s" in r.stderr
    assert not (ROOT / ".hydra").exists()  # hydra.output_subdir: null, hydra.run.dir: .

    r = _cli(cwd=tmp_path)  # no model_uri
    assert r.returncode == 2
    assert r.stderr.startswith("error: model_uri is missing") and r.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())  # nothing written


def test_command_config_batches_and_errors(compose_cfg, model_dir, capsys):
    from omegaconf import OmegaConf

    from pocketgpt.cli.generate import run
    from pocketgpt.config import register_configs

    register_configs()
    dcfg = compose_cfg(
        f"model_uri={model_dir}",
        "prompts=[Once upon a time,The meaning]",
        "max_new_tokens=5",
        "temperature=0.7",
        "top_k=40",
        "seed=1",
        "threads=null",
        name="generate",
    )
    texts = run(OmegaConf.to_object(dcfg))
    out = capsys.readouterr().out
    assert out == f"[0] Once upon a time{texts[0]}\n[1] The meaning{texts[1]}\n"
    for override, err, text in [
        ("top_p=2", errors.SamplingError, "top_p=2.0 must be in [0, 1]"),
        ("model_uri=/no/such/dir", ModelURIError, "neither a folder nor a model URI"),
        ("slide=99", errors.SamplingError, "slide=99 must be between 1 and model max_len=32"),
    ]:
        overrides = (f"model_uri={model_dir}", override, "threads=null")
        # a bad setting fails when the config is built, a bad model when run reaches it
        with pytest.raises(err, match=text.replace("[", r"\[").replace("]", r"\]")):
            run(OmegaConf.to_object(compose_cfg(*overrides, name="generate")))
        assert issubclass(err, PocketGPTError)  # the command prints these as one line


def test_generate_follows_parameter_updates_and_leaves_nothing_on_the_model():
    torch.manual_seed(1)
    m = GPTMini(CFG).eval()
    attributes = set(vars(m))
    prompt = torch.randint(0, CFG.vocab_size, (1, 5))
    generate(m, prompt, SamplingConfig(max_new_tokens=3))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # as an optimizer step would
    expected, _ = reference_greedy(m, prompt, 10)
    assert torch.equal(generate(m, prompt, SamplingConfig(max_new_tokens=10)), expected)
    generate(m, [[4, 5, 6], list(range(20, 50))], SamplingConfig(max_new_tokens=6))  # ragged
    assert set(vars(m)) == attributes  # no weights, caches or buffers kept between calls
    assert set(m.state_dict()) == set(GPTMini(CFG).state_dict())


def test_a_cache_is_reset_for_each_new_batch_of_sequences():
    model = model_with_random_biases(True)
    ids = torch.randint(0, CFG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(7))
    pads = torch.tensor([4, 0, 9])
    with torch.inference_mode():
        cache = model.new_kv_cache(3)
        for _ in range(2):  # the same cache twice: nothing of the first round leaks
            # Left-padded rows: padding masked out, positions from 0 at the first real token.
            cache.reset(pads)
            out = [model(ids[:, :12], input_pos=0, cache=cache)]
            out += [model(ids[:, t : t + 1], input_pos=t, cache=cache) for t in range(12, 20)]
            got = torch.cat(out, dim=1)  # (3, 20, V)
            for row, pad in enumerate(pads.tolist()):
                alone = model(ids[row : row + 1, pad:])
                assert torch.allclose(got[row, pad:], alone[0], **CLOSE), row
            # reset() without pads: an unpadded batch reusing the padded rows' slots
            cache.reset()
            assert cache.pads is None
            out = [model(ids[:, :7], input_pos=0, cache=cache)]
            out.append(model(ids[:, 7:15], input_pos=7, cache=cache))  # several tokens at once
            out += [model(ids[:, t : t + 1], input_pos=t, cache=cache) for t in range(15, 20)]
            assert torch.allclose(torch.cat(out, dim=1), model(ids), **CLOSE)
        assert cache.reset(torch.zeros(3, dtype=torch.long)).pads is None  # no row padded
        with pytest.raises(ValueError, match="2 rows given to a KV cache made for 3"):
            model(ids[:2, :4], input_pos=0, cache=cache)


def test_a_model_that_generated_can_be_copied_and_pickled():
    import copy
    import pickle

    torch.manual_seed(5)
    m = GPTMini(CFG).eval()
    prompt = torch.randint(0, CFG.vocab_size, (1, 6))
    out = generate(m, prompt, SamplingConfig(max_new_tokens=8))
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(generate(twin, prompt, SamplingConfig(max_new_tokens=8)), out)


def test_concurrent_generate_calls_on_one_model():
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(3)
    m = GPTMini(CFG).eval()
    prompts = [torch.randint(0, CFG.vocab_size, (1, 4 + i)) for i in range(6)]
    expected = [reference_greedy(m, p, 20)[0] for p in prompts]
    cfg = SamplingConfig(max_new_tokens=20)
    with ThreadPoolExecutor(3) as pool:  # each call allocates its own cache
        got = list(pool.map(lambda p: generate(m, p, cfg), prompts * 4))
    for i, out in enumerate(got):
        assert torch.equal(out, expected[i % len(prompts)]), i


@pytest.mark.slow  # spawns the command
@pytest.mark.parametrize("model_uri", ["models:/x/1", "best:pocketgpt"])
def test_command_fails_fast_when_the_tracking_server_is_down(model_uri):
    """Nothing listens on port 9: one error line at once, not MLflow's minutes of retries."""
    import time

    server = "http://127.0.0.1:9"
    start = time.monotonic()
    r = _cli(f"model_uri={model_uri}", f"tracking_uri={server}")
    assert time.monotonic() - start < 10
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: the MLflow tracking server at {server} does not answer")
    assert r.stderr.count("\n") == 1 and r.stdout == ""


def test_sampling_a_model_with_non_finite_logits_is_a_one_line_error():
    torch.manual_seed(0)
    broken = GPTMini(CFG).eval()
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")  # tied: the embedding row 0 too
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(SamplingError, match="logits are not finite") as e:
        generate(broken, prompt, SamplingConfig(max_new_tokens=3, temperature=1.0, seed=0))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ interactive mode, startup


def test_interactive_needs_a_terminal_and_no_batch(compose_cfg, model_dir):
    import io

    from omegaconf import OmegaConf

    from pocketgpt.cli.generate import run

    both = compose_cfg(
        f"model_uri={model_dir}", "interactive=true", "prompts=[a,b]", name="generate"
    )
    with pytest.raises(ConfigError, match=r"interactive=true .* prompts=\['a', 'b'\] was given"):
        OmegaConf.to_object(both)
    cfg = OmegaConf.to_object(
        compose_cfg(f"model_uri={model_dir}", "interactive=true", name="generate")
    )
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(ConfigError, match="needs a terminal on stdin") as e:
        run(cfg, out, err, inp=io.StringIO("a prompt\n"))  # a pipe or a file: refused
    assert "\n" not in str(e.value)
    assert out.getvalue() == err.getvalue() == ""  # refused before loading or printing anything


def test_chat_answers_a_terminal_until_end_of_input(model, tokenizer):
    """A real pseudo-terminal as input: a prompt, then Ctrl-D (end of input) at the next one."""
    import io

    from pocketgpt.cli.generate import PROMPT_MARK, chat

    cfg = SamplingConfig(max_new_tokens=8)
    master, slave = os.openpty()
    try:
        os.write(master, b"Once upon a time\n\x04")
        out, err = io.StringIO(), io.StringIO()
        with open(slave, encoding="utf-8", closefd=False) as terminal:
            assert terminal.isatty()
            texts = chat(model, tokenizer, cfg, terminal, out, err)
    finally:
        os.close(master)
        os.close(slave)
    assert texts == generate_text(model, tokenizer, ["Once upon a time"], cfg)
    assert out.getvalue() == texts[0] + "\n"
    assert err.getvalue().count(PROMPT_MARK) == 2 and "tokens/s" in err.getvalue()


class _Terminal:
    """``pocketgpt-generate interactive=true ARGS`` with a pseudo-terminal as its stdin; its
    stdout and stderr are read as they come."""

    def __init__(self, *args: str, cwd):
        import threading

        self.master, slave = os.openpty()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [sys.executable, "-m", "pocketgpt.generate", "interactive=true", *args]
        self.proc = subprocess.Popen(
            cmd, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env
        )
        os.close(slave)
        self.out, self.err = bytearray(), bytearray()
        self._readers = [
            threading.Thread(target=self._drain, args=(pipe, buf), daemon=True)
            for pipe, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(pipe, buf: bytearray) -> None:
        while chunk := pipe.read1(4096):
            buf.extend(chunk)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait_for(self, done, timeout: float = 90) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out; stderr: {self.err.decode()[-2000:]}"
            time.sleep(0.02)

    def prompts_shown(self) -> int:
        from pocketgpt.cli.generate import PROMPT_MARK

        return self.err.decode().count(PROMPT_MARK)

    def exit_status(self, timeout: float = 30) -> int:
        """Wait for the command to end and its output to be read; -> its exit status."""
        status = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout)
        return status

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


@pytest.mark.slow  # spawns the command
def test_interactive_command_answers_prompts_until_a_blank_line(model_dir, model, tokenizer):
    prompts = ["The meaning of life is", "Once upon a time"]
    with _Terminal(f"model_uri={model_dir}", "max_new_tokens=12", cwd=ROOT) as term:
        for i, prompt in enumerate(prompts, start=1):
            term.wait_for(lambda i=i: term.prompts_shown() == i)
            term.type(prompt + "\n")
        term.wait_for(lambda: term.prompts_shown() == 3)
        term.type("\n")
        assert term.exit_status() == 0, term.err.decode()
    expected = generate_text(model, tokenizer, prompts, SamplingConfig(12))
    assert term.out.decode() == "".join(text + "\n" for text in expected)  # one load, two answers
    assert term.err.decode().count("tokens/s") == 2


@pytest.mark.slow  # spawns the command
def test_command_refuses_interactive_without_a_terminal(model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(
        [sys.executable, "-m", "pocketgpt.generate", f"model_uri={model_dir}", "interactive=true"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: interactive=true needs a terminal on stdin")
    assert r.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow  # spawns a process
def test_importing_the_generate_command_imports_nothing_heavy():
    """A cold start is mostly imports: the command module must not pay for MLflow, torch or
    the training side before it knows what it needs."""
    heavy = ["mlflow", "torch", "matplotlib", "datasets", "pandas", "sqlalchemy", "transformers"]
    code = (
        "import sys, pocketgpt.cli.generate; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert "hydra" in loaded  # the check sees what was imported
    assert not loaded & set(heavy), sorted(loaded & set(heavy))


@pytest.fixture(scope="module")
def store(tmp_path_factory, model, tokenizer):
    """A real SQLite MLflow store: two runs, each with its logged model (pocketgpt's own
    log_model); the better one (val_bpb 1.0) registered as tiny@best. -> facts about it."""
    from pocketgpt.tracking.pyfunc import log_model
    from pocketgpt.tracking.store import artifact_location, make_client

    tmp = tmp_path_factory.mktemp("generate_store")
    tokenizer.save(tmp / "tokenizer.json")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = make_client(uri)
    exp = client.create_experiment("pocketgpt", artifact_location=artifact_location(uri))
    infos = {}
    for val_bpb in (2.0, 1.0):
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "val_bpb", val_bpb)
        register = "tiny@best" if val_bpb == 1.0 else None
        infos[val_bpb] = log_model(
            client, run.info.run_id, model, tmp / "tokenizer.json", 3, register
        )
        client.set_terminated(run.info.run_id)
    best = infos[1.0]
    return {"uri": uri, "client": client, "best": best, "tmp": tmp}


def _store_uris(best) -> list[str]:
    return [
        best.run_uri,
        best.model_uri,
        best.model_id,
        "models:/tiny/1",
        "models:/tiny/latest",
        "models:/tiny@best",
        "best:pocketgpt",
    ]


@pytest.mark.slow  # builds an MLflow store
def test_sqlite_lookups_agree_with_mlflow_and_read_in_place(store, tmp_path):
    from pocketgpt.tracking import registry

    uri, client, best = store["uri"], store["client"], store["best"]
    assert registry.best_model_uri("pocketgpt", "val_bpb", "min", uri)[0] == best.model_uri
    assert registry.best_model_uri("pocketgpt", "val_bpb", "max", uri)[0] != best.model_uri
    folder = Path(client.get_logged_model(best.model_id).artifact_location.removeprefix("file://"))
    for model_uri in _store_uris(best)[:-1]:
        full = f"models:/{model_uri}" if model_uri.startswith("m-") else model_uri
        # the direct read of the SQLite tables names the same files as MLflow's client
        assert registry._sqlite_location(uri, full) == registry._artifact_location(client, full)
        assert registry.resolve(model_uri, tmp_path, uri) == folder, model_uri
    assert registry.resolve("best:pocketgpt", tmp_path, uri) == folder
    assert not list(tmp_path.iterdir())  # read in place: nothing downloaded or copied
    # Not found by the direct read: MLflow's client answers, in its own words.
    with pytest.raises(ModelURIError, match="cannot load 'models:/tiny@nope'"):
        registry.resolve("models:/tiny@nope", tmp_path, uri)


@pytest.mark.slow  # spawns a process
def test_store_uris_load_without_importing_mlflow(store, model):
    code = (
        "import sys, pocketgpt\n"
        "for uri in sys.argv[2:]:\n"
        "    m, _ = pocketgpt.load(uri, tracking_uri=sys.argv[1])\n"
        "    print(float(m.tok_emb.weight.double().sum()))\n"
        "print('mlflow' in sys.modules, 'sqlalchemy' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    uris = _store_uris(store["best"])
    r = subprocess.run(
        [sys.executable, "-c", code, store["uri"], *uris],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    *sums, modules = r.stdout.splitlines()
    assert sums == [str(float(model.tok_emb.weight.detach().double().sum()))] * len(uris)
    assert modules == "False False"


@pytest.mark.slow  # spawns the command
def test_interactive_command_ctrl_c_stops_an_answer_then_ends(store):
    """From a registered model; Ctrl-C stops an endless answer, and at the prompt ends."""
    import signal

    args = ["model_uri=models:/tiny@best", f"tracking_uri={store['uri']}", "max_new_tokens=1000000"]
    with _Terminal(*args, cwd=store["tmp"]) as term:
        term.wait_for(lambda: term.prompts_shown() == 1)
        term.type("Once upon a time\n")
        term.wait_for(lambda: len(term.out) > 20)  # the answer is streaming
        term.proc.send_signal(signal.SIGINT)
        term.wait_for(lambda: term.prompts_shown() == 2)
        assert "(stopped)" in term.err.decode()
        term.proc.send_signal(signal.SIGINT)
        assert term.exit_status() == 130, term.err.decode()
    assert "Traceback" not in term.err.decode()
