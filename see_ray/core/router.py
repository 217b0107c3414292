"""Sequential routing (SEE.md step 3), in one process.

The experts form an ordered sequence (newest first by default). A query is offered to them one after
another; the first whose p(ACCEPT) reaches its threshold answers, and the rest are never asked. If all
reject, the base model answers. The walk is done for a whole batch at once: every still-unanswered query is
decided by the next expert in one forward pass, which gives exactly the per-query walk's decisions.

Thresholds: a fixed global value (``routing.threshold``) wins; otherwise each expert's calibrated value
(``calibrate_threshold`` on its own dev queries at training time); otherwise ``routing.default_threshold``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from see_ray.config import RoutingConfig
from see_ray.core.expert import SEEModel
from see_ray.config.constants import BASE
from see_ray.core.prompts import Query


@dataclass
class ExpertSpec:
    """What routing needs to know of an expert (the registry holds the full record)."""

    name: str
    task: str
    adapter_path: str
    threshold: float | None = None


@dataclass
class Ask:
    expert: str
    p_accept: float
    threshold: float
    accepted: bool
    ms: float  # time of the batched decide this ask was part of


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


def calibrate_threshold(p_own_dev: list[float], cfg: RoutingConfig) -> float:
    """The largest threshold that keeps false rejection of the expert's own dev queries <= the bound.

    With p sorted ascending, rejecting the k lowest (k = floor(bound * n)) is allowed, so the threshold is
    p[k]; it is clipped into ``calibration_bounds`` (a near-1.0 value from a small dev set would be brittle
    on test data, and below 0.5 an expert would accept what it finds more likely to reject).
    """
    lo, hi = cfg.calibration_bounds
    if not p_own_dev:
        return cfg.default_threshold
    ps = sorted(p_own_dev)
    k = math.floor(cfg.calibration_max_false_rejection * len(ps))
    return min(max(ps[k], lo), hi)


def ordered(experts: list[ExpertSpec], order: str) -> list[ExpertSpec]:
    """``experts`` is in registration order (oldest first)."""
    return list(reversed(experts)) if order == "newest_first" else list(experts)


class Router:
    def __init__(self, model: SEEModel, experts: list[ExpertSpec], cfg: RoutingConfig):
        self.model, self.cfg = model, cfg
        self.experts = list(experts)
        for e in self.experts:
            if e.name not in model.adapters:
                model.load_adapter(e.name, e.adapter_path)

    def threshold(self, e: ExpertSpec) -> float:
        if self.cfg.threshold is not None:
            return self.cfg.threshold
        return e.threshold if e.threshold is not None else self.cfg.default_threshold

    def sequence(self) -> list[ExpertSpec]:
        return ordered(self.experts, self.cfg.order)

    def route(self, queries: list[Query], generate: bool = True) -> list[RouteResult]:
        """Walk the sequence for every query; with ``generate=False`` only decisions are made."""
        results: list[RouteResult | None] = [None] * len(queries)
        traces: list[list[Ask]] = [[] for _ in queries]
        pending = list(range(len(queries)))
        for e in self.sequence():
            if not pending:
                break
            thr = self.threshold(e)
            t0 = time.perf_counter()
            probs, answers = self.model.decide_and_generate(
                [queries[i] for i in pending], e.name, thr if generate else None, self.cfg.max_new_tokens
            )
            ms = (time.perf_counter() - t0) * 1000
            still = []
            for i, p, a in zip(pending, probs, answers):
                accepted = p >= thr
                traces[i].append(Ask(e.name, p, thr, accepted, ms))
                if accepted:
                    results[i] = RouteResult(a, e.name, traces[i])
                else:
                    still.append(i)
            pending = still
        if pending:
            base = (
                self.model.generate([queries[i] for i in pending], None, self.cfg.max_new_tokens)
                if generate
                else [None] * len(pending)
            )
            for i, a in zip(pending, base):
                results[i] = RouteResult(a, BASE, traces[i])
        return results  # type: ignore[return-value]
