"""Training one expert on Ray Train with DeepSpeed: the core's loop, launched by a ``TorchTrainer``.

``trainer.train_loop_per_worker`` is the one training loop of the project; here it runs on N Ray workers:
- the reconstructed training set travels as a Ray Dataset (``ray.data.from_items``) that Ray Train splits
  into one shard per worker (``DataConfig`` default: streaming split), so no worker receives the whole set;
- DeepSpeed (ZeRO-2 by default) does the data-parallel part: the DeepSpeed config is a file the user can
  swap (``ray_train.deepspeed``: a shipped name or a path), so ZeRO-3 and CPU offload are config-only
  changes. It is read on the driver and handed to the workers as a dict, so worker nodes need no copy;
- gloo on CPU, nccl (and DeepSpeed bf16) on GPU;
- rank 0 reports the finished adapter (PEFT folder, safetensors, + see_meta.json) with
  ``ray.train.report(checkpoint=...)`` into ``RunConfig(storage_path=...)``; a controller-side callback
  prints the loss and tokens/s that the workers report every ``training.log_every`` steps, which is where
  they show up in a job's logs.

What Ray Train and DeepSpeed on small CPU machines require, and where it is done:
- resources missing (Serve holding the CPUs) must fail fast, because Ray Train otherwise retries starting its
  workers without end: ``FailureConfig(
  max_failures=0, controller_failure_limit=0)`` plus ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (Ray Train
  propagates that variable from the driver to its controller);
- one torch thread per worker by default and ``OMP_NUM_THREADS`` in the workers' runtime env (two processes
  with default thread pools on two cores oversubscribe them);
- DeepSpeed compiles ops on first use: the loop uses torch's Adam on CPU, and ``torch_extensions_dir``
  points the JIT cache at a persistent folder where runs repeat.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from see_ray.config import ConfigError, SEEConfig
from see_ray.config.train import RayTrainConfig, WorkerJob
from see_ray.core.rehearsal import Example
from see_ray.registry.storage import Storage, default_storage_uri

log = logging.getLogger(__name__)

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


# -- Ray plumbing ---------------------------------------------------------------------------------------
def ensure_ray(address: str | None = None, num_cpus: int | None = None, include_dashboard: bool | None = None) -> None:
    """Connect to the cluster (inside ``ray job submit`` RAY_ADDRESS is set) or start a local Ray.

    ``include_dashboard=False`` saves about ten background processes on a small machine (the benchmark uses
    it); Ray Train's placement-group cleaner then logs that it cannot query the state API, harmlessly.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # A local instance for development. Token auth would otherwise switch itself on and write
    # ~/.ray/auth_token, which then breaks `ray job submit` and `ray status` against clusters started
    # without it: the project runs its local clusters with RAY_AUTH_MODE=disabled.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard)


METRICS_FILE = "see_metrics.json"


def progress_line(label: str, steps: int | None, m: dict) -> str | None:
    """One line for a report of rank 0 (a step's loss, or the final figures); None for other reports. The step
    count is the report's own (the loop's resolved budget), else ``steps``."""
    if "loss" in m:
        return f"[train {label}] step {m.get('step')}/{m.get('steps', steps)} loss {m['loss']:.4f} tokens/s {m.get('tokens_per_s', 0):.0f}"
    if "final_loss" in m:
        return (f"[train {label}] done: {m.get('steps')} steps in {m.get('train_s', 0):.1f} s, "
                f"final loss {m['final_loss']:.4f}, tokens/s {m.get('tokens_per_s', 0):.0f}")
    return None


def _metrics_printer_cls():
    from ray.train import UserCallback

    class MetricsPrinter(UserCallback):
        """Prints what rank 0 reports and keeps it: runs on the Train controller, whose stdout reaches the
        job's logs. Ray Train V2 keeps only checkpointed metrics, so the full history is written next to the
        run's checkpoints (``<storage_path>/<run>/see_metrics.json``) when the final report arrives."""

        def __init__(self, label: str, steps: int, storage_uri: str, run_name: str):
            self.label, self.steps = label, steps
            self.storage_uri, self.run_name = storage_uri, run_name
            self.history: list[dict] = []

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0] if metrics else {}
            line = progress_line(self.label, self.steps, m)
            if line is None:
                return
            print(line, flush=True)
            self.history.append({k: v for k, v in m.items() if isinstance(v, (int, float, str, bool))})
            # Written at every report (a few hundred bytes), not only at the end: a driver that does not
            # forward worker logs (the demo) follows the run's progress from this file.
            try:
                Storage(self.storage_uri).write_text_atomic(f"{self.run_name}/{METRICS_FILE}", json.dumps(self.history))
            except Exception as e:  # metrics are a convenience: never fail a run over them
                print(f"[train {self.label}] could not write {METRICS_FILE}: {e}", flush=True)

    return MetricsPrinter


@dataclass
class TrainOutcome:
    """What a Ray training run produced."""

    adapter_dir: Path  # local copy of the reported adapter folder (PEFT format + see_meta.json)
    metrics: dict[str, Any]  # rank 0's final report (train_s, tokens_per_s, final_loss, ...)
    checkpoint_uri: str  # where Ray Train persisted it (under RunConfig.storage_path)
    run_name: str
    fit_s: float  # wall time of trainer.fit(), start-up included
    history: list[dict[str, Any]] = field(default_factory=list)  # every report of rank 0, in order


def train_on_ray(
    examples: list[Example],
    see: SEEConfig,
    rt: RayTrainConfig,
    *,
    name: str,
    meta: dict[str, Any] | None = None,
    storage: Storage | str | None = None,
    output_dir: str | Path | None = None,
    model_path: str | None = None,
    init_expert: dict[str, Any] | None = None,
) -> TrainOutcome:
    """Train one adapter on Ray Train (+ DeepSpeed); Ray must be initialized (see ``ensure_ray``).

    ``init_expert``: ``{"storage": URI, "record": registry record as dict}`` to start from that expert's adapter
    (``training.warm_start``); every worker reads it from the storage.

    ``model_path``: the base checkpoint folder as the workers should open it. None lets every worker resolve
    ``model.name_or_path`` on its own node (the default SmolLM2 is converted once per node), which is what a
    multi-node cluster needs.
    """
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from see_ray.core.trainer import train_loop_per_worker

    if not examples:
        raise ValueError("no training examples")
    ds_config = rt.deepspeed_dict(see)
    if ds_config is None and rt.num_workers > 1:
        raise ConfigError("training on more than one worker needs DeepSpeed (ray_train.deepspeed) for gradient sync")
    threads = rt.threads(see)
    see = see.model_copy(deep=True)
    see.model.num_threads = threads
    see.training = see.training.resolved(len(examples))  # the epoch budget counts the whole set, not a shard
    see.training.deepspeed = ds_config
    see.training.progress = False

    storage = storage if isinstance(storage, Storage) else Storage(storage or default_storage_uri())
    storage_path = rt.storage_path or storage.uri_of("runs")
    # A URI pyarrow resolves goes to Ray as is; an fsspec-only one as (path, file system object).
    ray_storage_path, ray_storage_fs = Storage(storage_path).for_ray_train("")
    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    # One row per example, serialized: a plain string column keeps the Dataset schema trivial.
    rows = [{"example": json.dumps(e.to_dict(), ensure_ascii=False)} for e in examples]
    dataset = ray.data.from_items(rows)

    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if rt.torch_extensions_dir:
        env["TORCH_EXTENSIONS_DIR"] = str(Path(rt.torch_extensions_dir).expanduser())
    if rt.worker_niceness is not None:
        env["RAY_worker_niceness"] = str(rt.worker_niceness)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=WorkerJob(
            see=see, model_path=model_path, meta={"name": name, **(meta or {})}, init_expert=init_expert, ray=True,
        ).model_dump(mode="json"),
        torch_config=TorchConfig(backend=rt.torch_backend()),
        scaling_config=ScalingConfig(
            num_workers=rt.num_workers,
            use_gpu=rt.use_gpu,
            resources_per_worker=rt.worker_resources(),
            placement_strategy=rt.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=ray_storage_path,
            storage_filesystem=ray_storage_fs,
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=rt.keep_checkpoints),
            callbacks=[_metrics_printer_cls()(name, see.training.steps, storage_path, run_name)],
            worker_runtime_env={"env_vars": env},
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    previous = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = str(rt.start_timeout_s)  # read by the controller (propagated from here)
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = previous
    fit_s = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without reporting an adapter checkpoint")
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix=f"see-{name}-"))
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    result.checkpoint.to_directory(str(out))
    try:
        history = json.loads(Storage(storage_path).read_text(f"{run_name}/{METRICS_FILE}"))
    except (OSError, ValueError):
        history = []
    return TrainOutcome(
        adapter_dir=out,
        metrics=dict(result.metrics or {}),
        checkpoint_uri=_checkpoint_uri(result.checkpoint),
        run_name=run_name,
        fit_s=fit_s,
        history=history,
    )


def _checkpoint_uri(ckpt) -> str:
    import pyarrow.fs as pafs

    fs = ckpt.filesystem
    if isinstance(fs, pafs.LocalFileSystem):
        return ckpt.path
    return f"{fs.type_name}://{ckpt.path}"
