"""Expert runtime: one frozen base model plus named LoRA adapters, answering ``decide`` and ``generate``.

- ``decide(queries, adapter)``: one batched forward pass over the prompts; p(ACCEPT) is the probability mass
  of the ACCEPT token against REJECT at the first answer position, i.e. sigmoid(logit_A - logit_R).
- ``decide_and_generate``: the same forward pass, and the prompts that pass the threshold go on generating
  after ACCEPT from that pass's KV cache (the prompt is never recomputed).
- ``generate(queries, adapter=None)``: plain generation (adapter None = the base model, SEE's fallback).

One process may hold many adapters over one copy of the base (the benchmark and the demo do); a Serve
replica holds exactly one. Adapters are only read from safetensors (never pickle).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .config import SEEConfig
from .model import load_base_model, resolve_model_path
from .prompts import PromptEncoder, Query

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(ValueError):
    """An adapter folder is missing, corrupt, or not in safetensors format."""


def check_adapter_folder(path: str | Path) -> Path:
    """Fail early with the folder and the problem, instead of deep inside peft."""
    p = Path(path)
    if not p.is_dir():
        raise AdapterError(f"adapter folder {p} does not exist")
    if not (p / ADAPTER_CONFIG).exists():
        raise AdapterError(f"{p}: missing {ADAPTER_CONFIG}; not a PEFT adapter folder")
    try:
        json.loads((p / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{p / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not (p / ADAPTER_WEIGHTS).exists():
        extra = " (pickled .bin adapters are refused)" if (p / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{p}: missing {ADAPTER_WEIGHTS}{extra}")
    try:
        from safetensors import safe_open

        with safe_open(str(p / ADAPTER_WEIGHTS), framework="pt") as f:
            if not list(f.keys()):
                raise AdapterError(f"{p / ADAPTER_WEIGHTS}: holds no tensors")
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises several types for truncated/garbage files
        raise AdapterError(f"{p / ADAPTER_WEIGHTS}: corrupt safetensors file ({e})") from None
    return p


class SEEModel:
    """The base model and its adapters in one process."""

    def __init__(self, cfg: SEEConfig, model_path: str | None = None, batch_size: int = 16):
        self.cfg = cfg
        self.model_path = model_path or resolve_model_path(cfg.model)
        self.base, self.tokenizer = load_base_model(cfg.model, self.model_path)
        self.encoder = PromptEncoder(self.tokenizer, cfg.indicators, cfg.model.max_prompt_tokens)
        self.peft = None  # becomes a PeftModel when the first adapter is loaded
        self.adapters: dict[str, str] = {}
        self.batch_size = batch_size  # rows per forward pass; bounds activation memory

    # -- adapters -------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> None:
        from peft import PeftModel

        p = check_adapter_folder(path)
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(p), adapter_name=name)
        else:
            if name in self.adapters:
                self.peft.delete_adapter(name)
            self.peft.load_adapter(str(p), adapter_name=name)
        self.peft.eval()
        self.adapters[name] = str(p)

    @contextlib.contextmanager
    def _use(self, adapter: str | None):
        if adapter is None:
            if self.peft is None:
                yield self.base
            else:
                with self.peft.disable_adapter():
                    yield self.peft
            return
        if adapter not in self.adapters:
            raise KeyError(f"unknown adapter {adapter!r}; loaded: {sorted(self.adapters)}")
        self.peft.set_adapter(adapter)
        yield self.peft

    # -- batching helpers ------------------------------------------------------------------------------
    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left padding, so that every row's next token sits in the last column (decide and generate)."""
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.encoder.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s) :] = torch.tensor(s)
            mask[i, n - len(s) :] = 1
        return ids, mask

    def _chunks(self, seqs: list[list[int]]):
        """Yield (indices, seqs) chunks, length-sorted so that little padding is computed."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for k in range(0, len(order), self.batch_size):
            idx = order[k : k + self.batch_size]
            yield idx, [seqs[i] for i in idx]

    def _generate(self, model, ids, mask, max_new_tokens: int, cache=None) -> list[str]:
        from transformers import GenerationConfig

        gc = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.encoder.pad_id,
            eos_token_id=self.encoder.eos_id,
        )
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, generation_config=gc)
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]

    def _chat_prompt(self, q: Query) -> list[int]:
        """The base model answers out-of-distribution queries as the general model it is: through its own chat
        template (an instruct model given the SEE template answered '' to "What is the largest planet?").
        Over-long prompts keep their last ``max_prompt_tokens`` tokens (the generation cue is at the end)."""
        messages = ([{"role": "system", "content": q.definition}] if q.definition else []) + [
            {"role": "user", "content": q.input}
        ]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)[-self.cfg.model.max_prompt_tokens :]

    def encode(self, queries: list[Query]) -> list[list[int]]:
        return [self.encoder.encode_query(q) for q in queries]

    # -- the three operations ------------------------------------------------------------------------
    @torch.inference_mode()
    def decide_and_generate(
        self,
        queries: list[Query],
        adapter: str,
        threshold: float | None,
        max_new_tokens: int,
    ) -> tuple[list[float], list[str | None]]:
        """p(ACCEPT) for every query; for those with p >= threshold also the answer (None otherwise).

        ``threshold=None`` only decides. The accepted rows continue from the decide pass's KV cache.
        """
        seqs = self.encode(queries)
        probs: list[float] = [0.0] * len(seqs)
        answers: list[str | None] = [None] * len(seqs)
        with self._use(adapter) as model:
            for idx, chunk in self._chunks(seqs):
                ids, mask = self._left_pad(chunk)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each row's text
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=threshold is not None)
                last = out.logits[:, -1, :].float()
                p = torch.sigmoid(last[:, self.encoder.accept_id] - last[:, self.encoder.reject_id])
                for i, v in zip(idx, p.tolist()):
                    probs[i] = v
                if threshold is None:
                    continue
                keep = [r for r, v in enumerate(p.tolist()) if v >= threshold]
                if not keep:
                    continue
                cache = out.past_key_values
                cache.batch_select_indices(torch.tensor(keep))
                accept = torch.full((len(keep), 1), self.encoder.accept_id, dtype=torch.long)
                gen_ids = torch.cat([ids[keep], accept], dim=1)
                gen_mask = torch.cat([mask[keep], torch.ones_like(accept)], dim=1)
                texts = self._generate(model, gen_ids, gen_mask, max_new_tokens, cache=cache)
                for r, t in zip(keep, texts):
                    answers[idx[r]] = t
        return probs, answers

    def decide(self, queries: list[Query], adapter: str) -> list[float]:
        return self.decide_and_generate(queries, adapter, None, 0)[0]

    @torch.inference_mode()
    def generate(
        self,
        queries: list[Query],
        adapter: str | None = None,
        max_new_tokens: int = 64,
        after_accept: bool = False,
    ) -> list[str]:
        """Generate from the prompt (recomputing it). ``after_accept`` appends ACCEPT first, as an expert
        that accepted would; the base model (adapter None) and the baselines answer directly."""
        if adapter is None and getattr(self.tokenizer, "chat_template", None):
            seqs = [self._chat_prompt(q) for q in queries]
        else:
            seqs = self.encode(queries)
        if after_accept:
            seqs = [s + [self.encoder.accept_id] for s in seqs]
        answers: list[str] = [""] * len(seqs)
        with self._use(adapter) as model:
            for idx, chunk in self._chunks(seqs):
                ids, mask = self._left_pad(chunk)
                for i, t in zip(idx, self._generate(model, ids, mask, max_new_tokens)):
                    answers[i] = t
        return answers


class ExpertRuntime:
    """One expert = the shared base + one adapter; what a Serve replica wraps."""

    def __init__(self, model: SEEModel, name: str, adapter_path: str | Path | None = None):
        self.model, self.name = model, name
        if adapter_path is not None:
            model.load_adapter(name, adapter_path)

    def decide(self, queries: list[Query]) -> list[float]:
        return self.model.decide(queries, self.name)

    def generate(self, queries: list[Query], max_new_tokens: int = 64) -> list[str]:
        return self.model.generate(queries, self.name, max_new_tokens, after_accept=True)

    def decide_and_generate(self, queries: list[Query], threshold: float, max_new_tokens: int = 64):
        return self.model.decide_and_generate(queries, self.name, threshold, max_new_tokens)
