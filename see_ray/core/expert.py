"""The expert model (``SEEModel``): one frozen base model plus named LoRA adapters, answering ``decide`` and
``generate``.

- ``decide(queries, adapter)``: one batched forward pass over the prompts; p(ACCEPT) is the probability mass
  of the ACCEPT token against REJECT at the first answer position, i.e. sigmoid(logit_A - logit_R).
- ``decide_and_generate``: the same forward pass, and the prompts that pass the threshold go on generating
  after ACCEPT from that pass's KV cache (the prompt is never recomputed).
- ``generate(queries, adapter=None)``: plain generation (adapter None = the base model, SEE's fallback).
- ``stream(query, adapter, threshold)``: one query token by token (Serve's streaming responses), through the
  same decide pass and the same greedy decode loop (``_decode``) as the batched calls, so the streamed pieces
  concatenate to exactly the batched answer.

One process may hold many adapters over one copy of the base (the benchmark and the demo do); a Serve
replica holds exactly one. Adapters are only read from safetensors (never pickle).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from see_ray.config import SEEConfig
from see_ray.core.model import load_base_model, resolve_model_path
from see_ray.core.prompts import PromptEncoder, Query
from see_ray.core.routing import accepts

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(ValueError):
    """An adapter folder is missing, corrupt, or not in safetensors format."""


PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


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
    # Unpickling runs arbitrary code, and peft falls back to adapter_model.bin on its own: a folder that holds
    # any pickle-format file is refused outright, even next to a safetensors file.
    pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"{p}: holds pickle-format file(s) {pickles}; only safetensors adapters are loaded (pickled .bin "
            "adapters are refused: loading a pickle can run code). Remove them or re-save with safetensors."
        )
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


def resolve_device(name: str) -> torch.device:
    """``model.device`` for this process: auto = cuda when a GPU is visible here, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda, but this process sees no GPU (torch.cuda.is_available() is False)")
    return torch.device(name)


class SEEModel:
    """The base model and its adapters in one process."""

    def __init__(self, cfg: SEEConfig, model_path: str | None = None, batch_size: int = 16, base=None,
                 device: str | None = None):
        """``base``: a ready (model, tokenizer) pair, e.g. built around weights shared between the replicas
        of a node (see_ray/serve/shared_weights.py); by default this process loads a private copy.
        ``device``: overrides ``model.device`` (a Serve replica resolves "auto" from the GPUs it reserved)."""
        self.cfg = cfg
        self.model_path = model_path or resolve_model_path(cfg.model)
        self.base, self.tokenizer = base if base is not None else load_base_model(cfg.model, self.model_path)
        self.device = resolve_device(device or cfg.model.device)
        if self.device.type != "cpu":
            self.base.to(self.device)  # adapters loaded later follow their base layers' device (peft)
        self.encoder = PromptEncoder(self.tokenizer, cfg.indicators, cfg.model.max_prompt_tokens)
        self._indicator_ids = [self.encoder.accept_id, self.encoder.reject_id]  # a list indexes logits on any device
        self.peft = None  # becomes a PeftModel when the first adapter is loaded
        self.adapters: dict[str, str] = {}
        self.batch_size = batch_size  # rows per forward pass; bounds activation memory
        # transformers 5.x renamed the KV-cache argument and output field past_key_values -> cache (the old
        # name warns, and goes in 5.40); take whichever this version has
        fwd = inspect.signature(self.base.forward).parameters
        self._cache_kw = "cache" if "cache" in fwd else "past_key_values"

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
        return ids.to(self.device), mask.to(self.device)

    def _chunks(self, seqs: list[list[int]]):
        """Yield (indices, seqs) chunks, length-sorted so that little padding is computed."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for k in range(0, len(order), self.batch_size):
            idx = order[k : k + self.batch_size]
            yield idx, [seqs[i] for i in idx]

    def _decode(self, model, ids, mask, max_new_tokens: int, cache=None, expert_answer: bool = False) -> Iterator[torch.Tensor]:
        """Greedy decoding, one step per iteration: yields every row's next token (a ``[rows]`` tensor; rows that
        already produced EOS yield padding). The one decode loop of the package: batched answers collect it
        (``_texts``), streaming answers (``stream``) hand each step to the client as it is computed.

        ``cache``: the KV cache of a pass over a prefix of ``ids`` (the decide pass); only the rest is computed.
        Without it the whole prompt is prefilled first. Left padding: positions start at each row's text.
        ``expert_answer``: the rows continue an ACCEPT; with ``indicators.keep_out_of_answers`` the indicator
        tokens are then never chosen.
        """
        banned = self._indicator_ids if expert_answer and self.cfg.indicators.keep_out_of_answers else None
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        feed = ids if cache is None else ids[:, cache.get_seq_length() :]
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -feed.shape[1] :]
            # logits_to_keep=1: only the last position's 49k-wide output row is needed
            out = model(input_ids=feed, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                        **{self._cache_kw: cache})
            cache = out[self._cache_kw]
            logits = out.logits[:, -1, :].float()
            if banned is not None:
                logits[:, banned] = float("-inf")
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.encoder.pad_id), nxt)
            yield nxt
            done |= nxt == self.encoder.eos_id
            if bool(done.all()):
                return
            feed = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(feed)], dim=1)

    def _texts(self, steps: Iterator[torch.Tensor], rows: int) -> list[str]:
        """Collect a ``_decode`` run into the rows' answers (special tokens dropped, stripped)."""
        cols = list(steps)
        if not cols:
            return [""] * rows
        out = torch.stack(cols, dim=1).cpu()
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _decide_pass(self, model, ids, mask, keep_cache: bool):
        """One forward pass over left-padded prompts: p(ACCEPT) per row and the KV cache (if asked for)."""
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each row's text
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=keep_cache, logits_to_keep=1)
        last = out.logits[:, -1, :].float()
        p = torch.sigmoid(last[:, self.encoder.accept_id] - last[:, self.encoder.reject_id])
        return p.tolist(), (out[self._cache_kw] if keep_cache else None)

    def _after_accept(self, ids, mask, cache, keep: list[int]):
        """The rows in ``keep`` continued by the ACCEPT token, with their part of the decide pass's cache."""
        cache.batch_select_indices(torch.tensor(keep, device=ids.device))
        accept = torch.full((len(keep), 1), self.encoder.accept_id, dtype=torch.long, device=ids.device)
        return torch.cat([ids[keep], accept], dim=1), torch.cat([mask[keep], torch.ones_like(accept)], dim=1), cache

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
                p, cache = self._decide_pass(model, ids, mask, keep_cache=threshold is not None)
                for i, v in zip(idx, p):
                    probs[i] = v
                if threshold is None:
                    continue
                keep = [r for r, v in enumerate(p) if accepts(v, threshold)]
                if not keep:
                    continue
                gen_ids, gen_mask, cache = self._after_accept(ids, mask, cache, keep)
                texts = self._texts(self._decode(model, gen_ids, gen_mask, max_new_tokens, cache, True), len(keep))
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
        seqs = self._prompts(queries, adapter, after_accept)
        answers: list[str] = [""] * len(seqs)
        with self._use(adapter) as model:
            for idx, chunk in self._chunks(seqs):
                ids, mask = self._left_pad(chunk)
                steps = self._decode(model, ids, mask, max_new_tokens, expert_answer=after_accept)
                for i, t in zip(idx, self._texts(steps, len(idx))):
                    answers[i] = t
        return answers

    def _prompts(self, queries: list[Query], adapter: str | None, after_accept: bool) -> list[list[int]]:
        if adapter is None and getattr(self.tokenizer, "chat_template", None):
            seqs = [self._chat_prompt(q) for q in queries]
        else:
            seqs = self.encode(queries)
        return [s + [self.encoder.accept_id] for s in seqs] if after_accept else seqs

    @torch.inference_mode()
    def stream(
        self, query: Query, adapter: str | None, threshold: float | None, max_new_tokens: int
    ) -> Iterator[dict]:
        """One query, token by token, computed exactly as the batched path computes a batch of one.

        Yields ``{"p": p(ACCEPT)}`` first (``{"p": None}`` for the base model, ``adapter=None``, which does not
        decide); then, if the expert accepts (``p >= threshold``; ``threshold=None``: decide only) or for the
        base, ``{"text": piece}`` as tokens are generated, and finally ``{"answer": full text, "tokens": n}``.
        The pieces concatenate to ``answer``, which equals ``decide_and_generate`` / ``generate``'s answer.
        """
        with self._use(adapter) as model:
            if adapter is None:
                yield {"p": None}
                ids, mask = self._left_pad(self._prompts([query], None, False))
                steps = self._decode(model, ids, mask, max_new_tokens)
            else:
                ids, mask = self._left_pad(self.encode([query]))
                p, cache = self._decide_pass(model, ids, mask, keep_cache=threshold is not None)
                yield {"p": p[0]}
                if threshold is None or p[0] < threshold:
                    return
                gen_ids, gen_mask, cache = self._after_accept(ids, mask, cache, [0])
                steps = self._decode(model, gen_ids, gen_mask, max_new_tokens, cache, True)
            text = StreamText(self.tokenizer)
            for tok in steps:
                piece = text.push(int(tok[0]))
                if piece:
                    yield {"text": piece, "tokens": text.generated}
            piece = text.finish()
            if piece:
                yield {"text": piece, "tokens": text.generated}
            yield {"answer": text.sent, "tokens": text.generated}


class StreamText:
    """One row's tokens -> text pieces whose concatenation is exactly the batched answer,
    ``decode(tokens, skip_special_tokens=True).strip()``.

    Leading whitespace is dropped; trailing whitespace and an incomplete UTF-8 character (decoded as U+FFFD
    while its bytes are split over tokens) are held back until a later token settles them. Decoding the whole
    prefix each step keeps byte-level BPE exact (a token may end inside a character).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.generated = 0  # tokens generated, EOS excluded

    def push(self, token_id: int) -> str:
        if token_id == self.tokenizer.eos_token_id:
            return ""
        self.generated += 1
        self.ids.append(token_id)
        text = self._decoded()
        while text and (text[-1].isspace() or text[-1] == "\ufffd"):
            text = text[:-1]
        return self._emit(text)

    def finish(self) -> str:
        return self._emit(self._decoded().rstrip())

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            # nothing new (or a decode that rewrote earlier text, which byte-level BPE does not do)
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

