"""The model replicas: one Serve deployment class per kind of model, each replica a model in memory.

- ``ExpertDeployment``: the frozen base model plus one expert's LoRA adapter (loaded from the registry, on
  whichever node the replica runs). Its ``ask`` is one hop of the dispatcher's walk (``walk.py``): decide
  p(ACCEPT) and, if it reaches the threshold, generate the answer from the decide pass's KV cache, in one call.
- ``BaseDeployment``: the base model without adapters; its ``generate`` answers when every expert rejects.

Both batch concurrent calls with ``@serve.batch`` (``batch.max_batch_size``, ``batch.wait_s``), hold them at a
gate while a batch computes so that they form the next batch together, and run the model (``core.expert
.SEEModel``) in a worker thread under a lock with ``torch.set_num_threads(threads)``. ``stream`` yields one
request's tokens as they are computed (the ingress streams them to the client).
"""

import asyncio
import os
import threading
import time
from typing import Any

from ray import serve

from see_ray.config import SEEConfig
from see_ray.config.constants import BASE, BASE_DEPLOYMENT
from see_ray.config.serve import ServeConfig
from see_ray.core.prompts import Query


class ModelReplica:
    """Shared by the expert and base deployments: the model, its thread budget, batching and metrics."""

    adapter: str | None = None

    def _setup(self, see_cfg: dict, serve_cfg: dict, threads: int) -> None:
        import torch

        # torch defaults to every core in each process: several replicas on one node then oversubscribe it and
        # a forward pass slows down many times over under load. Each replica gets its own thread budget.
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        from see_ray.core.expert import SEEModel
        from see_ray.core.model import resolve_model_path

        self.cfg = SEEConfig.model_validate(see_cfg)
        self.scfg = ServeConfig.model_validate(serve_cfg)
        path = resolve_model_path(self.cfg.model)
        self.shared = None  # SharedWeights when this replica maps the node's shared base copy
        base = None
        self.device = self.cfg.model.device
        if self.device == "auto":  # Ray 2.60 shows every GPU to actors that reserved none: use one only if reserved
            import ray

            self.device = "cuda" if ray.get_runtime_context().get_accelerator_ids().get("GPU") else "cpu"
        # The shared copy saves host memory between CPU replicas; on a GPU each replica holds its own device copy.
        if self.scfg.share_base_weights and self.device == "cpu":
            from see_ray.serve.shared_weights import load_shared_base

            model, tok, self.shared = load_shared_base(self.cfg.model, path)
            base = (model, tok)
        self.model = SEEModel(self.cfg, path, batch_size=self.scfg.batch.size, base=base, device=self.device)
        self._init_batching()
        from ray.serve.metrics import Histogram

        bounds = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
        self._m_decide = Histogram("see_replica_decide_ms", "Batched decide pass (ms).", bounds, tag_keys=("expert",))
        self._m_generate = Histogram(
            "see_replica_generate_ms", "Batched generation (ms).", bounds, tag_keys=("expert",)
        )
        self._m_batch = Histogram("see_replica_batch_size", "Requests per batch.", [1, 2, 4, 8, 16, 32, 64], tag_keys=("expert",))
        self._tags = {"expert": self.adapter or BASE}

    def _init_batching(self) -> None:
        """The model lock, the gate in front of the batch queues, and the batched methods' size and wait, from
        ``self.scfg.batch``."""
        self._lock = threading.Lock()
        self._computing = 0  # batches running in a worker thread (the lock lets one compute at a time)
        self._idle = asyncio.Event()  # set while nothing computes: the gate in front of the batch queues
        self._idle.set()
        size = self.scfg.batch.size
        wait = 0.0 if self.scfg.batch.adaptive_wait else self.scfg.batch.wait_s  # idle at start: no waiting
        for m in self._batched():
            m.set_max_batch_size(size)
            m.set_batch_wait_timeout_s(wait)

    def _adapt_wait(self, method, n: int) -> None:
        """``batch.adaptive_wait``: the next batch of ``method`` waits ``batch.wait_s`` for more requests only if
        this one held more than one (the replica is under load); a lone request does not wait for company that
        is not coming. (serve.batch reads the timeout when a batch starts, so this sets the next batch's.)"""
        if self.scfg.batch.adaptive_wait and self.scfg.batch.size > 1:
            method.set_batch_wait_timeout_s(self.scfg.batch.wait_s if n > 1 else 0.0)

    def _batched(self) -> tuple:
        """The ``@serve.batch`` methods behind the public ones (configured together)."""
        return (self._ask, self._generate)

    # Why a gate in front of @serve.batch: its loop forms the next batch from whatever arrives within
    # `batch_wait_timeout_s` of the first request after the current batch *started*, and that batch then
    # waits for the model. Under load a replica therefore ran batches of 1-2 while a dozen requests queued
    # behind them (measured at 16 HTTP clients on the real model: mean batch 1.2-2.1, 1.25x the unbatched
    # throughput). Requests that arrive while a batch computes wait here instead and enter the batch queue
    # together when the model is free, so the next batch holds all of them.
    async def _gated(self, batched, req):
        await self._idle.wait()
        return await batched(req)

    async def _run(self, fn, *a):
        def locked():
            with self._lock:
                return fn(*a)

        self._computing += 1
        self._idle.clear()
        try:
            return await asyncio.to_thread(locked)
        finally:
            self._computing -= 1
            if not self._computing:
                self._idle.set()

    def _tokens(self, queries: list[Query], answers: list[str | None], max_tokens: int) -> list[dict]:
        out = []
        for q, a in zip(queries, answers):
            n_prompt = len(self.model.encoder.encode_query(q))
            # re-tokenizing the decoded text can differ by a token from what was generated: cap it
            n_out = min(len(self.model.tokenizer.encode(a, add_special_tokens=False)), max_tokens) if a else 0
            out.append({"prompt_tokens": n_prompt, "completion_tokens": n_out,
                        "finish": "length" if n_out >= max_tokens else "stop"})
        return out

    @staticmethod
    def _query(req: dict) -> Query:
        return Query(req["input"], req.get("definition"))

    def _groups(self, reqs: list[dict], key) -> dict[Any, list[int]]:
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(key(r), []).append(i)
        return groups

    def _generate_batch(self, reqs: list[dict], after_accept: bool) -> list[dict]:
        out: list[dict] = [{}] * len(reqs)
        t0 = time.perf_counter()
        for mt, idx in self._groups(reqs, lambda r: int(r["max_tokens"])).items():
            qs = [self._query(reqs[i]) for i in idx]
            texts = self.model.generate(qs, self.adapter, mt, after_accept=after_accept)
            for i, t, tok in zip(idx, texts, self._tokens(qs, texts, mt)):
                out[i] = {"answer": t, **tok}
        self._m_generate.observe((time.perf_counter() - t0) * 1000, self._tags)
        self._m_batch.observe(len(reqs), self._tags)
        return out

    async def stream(self, req: dict):
        """Streaming generation, called as ``handle.options(stream=True).stream.remote(req)``.

        ``{input, definition?, max_tokens, threshold?}`` -> ``{"p"}`` (p(ACCEPT); None from the base) first,
        then ``{"text": piece}`` per generated token as it is computed (nothing if an expert rejects at
        ``threshold``), then ``{"answer", prompt_tokens, completion_tokens, finish}``. Not batched: every step
        is one token for this request, computed in a worker thread under the model lock, so concurrent
        streams and batches interleave token by token instead of waiting for whole answers.
        """
        q, mt = self._query(req), int(req["max_tokens"])
        thr = req.get("threshold", 0.0) if self.adapter is not None else None
        steps = self.model.stream(q, self.adapter, thr, mt)
        t0 = time.perf_counter()

        def step():
            with self._lock:
                return next(steps, None)

        while (item := await asyncio.to_thread(step)) is not None:
            if "p" in item:
                item = {**item, "prompt_tokens": len(self.model.encoder.encode_query(q))}
            elif "answer" in item:
                self._m_generate.observe((time.perf_counter() - t0) * 1000, self._tags)
                tok = self._tokens([q], [item["answer"]], mt)[0]
                item = {"answer": item["answer"], **tok}
            yield item

    def _placement(self) -> dict:
        """Where this replica computes: its model's device and dtype, and the GPUs Ray gave it."""
        import ray

        p = next(self.model.base.parameters())
        return {"device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
                "gpu_ids": [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]}

    def memory(self) -> dict:
        """Where this replica's base weights live (shared mapping or private copy) and its PSS."""
        from see_ray.serve.shared_weights import describe_weights

        return describe_weights(self.model.base, self.shared)

    def configure_batch(self, max_batch_size: int, wait_s: float) -> dict:
        """Change batching in place (benchmarks compare batch size 1 with batching on one replica)."""
        for m in self._batched():
            m.set_max_batch_size(max_batch_size)
            m.set_batch_wait_timeout_s(wait_s)
        self.model.batch_size = max_batch_size
        self.scfg.batch.max_batch_size, self.scfg.batch.wait_s = max_batch_size, wait_s  # _adapt_wait reads them
        return {"max_batch_size": max_batch_size, "wait_s": wait_s, "pid": os.getpid()}

    async def generate(self, req: dict) -> dict:
        """Generate an answer: ``{input, definition?, max_tokens}`` -> ``{answer, prompt_tokens, completion_tokens,
        finish}``. An expert generates as after its ACCEPT; the base answers directly. Batched."""
        return await self._gated(self._generate, req)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _generate(self, reqs: list[dict]) -> list[dict]:
        self._adapt_wait(self._generate, len(reqs))
        return await self._run(self._generate_batch, reqs, self.adapter is not None)

    # a placeholder so that _init_batching can configure the batched methods of both kinds of replica alike
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _ask(self, reqs: list[dict]) -> list[dict]:  # pragma: no cover - overridden by experts
        raise NotImplementedError("the base model does not decide")


@serve.deployment(name="expert", max_ongoing_requests=16, health_check_period_s=10)
class ExpertDeployment(ModelReplica):
    """One SEE expert: the frozen base model plus this expert's LoRA adapter (from the registry record)."""

    def __init__(self, record: dict, storage_uri: str, see_cfg: dict, serve_cfg: dict):
        from see_ray.registry import ExpertRecord, Registry
        from see_ray.serve.deploy import check_base_of, model_fingerprint  # deploy imports this module

        rec = ExpertRecord.model_validate(record)
        self.adapter = rec.name
        self.record = rec
        scfg = ServeConfig.model_validate(serve_cfg)
        self._setup(see_cfg, serve_cfg, scfg.expert_settings(rec.name).threads)
        # an adapter on another base model would load (same shapes) and answer garbage: refuse it here too
        check_base_of([rec], self.cfg)
        # From the storage URI, on whichever node this replica runs: the folder itself on a shared file
        # system, a downloaded copy from an object store; hash-checked against the record either way.
        path = Registry(storage_uri).adapter_path(rec)
        self.model.load_adapter(rec.name, path)
        self.adapter_path = str(path)
        self.fingerprint = model_fingerprint(record, storage_uri, see_cfg, serve_cfg)

    def _ask_batch(self, reqs: list[dict]) -> list[dict]:
        out: list[dict] = [{}] * len(reqs)
        t0 = time.perf_counter()
        key = lambda r: (float(r["threshold"]) if r.get("generate", True) else None, int(r.get("max_tokens", 1)))
        for (thr, mt), idx in self._groups(reqs, key).items():
            qs = [self._query(reqs[i]) for i in idx]
            probs, answers = self.model.decide_and_generate(qs, self.adapter, thr, mt)
            toks = self._tokens(qs, answers, mt)
            for i, p, a, tok in zip(idx, probs, answers, toks):
                out[i] = {"p": p, "answer": a, **tok}
        ms = (time.perf_counter() - t0) * 1000
        for o in out:  # the model's share of the hop, and the batch it ran in (the benchmark reads both)
            o["compute_ms"], o["batch_size"] = ms, len(reqs)
        self._m_decide.observe(ms, self._tags)
        self._m_batch.observe(len(reqs), self._tags)
        return out

    async def ask(self, req: dict) -> dict:
        """Decide and, on ACCEPT, generate in the same call from the decide pass's KV cache. Batched.

        ``{input, definition?, threshold, max_tokens, generate}`` -> ``{p, answer (None if rejected or
        generate=False), prompt_tokens, completion_tokens, finish, compute_ms, replica_ms, batch_size}``. This is one hop
        of the dispatcher's walk.
        """
        t0 = time.perf_counter()
        r = await self._gated(self._ask, req)
        # the replica's whole share of the hop (gate + batch queue + compute): the benchmark subtracts it
        return {**r, "replica_ms": (time.perf_counter() - t0) * 1000}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _ask(self, reqs: list[dict]) -> list[dict]:
        self._adapt_wait(self._ask, len(reqs))
        return await self._run(self._ask_batch, reqs)

    def info(self) -> dict:
        import ray

        return {"name": self.record.name, "version": self.record.version, "task": self.record.task,
                "threshold": self.record.threshold, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "fingerprint": self.fingerprint,
                "adapter_path": self.adapter_path, **self._placement()}


@serve.deployment(name=BASE_DEPLOYMENT, max_ongoing_requests=16, health_check_period_s=10)
class BaseDeployment(ModelReplica):
    """The general model without adapters: SEE's answer when every expert rejects (and ``model=base``)."""

    def __init__(self, see_cfg: dict, serve_cfg: dict):
        from see_ray.serve.deploy import model_fingerprint  # deploy imports this module

        scfg = ServeConfig.model_validate(serve_cfg)
        self._setup(see_cfg, serve_cfg, scfg.base.threads)
        self.fingerprint = model_fingerprint(None, None, see_cfg, serve_cfg)

    def info(self) -> dict:
        import ray

        return {"name": BASE, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "fingerprint": self.fingerprint, **self._placement()}
