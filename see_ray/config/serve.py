"""Configuration of the serving side (Ray Serve): one typed, documented object, like the SEE config's sections.

    ServeConfig.from_yaml("serve.yaml", ["dispatch.mode=concurrent", "expert.autoscaling.max_replicas=4"])

Defaults fit the local machine (2 CPU cores, no GPU): small CPU fractions per replica so that experts, the
base, the dispatcher and a training job fit side by side (Ray Train waits without end for CPUs that Serve
holds), one torch thread per replica (several processes with torch's default threads on 2 cores oversubscribe
them), and HTTP on 127.0.0.1 only. On a GPU cluster set ``expert.num_gpus=1`` (and the same for
``base``); ``threads`` then matters little.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from see_ray.config.base import ConfigBase
from see_ray.config.constants import API_KEY_ENV
from see_ray.core.data import validate_name


class AutoscalingSettings(ConfigBase):
    """Mapped onto Serve's ``autoscaling_config`` (request-based autoscaler)."""

    min_replicas: int = Field(1, ge=1, description="Replicas kept at all times (>= 1: no cold starts).")
    max_replicas: int = Field(2, ge=1, description="Upper bound the autoscaler may scale a busy deployment to.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Requests in flight (running + queued) per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(3.0, ge=0, description="How long load must stay high before scaling up.")
    downscale_delay_s: float = Field(15.0, ge=0, description="How long load must stay low before scaling down.")
    look_back_period_s: float = Field(
        5.0, gt=0, description="Window over which ongoing requests are averaged."
    )

    @model_validator(mode="after")
    def _order(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self

    def serve_dict(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }


class ReplicaSettings(ConfigBase):
    """Resources and scaling of one kind of model replica (an expert, or the base)."""

    num_cpus: float = Field(
        0.25, ge=0, description="CPUs each replica reserves in Ray (a fraction locally; scheduling only)."
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves (1 on GPU clusters).")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each replica reserves, e.g. {see_gpu_a100: 1}: replicas are placed only "
        "on nodes started with that resource (`ray start --resources`, a node type's `resources` in "
        "ray-cluster.yaml, rayStartParams in KubeRay). Pins experts to node groups.",
    )
    threads: int = Field(
        1, ge=1, description="torch intra-op threads (and OMP_NUM_THREADS) inside each replica. Keep the sum "
        "over replicas near the core count: oversubscribed cores slow every replica's forward passes."
    )
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings, description="Replica autoscaling.")
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests one replica accepts at once (>= batch.max_batch_size to fill a batch)."
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests queued per caller before Serve refuses (-> HTTP 503). -1: unbounded."
    )

    def actor_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}},
        }
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts

    @model_validator(mode="after")
    def _check_resources(self) -> ReplicaSettings:
        for k, v in self.resources.items():
            if k in ("CPU", "GPU", "memory"):  # Ray refuses these in `resources`; say which field to use
                raise ValueError(f"resources.{k}: use num_cpus / num_gpus for {k}, `resources` is for custom ones")
            if v < 0:
                raise ValueError(f"resources.{k}: must be >= 0, got {v}")
        return self


class BatchSettings(ConfigBase):
    """``@serve.batch`` inside every model replica (decide and generate are both batched)."""

    enabled: bool = Field(True, description="Batch concurrent requests (False: max_batch_size 1, benchmark baseline).")
    max_batch_size: int = Field(8, ge=1, description="Most requests run in one forward pass / generate call.")
    wait_s: float = Field(
        0.05, ge=0, description="Longest wait for a batch to fill after its first request arrives. With "
        "`adaptive_wait` it applies only under load, so it may be long: under load requests reach a replica "
        "spread over tens of ms after a batch returns, and a shorter wait leaves batches small (docs/results.md).",
    )
    adaptive_wait: bool = Field(
        True, description="Wait for a batch to fill only while the replica is under load (its previous batch held "
        "more than one request); a lone request runs at once, so batching adds no latency at low load.",
    )

    @property
    def size(self) -> int:
        return self.max_batch_size if self.enabled else 1


class DispatchSettings(ConfigBase):
    """How the dispatcher walks the expert sequence."""

    mode: Literal["sequential", "concurrent"] = Field(
        "sequential",
        description="sequential: ask expert 1, then 2, ... until one accepts (the plain SEE walk). concurrent: ask "
        "the next `width` experts at once and take the first ACCEPT in sequence order. Both give the same answers "
        "and traces; concurrent trades compute for latency when the owning expert is far down the sequence.",
    )
    width: int = Field(4, ge=1, description="Experts asked at once in concurrent mode (k).")
    registry_poll_s: float = Field(
        2.0, gt=0, description="How often the dispatcher re-reads the registry and Serve's status to follow "
        "added, disabled and removed experts (jobs also tell it directly)."
    )


class LimitSettings(ConfigBase):
    """Request limits enforced by the HTTP API (violations are 4xx, never 500)."""

    max_tokens: int = Field(256, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens when a request gives none (None: routing.max_new_tokens)."
    )
    max_prompt_chars: int = Field(16_000, ge=1, description="Longest prompt (or sum of chat messages) in characters.")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="Largest HTTP request body (-> 413 above it).")
    max_messages: int = Field(64, ge=1, description="Most chat messages in one request.")
    max_concurrent_per_client: int = Field(
        32, ge=1, description="Requests one client (by IP address) may have in flight at once on one dispatcher "
        "replica; more get 429 + Retry-After. 32: twice the 16-way load test, far below the dispatcher's 1000."
    )


class AuthSettings(ConfigBase):
    """Optional API key (``Authorization: Bearer <key>``) for every endpoint except ``GET /healthz``.

    The key itself is never part of the configuration (so never in a config dump, a repr, ``configs()`` or
    Serve's deployment arguments): the dispatcher process reads it at start from ``api_key_file`` if set,
    else from the environment variable ``api_key_env``. No key found: the API is open (fine on 127.0.0.1).
    """

    api_key_env: str | None = Field(
        API_KEY_ENV, description="Environment variable of the dispatcher's processes holding the key (the Ray "
        "cluster's environment: set it where `ray start` / `see-ray serve` runs). None: ignore the environment."
    )
    api_key_file: str | None = Field(
        None, description="File holding the key (first line; e.g. a mounted secret), read by the dispatcher at "
        "start; it must exist on the nodes that run the dispatcher. Takes precedence over api_key_env."
    )


class APIKeyError(ValueError):
    """The configured API key source is unusable (missing or empty file)."""


def load_api_key(auth: AuthSettings) -> SecretStr | None:
    """The API key from ``auth``'s file or environment variable; None when neither gives one.

    A SecretStr: its repr and str are masked, so an accidental log line or traceback does not leak it."""
    import os

    if auth.api_key_file:
        path = Path(auth.api_key_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise APIKeyError(f"auth.api_key_file {str(path)!r}: cannot read it ({e.strerror})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise APIKeyError(f"auth.api_key_file {str(path)!r}: the file is empty")
        return SecretStr(key)
    key = os.environ.get(auth.api_key_env, "").strip() if auth.api_key_env else ""
    return SecretStr(key) if key else None


class ServeConfig(ConfigBase):
    """Everything the serving side needs; the SEE model/routing settings stay in SEEConfig.

    ``ServeConfig.from_yaml(path, overrides)``: the file may wrap the fields in a top-level ``serve:`` section,
    and overrides may carry a ``serve.`` prefix."""

    yaml_section: ClassVar[str | None] = "serve"

    host: str = Field("127.0.0.1", description="HTTP bind address of Serve's proxy (127.0.0.1: this machine only).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy.")
    app_name: str = Field("see", description="Serve application of the dispatcher (the HTTP ingress).")
    route_prefix: str = Field(
        "/", pattern=r"^/([A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*)?$",
        description="Where the API is mounted ('/': http://host:port/v1/...; '/demo': http://host:port/demo/v1/...). "
        "One Serve proxy serves every application of a cluster, so two SEE systems on one cluster need two prefixes "
        "(and distinct application names).",
    )
    model_name: str = Field("see", description="The `model` name clients use for SEE routing (OpenAI API).")
    expert_app_prefix: str = Field(
        "see-expert-", description="Each expert is its own Serve application named prefix + expert name (its one "
        "deployment carries the expert's name), so adding one never touches running replicas."
    )
    base_app: str = Field("see-base", description="Serve application of the base model (fallback).")
    storage: str | None = Field(None, description="Registry storage root (None: $SEE_RAY_STORAGE or the default).")
    expert: ReplicaSettings = Field(default_factory=ReplicaSettings, description="Every expert deployment.")
    per_expert: dict[str, ReplicaSettings] = Field(
        default_factory=dict,
        description="Settings for named experts: the fields given override `expert`'s for that expert (a hot "
        "expert with more replicas, an expert pinned to a node group through `resources`). Experts not named "
        "here use `expert`.",
    )
    base: ReplicaSettings = Field(default_factory=ReplicaSettings, description="The base-model deployment.")
    share_base_weights: bool = Field(
        True, description="Model replicas on a node map one read-only copy of the frozen base weights, put once "
        "into Ray's object store by a per-node holder actor (see_ray/serve/shared_weights.py), instead of each loading "
        "a private copy: memory grows by a process, not a model, per expert. False: private copies."
    )
    dispatcher_num_cpus: float = Field(0.1, ge=0, description="CPUs the (lightweight) dispatcher reserves.")
    dispatcher_replicas: int = Field(1, ge=1, description="Dispatcher replicas (it holds no model).")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Batching inside model replicas.")
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings, description="Sequential walk.")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Request limits.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="Optional API key.")
    retry_after_s: int = Field(2, ge=1, description="Retry-After seconds sent with 503 and 429 responses.")
    ask_retries: int = Field(
        2, ge=0, description="Times the dispatcher re-sends one ask (or base call) that failed because its replica "
        "died or was unavailable; Serve routes the retry to another replica or the restarted one."
    )
    request_timeout_s: float = Field(120.0, gt=0, description="Longest a request may take inside the dispatcher.")

    @model_validator(mode="before")
    @classmethod
    def _merge_per_expert(cls, data: Any) -> Any:
        """``per_expert.<name>`` gives only what differs; complete each entry from ``expert``."""
        if not isinstance(data, dict) or not isinstance(data.get("per_expert"), dict):
            return data
        base = data.get("expert") or {}
        if isinstance(base, BaseModel):
            base = base.model_dump()
        merged = {}
        for name, over in data["per_expert"].items():
            if isinstance(over, BaseModel):
                over = over.model_dump()
            merged[name] = _deep_merge(base, over) if isinstance(over, dict) else over  # non-dicts: pydantic says why
        return {**data, "per_expert": merged}

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return validate_name(v, "model_name")

    def expert_app(self, name: str) -> str:
        return self.expert_app_prefix + name

    def expert_settings(self, name: str) -> ReplicaSettings:
        """The replica settings of expert ``name``: its ``per_expert`` entry, else ``expert``."""
        return self.per_expert.get(name, self.expert)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
