#!/usr/bin/env python
"""A bounded HTTP load driver for the SEE endpoint (httpx + asyncio): N requests at C concurrency.

Used by the load and fault tests (tests/cluster/test_serve_reliability.py) and by hand against a running server::

    python benchmarks/load.py --url http://127.0.0.1:8000 --requests 2000 --concurrency 16 --max-tokens 4

By hand it asks ``/v1/models`` for the experts and spreads the requests round-robin over ``see`` (SEE
routing), ``base`` and every expert (forced). Bounded in count AND time: after ``max_s`` no new request is
sent. Every non-200 answer and every exception counts as an error, with its status and the start of its
body; latencies are end to end as the client sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    errors: list[tuple[Any, str]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)  # of successful requests
    answered_by: Counter = field(default_factory=Counter)  # see_routing.expert of successful answers
    wall_s: float = 0.0

    @property
    def error_rate(self) -> float:
        return len(self.errors) / self.sent if self.sent else 0.0

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        if len(self.latencies_ms) == 1:
            return self.latencies_ms[0]
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[round(q) - 1]

    def summary(self) -> dict:
        p50, p99 = self.percentile(50), self.percentile(99)
        return {
            "sent": self.sent, "ok": self.ok, "errors": len(self.errors), "error_rate": self.error_rate,
            "p50_ms": None if p50 is None else round(p50, 1), "p99_ms": None if p99 is None else round(p99, 1),
            "max_ms": round(max(self.latencies_ms), 1) if self.latencies_ms else None,
            "wall_s": round(self.wall_s, 1), "rps": round(self.ok / self.wall_s, 1) if self.wall_s else None,
            "answered_by": dict(self.answered_by), "first_errors": [list(e) for e in self.errors[:5]],
        }


async def run_load(
    url: str,
    bodies: list[dict],
    requests: int,
    concurrency: int,
    path: str = "/v1/chat/completions",
    timeout_s: float = 60.0,
    max_s: float | None = None,
    headers: dict[str, str] | None = None,
    progress: asyncio.Event | None = None,
    progress_at: int = 0,
) -> LoadResult:
    """Send ``requests`` POSTs (bodies round-robin) with ``concurrency`` in flight. ``progress`` is set once
    ``progress_at`` requests have completed (fault tests inject their fault then)."""
    res = LoadResult()
    counter = iter(range(requests))
    t0 = time.perf_counter()
    done = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient):
        nonlocal done
        for i in counter:
            if max_s is not None and time.perf_counter() - t0 > max_s:
                return
            res.sent += 1
            t = time.perf_counter()
            try:
                r = await client.post(path, json=bodies[i % len(bodies)])
                if r.status_code == 200:
                    res.ok += 1
                    res.latencies_ms.append((time.perf_counter() - t) * 1000)
                    res.answered_by[r.json().get("see_routing", {}).get("expert", "?")] += 1
                else:
                    res.errors.append((r.status_code, r.text[:200]))
            except Exception as e:  # noqa: BLE001 - timeouts and connection errors count as errors
                res.errors.append(("exception", repr(e)[:200]))
            done += 1
            if progress is not None and done >= progress_at:
                progress.set()

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    res.wall_s = time.perf_counter() - t0
    return res


def load(url: str, bodies: list[dict], requests: int, concurrency: int, **kw) -> LoadResult:
    """Synchronous wrapper of ``run_load``."""
    return asyncio.run(run_load(url, bodies, requests, concurrency, **kw))


def chat_body(text: str, model: str = "see", definition: str | None = None, max_tokens: int = 4) -> dict:
    msgs = ([{"role": "system", "content": definition}] if definition else []) + [{"role": "user", "content": text}]
    return {"model": model, "messages": msgs, "max_tokens": max_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--max-s", type=float, default=600.0, help="stop sending after this many seconds")
    ap.add_argument("--api-key", help="bearer token, if the server requires one")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    models = [m["id"] for m in httpx.get(args.url + "/v1/models", headers=headers, timeout=30).json()["data"]]
    texts = ["12 + 30", "make this loud: hello there", "What is the capital of France?", "opposite of cold"]
    bodies = [chat_body(t, m, max_tokens=args.max_tokens) for m in models for t in texts]
    res = load(args.url, bodies, args.requests, args.concurrency, max_s=args.max_s, headers=headers)
    print(json.dumps(res.summary(), indent=2))


if __name__ == "__main__":
    main()
