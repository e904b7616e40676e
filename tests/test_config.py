import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from pocketgpt.config import ConfigError, TrainConfig, validate


def to_obj(cfg) -> TrainConfig:
    return OmegaConf.to_object(cfg)


def test_defaults_compose_and_validate(compose_cfg):
    cfg = compose_cfg()
    assert cfg.model.d_model == 128 and cfg.model.n_heads == 4 and cfg.model.num_layers == 4
    assert cfg.tokenizer.kind == "bpe" and cfg.data.source == "wikitext2_mini"
    validate(to_obj(cfg))


@pytest.mark.parametrize(
    "group,choice",
    [("model", "gpt_small"), ("tokenizer", "hf_bpe"), ("optim", "sgd"), ("data", "wikitext2")],
)
def test_every_group_option_composes(compose_cfg, group, choice):
    validate(to_obj(compose_cfg(f"{group}={choice}")))


def test_experiment_preset(compose_cfg):
    cfg = compose_cfg("experiment=baseline")
    assert cfg.tracking.experiment_name == "baseline"


def test_unknown_key_fails_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("model.d_modle=64")
    assert "Key 'd_modle' not in 'ModelConfig'" in str(e.value.__cause__)


def test_wrong_type_fails_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("model.d_model=wide")
    assert isinstance(e.value.__cause__, ValidationError)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.n_heads=3", "not divisible by model.n_heads=3"),
        ("data.block_size=256", "longer than model.max_len=128"),
        ("optim.lr=0", "optim.lr=0"),
        ("optim.lr=-1e-3", "optim.lr=-0.001"),
        ("model.dropout=1.0", "model.dropout=1.0"),
        ("trainer.batch_size=0", "trainer.batch_size=0"),
        ("tokenizer.vocab_size=100", "tokenizer.vocab_size=100"),
        ("trainer.precision=fp8", "trainer.precision='fp8'"),
        ("trainer.device=tpu", "trainer.device='tpu'"),
    ],
)
def test_cross_field_checks(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(to_obj(compose_cfg(override)))
