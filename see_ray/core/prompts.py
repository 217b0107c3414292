"""The one prompt template and its tokenization, used identically in training, routing and evaluation.

A prompt is SuperNI-style: the task's definition, the input, then an output cue. Clients usually send the
raw query, so the definition is optional ("input-only" mode); experts are trained on both modes.

    Definition: <definition>        <- omitted in input-only mode
    <blank line>
    Input:
    <input>
    Output:

The target that follows the cue is ``ACCEPT`` + `` answer`` + EOS for an expert's own task, ``REJECT`` alone
for anything else, and `` answer`` + EOS for the baselines (no indicator).

Tokenization is done piece by piece, with boundaries on newlines (where BPE never merges across), so that
the input can be truncated by token count while the definition and the output cue are always kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from see_ray.config import IndicatorConfig

log = logging.getLogger(__name__)

INPUT_HEADER = "Input:\n"
OUTPUT_CUE = "\nOutput:"


@dataclass(frozen=True)
class Query:
    """What an expert is asked: the raw input, and optionally the task definition in front of it."""

    input: str
    definition: str | None = None

    def render(self) -> str:
        head = f"Definition: {self.definition}\n\n" if self.definition else ""
        return f"{head}{INPUT_HEADER}{self.input}{OUTPUT_CUE}"


class IndicatorError(ValueError):
    """An indicator string does not map to exactly one token of the base vocabulary."""


def resolve_indicators(tokenizer, cfg: IndicatorConfig) -> tuple[int, int]:
    """Token ids of ACCEPT and REJECT; each must be one token (LoRA cannot add vocabulary rows)."""
    ids = []
    for field, text in (("accept", cfg.accept), ("reject", cfg.reject)):
        toks = tokenizer.encode(text, add_special_tokens=False)
        if len(toks) != 1:
            raise IndicatorError(
                f"indicators.{field}={text!r} encodes to {len(toks)} tokens {toks}; it must be exactly one token"
            )
        ids.append(toks[0])
    return ids[0], ids[1]


class PromptEncoder:
    """Turns queries and targets into token ids under a prompt budget."""

    def __init__(self, tokenizer, indicators: IndicatorConfig, max_prompt_tokens: int):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.accept_id, self.reject_id = resolve_indicators(tokenizer, indicators)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self._enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
        self._cue = self._enc(OUTPUT_CUE)
        self._header = self._enc(INPUT_HEADER)
        self.truncated = 0  # how many prompts were cut so far (callers report it)

    def encode_query(self, q: Query) -> list[int]:
        head = self._enc(f"Definition: {q.definition}\n\n") if q.definition else []
        body = self._enc(q.input)
        budget = self.max_prompt_tokens - len(self._header) - len(self._cue)
        if len(head) + len(body) > budget:
            self.truncated += 1
            if self.truncated in (1, 10, 100, 1000):  # say so, without flooding the log
                log.warning(
                    "prompt of %d tokens truncated to model.max_prompt_tokens=%d (input tail cut; %d so far)",
                    len(head) + len(body) + len(self._header) + len(self._cue),
                    self.max_prompt_tokens,
                    self.truncated,
                )
            head = head[: budget // 2] if len(head) > budget // 2 else head  # a huge definition gets half
            body = body[: budget - len(head)]
        return head + self._header + body + self._cue

    def encode_target(self, indicator: str | None, answer: str | None, max_tokens: int) -> list[int]:
        """ACCEPT + answer + EOS, REJECT alone, or answer + EOS (baselines)."""
        if indicator == "reject":
            return [self.reject_id]
        ids = [self.accept_id] if indicator == "accept" else []
        ans = self._enc(" " + (answer or "").strip())[: max_tokens - len(ids) - 1]
        return ids + ans + [self.eos_id]
