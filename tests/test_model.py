import pytest
import torch

from pocketgpt.config import ModelConfig
from pocketgpt.model import GPTMini
from pocketgpt.model_io import ModelFileError, load_model, save_model

TINY = ModelConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=64, num_layers=2, max_len=16)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPTMini(TINY).eval()


def test_shapes_and_loss(model):
    idx = torch.randint(0, 50, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, 50)
    logits2, loss = model(idx, targets=idx)
    assert torch.equal(logits, logits2)
    # A freshly initialised model predicts close to uniform: loss ~ ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


def test_causality(model):
    """Changing the token at position t leaves the logits before t unchanged."""
    idx = torch.randint(0, 50, (1, 12))
    base = model(idx)
    for t in (0, 5, 11):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 50
        out = model(changed)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])


def test_weight_tying_and_param_count(model):
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 16 * 32


def test_default_shape_param_count():
    m = GPTMini(ModelConfig(vocab_size=8192))
    per_layer = (
        (128 * 384 + 384) + (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128) + 4 * 128
    )
    assert m.num_params() == 8192 * 128 + 4 * per_layer + 2 * 128


def test_too_long_sequence_is_an_error(model):
    with pytest.raises(ValueError, match="max_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("prefill", [1, 7, 12])
def test_cached_prefill_and_steps_match_a_full_forward(model, prefill):
    idx = torch.randint(0, 50, (2, 12))
    full = model(idx)
    with torch.no_grad():
        cache = model.new_kv_cache(2)
        prefix = model(idx[:, :prefill], input_pos=0, cache=cache)
        steps = [model(idx[:, t : t + 1], input_pos=t, cache=cache) for t in range(prefill, 12)]
    stepped = torch.cat([prefix, *steps], dim=1)
    assert stepped.shape == full.shape
    assert torch.allclose(stepped, full, atol=1e-5)


def test_hidden_states_are_the_forward_before_the_head(model):
    idx = torch.randint(0, 50, (2, 9))
    h = model.hidden_states(idx)
    assert h.shape == (2, 9, 32)
    assert torch.equal(model.lm_head(h), model(idx))


def test_save_load_round_trip(model, tmp_path):
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    idx = torch.randint(0, 50, (2, 8))
    assert torch.equal(loaded(idx), model(idx))
    assert loaded.lm_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "model.safetensors",
        "model_config.json",
    ]


def test_load_rejects_corrupt_files(model, tmp_path):
    save_model(model, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelFileError, match="safetensors"):
        load_model(tmp_path / "m")
    with pytest.raises(ModelFileError, match="missing"):
        load_model(tmp_path / "nowhere")
