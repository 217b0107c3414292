"""Sequential routing (SEE's step 3), in one process: ``Router`` walks the expert sequence over a loaded
``SEEModel``.

The rule itself (order, thresholds, calibration, the first-accept walk) is ``see_ray.core.routing``'s; this
module runs it with the model in this process. The walk is done for a whole batch at once: every
still-unanswered query is decided by the next expert in one forward pass (which generates the answers of the
queries it accepts from the same pass), which gives exactly the per-query walk's decisions. If all reject,
the base model answers.
"""

from __future__ import annotations

from see_ray.config import RoutingConfig
from see_ray.config.constants import BASE
from see_ray.core.expert import SEEModel
from see_ray.core.prompts import Query
from see_ray.core.routing import ExpertSpec, RouteResult, ordered, threshold_of, walk


class Router:
    def __init__(self, model: SEEModel, experts: list[ExpertSpec], cfg: RoutingConfig):
        self.model, self.cfg = model, cfg
        self.experts = list(experts)
        for e in self.experts:
            if e.name not in model.adapters:
                model.load_adapter(e.name, e.adapter_path)

    def threshold(self, e: ExpertSpec) -> float:
        return threshold_of(e.threshold, self.cfg)

    def sequence(self) -> list[ExpertSpec]:
        return ordered(self.experts, self.cfg.order)

    def route(self, queries: list[Query], generate: bool = True) -> list[RouteResult]:
        """Walk the sequence for every query; with ``generate=False`` only decisions are made."""
        seq = self.sequence()

        async def ask(e: ExpertSpec, idx: list[int]) -> list[dict]:
            # one batched forward pass; with a threshold the accepted queries' answers come from it too
            probs, answers = self.model.decide_and_generate(
                [queries[i] for i in idx], e.name, self.threshold(e) if generate else None, self.cfg.max_new_tokens
            )
            return [{"p": p, "answer": a} for p, a in zip(probs, answers)]

        decisions = _run_to_end(walk(seq, queries, ask, [self.threshold(e) for e in seq]))
        base = [i for i, d in enumerate(decisions) if d.expert is None]
        answers = (
            self.model.generate([queries[i] for i in base], None, self.cfg.max_new_tokens)
            if generate and base
            else [None] * len(base)
        )
        base_answer = dict(zip(base, answers))
        return [
            RouteResult(base_answer[i], BASE, d.trace) if d.expert is None
            else RouteResult(d.result["answer"], d.expert.name, d.trace)
            for i, d in enumerate(decisions)
        ]


def _run_to_end(coro):
    """Run a walk whose asks never wait (one expert at a time, each ask a synchronous forward pass) without an
    event loop: one step runs it to the end. Unlike ``asyncio.run`` this works in any thread, inside a running
    event loop too (a notebook, an async caller)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the in-process walk waited on something: its asks must not suspend")
