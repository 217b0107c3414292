"""The SEE application's ingress: ``Dispatcher``, the Serve deployment behind the OpenAI-compatible HTTP API.

(About 500 lines: one Serve deployment class with its endpoints and its stream, kept together so that the
request path reads in one place; the schema, the walk and the replicas are in their own modules.)

It holds no model. Per replica it follows the registry (active experts whose Serve application has a running
replica form the sequence, re-read every ``dispatch.registry_poll_s`` and on ``refresh``), admits requests
(API key, per-client concurrency, body size: ``schema.py`` holds the HTTP schema and its errors), answers
them through its ``walk.Walker``, streams answers as server-sent events, and records Serve metrics.

One completion request, through the files that handle it::

    ingress.py   Dispatcher.completions -> answer -> Walker.route (or Walker.forced for model=<expert>/base)
    walk.py      Walker.route: core.routing.walk over the sequence; each hop Walker._ask -> the expert's handle
    replica.py   ExpertDeployment.ask -> batched _ask_batch (or BaseDeployment.generate when all reject)
    core/expert.py  SEEModel.decide_and_generate: the decide pass and, on ACCEPT, generation from its KV cache

A streamed request walks with decisions only, then opens the answering replica's ``stream``
(``Dispatcher._open_stream``).
"""

# No `from __future__ import annotations` here: FastAPI (through serve.ingress) must see real types.
import asyncio
import contextlib
import hmac
import logging
import time
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from ray import serve

import see_ray.serve.schema as api
from see_ray.config import SEEConfig
from see_ray.config.constants import BASE, BASE_DEPLOYMENT, DISPATCHER_DEPLOYMENT
from see_ray.config.serve import ServeConfig, load_api_key
from see_ray.core.data import validate_name
from see_ray.core.prompts import Query
from see_ray.core.routing import Ask, ExpertSpec, RouteResult, accepts, ordered, threshold_of
from see_ray.serve.schema import APIError, fastapi_app
from see_ray.serve.walk import Entry, Hooks, Walker

log = logging.getLogger(__name__)


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


class _Metrics(Hooks):
    """The dispatcher's Serve metrics; the walker reports its part through the ``Hooks`` methods."""

    def __init__(self) -> None:
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

    def hop(self, expert: str, ms: float) -> None:
        self.m_hop_ms.observe(ms, {"expert": expert})

    def decision(self, expert: str, decision: str) -> None:
        self.m_asks.inc(1, {"expert": expert, "decision": decision})

    def fallback(self) -> None:
        self.m_fallbacks.inc()

    def base_ms(self, ms: float) -> None:
        self.m_generate_ms.observe(ms)

    def retry(self, target: str) -> None:
        self.m_retries.inc(1, {"target": target})


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
        self.pending: list[dict] = []  # registry experts whose application is not running (yet)
        self.generation = -1
        self._handles: dict[tuple[str, str], Any] = {}
        self._refresh_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self.base = serve.get_deployment_handle(BASE_DEPLOYMENT, self.scfg.base_app)
        self._unavailable = _unavailable_errors()
        self._api_key = load_api_key(self.scfg.auth)  # a SecretStr (masked in reprs), never logged
        self._per_client: dict[str, int] = {}
        log.info("dispatcher: API key %s", "required" if self._api_key is not None else "not configured (open API)")
        self.metrics = _Metrics()
        self.walker = Walker(lambda req: self.base.generate.remote(req), self.scfg.dispatch.mode,
                             self.scfg.dispatch.width, _retryable_errors(), self.scfg.ask_retries, hooks=self.metrics)
        self._refresh_sync()

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
        in_sequence = {e.name for e in self.walker.seq}
        for s in specs:
            rec, app = recs[s.name], self.scfg.expert_app(s.name)
            st = apps.get(app)
            alive = st is not None and str(getattr(st.status, "value", st.status)) in ("RUNNING", "DEPLOYING",
                                                                                          "UNHEALTHY")
            dep = st.deployments.get(s.name) if alive else None
            running = dep is not None and any(
                str(getattr(k, "value", k)) == "RUNNING" and n > 0 for k, n in dep.replica_states.items()
            )
            # An expert already in the sequence stays while its application lives, even with no running replica
            # for a moment (a replica died and Serve is restarting it): its asks wait in the handle, instead
            # of the walk skipping it and routing its queries elsewhere.
            serving = alive and s.name in in_sequence
            if running or serving:
                h = self._handle(app, s.name)
                seq.append(Entry(s.name, s.task, rec.version, rec.position, threshold_of(s.threshold, self.cfg.routing),
                                 app, ask=lambda req, h=h: h.ask.remote(req),
                                 stream=lambda req, h=h: h.options(stream=True).stream.remote(req)))
            else:
                pending.append({"name": s.name, "app": app, "state": "not deployed" if st is None else str(st.status)})
        changed = [e.name for e in seq] != [e.name for e in self.walker.seq]
        self.walker.seq, self.pending, self.generation = seq, pending, doc.generation
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
            "mode": self.walker.mode,
            "width": self.walker.width,
            "registry": self.storage_uri,
            "registry_generation": self.generation,
            "sequence": [
                {"name": e.name, "task": e.task, "version": e.version, "position": e.position,
                 "threshold": e.threshold, "app": e.app, "state": "serving",
                 "inflight": self.walker.inflight.get(e.name, 0)}
                for e in self.walker.seq
            ],
            "pending": self.pending,
        }

    async def inflight_of(self, name: str) -> int:
        return self.walker.inflight.get(name, 0)

    def set_dispatch(self, mode: str | None = None, width: int | None = None) -> dict:
        """Switch between sequential and concurrent walking in place (benchmarks, tests)."""
        return self.walker.set_mode(mode, width)

    def configs(self) -> dict:
        """The configurations this dispatcher serves with (live deployment of new experts reuses them)."""
        return {"see": self.cfg.model_dump(mode="json"), "serve": self.scfg.model_dump(mode="json"),
                "storage": self.storage_uri}

    def stats(self) -> dict:
        """Counters the fault tests read: re-sent calls, requests in flight per client."""
        return {"retries": self.walker.retries, "per_client": dict(self._per_client)}

    # -- answering ---------------------------------------------------------------------------------------
    async def answer(self, model: str, q: Query, max_tokens: int) -> tuple[RouteResult, dict, dict]:
        """Route (or force) one query; returns the result, the answer's token info, and the trace dict."""
        forced = model != self.scfg.model_name
        t0 = time.perf_counter()
        coro = self.walker.forced(model, q, max_tokens) if forced else self.walker.route(q, max_tokens)
        res, info, _ = await self._bounded(coro, f"no answer within {self.scfg.request_timeout_s:.0f} s; retry later")
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
        self.metrics.m_hops.observe(res.hops)
        self.metrics.m_answers.inc(1, {"expert": res.expert})
        return self.walker.trace_dict(res, forced, (time.perf_counter() - t0) * 1000)

    # -- HTTP -----------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        """401 unless the request carries the configured API key (constant-time comparison)."""
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expected = self._api_key.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            self.metrics.m_errors.inc(1, {"status": "401"})
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
            self.metrics.m_errors.inc(1, {"status": "429"})
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
            self.metrics.m_errors.inc(1, {"status": str(e.status)})
            raise

    def _check_model(self, model: str) -> None:
        try:
            validate_name(model, "model")
        except ValueError as e:
            self.metrics.m_errors.inc(1, {"status": "400"})
            raise APIError(400, str(e), param="model", code="invalid_model_name") from None
        known = {self.scfg.model_name, BASE, *(e.name for e in self.walker.seq)}
        if model not in known:
            self.metrics.m_errors.inc(1, {"status": "400"})
            raise APIError(400, f"unknown model {model!r}; available: {sorted(known)}", param="model",
                           code="model_not_found")

    def _max_tokens(self, req) -> int:
        return req.max_tokens or self.scfg.limits.default_max_tokens or self.cfg.routing.max_new_tokens

    def _finish(self, text: str | None, info: dict, stops: list[str]) -> tuple[str, str]:
        text, stopped = api.apply_stop(text or "", stops)
        return text, "stop" if stopped else info.get("finish", "stop")

    async def _guard(self, endpoint: str, model: str, fn):
        t0 = time.perf_counter()
        self.metrics.m_requests.inc(1, {"endpoint": endpoint, "model": model})
        try:
            return await fn()
        except APIError as e:
            self.metrics.m_errors.inc(1, {"status": str(e.status)})
            raise
        finally:
            self.metrics.m_request_ms.observe((time.perf_counter() - t0) * 1000, {"endpoint": endpoint})

    async def _generate(self, request: Request, model_cls, endpoint: str, respond):
        """The completion endpoints' common path: a client slot, the parsed body, a known model, the token
        budget, then ``respond(req, max_tokens)`` under the request metrics."""
        async with self._admit(request):
            req = await self._body(request, model_cls)
            self._check_model(req.model)
            mt = self._max_tokens(req)
            return await self._guard(endpoint, req.model, lambda: respond(req, mt))

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, api.CompletionRequest, "completions", self._complete)

    async def _complete(self, req, mt: int):
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

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, api.ChatRequest, "chat", self._chat)

    async def _chat(self, req, mt: int):
        if req.stream:
            return await self._stream(req, req.query(), mt, chat=True)
        res, info, trace = await self.answer(req.model, req.query(), mt)
        text, finish = self._finish(res.answer, info, req.stops())
        usage = api.usage(info.get("prompt_tokens", 0), info.get("completion_tokens", 0))
        return api.chat_response(req.model, text, finish, usage, trace)

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
            res, _, entry = await self.walker.route(q, 1, False)
        elif model == BASE:
            res, entry = RouteResult(None, BASE, []), None
        else:
            res, entry = None, self.walker.entry(model)
        if entry is not None:
            self.walker.add_inflight(entry.name, 1)
        t0 = time.perf_counter()
        gen = None
        try:
            gen = self.base.options(stream=True).stream.remote(req) if entry is None else entry.stream(req)
            first = await gen.__anext__()
        except BaseException:  # including the cancellation of a timed-out start
            if gen is not None:
                gen.cancel()
            if entry is not None:
                self.walker.add_inflight(entry.name, -1)
            raise
        if res is None:  # forced expert: its decision is reported, not applied
            p = first["p"]
            res = RouteResult(None, entry.name, [Ask(entry.name, p, entry.threshold, accepts(p, entry.threshold),
                                                     (time.perf_counter() - t0) * 1000)])
            self.metrics.decision(entry.name, "forced")
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
                    self.walker.add_inflight(entry.name, -1)

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
                res, _, _ = await asyncio.wait_for(self.walker.route(req.query(), 1, generate=False),
                                                   self.scfg.request_timeout_s)
            except TimeoutError:
                raise api.unavailable("routing timed out; retry later", self.scfg.retry_after_s) from None
            except self._unavailable as e:
                raise api.unavailable(f"no deployment can take the request now ({type(e).__name__})",
                                      self.scfg.retry_after_s) from None
            return {"object": "see.route", **self.walker.trace_dict(res, False, (time.perf_counter() - t0) * 1000)}

        return await self._guard("route", self.scfg.model_name, run)

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        async with self._admit(request):
            data = [{"id": self.scfg.model_name, "object": "model", "created": 0, "owned_by": "see-ray",
                     "see_kind": "system"},
                    {"id": BASE, "object": "model", "created": 0, "owned_by": "see-ray", "see_kind": "base"}]
            data += [{"id": e.name, "object": "model", "created": 0, "owned_by": "see-ray", "see_kind": "expert",
                      "see_task": e.task} for e in self.walker.seq]
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
        return {"status": "ok", "experts": len(self.walker.seq), "pending": len(self.pending), "mode": self.walker.mode}
