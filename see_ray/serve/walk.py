"""The dispatcher's routing of one request over the served experts, without Ray: ``Walker``.

The ingress (``ingress.Dispatcher``) keeps a ``Walker`` whose sequence it replaces whenever the registry or
Serve's applications change. Every ``Entry`` carries its expert's calls as plain async callables (in
serving: the expert's Serve handle's ``ask``; in tests: any async function), so this module imports neither
Ray nor Serve and its logic is tested with fakes (tests/unit/test_walk.py).

One routed request: ``Walker.route`` runs SEE's first-accept walk (``see_ray.core.routing.walk``, sequential or
``width`` experts at a time) with one ``ask`` per hop, a call to the expert replica's ``ask`` (``replica.py``):
decide and, on ACCEPT, generate in the same call. If every expert rejects, the base replica's ``generate``
answers. A request for a named model skips the walk (``Walker.forced``). Every call to a replica is re-sent on
the error types the walker is given as retryable (a replica that died), with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from see_ray.config.constants import BASE
from see_ray.core.prompts import Query
from see_ray.core.routing import Ask, RouteResult, accepts, walk

log = logging.getLogger(__name__)

Call = Callable[[dict], Awaitable[dict]]

# Waits between re-sent calls (s): the first lets Serve's router drop the dead replica, the later ones cover a
# single-replica deployment whose replica is being restarted (requests then queue in the handle until it is up).
RETRY_BACKOFF_S = (0.2, 1.0, 2.0, 4.0)

MODES = ("sequential", "concurrent")


@dataclass
class Entry:
    """One expert of the served sequence."""

    name: str
    task: str
    version: int
    position: int
    threshold: float  # its effective threshold (core.routing.threshold_of)
    app: str  # its Serve application
    ask: Call  # one hop: {input, definition, threshold, max_tokens, generate} -> {p, answer, ...}
    stream: Callable[[dict], Any] | None = None  # opens its token stream (the ingress streams; the walk does not)


class Hooks:
    """What the walker reports as it works (the ingress records these as metrics); each a no-op here."""

    def hop(self, expert: str, ms: float) -> None:
        """One ask of ``expert`` returned after ``ms`` (retries included)."""

    def decision(self, expert: str, decision: str) -> None:
        """A hop entered a trace: ``accept`` / ``reject``, or ``forced`` (a named expert answered)."""

    def fallback(self) -> None:
        """Every expert rejected: the base answers."""

    def base_ms(self, ms: float) -> None:
        """The base's answer to a routed request took ``ms``."""

    def retry(self, target: str) -> None:
        """A call to ``target`` (an expert, or the base) is re-sent."""


class Walker:
    """Routes one request over ``seq``; ``base`` generates the base model's answer.

    ``retryable``: exception types after which a call is re-sent (at most ``max_retries`` times, waiting
    ``backoff_s[attempt]``); every call is a pure function of its request, so re-sending cannot change the
    answer. ``mode``/``width``: ``sequential``, or ``concurrent`` with ``width`` experts asked at once.
    """

    def __init__(self, base: Call, mode: str = "sequential", width: int = 1,
                 retryable: tuple[type[BaseException], ...] = (), max_retries: int = 0,
                 backoff_s: tuple[float, ...] = RETRY_BACKOFF_S, hooks: Hooks | None = None):
        self.base = base
        self.seq: list[Entry] = []
        self.mode, self.width = "sequential", 1
        self.set_mode(mode, width)
        self.retryable, self.max_retries, self.backoff_s = retryable, max_retries, backoff_s
        self.hooks = hooks or Hooks()
        self.inflight: dict[str, int] = {}  # calls to each expert not yet returned (removal waits for 0)
        self.retries = 0  # calls re-sent so far

    def set_mode(self, mode: str | None = None, width: int | None = None) -> dict:
        """Switch between sequential and concurrent walking in place (benchmarks, tests)."""
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"unknown dispatch mode {mode!r}")
            self.mode = mode
        if width is not None:
            if width < 1:
                raise ValueError("width must be >= 1")
            self.width = width
        return {"mode": self.mode, "width": self.width}

    def entry(self, name: str) -> Entry:
        return next(e for e in self.seq if e.name == name)

    def add_inflight(self, name: str, n: int) -> None:
        self.inflight[name] = self.inflight.get(name, 0) + n

    # -- calls -------------------------------------------------------------------------------------------
    async def call(self, fn: Call, req: dict, target: str) -> dict:
        """``fn(req)``, re-sent after a retryable error: the retry reaches another replica, or waits in the
        handle until the restarted one is up. After ``max_retries`` re-sends the error propagates."""
        for attempt in range(self.max_retries + 1):
            try:
                return await fn(req)
            except self.retryable as exc:
                if attempt >= self.max_retries:
                    raise
                self.retries += 1
                self.hooks.retry(target)
                log.warning("%s: %s; re-sending (retry %d of %d)", target, type(exc).__name__, attempt + 1,
                            self.max_retries)
                await asyncio.sleep(self.backoff_s[min(attempt, len(self.backoff_s) - 1)])
        raise AssertionError("unreachable")  # the last attempt returned or raised

    async def _ask(self, e: Entry, q: Query, max_tokens: int, generate: bool,
                   threshold: float | None = None) -> tuple[dict, float]:
        """One hop: ``e`` decides ``q`` at its threshold (or ``threshold``) and, if it accepts and ``generate``,
        answers from the same call. Returns its result and the hop's latency (ms)."""
        thr = e.threshold if threshold is None else threshold
        req = {"input": q.input, "definition": q.definition, "threshold": thr, "max_tokens": max_tokens,
               "generate": generate}
        self.add_inflight(e.name, 1)
        t0 = time.perf_counter()
        try:
            r = await self.call(e.ask, req, e.name)
        finally:
            self.add_inflight(e.name, -1)
        ms = (time.perf_counter() - t0) * 1000
        self.hooks.hop(e.name, ms)
        return r, ms

    async def _base(self, q: Query, max_tokens: int) -> dict:
        return await self.call(self.base, {"input": q.input, "definition": q.definition, "max_tokens": max_tokens},
                               BASE)

    # -- routing -----------------------------------------------------------------------------------------
    async def route(self, q: Query, max_tokens: int, generate: bool = True,
                    mode: str | None = None) -> tuple[RouteResult, dict, Entry | None]:
        """SEE's routing of one query. Returns the result, the answer's info from the replica (token counts,
        finish; ``{}`` when nothing was generated) and the accepting entry (None: the base answered, or would
        answer with ``generate=False``)."""
        seq = list(self.seq)  # a snapshot: a refresh during the walk does not change this request's sequence
        width = 1 if (mode or self.mode) == "sequential" else self.width

        async def ask(e: Entry, idx: list[int]) -> list[dict]:
            r, _ = await self._ask(e, q, max_tokens, generate)
            return [r]

        def on_ask(a: Ask) -> None:
            self.hooks.decision(a.expert, "accept" if a.accepted else "reject")

        (d,) = await walk(seq, [q], ask, [e.threshold for e in seq], width, on_ask)
        if d.expert is not None:
            return RouteResult(d.result["answer"], d.expert.name, d.trace), d.result, d.expert
        self.hooks.fallback()
        if not generate:
            return RouteResult(None, BASE, d.trace), {}, None
        t0 = time.perf_counter()
        r = await self._base(q, max_tokens)
        self.hooks.base_ms((time.perf_counter() - t0) * 1000)
        return RouteResult(r["answer"], BASE, d.trace), r, None

    async def forced(self, model: str, q: Query, max_tokens: int) -> tuple[RouteResult, dict, Entry | None]:
        """The answer of the named model (an expert of the sequence, or ``base``) without a walk, returned as
        ``route`` returns it. An expert answers whatever its p(ACCEPT); its decision is reported in the trace,
        not applied."""
        if model == BASE:
            r = await self._base(q, max_tokens)
            return RouteResult(r["answer"], BASE, []), r, None
        e = self.entry(model)
        r, ms = await self._ask(e, q, max_tokens, True, threshold=0.0)  # threshold 0: it always answers
        trace = [Ask(e.name, r["p"], e.threshold, accepts(r["p"], e.threshold), ms)]
        self.hooks.decision(e.name, "forced")
        return RouteResult(r["answer"], e.name, trace), r, e

    def trace_dict(self, res: RouteResult, forced: bool, total_ms: float) -> dict:
        """The trace the API returns with an answer (``see_trace``)."""
        return {
            "expert": res.expert,
            "hops": res.hops,
            "mode": "forced" if forced else self.mode,
            "asks": [asdict(a) for a in res.trace],
            "hop_ms": [a.ms for a in res.trace],
            "total_ms": total_ms,
            "forced": forced,
        }
