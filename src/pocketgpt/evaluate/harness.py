"""pocketgpt's model class for EleutherAI's lm-evaluation-harness, registered as ``pocketgpt``.

``PocketGPTLM(model, tokenizer)`` answers lm-eval's three request types:

* ``loglikelihood(context, continuation)``: the continuation's log-probability and whether it
  is the greedy choice. As lm-eval's HF model does, trailing spaces of the context move to the
  continuation, the pair is encoded whole and split at the context's length, and an empty
  context is replaced by the end-of-text token; the input keeps its last ``max_len`` tokens.
* ``loglikelihood_rolling(text)``: the whole text's log-probability, in lm-eval's disjoint
  windows of ``max_len`` tokens (``lm_eval.utils.get_rolling_token_windows``, context 1): the
  first token is predicted from ``<eos>`` (our end-of-text token), then each window of up to
  ``max_len`` tokens from the start of that window only.
* ``generate_until(context, gen_kwargs)``: ``pocketgpt.sampling`` (greedy unless the task asks
  for a temperature), cut at the first stop string.

Importing this module imports lm-eval; ``pocketgpt.evaluate`` does so only when asked to run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows
from tqdm import tqdm

from pocketgpt.config import SamplingConfig
from pocketgpt.model import GPTMini
from pocketgpt.sampling import generate


@register_model("pocketgpt")
class PocketGPTLM(LM):
    def __init__(self, model: GPTMini, tokenizer, batch_size: int = 8):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = model.config.max_len
        self._device = model.tok_emb.weight.device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """``lm_eval --model pocketgpt --model_args pretrained=URI,batch_size=8`` (Python API)."""
        from lm_eval.utils import simple_parse_args_string

        from pocketgpt.loading import load

        args = simple_parse_args_string(arg_string) | (additional_config or {})
        model, tokenizer = load(args["pretrained"], args.get("device") or "cpu")
        return cls(model, tokenizer, int(args.get("batch_size") or 8))

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        return eos if eos is not None else 0

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    # --- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _score(self, windows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(input ids, target ids) pairs, the targets being the tokens after the last
        len(targets) inputs -> (sum of the targets' log-probabilities, all greedy) per pair."""
        out: list[tuple[float, bool]] = [(0.0, False)] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))  # similar lengths
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = len(windows[rows[0]][0])
            # Right padding: a causal model's logits at real positions ignore what follows.
            x = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                inp = windows[i][0]
                x[r, : len(inp)] = torch.tensor(inp)
            logits = self.model(x.to(self._device)).float()  # (b, width, V)
            for r, i in enumerate(rows):
                inp, target = windows[i]
                n = len(target)
                scores = F.log_softmax(logits[r, len(inp) - n : len(inp)], dim=-1)  # (n, V)
                t = torch.tensor(target, device=scores.device)
                ll = scores.gather(1, t[:, None]).sum().item()
                out[i] = (ll, bool((scores.argmax(-1) == t).all()))
        return out

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        cont = whole[len(ctx) :]
        return (ctx or [self.eot_token_id]), cont

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        windows = []
        for req in requests:
            ctx, cont = self._pair(*req.args)
            cont = cont[-self.max_length :]
            inp = (ctx + cont)[-(self.max_length + 1) : -1]
            windows.append((inp, cont))
        return self._score(windows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            for inp, target in get_rolling_token_windows(
                self.tok_encode(text), self.eot_token_id, self.max_length, 1
            ):
                windows.append((inp, target))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._score(windows)):
            totals[k] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        answers = []
        for req in tqdm(requests, disable=disable_tqdm or len(requests) < 2):
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            cfg = SamplingConfig(
                max_new_tokens=int(kwargs.get("max_gen_toks", 256)), temperature=temperature
            )
            prompt = self.tok_encode(context) or [self.eot_token_id]
            new = generate(self.model, [prompt], cfg, eos_id=self.tokenizer.eos_id)[0].tolist()
            eos = self.tokenizer.eos_id
            text = self.tokenizer.decode(new[: new.index(eos)] if eos in new else new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            answers.append(text)
        return answers
