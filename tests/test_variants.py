"""Model variants and the recipe options of issue 16: each block option against a plain-PyTorch
reference of its formula, the KV cache against full recomputation for every position encoding,
the model files and the logged model of each variant, Muon's parameter split, the schedules, and
the bad inputs."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from pocketgpt.config import ModelConfig, OptimConfig, TrainConfig, TrainerConfig, validate
from pocketgpt.errors import ConfigError
from pocketgpt.fused_loss import lm_loss
from pocketgpt.model import GPTMini, alibi_slopes
from pocketgpt.model_io import CONFIG_FILE, load_model, save_model
from pocketgpt.optim import MuonAdamW, build_optimizer, lr_factor, set_lr_factor

from .conftest import TINY, compose

V = 50
SMALL = {"vocab_size": V, "d_model": 32, "n_heads": 4, "d_ff": 48, "num_layers": 2, "max_len": 24}
VARIANTS = {
    "learned": {},
    "rope": {"position": "rope"},
    "alibi": {"position": "alibi"},
    "modern": {
        "position": "rope",
        "norm": "rmsnorm",
        "activation": "swiglu",
        "qk_norm": True,
        "logit_softcap": 5.0,
        "tie_embeddings": False,
        "bias": False,
    },
    "alibi-relu2-6-heads": {
        "position": "alibi",
        "activation": "relu2",
        "d_model": 48,
        "n_heads": 6,
    },
}


def make(seed: int = 0, **changes) -> GPTMini:
    """A small model whose weights are all visibly non-zero (norm weights and biases too), so
    every term of every formula shows in the outputs."""
    torch.manual_seed(seed)
    model = GPTMini(ModelConfig(**{**SMALL, **changes})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


# --------------------------------------------------------------------------- block options


def test_rmsnorm_is_its_formula():
    model = make(norm="rmsnorm")
    norm = model.blocks[0].ln1
    x = torch.randn(2, 5, 32)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert not any("bias" in n for n, _ in norm.named_parameters())


@pytest.mark.parametrize("activation", ["gelu", "relu2", "swiglu"])
def test_feed_forward_activations_are_their_formulas(activation):
    ff = make(activation=activation).blocks[0].ff
    x = torch.randn(2, 5, 32)
    a = x @ ff.fc.weight.T + ff.fc.bias
    if activation == "gelu":  # GPT-2's tanh approximation
        h = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
    elif activation == "relu2":
        h = torch.clamp(a, min=0) ** 2
    else:  # the first d_ff rows gate, the next d_ff rows go up
        assert ff.fc.weight.shape == (2 * 48, 32)
        gate, up = a[..., :48], a[..., 48:]
        h = gate * torch.sigmoid(gate) * up
    torch.testing.assert_close(ff(x), h @ ff.proj.weight.T + ff.proj.bias)


def _attention_reference(attn, x, positions, position, rope_base=10000.0, qk_norm=False):
    """Causal attention written out: per-head scores, explicit softmax; RoPE as a complex
    rotation of the (i, i + hs/2) pairs; ALiBi as -slope * distance added to the scores."""
    B, T, C = x.shape
    nh = attn.n_heads
    hs = C // nh
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=-1)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    if qk_norm:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-5)
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5)
    if position == "rope":
        freqs = rope_base ** (-torch.arange(hs // 2, dtype=torch.float64) * 2 / hs)
        rot = torch.polar(torch.ones(T, hs // 2), (positions[:, None] * freqs).float())

        def rotate(t):
            z = torch.complex(t[..., : hs // 2], t[..., hs // 2 :]) * rot
            return torch.cat([z.real, z.imag], dim=-1)

        q, k = rotate(q), rotate(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)  # (B, nh, T, T)
    if position == "alibi":
        slopes = torch.tensor([2.0 ** (-8 * (h + 1) / nh) for h in range(nh)])
        distance = positions[:, None] - positions[None, :]
        scores = scores - slopes[:, None, None] * distance
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    y = (weights @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_is_its_formula(position, qk_norm):
    model = make(position=position, qk_norm=qk_norm, rope_base=500.0)
    x = torch.randn(2, 9, 32)
    positions = torch.arange(9, dtype=torch.float32)
    attn = model.blocks[0].attn
    expected = _attention_reference(attn, x, positions, position, 500.0, qk_norm)
    # Through the model's own plumbing: one block's attention with what hidden_states passes it.
    with torch.no_grad():
        rope = mask = None
        if position == "rope":
            from pocketgpt.model import rope_angles

            angles = rope_angles(torch.arange(9), 8, 500.0).view(1, 1, 9, 4)
            rope = (angles.cos(), angles.sin())
        if position == "alibi":
            mask = model._alibi_bias(None, 0, 9, 0, x.dtype)
        got = attn(x, mask, None, 0, rope)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(4).tolist() == [2**-2, 2**-4, 2**-6, 2**-8]
    # 6 heads: the 4-head series, then every other slope of the 8-head series.
    assert alibi_slopes(6).tolist() == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]


def test_zero_init_proj_starts_every_block_as_the_identity():
    torch.manual_seed(0)
    model = GPTMini(ModelConfig(**SMALL, zero_init_proj=True)).eval()
    proj = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
    assert len(proj) == 4 and all(bool((p == 0).all()) for p in proj)
    idx = torch.randint(0, V, (2, 7))
    x = model.tok_emb(idx) + model.pos_emb.weight[:7]
    torch.testing.assert_close(model.hidden_states(idx), model.ln_f(x))


def test_logit_softcap_is_tanh_and_holds_in_the_fused_loss():
    model = make(logit_softcap=2.0).train()
    idx, targets = torch.randint(0, V, (3, 12)), torch.randint(0, V, (3, 12))
    raw = model.lm_head(model.hidden_states(idx))
    logits = model(idx)
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
    assert logits.abs().max() < 2.0 < raw.abs().max()
    plain = F.cross_entropy(logits.view(-1, V), targets.view(-1))
    grads = torch.autograd.grad(plain, list(model.parameters()))
    fused = lm_loss(model, idx, targets, chunk=7)  # several chunks
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_untied_head_is_its_own_weight_in_training_and_on_disk(tmp_path):
    model = make(tie_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    idx, targets = torch.randint(0, V, (2, 10)), torch.randint(0, V, (2, 10))
    grad = torch.autograd.grad(lm_loss(model.train(), idx, targets), model.lm_head.weight)[0]
    assert grad.abs().sum() > 0
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.lm_head.weight.data_ptr() != loaded.tok_emb.weight.data_ptr()
    assert torch.equal(loaded.eval()(idx), model.eval()(idx))


def test_the_default_model_keeps_its_parameter_names_and_old_config_files_load(tmp_path):
    torch.manual_seed(0)
    model = GPTMini(ModelConfig(**SMALL)).eval()
    names = set(model.state_dict())
    expected = {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"}
    for i in range(2):
        for part in ("ln1", "ln2", "attn.qkv", "attn.proj", "ff.fc", "ff.proj"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    assert names == expected
    save_model(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    new_keys = {"position", "rope_base", "norm", "activation", "qk_norm", "zero_init_proj"}
    new_keys |= {"logit_softcap", "tie_embeddings"}
    assert config["position"] == "learned" and config["tie_embeddings"] is True
    # A model_config.json written before the variants existed.
    old = {k: v for k, v in config.items() if k not in new_keys}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old))
    idx = torch.randint(0, V, (2, 8))
    assert torch.equal(load_model(tmp_path).eval()(idx), model(idx))


# --------------------------------------------------------------------------- one forward, one cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cache_matches_full_recompute_with_left_padding(variant):
    """Row 0 left-padded by 3, row 1 unpadded: prefill then one token at a time through the
    cache gives each row the logits of its own unpadded full window."""
    model = make(**VARIANTS[variant])
    seq = torch.randint(1, V, (2, 14))
    pads = torch.tensor([3, 0])
    padded = seq.clone()
    padded[0] = torch.cat([torch.zeros(3, dtype=torch.long), seq[0, :11]])
    with torch.inference_mode():
        cache = model.new_kv_cache(2).reset(pads)
        steps = [model(padded[:, :6], input_pos=0, cache=cache)]
        for t in range(6, 14):
            steps.append(model(padded[:, t : t + 1], input_pos=t, cache=cache))
        cached = torch.cat(steps, dim=1)  # (2, 14, V)
        full0, full1 = model(seq[:1, :11]), model(seq[1:])
    torch.testing.assert_close(cached[0, 3:], full0[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cached[1], full1[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["rope", "alibi"])
def test_rope_and_alibi_run_past_max_len_without_a_cache(variant):
    model = make(**VARIANTS[variant])  # max_len 24
    idx = torch.randint(0, V, (1, 60))
    long = model(idx)
    torch.testing.assert_close(long[:, :24], model(idx[:, :24]), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="longer than max_len=24"):
        model(idx[:, :25], input_pos=0, cache=model.new_kv_cache(1))


def test_learned_positions_stop_at_max_len():
    with pytest.raises(ValueError, match="longer than max_len=24"):
        make()(torch.randint(0, V, (1, 25)))


# --------------------------------------------------------------------------- optimizers, schedules


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = make(tie_embeddings=False)
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.05)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    hidden = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj")}
    hidden |= {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("ff.fc", "ff.proj")}
    assert muon == hidden
    assert adamw == set(names.values()) - hidden  # embeddings, head, norms, biases
    set_lr_factor(opt, cfg, 0.5)
    assert [g["lr"] for g in opt.muon.param_groups] == [0.025]
    assert [g["lr"] for g in opt.adamw.param_groups] == [5e-4, 5e-4]


def test_muon_adamw_steps_both_and_round_trips_its_state():
    model = make()
    cfg = OptimConfig(name="muon")
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, V, (2, 10))
    lm_loss(model.train(), idx, idx).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(before)  # both halves moved
    state = opt.state_dict()
    other = build_optimizer(model, cfg, torch.device("cpu"))
    other.load_state_dict(state)
    assert torch.equal(
        other.muon.state_dict()["state"][0]["momentum_buffer"],
        state["muon"]["state"][0]["momentum_buffer"],
    )
    with pytest.raises(ConfigError, match="not Muon \\+ AdamW"):
        other.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_schedules():
    wsd = OptimConfig(schedule="wsd", warmup_steps=10, cooldown_fraction=0.2, min_lr_ratio=0.1)
    f = [lr_factor(s, wsd, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0
    assert all(x == 1.0 for x in f[10:80])  # stable
    # Cooldown: the last 20 steps fall linearly to min_lr_ratio at the last step.
    assert f[80:] == pytest.approx([0.1 + 0.9 * (19 - i) / 20 for i in range(20)])
    assert all(a > b for a, b in zip(f[80:], f[81:]))
    no_cooldown = OptimConfig(schedule="wsd", warmup_steps=0, cooldown_fraction=0.0)
    assert {lr_factor(s, no_cooldown, 50) for s in range(50)} == {1.0}
    const = OptimConfig(schedule="constant", warmup_steps=0)
    assert {lr_factor(s, const, 50) for s in range(50)} == {1.0}
    cos = OptimConfig(warmup_steps=0, min_lr_ratio=0.1)
    assert lr_factor(50, cos, 100) == pytest.approx(0.1 + 0.9 * 0.5)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make_config,message",
    [
        (lambda: ModelConfig(d_model=30, n_heads=2, position="rope"), "needs an even head size"),
        (lambda: ModelConfig(activation="tanh"), "model.activation='tanh' is not one of gelu"),
        (lambda: ModelConfig(norm="batch"), "model.norm='batch' is not one of layernorm, rms"),
        (lambda: ModelConfig(position="sin"), "model.position='sin' is not one of learned"),
        (lambda: ModelConfig(logit_softcap=0.0), "model.logit_softcap=0.0 must be a positive"),
        (lambda: OptimConfig(name="muon", momentum=0.8), "optim.momentum=0.8 is an SGD setting"),
        (lambda: OptimConfig(name="muon", nesterov=False), "optim.nesterov=False is an SGD"),
        (lambda: OptimConfig(muon_lr=0.1), "optim.muon_lr=0.1 is a Muon setting"),
        (lambda: OptimConfig(cooldown_fraction=1.5), "optim.cooldown_fraction=1.5 must be in"),
        (lambda: OptimConfig(cooldown_fraction=-0.1), "optim.cooldown_fraction=-0.1 must be in"),
        (
            lambda: validate(
                TrainConfig(optim=OptimConfig(name="muon"), trainer=TrainerConfig(strategy="fsdp"))
            ),
            "use trainer.strategy=ddp",
        ),
    ],
)
def test_bad_settings_name_the_value_and_the_fix(make_config, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        make_config()


@pytest.mark.parametrize(
    "overrides,code,needle",
    [
        (["model.position=rope", "model.d_model=30"], 2, "needs an even head size"),
        (["model.activation=tanh"], 1, "expected one of [gelu, relu2, swiglu]"),
        (["model.norm=batchnorm"], 1, "expected one of [layernorm, rmsnorm]"),
        (["optim=muon", "optim.momentum=0.5"], 2, "optim.momentum=0.5 is an SGD setting"),
        (["optim.cooldown_fraction=2"], 2, "optim.cooldown_fraction=2.0 must be in [0, 1]"),
    ],
)
def test_bad_input_fails_in_one_line_before_any_work(
    overrides, code, needle, tmp_path, monkeypatch, capsys
):
    from pocketgpt.cli.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", ["pocketgpt-train", *TINY, *overrides])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    if code == 2:
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlruns").exists()


def test_presets_compose():
    muon = compose("train", "optim=muon").optim
    assert muon.name == "muon" and muon.muon_lr == OptimConfig.muon_lr
    fast = compose("train", "experiment=fast")
    assert fast.tracking.experiment_name == "fast"


# --------------------------------------------------------------------------- logged models


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["alibi", "modern"])  # modern: RoPE + every block option
def test_a_logged_variant_reloads_and_generates_identically(variant, tmp_path, shared_cache):
    """Trained through the real job, logged to MLflow: pocketgpt.load and the pyfunc model give
    the trained model's text, including past max_len (the window slides)."""
    import mlflow.pyfunc

    from pocketgpt.loading import load
    from pocketgpt.sampling import SamplingConfig, generate_text
    from pocketgpt.train import build, run

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"model.{k}={'null' if v is None else v}" for k, v in VARIANTS[variant].items()]
    job = build(
        compose(
            "train",
            *TINY,
            *overrides,
            "trainer.max_steps=3",
            "trainer.eval_at_start=false",
            "trainer.checkpoint_interval=null",
            "tracking.system_metrics=false",
            f"tracking.uri={store}",
            f"cache_dir={shared_cache}",
            f"trainer.checkpoint_dir={tmp_path / 'ckpt'}",
        )
    )
    outcome = run(job)
    uri = outcome.logged_model.run_uri
    prompts = ["The meaning of life is", "Once"]
    long = SamplingConfig(max_new_tokens=45)  # past max_len=32: the window slides
    expected = generate_text(job.model.eval(), job.tokenizer, prompts, long)
    model, tokenizer = load(uri, tracking_uri=store)
    assert model.config == job.model.config
    assert generate_text(model, tokenizer, prompts, long) == expected
    no_cache = SamplingConfig(max_new_tokens=45, use_cache=False)
    assert generate_text(model, tokenizer, prompts, no_cache) == expected
    mlflow.set_tracking_uri(store)
    try:
        pyfunc = mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)
    assert pyfunc.predict(prompts, params={"max_new_tokens": 45}) == expected
