"""Batching inside a model replica: requests that arrive while a batch computes form the next batch together.

Runs the replica's real ``@serve.batch`` methods and gate in a plain asyncio loop, with the model replaced by
a function that records the batch sizes it is given and takes 0.3 s (a stand-in for the forward passes), so
that the arrival pattern is under the test's control. Serve's batch loop alone forms the next batch from the
first request that arrives after the current batch started; without the gate every late arrival below ran
in a batch of its own (measured), the pattern that held 16 HTTP clients at mean batches of 1-2 on the real
model.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from ray import serve

from see_ray.serve.replica import ModelReplica
from see_ray.config.serve import ServeConfig


@pytest.fixture(scope="module")
def run():
    """One event loop for the module: serve.batch keeps one queue per decorated method for the whole process
    (one replica per process in Serve), bound to the loop that first used it."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture(autouse=True)
def _replica_context(monkeypatch):
    """serve.batch reads the deployment's max_ongoing_requests from the replica context (for a warning only)."""
    ctx = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=16))
    monkeypatch.setattr(serve, "get_replica_context", lambda: ctx)


class _FakeReplica(ModelReplica):
    """The replica's batching machinery around a model that records batch sizes and takes ``compute_s``."""

    def __init__(self, compute_s: float, wait_s: float, adaptive: bool = True):
        self.scfg = ServeConfig.from_yaml(None, ["batch.max_batch_size=16", f"batch.wait_s={wait_s}",
                                                 f"batch.adaptive_wait={adaptive}"])
        self._init_batching()  # what a real replica's _setup does, without loading a model
        self.compute_s, self.batches = compute_s, []

    def _generate_batch(self, reqs, after_accept):  # the model's part, run under the lock in a worker thread
        self.batches.append(len(reqs))
        time.sleep(self.compute_s)
        return [{"answer": r["input"]} for r in reqs]


async def _arrivals(rep: _FakeReplica, late: int, spread_s: float) -> list[dict]:
    """One request, then ``late`` more spread over ``spread_s`` while the first one computes."""
    first = asyncio.create_task(rep.generate({"input": "q0", "max_tokens": 1}))
    await asyncio.sleep(0.05)
    rest = []
    for i in range(late):
        rest.append(asyncio.create_task(rep.generate({"input": f"q{i + 1}", "max_tokens": 1})))
        await asyncio.sleep(spread_s / late)
    return await asyncio.gather(first, *rest)


def test_requests_arriving_during_a_batch_run_together_next(run):
    rep = _FakeReplica(compute_s=0.3, wait_s=0.01)
    out = run(_arrivals(rep, late=10, spread_s=0.15))
    assert [o["answer"] for o in out] == ["q0"] + [f"q{i}" for i in range(1, 11)]  # each caller gets its own
    assert rep.batches == [1, 10], rep.batches


def test_fixed_wait_still_batches_late_arrivals_together(run):
    rep = _FakeReplica(compute_s=0.3, wait_s=0.01, adaptive=False)
    run(_arrivals(rep, late=8, spread_s=0.15))
    assert rep.batches == [1, 8], rep.batches


def test_gate_opens_again_after_a_failed_batch(run):
    rep = _FakeReplica(compute_s=0.0, wait_s=0.0)

    def boom(reqs, after_accept):
        raise RuntimeError("model failed")

    rep._generate_batch = boom

    async def scenario():
        try:
            await rep.generate({"input": "q", "max_tokens": 1})
        except RuntimeError as e:
            assert "model failed" in str(e)
        else:
            raise AssertionError("the model's error did not reach the caller")
        assert rep._idle.is_set() and rep._computing == 0
        rep._generate_batch = _FakeReplica._generate_batch.__get__(rep)
        return await asyncio.wait_for(rep.generate({"input": "again", "max_tokens": 1}), 5)

    assert run(scenario())["answer"] == "again"
