"""Serving SEE on Ray Serve: one deployment per expert, a base deployment, and a sequential dispatcher.

Layout on the cluster (STACK-NOTES gotcha 5: every expert is its own *application*, so adding, replacing or
removing one never redeploys — and never restarts — anything else):

    application  see-expert-<name>   deployment <name>   ExpertDeployment: base model + that expert's adapter
    application  see-base            deployment base     BaseDeployment: the base model without adapters
    application  see                 deployment dispatcher  Dispatcher: FastAPI ingress at '/', no model

The dispatcher holds async ``DeploymentHandle``s to the experts, found by name, in registry order (newest
first by default), and walks them per request: ``ask`` expert 1; if it rejects, expert 2; ...; the first that
accepts generates in the same call (from its decide pass's KV cache); if all reject, ``base`` generates. In
``concurrent`` mode it asks the next ``width`` experts at once and takes the first ACCEPT in sequence order:
every expert runs the very same ``ask`` on the very same query, so both modes give identical answers and
traces (the trace lists the experts up to the acceptor; later asks of a window are cancelled or ignored).

It follows registry changes without a restart: it re-reads the registry (and Serve's status, so that only
experts whose application is running join the sequence) every ``dispatch.registry_poll_s``, and
``add_expert_live`` / ``remove_expert_live`` tell it at once.

Model replicas batch concurrent requests with ``@serve.batch`` (``batch.max_batch_size``, ``batch.wait_s``)
and run the model in a worker thread under a lock, with ``torch.set_num_threads(threads)``.
"""

# No `from __future__ import annotations` here: FastAPI (through serve.ingress) must see real types.
import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

import see_ray.serve.schema as api
from see_ray.serve.schema import APIError
from see_ray.config import SEEConfig
from see_ray.config.app import AppArgs
from see_ray.core.data import validate_name
from see_ray.config.constants import BASE, BASE_DEPLOYMENT, DISPATCHER_DEPLOYMENT
from see_ray.core.prompts import Query
from see_ray.core.router import Ask, ExpertSpec, RouteResult, ordered
from see_ray.config.serve import ServeConfig, load_api_key

log = logging.getLogger(__name__)



def effective_threshold(spec: ExpertSpec, routing) -> float:
    """The same rule as ``router.Router.threshold``: fixed global > calibrated > default."""
    if routing.threshold is not None:
        return routing.threshold
    return spec.threshold if spec.threshold is not None else routing.default_threshold


# == model replicas ========================================================================================
class _ModelReplica:
    """Shared by the expert and base deployments: the model, its thread budget, batching and metrics."""

    adapter: str | None = None

    def _setup(self, see_cfg: dict, serve_cfg: dict, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # STACK-NOTES gotcha 4
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
        return (self._ask, self._decide, self._generate)

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

    # placeholders so that _setup can configure every batched method of both kinds of replica
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _ask(self, reqs: list[dict]) -> list[dict]:  # pragma: no cover - overridden by experts
        raise NotImplementedError("the base model does not decide")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _decide(self, reqs: list[dict]) -> list[float]:  # pragma: no cover - overridden by experts
        raise NotImplementedError("the base model does not decide")


@serve.deployment(name="expert", max_ongoing_requests=16, health_check_period_s=10)
class ExpertDeployment(_ModelReplica):
    """One SEE expert: the frozen base model plus this expert's LoRA adapter (from the registry record)."""

    def __init__(self, record: dict, storage_uri: str, see_cfg: dict, serve_cfg: dict):
        from see_ray.registry import ExpertRecord, Registry

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

    async def decide(self, req: dict) -> float:
        """p(ACCEPT) only: ``{input, definition?}`` -> float. Batched."""
        return await self._gated(self._decide, req)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _ask(self, reqs: list[dict]) -> list[dict]:
        self._adapt_wait(self._ask, len(reqs))
        return await self._run(self._ask_batch, reqs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _decide(self, reqs: list[dict]) -> list[float]:
        self._adapt_wait(self._decide, len(reqs))

        def run():
            t0 = time.perf_counter()
            ps = self.model.decide([self._query(r) for r in reqs], self.adapter)
            self._m_decide.observe((time.perf_counter() - t0) * 1000, self._tags)
            return ps

        return await self._run(run)

    def info(self) -> dict:
        import ray

        return {"name": self.record.name, "version": self.record.version, "task": self.record.task,
                "threshold": self.record.threshold, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "fingerprint": self.fingerprint,
                "adapter_path": self.adapter_path, **self._placement()}


@serve.deployment(name=BASE_DEPLOYMENT, max_ongoing_requests=16, health_check_period_s=10)
class BaseDeployment(_ModelReplica):
    """The general model without adapters: SEE's answer when every expert rejects (and ``model=base``)."""

    def __init__(self, see_cfg: dict, serve_cfg: dict):
        scfg = ServeConfig.model_validate(serve_cfg)
        self._setup(see_cfg, serve_cfg, scfg.base.threads)
        self.fingerprint = model_fingerprint(None, None, see_cfg, serve_cfg)

    def info(self) -> dict:
        import ray

        return {"name": BASE, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "fingerprint": self.fingerprint, **self._placement()}


# == dispatcher ============================================================================================
fastapi_app = FastAPI(
    title="see-ray",
    description="SEE (Sequential Ensemble of Experts) behind an OpenAI-compatible API. See see_ray/serve/schema.py.",
)


# The POST endpoints read the raw body themselves (size limit before parsing, OpenAI-format errors), so FastAPI
# cannot see their schemas: they are added to the OpenAPI document here (clients and the fuzz test use it).
_REQUEST_BODIES = {
    "/v1/completions": api.CompletionRequest,
    "/v1/chat/completions": api.ChatRequest,
    "/v1/route": api.RouteRequest,
}


def _openapi() -> dict:
    if fastapi_app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=fastapi_app.title, version=fastapi_app.version,
                           description=fastapi_app.description, routes=fastapi_app.routes)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for path, model in _REQUEST_BODIES.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            spec["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        fastapi_app.openapi_schema = spec
    return fastapi_app.openapi_schema


fastapi_app.openapi = _openapi


@fastapi_app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@fastapi_app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):  # a bug, never bad input
    log.exception("internal error")
    err = APIError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error")
    return JSONResponse(err.body(), status_code=500)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    err = APIError(422, f"invalid request: {exc.errors()[:1]}", code="invalid_value")
    return JSONResponse(err.body(), status_code=422)


@fastapi_app.exception_handler(404)
async def _not_found(request: Request, exc):
    err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
    return JSONResponse(err.body(), status_code=404)


@fastapi_app.exception_handler(405)
async def _bad_method(request: Request, exc):
    err = APIError(405, f"method {request.method} not allowed on {request.url.path}", code="method_not_allowed")
    return JSONResponse(err.body(), status_code=405)


@dataclass
class _Entry:
    name: str
    task: str
    version: int
    position: int
    threshold: float
    app: str
    handle: Any = None


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        RayServeException,
    )

    return (BackPressureError, DeploymentUnavailableError, RayActorError, RayServeException)


def _retryable_errors() -> tuple[type[BaseException], ...]:
    """A replica that died (killed, OOM, node lost) or cannot be reached: the same call can succeed on another
    replica or on the one Serve restarts. Back-pressure is not retried (the caller gets 503 + Retry-After)."""
    from ray.exceptions import (
        RayActorError,  # ActorDiedError and ActorUnavailableError derive from it
    )
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


# Waits between re-sent calls (s): the first lets Serve's router drop the dead replica, the later ones cover a
# single-replica deployment whose replica is being restarted (requests then queue in the handle until it is up).
RETRY_BACKOFF_S = (0.2, 1.0, 2.0, 4.0)


@serve.deployment(name=DISPATCHER_DEPLOYMENT, max_ongoing_requests=1000, health_check_period_s=10)
@serve.ingress(fastapi_app)
class Dispatcher:
    """Walks the expert sequence for every request; holds no model."""

    def __init__(self, see_cfg: dict, serve_cfg: dict, storage_uri: str):
        from see_ray.registry import Registry

        self.cfg = SEEConfig.model_validate(see_cfg)
        self.scfg = ServeConfig.model_validate(serve_cfg)
        app = serve.get_replica_context().app_name
        if app != self.scfg.app_name:  # a Serve config file named the application differently
            raise ValueError(f"the SEE application is deployed as {app!r} but its serve settings say app_name="
                             f"{self.scfg.app_name!r}: make them equal (serve_set: ['app_name={app}']); jobs and "
                             "`see-ray status` find the application by that name")
        self.storage_uri = storage_uri
        self.registry = Registry(storage_uri)
        self.mode, self.width = self.scfg.dispatch.mode, self.scfg.dispatch.width
        self.seq: list[_Entry] = []
        self.pending: list[dict] = []  # registry experts whose application is not running (yet)
        self.generation = -1
        self.inflight: dict[str, int] = {}
        self._handles: dict[tuple[str, str], Any] = {}
        self._refresh_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self.base = serve.get_deployment_handle(BASE_DEPLOYMENT, self.scfg.base_app)
        self._unavailable = _unavailable_errors()
        self._retryable = _retryable_errors()
        self._api_key = load_api_key(self.scfg.auth)  # a SecretStr (masked in reprs), never logged
        self._per_client: dict[str, int] = {}
        self.retries = 0
        log.info("dispatcher: API key %s", "required" if self._api_key is not None else "not configured (open API)")
        self._init_metrics()
        self._refresh_sync()

    # -- metrics ----------------------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        ms = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
        self.m_requests = Counter("see_requests_total", "Requests by endpoint and model.", tag_keys=("endpoint", "model"))
        self.m_asks = Counter("see_expert_decisions_total", "Expert decisions.", tag_keys=("expert", "decision"))
        self.m_fallbacks = Counter("see_fallbacks_total", "Requests answered by the base after all experts rejected.")
        self.m_answers = Counter("see_answers_total", "Requests answered, by who answered.", tag_keys=("expert",))
        self.m_errors = Counter("see_errors_total", "Error responses by HTTP status.", tag_keys=("status",))
        self.m_retries = Counter("see_retries_total", "Calls re-sent after a replica died or was unavailable.",
                                 tag_keys=("target",))
        self.m_hops = Histogram("see_hops", "Experts asked per request.", [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 32.5])
        self.m_hop_ms = Histogram("see_hop_ms", "Latency of one ask (decide, + generate on ACCEPT) seen by the "
                                  "dispatcher.", ms, tag_keys=("expert",))
        self.m_generate_ms = Histogram("see_base_generate_ms", "Latency of a base-model answer.", ms)
        self.m_request_ms = Histogram("see_request_ms", "End-to-end latency inside the dispatcher.", ms,
                                      tag_keys=("endpoint",))

    # -- following the registry ---------------------------------------------------------------------------
    def _handle(self, app: str, name: str):
        key = (app, name)
        if key not in self._handles:
            self._handles[key] = serve.get_deployment_handle(name, app, _check_exists=False)
        return self._handles[key]

    def _refresh_sync(self) -> dict:
        """Registry (active experts, in routing order) ∩ Serve applications with a running replica."""
        doc = self.registry.load()
        recs = {r.name: r for r in doc.experts if r.status == "active"}
        specs = ordered([ExpertSpec(r.name, r.task, r.adapter_uri, r.threshold) for r in recs.values()],
                        self.cfg.routing.order)
        apps = serve.status().applications
        seq, pending = [], []
        for s in specs:
            rec, app = recs[s.name], self.scfg.expert_app(s.name)
            st = apps.get(app)
            running = False
            if st is not None and str(getattr(st.status, "value", st.status)) in ("RUNNING", "DEPLOYING", "UNHEALTHY"):
                dep = st.deployments.get(s.name)
                running = dep is not None and any(
                    str(getattr(k, "value", k)) == "RUNNING" and n > 0 for k, n in dep.replica_states.items()
                )
            # An expert already in the sequence stays while its application lives, even with no running replica
            # for a moment (a replica died and Serve is restarting it): its asks wait in the handle, instead
            # of the walk skipping it and routing its queries elsewhere.
            serving = s.name in {e.name for e in self.seq} and st is not None and str(
                getattr(st.status, "value", st.status)) in ("RUNNING", "DEPLOYING", "UNHEALTHY")
            if running or serving:
                seq.append(_Entry(s.name, s.task, rec.version, rec.position,
                                  effective_threshold(s, self.cfg.routing), app, self._handle(app, s.name)))
            else:
                pending.append({"name": s.name, "app": app, "state": "not deployed" if st is None else str(st.status)})
        changed = [e.name for e in seq] != [e.name for e in self.seq]
        self.seq, self.pending, self.generation = seq, pending, doc.generation
        if changed:
            log.info("expert sequence now %s", [e.name for e in seq])
        return self.sequence_info()

    async def refresh(self) -> dict:
        """Re-read the registry and Serve's status now (jobs call this after deploying or before removing)."""
        async with self._refresh_lock:
            return await asyncio.to_thread(self._refresh_sync)

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.scfg.dispatch.registry_poll_s)
            try:
                await self.refresh()
            except Exception:  # a transient registry/controller problem must not stop the poller
                log.exception("registry refresh failed; keeping the previous sequence")

    def sequence_info(self) -> dict:
        return {
            "order": self.cfg.routing.order,
            "mode": self.mode,
            "width": self.width,
            "registry": self.storage_uri,
            "registry_generation": self.generation,
            "sequence": [
                {"name": e.name, "task": e.task, "version": e.version, "position": e.position,
                 "threshold": e.threshold, "app": e.app, "state": "serving", "inflight": self.inflight.get(e.name, 0)}
                for e in self.seq
            ],
            "pending": self.pending,
        }

    async def inflight_of(self, name: str) -> int:
        return self.inflight.get(name, 0)

    def set_dispatch(self, mode: str | None = None, width: int | None = None) -> dict:
        """Switch between sequential and concurrent walking in place (benchmarks, tests)."""
        if mode is not None:
            if mode not in ("sequential", "concurrent"):
                raise ValueError(f"unknown dispatch mode {mode!r}")
            self.mode = mode
        if width is not None:
            if width < 1:
                raise ValueError("width must be >= 1")
            self.width = width
        return {"mode": self.mode, "width": self.width}

    def configs(self) -> dict:
        """The configurations this dispatcher serves with (live deployment of new experts reuses them)."""
        return {"see": self.cfg.model_dump(mode="json"), "serve": self.scfg.model_dump(mode="json"),
                "storage": self.storage_uri}

    # -- the walk ---------------------------------------------------------------------------------------
    async def _ask(self, e: _Entry, q: Query, max_tokens: int, generate: bool, threshold: float | None = None):
        req = {"input": q.input, "definition": q.definition, "threshold": e.threshold if threshold is None else threshold,
               "max_tokens": max_tokens, "generate": generate}
        self.inflight[e.name] = self.inflight.get(e.name, 0) + 1
        t0 = time.perf_counter()
        try:
            r = await self._call(e.handle.ask, req, e.name)
        finally:
            self.inflight[e.name] -= 1
        ms = (time.perf_counter() - t0) * 1000
        self.m_hop_ms.observe(ms, {"expert": e.name})
        return r, ms

    async def _call(self, method, req: dict, deployment: str):
        """One call to a model replica, re-sent (at most ``ask_retries`` times) when its replica died or was
        unavailable: Serve routes the retry to another replica, or queues it until the restarted one is up.
        Every call is a pure function of the request, so re-sending it cannot change the answer."""
        for attempt in range(self.scfg.ask_retries + 1):
            try:
                return await method.remote(req)
            except self._retryable as exc:
                if attempt >= self.scfg.ask_retries:
                    raise
                self.retries += 1
                self.m_retries.inc(1, {"target": deployment})
                log.warning("%s: %s; re-sending (retry %d of %d)", deployment, type(exc).__name__, attempt + 1,
                            self.scfg.ask_retries)
                await asyncio.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])

    def stats(self) -> dict:
        """Counters the fault tests read: re-sent calls, requests in flight per client."""
        return {"retries": self.retries, "per_client": dict(self._per_client)}

    def _record(self, e: _Entry, r: dict, ms: float, thr: float, trace: list[Ask]) -> bool:
        accepted = r["p"] >= thr
        trace.append(Ask(e.name, r["p"], thr, accepted, ms))
        self.m_asks.inc(1, {"expert": e.name, "decision": "accept" if accepted else "reject"})
        return accepted

    async def walk(self, q: Query, max_tokens: int, generate: bool = True, mode: str | None = None) -> tuple[RouteResult, dict]:
        """SEE's sequential routing for one query. Returns the result and token/finish info of the answer."""
        res, r, _ = await self._walk(q, max_tokens, generate, mode)
        return res, r

    async def _walk(self, q: Query, max_tokens: int, generate: bool, mode: str | None):
        """``walk``, also returning the accepting expert's entry (None: the base answers)."""
        mode = mode or self.mode
        seq = list(self.seq)  # a snapshot: a refresh during the walk does not change this request's sequence
        trace: list[Ask] = []
        if mode == "sequential":
            for e in seq:
                r, ms = await self._ask(e, q, max_tokens, generate)
                if self._record(e, r, ms, e.threshold, trace):
                    return RouteResult(r["answer"], e.name, trace), r, e
        else:
            k = max(1, self.width)
            for start in range(0, len(seq), k):
                window = seq[start : start + k]
                t0 = time.perf_counter()
                tasks = [asyncio.ensure_future(self._ask(e, q, max_tokens, generate)) for e in window]
                try:
                    for e, task in zip(window, tasks):
                        r, _ = await task
                        ms = (time.perf_counter() - t0) * 1000  # from the window's start: this hop's latency
                        if self._record(e, r, ms, e.threshold, trace):
                            return RouteResult(r["answer"], e.name, trace), r, e
                finally:
                    for t in tasks:  # the asks after the acceptor are not needed
                        if not t.done():
                            t.cancel()
        self.m_fallbacks.inc()
        if not generate:
            return RouteResult(None, BASE, trace), {}, None
        t0 = time.perf_counter()
        r = await self._call(self.base.generate, {"input": q.input, "definition": q.definition,
                                                  "max_tokens": max_tokens}, BASE)
        self.m_generate_ms.observe((time.perf_counter() - t0) * 1000)
        return RouteResult(r["answer"], BASE, trace), r, None

    async def _forced(self, model: str, q: Query, max_tokens: int) -> tuple[RouteResult, dict]:
        if model == BASE:
            r = await self._call(self.base.generate, {"input": q.input, "definition": q.definition,
                                                      "max_tokens": max_tokens}, BASE)
            return RouteResult(r["answer"], BASE, []), r
        e = next(x for x in self.seq if x.name == model)
        r, ms = await self._ask(e, q, max_tokens, True, threshold=0.0)  # threshold 0: it always answers
        trace = [Ask(e.name, r["p"], e.threshold, r["p"] >= e.threshold, ms)]
        self.m_asks.inc(1, {"expert": e.name, "decision": "forced"})
        return RouteResult(r["answer"], e.name, trace), r

    async def answer(self, model: str, q: Query, max_tokens: int) -> tuple[RouteResult, dict, dict]:
        """Route (or force) one query; returns the result, the answer's token info, and the trace dict."""
        forced = model != self.scfg.model_name
        t0 = time.perf_counter()
        coro = self._forced(model, q, max_tokens) if forced else self.walk(q, max_tokens)
        res, info = await self._bounded(coro, f"no answer within {self.scfg.request_timeout_s:.0f} s; retry later")
        return res, info, self._answered(res, forced, t0)

    async def _bounded(self, coro, timeout_message: str):
        """Await within ``request_timeout_s``; a timeout or a deployment that cannot take the request -> 503."""
        try:
            return await asyncio.wait_for(coro, self.scfg.request_timeout_s)
        except TimeoutError:
            raise api.unavailable(timeout_message, self.scfg.retry_after_s) from None
        except self._unavailable as e:
            raise api.unavailable(f"no deployment can take the request now ({type(e).__name__}); retry later",
                                  self.scfg.retry_after_s) from None

    def _answered(self, res: RouteResult, forced: bool, t0: float) -> dict:
        self.m_hops.observe(res.hops)
        self.m_answers.inc(1, {"expert": res.expert})
        return self.trace_dict(res, forced, (time.perf_counter() - t0) * 1000)

    def trace_dict(self, res: RouteResult, forced: bool, total_ms: float) -> dict:
        return {
            "expert": res.expert,
            "hops": res.hops,
            "mode": "forced" if forced else self.mode,
            "asks": [asdict(a) for a in res.trace],
            "hop_ms": [a.ms for a in res.trace],
            "total_ms": total_ms,
            "forced": forced,
        }

    # -- HTTP -----------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        """401 unless the request carries the configured API key (constant-time comparison)."""
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expected = self._api_key.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            self.m_errors.inc(1, {"status": "401"})
            raise api.unauthorized()

    @contextlib.asynccontextmanager
    async def _admit(self, request: Request):
        """Authentication, then one of the client's ``limits.max_concurrent_per_client`` slots (429 when all
        are taken). Clients are told apart by IP address; the count is per dispatcher replica."""
        self._ensure_poller()
        self._authorize(request)
        client = request.client.host if request.client else "unknown"
        limit = self.scfg.limits.max_concurrent_per_client
        if self._per_client.get(client, 0) >= limit:
            self.m_errors.inc(1, {"status": "429"})
            raise api.too_many_requests(limit, self.scfg.retry_after_s)
        self._per_client[client] = self._per_client.get(client, 0) + 1
        try:
            yield
        finally:
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]

    async def _body(self, request: Request, model_cls):
        try:  # refused before `_guard` runs: counted here, so that see_errors_total sees every 4xx
            raw = await api.read_body(request, self.scfg.limits.max_body_bytes)
            return api.parse_body(raw, model_cls, self.scfg.limits)
        except APIError as e:
            self.m_errors.inc(1, {"status": str(e.status)})
            raise

    def _check_model(self, model: str) -> None:
        try:
            validate_name(model, "model")
        except ValueError as e:
            self.m_errors.inc(1, {"status": "400"})
            raise APIError(400, str(e), param="model", code="invalid_model_name") from None
        known = {self.scfg.model_name, BASE, *(e.name for e in self.seq)}
        if model not in known:
            self.m_errors.inc(1, {"status": "400"})
            raise APIError(400, f"unknown model {model!r}; available: {sorted(known)}", param="model",
                           code="model_not_found")

    def _max_tokens(self, req) -> int:
        return req.max_tokens or self.scfg.limits.default_max_tokens or self.cfg.routing.max_new_tokens

    def _finish(self, text: str | None, info: dict, stops: list[str]) -> tuple[str, str]:
        text, stopped = api.apply_stop(text or "", stops)
        return text, "stop" if stopped else info.get("finish", "stop")

    async def _guard(self, endpoint: str, model: str, fn):
        t0 = time.perf_counter()
        self.m_requests.inc(1, {"endpoint": endpoint, "model": model})
        try:
            return await fn()
        except APIError as e:
            self.m_errors.inc(1, {"status": str(e.status)})
            raise
        finally:
            self.m_request_ms.observe((time.perf_counter() - t0) * 1000, {"endpoint": endpoint})

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        async with self._admit(request):
            return await self._completions(request)

    async def _completions(self, request: Request):
        req = await self._body(request, api.CompletionRequest)
        self._check_model(req.model)
        mt = self._max_tokens(req)

        async def run():
            if req.stream:
                return await self._stream(req, req.queries()[0], mt, chat=False)
            outs = await asyncio.gather(*(self.answer(req.model, q, mt) for q in req.queries()))
            choices, pt, ct, traces = [], 0, 0, []
            for i, (res, info, trace) in enumerate(outs):
                text, finish = self._finish(res.answer, info, req.stops())
                if req.echo:
                    text = req.prompts()[i] + text
                choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": None})
                pt += info.get("prompt_tokens", 0)
                ct += info.get("completion_tokens", 0)
                traces.append(trace)
            return api.completion_response(req.model, choices, api.usage(pt, ct), traces[0] if len(traces) == 1 else traces)

        return await self._guard("completions", req.model, run)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        async with self._admit(request):
            return await self._chat_completions(request)

    async def _chat_completions(self, request: Request):
        req = await self._body(request, api.ChatRequest)
        self._check_model(req.model)
        mt = self._max_tokens(req)

        async def run():
            if req.stream:
                return await self._stream(req, req.query(), mt, chat=True)
            res, info, trace = await self.answer(req.model, req.query(), mt)
            text, finish = self._finish(res.answer, info, req.stops())
            usage = api.usage(info.get("prompt_tokens", 0), info.get("completion_tokens", 0))
            return api.chat_response(req.model, text, finish, usage, trace)

        return await self._guard("chat", req.model, run)

    # -- streaming ----------------------------------------------------------------------------------------
    async def _open_stream(self, model: str, q: Query, max_tokens: int):
        """Decide who answers, then open that deployment's token stream and read its first item.

        Routed requests walk the sequence with decisions only (the same walk, both modes); the accepting expert
        (or the base) then streams, continuing after ACCEPT from its own decide pass. A forced expert streams
        directly and its first item is its decision. Reading the first item here keeps failures to start an
        HTTP error (503) rather than a broken stream. Returns (result, entry or None, stream, first item).
        """
        forced = model != self.scfg.model_name
        req = {"input": q.input, "definition": q.definition, "max_tokens": max_tokens,
               "threshold": 0.0}  # the decision is made: the answering expert generates regardless
        if not forced:
            res, _, entry = await self._walk(q, 1, False, None)
        elif model == BASE:
            res, entry = RouteResult(None, BASE, []), None
        else:
            res, entry = None, next(x for x in self.seq if x.name == model)
        handle = self.base if entry is None else entry.handle
        if entry is not None:
            self.inflight[entry.name] = self.inflight.get(entry.name, 0) + 1
        t0 = time.perf_counter()
        gen = None
        try:
            gen = handle.options(stream=True).stream.remote(req)
            first = await gen.__anext__()
        except BaseException:  # including the cancellation of a timed-out start
            if gen is not None:
                gen.cancel()
            if entry is not None:
                self.inflight[entry.name] -= 1
            raise
        if res is None:  # forced expert: its decision is reported, not applied
            p = first["p"]
            res = RouteResult(None, entry.name, [Ask(entry.name, p, entry.threshold, p >= entry.threshold,
                                                     (time.perf_counter() - t0) * 1000)])
            self.m_asks.inc(1, {"expert": entry.name, "decision": "forced"})
        return res, entry, gen, first

    async def _stream(self, req, q: Query, max_tokens: int, chat: bool) -> StreamingResponse:
        """Server-sent events in OpenAI's chunk format, one chunk per generated token's text."""
        t0 = time.perf_counter()
        forced = req.model != self.scfg.model_name
        res, entry, gen, first = await self._bounded(self._open_stream(req.model, q, max_tokens),
                                                     "streaming did not start in time; retry later")
        cid, created = api.new_id("chatcmpl" if chat else "cmpl"), int(time.time())

        def chunk(piece: str | None, fin: str | None, extra: dict | None = None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if piece is None else {"content": piece})
                choice = {"index": 0, "delta": delta, "finish_reason": fin, "logprobs": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": fin, "logprobs": None}
                obj = "text_completion"
            return {"id": cid, "object": obj, "created": created, "model": req.model, "choices": [choice], **(extra or {})}

        async def events():
            stops = api.StopScanner(req.stops())
            final, n_tokens, done = None, 0, False
            try:
                if chat:
                    yield api.sse(chunk(None, None, role=True))
                elif getattr(req, "echo", False):
                    yield api.sse(chunk(req.prompts()[0], None))
                async for item in gen:
                    if "text" in item:
                        n_tokens = item.get("tokens", n_tokens)
                        piece, hit = stops.feed(item["text"])
                        if piece:
                            yield api.sse(chunk(piece, None))
                        if hit:
                            break  # a stop string ended the answer: the rest is not generated
                    elif "answer" in item:
                        final = item
                rest = stops.flush()
                if rest:
                    yield api.sse(chunk(rest, None))
                if final is not None:
                    pt, ct, finish = final["prompt_tokens"], final["completion_tokens"], final["finish"]
                else:  # stopped early
                    pt, ct, finish = first.get("prompt_tokens", 0), min(n_tokens, max_tokens), "stop"
                if stops.stopped:
                    finish = "stop"
                trace = self._answered(res, forced, t0)
                yield api.sse(chunk(None if chat else "", finish, {"usage": api.usage(pt, ct), api.TRACE_FIELD: trace}))
                yield api.sse("[DONE]")
                done = True
            except Exception as e:  # the status line is sent: report in the stream, as OpenAI does
                log.exception("stream failed")
                err = api.unavailable(f"the answer stream broke off ({type(e).__name__}); retry later",
                                      self.scfg.retry_after_s)
                yield api.sse(err.body())
                yield api.sse("[DONE]")
            finally:
                if not done:
                    gen.cancel()
                if entry is not None:
                    self.inflight[entry.name] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @fastapi_app.post("/v1/route")
    async def route(self, request: Request):
        async with self._admit(request):
            return await self._route(request)

    async def _route(self, request: Request):
        req = await self._body(request, api.RouteRequest)

        async def run():
            t0 = time.perf_counter()
            try:
                res, _ = await asyncio.wait_for(self.walk(req.query(), 1, generate=False), self.scfg.request_timeout_s)
            except TimeoutError:
                raise api.unavailable("routing timed out; retry later", self.scfg.retry_after_s) from None
            except self._unavailable as e:
                raise api.unavailable(f"no deployment can take the request now ({type(e).__name__})",
                                      self.scfg.retry_after_s) from None
            return {"object": "see.route", **self.trace_dict(res, False, (time.perf_counter() - t0) * 1000)}

        return await self._guard("route", self.scfg.model_name, run)

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        async with self._admit(request):
            data = [{"id": self.scfg.model_name, "object": "model", "created": 0, "owned_by": "see-ray",
                     "see_kind": "system"},
                    {"id": BASE, "object": "model", "created": 0, "owned_by": "see-ray", "see_kind": "base"}]
            data += [{"id": e.name, "object": "model", "created": 0, "owned_by": "see-ray", "see_kind": "expert",
                      "see_task": e.task} for e in self.seq]
            return {"object": "list", "data": data}

    @fastapi_app.get("/v1/experts")
    async def experts(self, request: Request):
        async with self._admit(request):
            return self.sequence_info()

    @fastapi_app.get("/healthz")
    async def healthz(self):
        # Open even with an API key: liveness probes and load balancers carry no credentials, and it tells
        # nothing but the sequence size and mode (no names, no registry path).
        self._ensure_poller()
        return {"status": "ok", "experts": len(self.seq), "pending": len(self.pending), "mode": self.mode}


# == building and deploying ================================================================================
def _dump(cfg) -> dict:
    return json.loads(cfg.model_dump_json())


def model_fingerprint(record: dict | None, storage_uri: str | None, see_cfg: dict, serve_cfg: dict) -> str:
    """What a model replica was built from: the record (None: the base), storage, SEE config and the parts of
    the serve config a model replica uses (its replica settings and batching). ``build_app`` leaves a running
    model application alone when this is unchanged, so that re-applying a Serve config restarts nothing."""
    import hashlib

    scfg = ServeConfig.model_validate(serve_cfg)
    replica = scfg.base if record is None else scfg.expert_settings(record["name"])
    doc = {"record": record, "storage": storage_uri, "see": see_cfg,
           "replica": _dump(replica), "batch": _dump(scfg.batch)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expert_app(rec, see: SEEConfig, scfg: ServeConfig, storage_uri: str):
    r = scfg.expert_settings(rec.name)
    return ExpertDeployment.options(
        name=rec.name,
        ray_actor_options=r.actor_options(),
        autoscaling_config=r.autoscaling.serve_dict(),
        max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests,
    ).bind(rec.model_dump(mode="json"), storage_uri, _dump(see), _dump(scfg))


def base_app(see: SEEConfig, scfg: ServeConfig):
    r = scfg.base
    return BaseDeployment.options(
        ray_actor_options=r.actor_options(),
        autoscaling_config=r.autoscaling.serve_dict(),
        max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests,
    ).bind(_dump(see), _dump(scfg))


def dispatcher_app(see: SEEConfig, scfg: ServeConfig, storage_uri: str):
    return Dispatcher.options(
        num_replicas=scfg.dispatcher_replicas,
        ray_actor_options={"num_cpus": scfg.dispatcher_num_cpus},
    ).bind(_dump(see), _dump(scfg), storage_uri)


def start_serve(scfg: ServeConfig) -> None:
    """Start Serve's HTTP proxy on host:port (a no-op when Serve already runs on this cluster)."""
    serve.start(http_options={"host": scfg.host, "port": scfg.port})


def url_of(scfg: ServeConfig) -> str:
    """The API's base URL (OpenAI clients append /v1/...)."""
    return f"http://{scfg.host}:{scfg.port}{scfg.route_prefix.rstrip('/')}"


def check_base_of(recs, see: SEEConfig) -> None:
    """Raise BaseModelMismatch if any record was trained on another base than ``see.model`` (fingerprints)."""
    from see_ray.core.model import fingerprint, resolve_model_path
    from see_ray.registry import check_served_base

    if recs:
        path = resolve_model_path(see.model)
        check_served_base(recs, fingerprint(path), see.model.name_or_path)


def _running_fingerprint(app: str, deployment: str) -> str | None:
    """The fingerprint a RUNNING model application reports (None: absent, not running, or not answering)."""
    st = serve.status().applications.get(app)
    if st is None or str(getattr(st.status, "value", st.status)) != "RUNNING":
        return None
    try:
        return serve.get_deployment_handle(deployment, app).info.remote().result(timeout_s=30).get("fingerprint")
    except Exception:  # a replica that cannot answer is redeployed
        return None


def deploy_models(see: SEEConfig, scfg: ServeConfig, storage_uri: str, progress=print,
                  keep_unchanged: bool = False) -> list[str]:
    """Deploy the registry's active experts and the base, each as its own application, and wait until they
    run. ``keep_unchanged``: leave applications alone whose replicas were built from the same inputs
    (``model_fingerprint``). Returns the applications (re)deployed."""
    from ray.serve import RunTarget

    from see_ray.registry import Registry

    recs = [r for r in Registry(storage_uri).list() if r.status == "active"]
    check_base_of(recs, see)  # before anything is deployed; every expert replica checks again
    see_d, scfg_d = _dump(see), _dump(scfg)
    wanted = [(scfg.expert_app(r.name), r.name, model_fingerprint(r.model_dump(mode="json"), storage_uri, see_d, scfg_d),
               lambda r=r: expert_app(r, see, scfg, storage_uri)) for r in recs]
    wanted.append((scfg.base_app, BASE_DEPLOYMENT, model_fingerprint(None, None, see_d, scfg_d),
                   lambda: base_app(see, scfg)))
    targets, kept = [], []
    for app, dep, fp, make in wanted:
        if keep_unchanged and _running_fingerprint(app, dep) == fp:
            kept.append(app)
        else:
            targets.append(RunTarget(make(), name=app, route_prefix=None))
    t0 = time.perf_counter()
    progress(f"deploying {len(recs)} expert(s) {[r.name for r in recs]} and the base model"
             + (f" (unchanged, kept running: {kept})" if kept else "") + " ...")
    if targets:
        serve.run_many(targets, wait_for_applications_running=True)
    progress(f"model deployments running after {time.perf_counter() - t0:.0f} s")
    return [t.name for t in targets]


def deploy_all(see: SEEConfig, scfg: ServeConfig, storage_uri: str, progress=print) -> dict:
    """Deploy the registry's active experts, the base and the dispatcher (all applications at once)."""
    start_serve(scfg)
    t0 = time.perf_counter()
    deploy_models(see, scfg, storage_uri, progress)
    progress("deploying the dispatcher ...")
    serve.run(dispatcher_app(see, scfg, storage_uri), name=scfg.app_name, route_prefix=scfg.route_prefix)
    info = serve.get_app_handle(scfg.app_name).refresh.remote().result()
    progress(f"serving at {url_of(scfg)} ({time.perf_counter() - t0:.0f} s); sequence "
             f"{[e['name'] for e in info['sequence']]}")
    return info


def build_app(args: AppArgs):
    """Serve application builder for config files (``serve deploy``, KubeRay's ``serveConfigV2``).

    Builds the configs from ``args``, deploys the registry's experts and the base as their own applications
    (the same layout and code as ``deploy_all``; unchanged running ones are kept, so re-applying a config
    restarts nothing) and waits until they run, then returns the dispatcher application, which Serve deploys
    under the config's name and route_prefix. Those must equal ``app_name`` / ``route_prefix`` of the serve
    settings (the dispatcher refuses to start otherwise): jobs find the application by that name.
    Waiting here keeps the SEE application DEPLOYING until its experts can answer, so a RayService switches
    traffic to a new cluster only once the whole sequence is up.
    """
    from see_ray.registry.storage import Storage, default_storage_uri

    if isinstance(args, dict):  # Serve validates against the annotation; direct callers may pass a dict
        args = AppArgs.model_validate(args)
    see = SEEConfig.from_yaml(args.config, args.set)
    scfg = ServeConfig.from_yaml(args.serve_config, args.serve_set)
    storage = Storage(args.storage or scfg.storage or default_storage_uri()).uri
    scfg.storage = storage
    deploy_models(see, scfg, storage, progress=log.info, keep_unchanged=True)
    return dispatcher_app(see, scfg, storage)


def dispatcher_handle(scfg: ServeConfig | None = None, app_name: str | None = None):
    return serve.get_app_handle(app_name or (scfg.app_name if scfg else ServeConfig().app_name))


def add_expert_live(name: str, app_name: str = "see", timeout_s: float = 300.0) -> dict:
    """Deploy a registered expert as its own application and put it into the running dispatcher's sequence.

    Uses the configs the dispatcher serves with (so the replica matches the others) and the dispatcher's
    registry. Nothing running is redeployed: the new application starts, and once it has a running replica
    the dispatcher is told to refresh. Returns the dispatcher's new sequence info.
    """
    from see_ray.registry import Registry

    d = dispatcher_handle(app_name=app_name)
    conf = d.configs.remote().result(timeout_s=60)
    see, scfg, storage = SEEConfig.model_validate(conf["see"]), ServeConfig.model_validate(conf["serve"]), conf["storage"]
    rec = Registry(storage).get(name)  # validates the name
    check_base_of([rec], see)
    serve.run(expert_app(rec, see, scfg, storage), name=scfg.expert_app(name), route_prefix=None)
    deadline = time.monotonic() + timeout_s
    while True:
        info = d.refresh.remote().result(timeout_s=60)
        if any(e["name"] == name for e in info["sequence"]) or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def remove_expert_live(name: str, app_name: str = "see", drain_timeout_s: float = 60.0) -> dict:
    """Take an expert out of the sequence first, then tear down its deployment.

    Call after the registry marked it disabled/removed: the dispatcher refreshes (it drops the expert from
    new walks), waits until every dispatcher replica has polled and the expert's in-flight asks finished,
    and only then deletes the expert's application.
    """
    validate_name(name, "expert name")
    d = dispatcher_handle(app_name=app_name)
    conf = d.configs.remote().result(timeout_s=60)
    scfg = ServeConfig.model_validate(conf["serve"])
    info = d.refresh.remote().result(timeout_s=60)
    if any(e["name"] == name for e in info["sequence"]):
        raise RuntimeError(f"expert {name!r} is still active in the registry; disable or remove it there first")
    time.sleep(scfg.dispatch.registry_poll_s * 1.5)  # other dispatcher replicas poll on their own
    deadline = time.monotonic() + drain_timeout_s
    while d.inflight_of.remote(name).result(timeout_s=30) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    app = scfg.expert_app(name)
    if app in serve.status().applications:
        serve.delete(app)
    return d.refresh.remote().result(timeout_s=60)


def dispatcher_configs(app_name: str = "see") -> dict | None:
    """The configs of the running SEE application ``app_name``, or None if it is not running."""
    if app_name not in serve.status().applications:
        return None
    return dispatcher_handle(app_name=app_name).configs.remote().result(timeout_s=60)


def serving_running() -> bool:
    """Is a Ray Serve controller alive on the connected cluster? (looked up by name; nothing is started)."""
    import ray

    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except Exception:  # ValueError: no controller; anything else (no Serve, unreachable GCS): not running either
        return False


def live_app_for(storage_uri: str, app_name: str = "see") -> tuple[dict | None, str]:
    """The configs of the running SEE application ``app_name`` if it serves the registry at ``storage_uri``;
    else None and why not. Ray must be connected. Used by the add-expert job (step 6) and the registry CLI."""
    from see_ray.registry.storage import Storage

    if not serving_running():
        return None, "serving is not running"
    conf = dispatcher_configs(app_name)
    if conf is None:
        return None, f"Serve is running but has no SEE application {app_name!r}"
    if Storage(conf["storage"]).uri != Storage(storage_uri).uri:
        return None, f"the running SEE application serves the registry {conf['storage']}, not {storage_uri}"
    return conf, "serving"

