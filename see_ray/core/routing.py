"""SEE's routing rule (the method's step 3), in one place: the sequence order, the threshold rule, the calibration
of an expert's threshold and the queries it is calibrated on, and the first-accept walk.

Everything that routes uses these: the in-process ``router.Router``, the serving dispatcher
(``see_ray.serve.walk``), and the add-expert job's validation (``see_ray.training.add_expert``). Nothing here
loads a model or imports Ray.

- Order: the experts form a sequence, newest first by default (``routing.order``).
- Threshold: a fixed global ``routing.threshold`` wins; otherwise the expert's calibrated threshold;
  otherwise ``routing.default_threshold``.
- Calibration: on held-out data, in the prompt forms the expert was trained on: the expert's own dev queries
  (positives) and negatives it never trained on (other tasks' held-out rehearsal queries and general-pool queries,
  ``rehearsal.calibration_negatives``). Within false rejection <= ``routing.calibration_max_false_rejection`` of the
  positives, the threshold that rejects the most negatives, placed in the middle of the gap it leaves (log-odds).
- The walk: a query is offered to the experts one after another; the first whose p(ACCEPT) reaches its
  threshold answers, and the experts after it are never asked for that query. If all reject, the base model
  answers. With a concurrency width k > 1 the next k experts are asked at once and the first ACCEPT in
  sequence order wins: every expert computes the same p for the same query, so the answers and traces are
  those of the one-by-one walk.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from see_ray.config import RoutingConfig
from see_ray.core.prompts import Query

if TYPE_CHECKING:
    from see_ray.config import SEEConfig
    from see_ray.core.data import Task
    from see_ray.core.rehearsal import RehearsalBuffer


@dataclass
class ExpertSpec:
    """What routing needs to know of an expert (the registry holds the full record)."""

    name: str
    task: str
    adapter_path: str
    threshold: float | None = None


@dataclass
class Ask:
    """One hop of a walk: an expert's p(ACCEPT) for a query, against its threshold."""

    expert: str
    p_accept: float
    threshold: float
    accepted: bool
    ms: float  # latency of this hop: the ask it was part of (a batch, or from the start of a concurrent window)


@dataclass
class RouteResult:
    answer: str | None
    expert: str  # name of the expert that answered, or "base"
    trace: list[Ask] = field(default_factory=list)

    @property
    def hops(self) -> int:
        return len(self.trace)

    def to_dict(self) -> dict:
        return {"answer": self.answer, "expert": self.expert, "hops": self.hops, "trace": [asdict(a) for a in self.trace]}


# -- order, acceptance and thresholds -------------------------------------------------------------------------------
class Named(Protocol):
    name: str


E = TypeVar("E", bound=Named)


def ordered(experts: list[E], order: str) -> list[E]:
    """The sequence in which experts are asked; ``experts`` is in registration order (oldest first)."""
    return list(reversed(experts)) if order == "newest_first" else list(experts)


def accepts(p_accept: float, threshold: float) -> bool:
    """An expert accepts a query when its p(ACCEPT) reaches its threshold."""
    return p_accept >= threshold


def threshold_of(calibrated: float | None, routing: RoutingConfig) -> float:
    """An expert's acceptance threshold: the fixed global ``routing.threshold`` if set, else its calibrated
    threshold (None: it has none), else ``routing.default_threshold``."""
    if routing.threshold is not None:
        return routing.threshold
    return calibrated if calibrated is not None else routing.default_threshold


# -- calibration -------------------------------------------------------------------------------------------
def prompt_forms(queries: list[Query], input_only_share: float) -> list[Query]:
    """The queries in the prompt forms an expert was trained on (``rehearsal.input_only_share``): with the
    task definition (share < 1), input-only (share > 0: what clients usually send), or both
    when training mixed them. A query without a definition has one form only."""
    out = []
    for q in queries:
        if input_only_share < 1.0 or not q.definition:
            out.append(q)
        if input_only_share > 0.0 and q.definition:
            out.append(Query(q.input, None))
    return out


def calibration_queries(task: Task, input_only_share: float) -> list[Query]:
    """The queries an expert's threshold is calibrated on: its task's dev instances, in the prompt forms it
    was trained on (``prompt_forms``)."""
    return prompt_forms([task.query(x) for x in task.dev], input_only_share)


@dataclass
class Calibration:
    """An expert's operating point, chosen on held-out data: its threshold and both error rates there."""

    threshold: float
    false_rejection: float  # share of the held-out own queries rejected at ``threshold``
    false_acceptance: float | None  # share of the held-out negatives accepted (None: there were none)
    n_positives: int
    n_negatives: int
    negatives_by_source: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


def calibrate(p_pos: Sequence[float], p_neg: Sequence[float], cfg: RoutingConfig,
              negatives_by_source: dict[str, int] | None = None) -> Calibration:
    """Choose an expert's threshold from its p(ACCEPT) on held-out own queries (``p_pos``) and held-out negatives.

    Rejecting the k lowest positives is allowed (k = floor(bound x n)), so thresholds up to ``t_max`` = the k-th
    lowest positive keep false rejection within the bound. Raising the threshold only ever rejects more, so the
    fewest negatives are accepted at ``t_max``; every threshold above the highest negative below ``t_max`` does as
    well. The threshold lies in that interval at ``routing.calibration_position`` (in log-odds: 0 just above the
    negative, 0.5 the middle, where positives and negatives keep equal margins, 1 at ``t_max``); without negatives it
    is ``t_max`` (the largest threshold within the bound). It is clipped into
    ``calibration_bounds`` and the error rates are measured at the clipped value.
    """
    lo, hi = cfg.calibration_bounds
    pos = sorted(p_pos)
    neg = list(p_neg)
    if not pos:
        thr = cfg.default_threshold
    else:
        t_max = pos[math.floor(cfg.calibration_max_false_rejection * len(pos))]
        below = [p for p in neg if p < t_max]
        if neg and below:
            n_lo = max(below)
            a = cfg.calibration_position
            mid = (1 - a) * _logit(n_lo) + a * _logit(t_max)
            thr = 1 / (1 + math.exp(-mid))
            thr = min(max(thr, math.nextafter(n_lo, 1.0)), t_max)  # rounding never crosses either end
        else:
            thr = t_max
    thr = min(max(thr, lo), hi)
    fr = sum(not accepts(p, thr) for p in pos) / len(pos) if pos else 0.0
    fa = sum(accepts(p, thr) for p in neg) / len(neg) if neg else None
    return Calibration(thr, fr, fa, len(pos), len(neg), dict(negatives_by_source or {}))


@dataclass
class HeldOut:
    """An expert's p(ACCEPT) on its held-out calibration data, and the operating point chosen from it."""

    calibration: Calibration
    p_own: list[float]  # own dev queries, in the trained prompt forms
    p_negatives: dict[str, list[float]]  # by source: an earlier task's name, or "general"


def calibrate_on_held_out(decide: Callable[[list[Query]], list[float]], task: Task, buffer: RehearsalBuffer,
                          pool: list[Query], see: SEEConfig) -> HeldOut:
    """Calibrate a new expert as every caller does (the add-expert job, the benchmark, the in-process demo):
    ``decide(queries)`` is the expert's p(ACCEPT); positives are its task's dev queries, negatives the held-out
    rehearsal queries of the other tasks in ``buffer`` and the held-out general-pool queries
    (``rehearsal.calibration_negatives``), all in the prompt forms the expert was trained on."""
    from see_ray.core.rehearsal import calibration_negatives

    share = see.rehearsal.input_only_share
    negatives = {src: prompt_forms(qs, share)
                 for src, qs in calibration_negatives(buffer, pool, see.rehearsal, exclude={task.name}).items()}
    p_own = decide(calibration_queries(task, share))
    p_neg = {src: decide(qs) for src, qs in negatives.items()}
    cal = calibrate(p_own, [p for ps in p_neg.values() for p in ps], see.routing,
                    {src: len(qs) for src, qs in negatives.items()})
    return HeldOut(cal, p_own, p_neg)


# -- the first-accept walk ---------------------------------------------------------------------------------
@dataclass
class Decision(Generic[E]):
    """Where one query's walk ended: the accepting expert and its result, or None (the base answers)."""

    expert: E | None
    result: dict | None  # the accepting expert's result for this query ("p", and "answer" if it generated)
    trace: list[Ask]  # every expert asked, in sequence order, up to and including the acceptor


# ask(expert, query indices) -> one result per index, each with "p" (p(ACCEPT)) and optionally "answer"
AskFn = Callable[[Any, list[int]], Awaitable[list[dict]]]


async def walk(sequence: Sequence[E], queries: Sequence[Any], ask: AskFn, thresholds: Sequence[float],
               width: int = 1, on_ask: Callable[[Ask], None] | None = None) -> list[Decision[E]]:
    """Walk ``sequence`` for a batch of ``queries``; ``thresholds[j]`` is ``sequence[j]``'s threshold.

    Each expert is asked once for all queries still unanswered when its turn comes (``ask(expert, indices)``).
    ``width`` 1 asks one expert at a time. ``width`` k > 1 asks the next k experts at once for those queries,
    takes each query's first ACCEPT in sequence order, ignores the later experts' results for it, and cancels
    the asks that no query needs any more; a hop's ``ms`` then counts from the window's start. ``on_ask`` sees
    every hop as it enters a trace. An exception from an ask ends the walk (the window's other asks are
    cancelled) and propagates.
    """
    if len(thresholds) != len(sequence):
        raise ValueError(f"{len(sequence)} experts but {len(thresholds)} thresholds")
    traces: list[list[Ask]] = [[] for _ in queries]
    accepted: list[tuple[E, dict] | None] = [None] * len(queries)
    pending = list(range(len(queries)))
    hops = list(zip(sequence, thresholds))
    k = max(1, width)

    def record(expert: E, thr: float, asked: list[int], results: list[dict], ms: float) -> None:
        for i, r in zip(asked, results, strict=True):
            if accepted[i] is not None:  # an earlier expert of the same window accepted it
                continue
            a = Ask(expert.name, r["p"], thr, accepts(r["p"], thr), ms)
            traces[i].append(a)
            if on_ask is not None:
                on_ask(a)
            if a.accepted:
                accepted[i] = (expert, r)

    for start in range(0, len(hops), k):
        if not pending:
            break
        window, asked = hops[start : start + k], pending
        t0 = time.perf_counter()
        if len(window) == 1:
            e, thr = window[0]
            record(e, thr, asked, await ask(e, asked), (time.perf_counter() - t0) * 1000)
        else:
            tasks = [asyncio.ensure_future(ask(e, asked)) for e, _ in window]
            try:
                for (e, thr), task in zip(window, tasks):
                    results = await task
                    record(e, thr, asked, results, (time.perf_counter() - t0) * 1000)
                    if all(accepted[i] is not None for i in asked):
                        break
            finally:
                for t in tasks:  # the asks after the last acceptor are not needed
                    if not t.done():
                        t.cancel()
        pending = [i for i in asked if accepted[i] is None]
    return [Decision(a[0], a[1], t) if a is not None else Decision(None, None, t) for a, t in zip(accepted, traces)]
