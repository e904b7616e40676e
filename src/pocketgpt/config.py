"""Typed configuration: every default pocketgpt has, in one place.

One dataclass per Hydra config group (the group's YAML presets in ``pocketgpt/conf`` hold only
what makes them different), registered with Hydra's ConfigStore, so an unknown key, a wrong
type or a value outside an Enum fails at composition with Hydra's message. Each dataclass checks
its own ranges in ``__post_init__`` (it runs when ``OmegaConf.to_object`` builds it); the checks
that span groups live in ``validate``. Every failed check raises ``ConfigError`` naming the value
and the fix.

Importing this module imports no torch and no Hydra: the model and the tokenizer use it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from pocketgpt.errors import ConfigError, SamplingError

# --------------------------------------------------------------------------- allowed values


class TokenizerKind(StrEnum):
    bpe = "bpe"  # ours (pocketgpt.tokenizer.BPETokenizer), trained on the train split
    hf_bpe = "hf_bpe"  # Hugging Face `tokenizers`, trained with the same settings
    hf_file = "hf_file"  # a ready tokenizer.json at tokenizer.path


class Pattern(StrEnum):
    gpt2 = "gpt2"
    gpt4 = "gpt4"


class DataSource(StrEnum):
    wikitext2_mini = "wikitext2_mini"  # embedded in the package, offline
    wikitext2 = "wikitext2"  # the Hugging Face Hub
    files = "files"  # local text or parquet files


class OptimizerName(StrEnum):
    adamw = "adamw"
    sgd = "sgd"
    # torch.optim.Muon on the 2-D hidden matrices (attention and feed-forward weights), AdamW at
    # optim.lr on the rest (embeddings, head, norms, biases)
    muon = "muon"


class Schedule(StrEnum):
    cosine = "cosine"  # linear warm-up, then cosine decay to lr * min_lr_ratio
    constant = "constant"  # linear warm-up, then constant
    # warmup-stable-decay: linear warm-up, constant, then a linear cooldown to lr * min_lr_ratio
    # over the last cooldown_fraction of the steps
    wsd = "wsd"


class Position(StrEnum):
    learned = "learned"  # a learned table of max_len positions added to the token embedding
    rope = "rope"  # rotary embedding of queries and keys (rotate-half pairing, base rope_base)
    alibi = "alibi"  # a per-head linear distance penalty on the attention scores


class Norm(StrEnum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class Activation(StrEnum):
    gelu = "gelu"  # GELU, tanh approximation (GPT-2)
    relu2 = "relu2"  # relu(x) ** 2 (modded-nanogpt)
    swiglu = "swiglu"  # silu(gate) * up: ff.fc holds gate and up rows (2 * d_ff of them)


class Device(StrEnum):
    auto = "auto"  # cuda, else mps, else cpu
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Strategy(StrEnum):
    auto = "auto"  # ddp when launched as several processes (torchrun, SLURM), else single
    single = "single"  # one process
    ddp = "ddp"  # DistributedDataParallel: every rank holds the whole model
    fsdp = "fsdp"  # FSDP2 (fully_shard): parameters, gradients and optimizer state sharded


class DistBackend(StrEnum):
    auto = "auto"  # nccl on CUDA, gloo on the CPU
    gloo = "gloo"  # CPU tensors (or CUDA, slower): runs everywhere
    nccl = "nccl"  # CUDA tensors only


class Precision(StrEnum):
    auto = "auto"  # bf16 on CUDA where supported, else fp16 there; fp32 on CPU and MPS
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # adds a gradient scaler


class Compile(StrEnum):
    auto = "auto"  # on CUDA only: on the CPU it measured slower (BENCHMARKS.md)
    true = "true"
    false = "false"


class Progress(StrEnum):
    auto = "auto"  # the bar when stderr is a terminal (or a notebook), plain log lines elsewhere
    true = "true"  # the bar wherever stderr goes
    false = "false"  # plain log lines only


class OnNonFinite(StrEnum):
    fail = "fail"
    skip = "skip"


class Mode(StrEnum):
    min = "min"  # lower is better
    max = "max"


def _enum(enum: type[StrEnum], key: str, value: Any) -> StrEnum:
    """``value`` as a member of ``enum`` (JSON and plain Python give strings), or ConfigError."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(enum.__members__)
        raise ConfigError(f"{key}={value!r} is not one of {allowed}") from None


class ExportFormat(StrEnum):
    hf = "hf"  # a transformers folder: AutoModelForCausalLM / AutoTokenizer, no custom code
    onnx = "onnx"  # an ONNX graph with past key/value inputs, for ONNX Runtime


class Engine(StrEnum):
    auto = "auto"  # the native C++ engine where it can run the model on this device, else torch
    native = "native"  # the native engine, or an error saying why it cannot run
    torch = "torch"  # GPTMini in PyTorch: the readable reference


class Quantize(StrEnum):
    none = "none"  # fp32 weights
    int8 = "int8"  # per-output-channel symmetric int8 weights, fp32 activations (native only)


class Kernels(StrEnum):
    optimized = "optimized"  # packed panels, register tiles, fused softmax, OpenMP threads
    naive = "naive"  # plain loops, one thread: the readable reference (pocketgpt.native)


def _positive(**values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be a positive integer")


# --------------------------------------------------------------------------- groups


@dataclass
class ModelConfig:
    """GPTMini's shape; the one config class of the model (``GPTMini(ModelConfig(...))``).

    ``vocab_size`` is the tokenizer's: training fills it in, and a logged model stores it.
    """

    vocab_size: int | None = None
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    num_layers: int = 4
    # The KV cache's slots, and with position=learned the number of learned positions: the
    # longest context the model can see. rope and alibi have no table, so a whole window without
    # the cache may be longer (e.g. evaluation at twice the trained context).
    max_len: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers
    # The variants below default to GPT-2's block (today's GPTMini); a model_config.json written
    # before they existed loads with these values. Their names and values are read by other
    # tools (native engine, exporters): keep them.
    position: Position = Position.learned
    rope_base: float = 10000.0  # rope: the wavelength base of the rotary frequencies
    norm: Norm = Norm.layernorm  # the pre-block and final norms
    activation: Activation = Activation.gelu  # the feed-forward's non-linearity
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (no weights) before RoPE
    zero_init_proj: bool = False  # start attention and feed-forward output projections at 0
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap); null = off
    tie_embeddings: bool = True  # the head shares the token embedding's weight

    def __post_init__(self) -> None:
        self.position = _enum(Position, "model.position", self.position)
        self.norm = _enum(Norm, "model.norm", self.norm)
        self.activation = _enum(Activation, "model.activation", self.activation)
        _positive(
            **{
                "model.d_model": self.d_model,
                "model.n_heads": self.n_heads,
                "model.d_ff": self.d_ff,
                "model.num_layers": self.num_layers,
                "model.max_len": self.max_len,
            }
        )
        if self.vocab_size is not None:
            _positive(**{"model.vocab_size": self.vocab_size})
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"pick n_heads among the divisors of d_model"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.position == Position.rope and self.head_size % 2:
            raise ConfigError(
                f"model.position=rope needs an even head size, and model.d_model={self.d_model} / "
                f"model.n_heads={self.n_heads} = {self.head_size}; pick d_model and n_heads so "
                "that d_model / n_heads is even"
            )
        if not (self.rope_base > 1 and math.isfinite(self.rope_base)):
            raise ConfigError(
                f"model.rope_base={self.rope_base} must be a number above 1, e.g. 1e4"
            )
        cap = self.logit_softcap
        if cap is not None and not (cap > 0 and math.isfinite(cap)):
            raise ConfigError(
                f"model.logit_softcap={cap} must be a positive number (e.g. 15), or null for off"
            )

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML values: an Enum as its string."""
        plain = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v.value if isinstance(v, StrEnum) else v for k, v in plain.items()}


@dataclass
class TokenizerConfig:
    """Which tokenizer, and how it is trained."""

    kind: TokenizerKind = TokenizerKind.bpe
    vocab_size: int = 8192
    pattern: Pattern = Pattern.gpt2  # pre-tokenization regex
    path: str | None = None  # hf_file: a tokenizer.json; bpe: a saved pocketgpt tokenizer to reuse
    special_tokens: list[str] = field(default_factory=lambda: ["<unk>", "<pad>", "<bos>", "<eos>"])

    def __post_init__(self) -> None:
        n_special = len(self.special_tokens)
        if self.kind != TokenizerKind.hf_file and self.vocab_size < 256 + n_special:
            raise ConfigError(
                f"tokenizer.vocab_size={self.vocab_size} is smaller than the 256 byte tokens plus "
                f"{n_special} special tokens; use at least {256 + n_special}"
            )
        if self.kind == TokenizerKind.hf_file and not self.path:
            raise ConfigError("tokenizer=hf_file needs tokenizer.path=/path/to/tokenizer.json")


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into training windows."""

    source: DataSource = DataSource.wikitext2_mini
    train: str | None = None  # files: one path or glob per split
    validation: str | None = None  # files: or null with validation_fraction
    test: str | None = None  # files: optional; null = no test evaluation
    # files without data.validation: hold out this fraction of the training lines (the last
    # ones, a contiguous block) as the validation split
    validation_fraction: float | None = None
    text_column: str = "text"  # parquet files: which column holds the text
    hub_name: str = "Salesforce/wikitext"
    hub_config: str = "wikitext-2-raw-v1"
    block_size: int = 128  # tokens of context per training window
    stride: int | None = None  # distance between window starts; null = block_size (no overlap)

    def __post_init__(self) -> None:
        _positive(**{"data.block_size": self.block_size})
        if self.stride is not None and self.stride <= 0:
            raise ConfigError(
                f"data.stride={self.stride} must be positive (or null for block_size)"
            )
        f = self.validation_fraction
        if f is not None and not (0.0 < f < 1.0):
            raise ConfigError(f"data.validation_fraction={f} must be in (0, 1), e.g. 0.05")
        if self.source == DataSource.files:
            if not self.train:
                raise ConfigError(
                    "data=files needs data.train=PATH (and data.validation=PATH or "
                    "data.validation_fraction=F; data.test=PATH is optional)"
                )
            if not self.validation and f is None:
                raise ConfigError(
                    "data=files needs a validation split: data.validation=PATH, or "
                    "data.validation_fraction=F to hold out the last fraction F of data.train"
                )
            if self.validation and f is not None:
                raise ConfigError(
                    f"data.validation={self.validation} and data.validation_fraction={f} "
                    f"both give the validation split; set only one"
                )


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-3  # measured best at the default shape: BENCHMARKS.md (e)
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    # muon: the learning rate, momentum and weight decay of the hidden matrices (optim.lr,
    # betas, eps and weight_decay are those of the AdamW part)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # the cosine (and wsd's cooldown) ends at lr * min_lr_ratio
    schedule: Schedule = Schedule.cosine
    cooldown_fraction: float = 0.2  # wsd: the share of the steps spent in the final cooldown

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr={self.lr} must be a positive number")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            raise ConfigError(
                f"optim.cooldown_fraction={self.cooldown_fraction} must be in [0, 1] (the share "
                "of the steps spent cooling down, e.g. 0.2)"
            )
        if not (self.muon_lr > 0 and math.isfinite(self.muon_lr)):
            raise ConfigError(f"optim.muon_lr={self.muon_lr} must be a positive number")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"optim.muon_momentum={self.muon_momentum} must be in [0, 1)")
        if self.muon_weight_decay < 0:
            raise ConfigError(f"optim.muon_weight_decay={self.muon_weight_decay} must be >= 0")
        self._check_keys_of_other_optimizers()

    def _check_keys_of_other_optimizers(self) -> None:
        """A key that only another optimizer reads (set away from its default) is a mistake the
        run would silently ignore: name it and its counterpart."""
        keys = ("momentum", "nesterov", "muon_lr", "muon_momentum", "muon_weight_decay")
        defaults = {f.name: f.default for f in fields(self) if f.name in keys}
        changed = {k for k in keys if getattr(self, k) != defaults[k]}
        if self.name == OptimizerName.muon:
            for key in ("momentum", "nesterov"):
                if key in changed:
                    hint = (
                        "Muon's momentum is optim.muon_momentum"
                        if key == "momentum"
                        else "Muon always uses Nesterov momentum"
                    )
                    raise ConfigError(
                        f"optim.{key}={getattr(self, key)} is an SGD setting, and "
                        f"optim.name=muon ignores it; drop it ({hint})"
                    )
        else:
            for key in ("muon_lr", "muon_momentum", "muon_weight_decay"):
                if key in changed:
                    raise ConfigError(
                        f"optim.{key}={getattr(self, key)} is a Muon setting, and optim.name="
                        f"{self.name} ignores it; drop it, or use optim=muon"
                    )


@dataclass
class TrainerConfig:
    """The training loop: device, precision, budget, batching, evaluation, checkpoints."""

    device: Device = Device.auto
    strategy: Strategy = Strategy.auto  # how several processes share a step (torchrun, SLURM)
    dist_backend: DistBackend = DistBackend.auto  # torch.distributed's, for several processes
    precision: Precision = Precision.auto  # autocast; fp16 adds a GradScaler
    # auto | true | false. A string, not a Compile field: Hydra reads `trainer.compile=true`
    # as a bool, which an Enum field would refuse; __post_init__ turns it into a Compile.
    compile: str = "auto"
    epochs: int = 1000  # an upper bound; max_steps and max_time usually stop first
    max_steps: int = 600
    max_time: float | None = None  # seconds of training before a final evaluation; null = no limit
    batch_size: int = 16
    grad_accum: int = 1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_interval: int = 200
    eval_at_start: bool = True  # also evaluate before the first step (a fresh run, not a resume)
    eval_max_batches: int | None = None  # null = the whole validation (and test) split
    log_interval: int = 10
    patience: int | None = None  # evaluations without improvement before stopping; null = off
    seed: int = 1337
    threads: int | None = None  # torch intra-op threads; null = torch's default
    checkpoint_interval: int | None = 100  # steps between checkpoints (and one at the end)
    checkpoint_dir: str | None = None  # null = <Hydra output folder>/checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (and in MLflow)
    checkpoint_to_mlflow: bool = False  # also copy each checkpoint into the run's artifacts
    resume: str | None = None  # auto | a checkpoint file or folder | an MLflow run id
    on_nonfinite: OnNonFinite = OnNonFinite.fail  # what a NaN/inf loss does
    # The sample printed and logged at the end (sample.txt), drawn the way a reader would read the
    # model: greedy decoding of a small model soon loops ("= = = ="). sample_greedy.txt is
    # logged beside it. sample_temperature=0 makes the sample itself greedy.
    sample_tokens: int = 40
    sample_prompt: str = "The meaning of life is"
    sample_temperature: float = 0.8
    sample_top_p: float | None = 0.95
    sample_seed: int = 1337  # a private RNG: the same model always prints the same sample
    # auto | true | false: a tqdm bar on stderr, or one plain log line per log step
    # (pocketgpt.progress). A string for the reason compile is one; __post_init__ makes a Progress.
    progress: str = "auto"

    def __post_init__(self) -> None:
        value = str(self.compile).lower()
        if value not in Compile.__members__:
            raise ConfigError(f"trainer.compile={self.compile!r} is not one of auto, true, false")
        self.compile = Compile(value)
        value = str(self.progress).lower()
        if value not in Progress.__members__:
            raise ConfigError(f"trainer.progress={self.progress!r} is not one of auto, true, false")
        self.progress = Progress(value)
        if self.dist_backend == DistBackend.nccl and self.device in (Device.cpu, Device.mps):
            raise ConfigError(
                f"trainer.dist_backend=nccl with trainer.device={self.device}: NCCL moves CUDA "
                "tensors only; use trainer.dist_backend=gloo (or auto) on this device"
            )
        _positive(
            **{
                "trainer.batch_size": self.batch_size,
                "trainer.grad_accum": self.grad_accum,
                "trainer.epochs": self.epochs,
                "trainer.max_steps": self.max_steps,
                "trainer.eval_interval": self.eval_interval,
                "trainer.log_interval": self.log_interval,
            }
        )
        if self.grad_clip < 0:
            raise ConfigError(
                f"trainer.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)"
            )
        if self.max_time is not None and self.max_time <= 0:
            raise ConfigError(f"trainer.max_time={self.max_time} must be positive seconds, or null")
        for key in ("patience", "checkpoint_interval", "eval_max_batches", "threads"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"trainer.{key}={value} must be positive, or null")
        if self.keep_checkpoints <= 0:
            raise ConfigError(
                f"trainer.keep_checkpoints={self.keep_checkpoints} must be at least 1"
            )
        if self.sample_tokens < 0:
            raise ConfigError(f"trainer.sample_tokens={self.sample_tokens} must be >= 0")
        try:  # the sample's settings, checked now rather than after training
            SamplingConfig(
                temperature=self.sample_temperature, top_p=self.sample_top_p, seed=self.sample_seed
            )
        except SamplingError as e:
            raise ConfigError(f"trainer.sample_{e}") from None


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` null means $MLFLOW_TRACKING_URI, else SQLite in ./mlruns."""

    uri: str | None = None
    experiment_name: str = "pocketgpt"
    run_name: str | None = None
    log_model: bool = True  # log the final model as an MLflow Model (pyfunc), linked to the run
    register_as: str | None = None  # NAME or NAME@ALIAS: register the final model as a version
    # MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network; GPU
    # figures where nvidia-ml-py is installed), sampled every system_metrics_interval seconds
    system_metrics: bool = True
    system_metrics_interval: float = 10.0
    # A tracking server that stops answering mid-run delays the figures, not the training (they
    # wait in memory). The end of the run waits this many seconds for it to come back, then
    # writes what is unsent to tracking_outbox.jsonl in the output folder, to import later.
    outage_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.system_metrics_interval <= 0:
            raise ConfigError(
                f"tracking.system_metrics_interval={self.system_metrics_interval} must be "
                "positive (seconds between samples), e.g. 10"
            )
        if not (self.outage_timeout >= 0 and math.isfinite(self.outage_timeout)):
            raise ConfigError(
                f"tracking.outage_timeout={self.outage_timeout} must be >= 0 (seconds the end "
                "of a run waits for an unreachable tracking server), e.g. 300"
            )
        reg = self.register_as
        if reg is None:
            return
        if not self.log_model:
            raise ConfigError(
                f"tracking.register_as={reg!r} needs tracking.log_model=true (nothing to register)"
            )
        name, _, alias = reg.partition("@")
        if not name.strip() or "@" in alias or (reg.count("@") and not alias.strip()):
            raise ConfigError(f"tracking.register_as={reg!r} must be NAME or NAME@ALIAS")
        if alias and alias[0] == "v" and alias[1:].isdigit():
            raise ConfigError(
                f"tracking.register_as={reg!r}: alias {alias!r} looks like a version; pick "
                "another alias, e.g. best"
            )


@dataclass
class TrainConfig:
    """The whole training job, as composed by ``conf/train.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # tokenized corpora and trained tokenizers
    cache_dir: str = "${oc.env:POCKETGPT_CACHE_DIR,.cache/pocketgpt}"


def validate(cfg: TrainConfig) -> None:
    """The checks that span groups (each group checks itself when built)."""
    m, d = cfg.model, cfg.data
    if d.block_size > m.max_len:
        raise ConfigError(
            f"data.block_size={d.block_size} is longer than model.max_len={m.max_len}; "
            f"lower data.block_size or raise model.max_len"
        )
    if cfg.optim.name == OptimizerName.muon and cfg.trainer.strategy == Strategy.fsdp:
        raise ConfigError(
            "optim=muon orthogonalises whole weight matrices, which trainer.strategy=fsdp "
            "shards; use trainer.strategy=ddp (or single) with Muon, or optim=adamw with fsdp"
        )


# --------------------------------------------------------------------------- generation


@dataclass
class SamplingConfig:
    """How text is generated; the generate command, the pyfunc model's params and
    ``pocketgpt.sampling.generate`` all take these fields."""

    max_new_tokens: int = 40
    temperature: float = 0.0  # 0 = greedy (argmax); top_k and top_p then do nothing
    top_k: int | None = None  # keep the k most likely tokens; None or 0 = off
    top_p: float | None = None  # keep the smallest set reaching probability p; None or 1 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    seed: int | None = None  # a private RNG for reproducible sampling; None = torch's global RNG
    stop_at_eos: bool = True
    slide: int = 1  # how far the window moves when the context is full (pocketgpt.sampling)
    use_cache: bool = True  # False: re-run the whole window every step (a reference, and slower)

    def __post_init__(self) -> None:
        self.check()

    def check(self, max_len: int | None = None) -> None:
        """Raise SamplingError naming the first bad setting and the fix; ``max_len`` (the
        model's context) also bounds ``slide``."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 0")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SamplingError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 0:
            raise SamplingError(f"top_k={self.top_k} must be >= 0 (0 or null = off)")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise SamplingError(f"top_p={self.top_p} must be in [0, 1] (1 or null = off)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise SamplingError(
                f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off, >1 penalizes)"
            )
        if self.slide < 1 or (max_len is not None and self.slide > max_len):
            bound = f"model max_len={max_len}" if max_len is not None else "the model's max_len"
            raise SamplingError(f"slide={self.slide} must be between 1 and {bound}")

    @classmethod
    def from_settings(cls, settings: Any) -> SamplingConfig:
        """The sampling fields of any object that has them (e.g. a GenerateConfig)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


@dataclass
class EngineConfig:
    """Which inference engine runs a loaded model (``pocketgpt.load``, the generate command,
    the pyfunc model); see docs/native.md."""

    engine: Engine = Engine.torch
    quantize: Quantize = Quantize.none
    kernels: Kernels = Kernels.optimized
    quantize_head: bool = False  # int8: the tied head (the largest matrix) in int8 too
    threads: int | None = 1  # native engine threads (OpenMP); null = one per core

    def __post_init__(self) -> None:
        # Strings from Python callers and pyfunc params become the Enums (Hydra already does it).
        for name, kind in (("engine", Engine), ("quantize", Quantize), ("kernels", Kernels)):
            value = getattr(self, name)
            try:
                setattr(self, name, kind(value))
            except ValueError:
                allowed = ", ".join(m.value for m in kind)
                raise ConfigError(f"{name}={value!r} is not one of {allowed}") from None
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads={self.threads!r} must be a positive integer or null")
        if self.engine == Engine.torch and self.quantize != Quantize.none:
            raise ConfigError(
                f"quantize={self.quantize.value} needs the native engine; set engine=native "
                "(or engine=auto), or drop quantize"
            )
        if self.quantize_head and self.quantize != Quantize.int8:
            raise ConfigError("quantize_head=true needs quantize=int8; set both, or drop it")

    @classmethod
    def from_settings(cls, settings: Any) -> EngineConfig:
        """The engine fields of any object that has them (e.g. a GenerateConfig)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


@dataclass
class GenerateConfig(SamplingConfig):
    """The generate command: the sampling settings plus where the model comes from."""

    # runs:/RUN_ID/model | models:/NAME/VERSION | models:/NAME@ALIAS | models:/m-ID | m-ID |
    # best:EXPERIMENT | a local folder
    model_uri: str = MISSING
    prompt: str = "The meaning of life is"
    prompts: list[str] = field(default_factory=list)  # a batch; when given, replaces prompt
    metric: str = "val_bpb"  # best:EXPERIMENT ranks the experiment's finished runs by this
    mode: Mode = Mode.min  # whether a lower or higher metric is better
    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else ./mlruns
    device: Device = Device.cpu
    # torch intra-op threads, and the native engine's OpenMP threads. 1: a model this small
    # decodes fastest on one thread (its ops are too small to split, and on a busy machine extra
    # threads wait on each other; see BENCHMARKS.md); null = the library's default.
    threads: int | None = 1
    # The native C++ engine where it can run the model (CPU, default architecture), else PyTorch
    # with a one-line notice; see EngineConfig and docs/native.md.
    engine: Engine = Engine.auto
    quantize: Quantize = Quantize.none
    kernels: Kernels = Kernels.optimized
    quantize_head: bool = False
    stream: bool = True  # print a single prompt's tokens as they come
    # Load once, then answer prompt after prompt typed on the terminal (stdin must be one).
    interactive: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        EngineConfig.from_settings(self)  # checks the engine settings together
        if self.interactive and self.prompts:
            raise ConfigError(
                f"interactive=true reads its prompts from the terminal, and prompts="
                f"{list(self.prompts)} was given too; drop prompts=, or drop interactive=true"
            )


# --------------------------------------------------------------------------- export, evaluate


@dataclass
class ExportConfig:
    """The export command: a model to a transformers or ONNX folder."""

    model_uri: str = MISSING  # every form pocketgpt.load takes
    format: ExportFormat = ExportFormat.hf
    out: str = MISSING  # the folder to write; it must not exist unless overwrite=true
    overwrite: bool = False  # replace an existing out folder (only once the new one is complete)
    log: bool = False  # also log the folder as an artifact of the model's source MLflow run
    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else ./mlruns
    opset: int = 18  # ONNX opset of the graph (format=onnx)

    def __post_init__(self) -> None:
        if not str(self.out).strip():
            raise ConfigError("out='' is empty; give the folder to write, e.g. out=exported/hf")
        if not 14 <= self.opset <= 23:
            raise ConfigError(f"opset={self.opset} must be between 14 and 23, e.g. 18")


@dataclass
class EvaluateConfig:
    """The evaluate command: lm-evaluation-harness tasks on a model, logged to its run."""

    model_uri: str = MISSING  # every form pocketgpt.load takes
    # lm-eval task names. wikitext2_local (the package's test split, as trained: raw text) and
    # wikitext2_local_detok (lm-eval's wikitext detokenizer) run offline; Hub tasks such as
    # wikitext, lambada_openai, hellaswag need network.
    tasks: list[str] = field(default_factory=lambda: ["wikitext2_local"])
    # Text file of the local tasks (WikiText raw layout, " = Title = " headings); null: the
    # package's wikitext2_mini test split.
    local_file: str | None = None
    limit: int | None = None  # documents (or examples) per task; null: all
    num_fewshot: int | None = None  # null: each task's own default
    batch_size: int = 8  # windows per forward pass
    device: Device = Device.cpu
    threads: int | None = None  # torch intra-op threads; null: torch's default
    log: bool = True  # log every task metric into the model's source run (if it has one)
    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else ./mlruns
    output: str | None = None  # also write lm-eval's results as JSON to this file

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks=[] is empty; name at least one, e.g. tasks=[wikitext2_local]")
        _positive(**{"batch_size": self.batch_size})
        if self.limit is not None:
            _positive(**{"limit": self.limit})
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot={self.num_fewshot} must be >= 0 (or null)")


def register_configs() -> None:
    """Register the schemas the YAML files extend (``defaults: [train_schema]``)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
