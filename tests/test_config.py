from pathlib import Path

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
        ("trainer.compile=maybe", "trainer.compile='maybe'"),
        ("optim.betas=[0.9]", "must be two numbers"),
        ("tracking.register_as=a@v1", "looks like a version"),
        ("trainer.sample_temperature=-1", "trainer.sample_temperature=-1.0 must be >= 0"),
        ("trainer.sample_top_p=2", "trainer.sample_top_p=2.0 must be in"),
    ],
)
def test_cross_field_checks(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(to_obj(compose_cfg(override)))


@pytest.mark.parametrize(
    "override,allowed",
    [
        ("trainer.precision=fp8", "auto, fp32, bf16, fp16"),
        ("trainer.device=tpu", "auto, cpu, cuda, mps"),
        ("tokenizer.kind=wordpiece", "bpe, hf_bpe, hf_file"),
        ("optim.name=adam", "adamw, sgd, muon"),
        ("model.norm=batchnorm", "layernorm, rmsnorm"),
        ("model.activation=tanh", "gelu, relu2, swiglu"),
        ("model.position=sinusoidal", "learned, rope, alibi"),
        ("data.source=web", "wikitext2_mini, wikitext2, files"),
    ],
)
def test_a_value_outside_its_enum_fails_at_composition(compose_cfg, override, allowed):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(override)
    assert f"expected one of [{allowed}]" in str(e.value.__cause__)


@pytest.mark.parametrize("value", ["true", "false", "auto", "True"])
def test_compile_takes_booleans_and_auto(compose_cfg, value):
    assert to_obj(compose_cfg(f"trainer.compile={value}")).trainer.compile == value.lower()


def test_presets_hold_only_what_differs_from_the_schema():
    """Every default lives in config.py: a group file that restates one is a second source."""
    import dataclasses

    import yaml

    from pocketgpt import config

    conf = Path(config.__file__).parent / "conf"
    schemas = {
        f.name: f.default_factory()
        for f in dataclasses.fields(config.TrainConfig)
        if f.default_factory is not dataclasses.MISSING
    }
    for group, schema in schemas.items():
        for preset in (conf / group).glob("*.yaml"):
            values = yaml.safe_load(preset.read_text()) or {}
            same = [k for k, v in values.items() if getattr(schema, k) == v]
            assert not same, f"{preset.name} restates the default of {group}.{same}"
