"""``NativeGPT``: a model folder run by the C++ engine behind GPTMini's inference interface.

The engine reads ``model.safetensors`` (memory-mapped, header parsed in C++) and
``model_config.json`` itself; nothing here touches the weights. Tensors cross the boundary as
NumPy arrays without copies: ids (B, T) int64 in, logits float32 out.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pocketgpt.config import EngineConfig, ModelConfig
from pocketgpt.errors import ConfigError, ModelFileError
from pocketgpt.native._engine import Engine, EngineFileError


class NativeKVCache:
    """GPTMini's ``KVCache`` interface over the engine's cache (keys, values and scratch)."""

    def __init__(self, engine: Engine, batch_size: int, max_len: int):
        self.batch_size, self.max_len = batch_size, max_len
        self.pads: torch.Tensor | None = None
        self._cache = engine.new_cache(batch_size)

    def reset(self, pads: torch.Tensor | None = None) -> NativeKVCache:
        """Start a new batch of sequences; ``pads`` (B,): each row's number of padding tokens."""
        if pads is not None and not bool(pads.any()):
            pads = None
        self.pads = pads
        if pads is None:
            self._cache.clear_pads()
        else:
            self._cache.reset(pads.cpu().numpy())
        return self

    def start_profile(self) -> None:
        """Time each stage of every forward on this cache from now on (benchmarks/bench_native)."""
        self._cache.start_profile()

    def profile(self) -> dict[str, float]:
        """Seconds per stage (embed, layer_norm, qkv, attention, ..., head) since start_profile."""
        return dict(self._cache.profile())


class NativeGPT:
    """Inference-only stand-in for ``GPTMini`` (eval mode, no gradients) on the native engine.

    ``model(idx, input_pos=, cache=)`` -> logits (B, T, vocab); ``model(idx, targets)`` ->
    (logits, loss), so ``evaluation.evaluate`` measures it; ``last_logits`` -> (B, vocab) of
    each row's last token, the call ``sampling.generate`` makes per step.
    """

    device = torch.device("cpu")
    training = False

    def __init__(self, model_dir: str | os.PathLike, config: ModelConfig, cfg: EngineConfig):
        self.config = config
        self.engine_config = cfg
        try:
            self._engine = Engine(
                os.fspath(model_dir),
                kernels=cfg.kernels.value,
                quantize=cfg.quantize.value,
                quantize_head=cfg.quantize_head,
                threads=cfg.threads or 0,
            )
        except EngineFileError as e:
            raise ModelFileError(str(e)) from None

    def __repr__(self) -> str:
        c = self.engine_config
        return (
            f"NativeGPT(kernels={c.kernels.value}, quantize={c.quantize.value}, "
            f"threads={self._engine.threads}, {self.config})"
        )

    def eval(self) -> NativeGPT:
        return self

    def train(self, mode: bool = True) -> NativeGPT:
        if mode:
            raise ConfigError("the native engine runs inference only; train the PyTorch GPTMini")
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        """GPTMini's count for the same config (tied head counted once)."""
        c, b = self.config, int(self.config.bias)
        C, F = c.d_model, c.d_ff
        block = 2 * C * (1 + b) + 3 * C * C + 3 * C * b + C * C + C * b
        block += F * C + F * b + C * F + C * b
        n = c.vocab_size * C + c.max_len * C + c.num_layers * block + C * (1 + b)
        return n - c.max_len * C if non_embedding else n

    def new_kv_cache(self, batch_size: int) -> NativeKVCache:
        return NativeKVCache(self._engine, batch_size, self.config.max_len)

    def _forward(self, idx: torch.Tensor, input_pos, cache, all_positions: bool) -> torch.Tensor:
        if cache is None:  # a whole window from position 0: a throwaway cache, no padding
            if input_pos:
                raise ValueError(
                    f"input_pos={input_pos} without a cache: the native engine starts a window "
                    "at position 0; pass cache=model.new_kv_cache(B)"
                )
            cache = self.new_kv_cache(idx.size(0))
        elif not isinstance(cache, NativeKVCache):
            raise ConfigError("a NativeGPT needs its own cache: use model.new_kv_cache(B)")
        ids = idx.detach().cpu().numpy().astype(np.int64, copy=False)
        # ValueError on an impossible shape, worded as GPTMini words it
        out = self._engine.forward(cache._cache, ids, input_pos or 0, all_positions)
        return torch.from_numpy(out)

    def last_logits(
        self, idx: torch.Tensor, *, input_pos: int | None = None, cache: NativeKVCache | None = None
    ) -> torch.Tensor:
        """idx (B, T) into cache slots input_pos.. -> logits (B, vocab) of each row's last one."""
        return self._forward(idx, input_pos, cache, all_positions=False)

    def __call__(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        input_pos: int | None = None,
        cache: NativeKVCache | None = None,
    ):
        logits = self._forward(idx, input_pos, cache, all_positions=True)  # (B, T, vocab)
        if targets is None:
            return logits
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1)
        )
        return logits, loss
