"""Configuration of distributed training and of the add-expert job.

- ``RayTrainConfig``: how one expert trains on the cluster (the ``ray_train`` section of a job's YAML);
- ``ValidationBars``: what a new expert must clear before it is registered;
- ``JobConfig``: a job's YAML as a whole, the SEE sections plus ``ray_train``;
- ``WorkerJob``: what every Ray Train worker receives (``train_loop_per_worker``'s config).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from see_ray.config.base import ConfigBase, ConfigError
from see_ray.config.see import SEEConfig

CONFIG_DIR = Path(__file__).resolve().parent / "deepspeed"
SHIPPED_DEEPSPEED = {
    "zero2": CONFIG_DIR / "deepspeed_zero2.json",
    "zero3": CONFIG_DIR / "deepspeed_zero3.json",
    "zero3_offload": CONFIG_DIR / "deepspeed_zero3_offload.json",
}


class RayTrainConfig(ConfigBase):
    """How one expert's training runs on the cluster (the ``ray_train`` section of a job's YAML)."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, nccl backend and DeepSpeed bf16.")
    cpus_per_worker: float = Field(
        0.5,
        gt=0,
        description="CPUs each worker reserves. Small by default so that training fits next to Serve replicas "
        "(Ray Train would wait for CPUs that Serve holds); the worker's torch threads are set separately "
        "(threads_per_worker).",
    )
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs each worker reserves when use_gpu.")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Explicit Ray resources per worker (overrides cpus/gpus_per_worker), e.g. {CPU: 2, GPU: 1}."
    )
    threads_per_worker: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads and OMP_NUM_THREADS per worker. None: model.num_threads if set, "
        "else max(1, floor(cpus_per_worker)).",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement of the workers' bundles across nodes."
    )
    deepspeed: str | None = Field(
        "zero2",
        description="DeepSpeed config: a shipped name (zero2, zero3, zero3_offload), a JSON/YAML file path, or "
        "None to use training.deepspeed as is (None there too: plain AdamW, 1 worker only).",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend; auto: nccl on GPU, gloo on CPU.")
    storage_path: str | None = Field(
        None,
        description="RunConfig(storage_path): where Ray Train writes checkpoints and run state. None: "
        "'<registry storage>/runs'. Any URI Ray supports (s3://, gs://, an NFS path); must be shared by all nodes.",
    )
    start_timeout_s: float = Field(
        30.0, gt=0, description="Fail (instead of waiting forever) if the workers cannot be placed in this time."
    )
    torch_extensions_dir: str | None = Field(
        None, description="TORCH_EXTENSIONS_DIR for the workers (DeepSpeed's JIT op cache); None: torch's default."
    )
    keep_checkpoints: int = Field(1, ge=1, description="CheckpointConfig(num_to_keep).")
    worker_niceness: int | None = Field(
        0,
        ge=0,
        le=19,
        description="Niceness of the training workers (RAY_worker_niceness in their runtime env). Ray nices "
        "every worker process by default; a training worker is the job's main work, and niced it loses its "
        "cores to every Ray background process (docs/results.md). None: Ray's default.",
    )

    @model_validator(mode="after")
    def _check(self) -> "RayTrainConfig":
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("ray_train.backend=nccl needs use_gpu=true")
        return self

    # -- derived ---------------------------------------------------------------------------------------
    def worker_resources(self) -> dict[str, float]:
        if self.resources_per_worker is not None:
            return dict(self.resources_per_worker)
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res

    def threads(self, see: SEEConfig) -> int:
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        if see.model.num_threads is not None:
            return see.model.num_threads
        return max(1, math.floor(self.worker_resources().get("CPU", 1)))

    def torch_backend(self) -> str:
        return ("nccl" if self.use_gpu else "gloo") if self.backend == "auto" else self.backend

    def deepspeed_dict(self, see: SEEConfig) -> dict[str, Any] | None:
        """The DeepSpeed config as a dict (read here, on the driver), or None for plain AdamW."""
        src: Any = self.deepspeed if self.deepspeed is not None else see.training.deepspeed
        if src is None or isinstance(src, dict):
            return src
        path = SHIPPED_DEEPSPEED.get(src, Path(src).expanduser())
        try:
            text = Path(path).read_text()
            # JSON files through json: YAML 1.1 reads JSON's 1e-8 as a string.
            data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"ray_train.deepspeed: {path}: not valid JSON/YAML ({e})") from None
        except FileNotFoundError:
            raise ConfigError(
                f"ray_train.deepspeed: {src!r} is neither a shipped config ({', '.join(SHIPPED_DEEPSPEED)}) "
                "nor an existing file"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"ray_train.deepspeed: {path} must hold a mapping")
        return data


class ValidationBars(ConfigBase):
    """The bar a new expert must clear before it is registered."""

    min_accept: float = Field(0.8, ge=0.0, le=1.0, description="Least accept rate on its own dev queries.")
    min_reject: float = Field(
        0.8, ge=0.0, le=1.0, description="Least reject rate on the other tasks' rehearsal queries."
    )


class JobConfig(SEEConfig):
    """A job's YAML file (``--config``) and ``--set`` overrides: the SEE sections plus ``ray_train``.

    ``JobConfig.from_yaml(path, ["training.steps=60", "ray_train.num_workers=2"])``; ``split()`` gives the
    SEE config and the Ray Train config apart, as the rest of the code takes them.
    """

    ray_train: RayTrainConfig = Field(default_factory=RayTrainConfig, description="Training on the cluster.")

    def split(self) -> tuple[SEEConfig, RayTrainConfig]:
        return SEEConfig.model_validate(self.model_dump(exclude={"ray_train"})), self.ray_train.model_copy(deep=True)


class WorkerJob(ConfigBase):
    """What ``train_loop_per_worker`` receives, as Ray Train's ``train_loop_config`` (a dict on the wire)."""

    see: SEEConfig = Field(description="The SEE config the adapter is trained with.")
    model_path: str | None = Field(
        None, description="Base checkpoint folder as this worker opens it; None: resolve model.name_or_path here "
        "(the default SmolLM2 is converted once per node).")
    examples: list[Any] | None = Field(
        None, description="In-process: the training examples (Example objects or their dicts). Under Ray they "
        "come from the 'train' dataset shard instead.")
    output_dir: str | None = Field(None, description="In-process: the folder the finished adapter is written to.")
    init_adapter: str | None = Field(None, description="An adapter folder to continue from.")
    init_expert: dict[str, Any] | None = Field(
        None, description="{'storage': URI, 'record': registry record}: start from that registered expert's adapter "
        "(training.warm_start), read by every worker from the storage, hash-checked.")
    meta: dict[str, Any] = Field(default_factory=dict, description="Copied into the adapter's see_meta.json.")
    snapshot_steps: list[int] = Field(
        default_factory=list, description="In-process: also write the adapter as it is after each of these steps, "
        "to <output_dir>.snapshots/step-N (a learning curve from one run, e.g. the benchmark's MTL dev curve).")
    ray: bool = Field(False, description="Running as a Ray Train worker (rank, device and data from Ray Train).")
