"""Ray Train + DeepSpeed training of one expert on the session's private Ray head (conftest ``ray_head``).

1 and 2 CPU workers with DeepSpeed ZeRO-2 on the tiny model; the reported adapter loads with
``PeftModel.from_pretrained``; the data set is sharded (each worker sees its part, not the whole set);
missing resources fail fast; the registry's actor lock (object-store roots) serializes writers.
Config loading (no Ray) is tested here too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from see_ray.config import ConfigError, SEEConfig
from see_ray.core.rehearsal import RehearsalBuffer, reconstruct
from see_ray.config.train import SHIPPED_DEEPSPEED, JobConfig, RayTrainConfig
from see_ray.training.ray_train import train_on_ray


# -- configuration (no Ray) -------------------------------------------------------------------------
def test_job_config_splits_ray_section(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("training:\n  steps: 7\nray_train:\n  num_workers: 2\n  deepspeed: zero3\n")
    see, rt = JobConfig.from_yaml(str(y), ["ray_train.cpus_per_worker=0.25", "lora.r=4"]).split()
    assert see.training.steps == 7 and see.lora.r == 4
    assert rt.num_workers == 2 and rt.cpus_per_worker == 0.25
    assert rt.deepspeed_dict(see)["zero_optimization"]["stage"] == 3
    assert rt.worker_resources() == {"CPU": 0.25} and rt.threads(see) == 1 and rt.torch_backend() == "gloo"
    gpu = RayTrainConfig(use_gpu=True, cpus_per_worker=2)
    assert gpu.worker_resources() == {"CPU": 2, "GPU": 1.0} and gpu.torch_backend() == "nccl"


def test_job_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="training.stepz"):
        JobConfig.from_yaml(None, ["training.stepz=3"])
    with pytest.raises(ConfigError, match="num_workers"):
        JobConfig.from_yaml(None, ["ray_train.num_workers=0"])
    with pytest.raises(ConfigError, match="neither a shipped config"):
        RayTrainConfig(deepspeed="/nope.json").deepspeed_dict(SEEConfig())


@pytest.mark.parametrize("name", sorted(SHIPPED_DEEPSPEED))
def test_shipped_deepspeed_configs_parse(name):
    ds = RayTrainConfig(deepspeed=name).deepspeed_dict(SEEConfig())
    assert ds["zero_optimization"]["stage"] in (2, 3)
    assert isinstance(ds["optimizer"]["params"]["eps"], float)  # JSON read as JSON (YAML 1.1 says str)


# -- training on Ray ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def examples(two_tasks, pool, tiny_model_path):
    cfg = SEEConfig.from_yaml(None, tiny_overrides(tiny_model_path))
    return reconstruct(two_tasks[0], RehearsalBuffer.empty(), pool, cfg.rehearsal)


def _cfg(tiny_model_path, steps: int) -> SEEConfig:
    return SEEConfig.from_yaml(
        None, tiny_overrides(tiny_model_path, **{"training.steps": steps, "training.log_every": 10})
    )


def _check_adapter(path: Path, tiny_model_path: str) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (path / "adapter_model.safetensors").exists() and (path / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = PeftModel.from_pretrained(base, str(path))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    return json.loads((path / "see_meta.json").read_text())


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_train_on_ray_with_deepspeed(ray_head, workers, examples, tiny_model_path, tmp_path):
    cfg = _cfg(tiny_model_path, steps=30)
    rt = RayTrainConfig(num_workers=workers, deepspeed="zero2", cpus_per_worker=0.5)
    out = train_on_ray(
        examples, cfg, rt, name=f"t{workers}", meta={"task": "arithmetic"}, storage=str(tmp_path / "store"),
        model_path=tiny_model_path,
    )
    meta = _check_adapter(out.adapter_dir, tiny_model_path)
    fig = meta["training"]
    assert fig["workers"] == workers and fig["deepspeed"] is True and fig["steps"] == 30
    assert meta["name"] == f"t{workers}" and meta["task"] == "arithmetic"
    assert fig["final_loss"] < fig["first_loss"]  # it learned something
    # sharded, not copied: the workers' row counts add up to the data set (at most one row per worker cut
    # by the equal split), where a copy per worker would give workers x len(examples)
    assert len(examples) - workers < fig["examples"] <= len(examples)
    # the checkpoint went through ray.train.report into RunConfig(storage_path)
    assert out.checkpoint_uri.startswith(str(tmp_path / "store" / "runs"))
    assert Path(out.checkpoint_uri, "adapter_model.safetensors").exists()
    # loss and tokens/s were reported every log_every steps
    steps = [m.get("step") for m in out.history if "loss" in m]
    assert steps[:2] == [10, 20]
    assert all(m["tokens_per_s"] > 0 for m in out.history if "loss" in m)
    assert out.metrics["tokens_per_s"] > 0


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_missing_resources_fail_fast(ray_head, examples, tiny_model_path, tmp_path):
    """STACK-NOTES gotcha 2: no endless retry when the cluster cannot place the workers."""
    cfg = _cfg(tiny_model_path, steps=2)
    rt = RayTrainConfig(num_workers=1, cpus_per_worker=64, start_timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        train_on_ray(examples, cfg, rt, name="toobig", storage=str(tmp_path / "store"), model_path=tiny_model_path)
    assert time.monotonic() - t0 < 120
    assert "CPU" in str(err.value) or "resources" in str(err.value).lower() or "timed out" in str(err.value).lower()


# -- the registry's actor lock (object-store roots) ---------------------------------------------------
@pytest.mark.ray
def test_actor_lock_serializes_object_store_writers(ray_head, tmp_path):
    import threading

    import pyarrow.fs as pafs

    from see_ray.registry import Registry, RegistryLockTimeout
    from see_ray.registry.storage import Storage
    from test_registry import new_expert

    fs = pafs._MockFileSystem()
    uri = f"mock://bucket/{tmp_path.name}"
    regs = [Registry(Storage(uri, filesystem=fs), lock_timeout_s=60) for _ in range(3)]
    assert regs[0].lock_kind == "actor"
    errors = []

    def add(i):
        try:
            regs[i].add(new_expert(tmp_path, f"e{i}"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    doc = regs[0].load()
    assert sorted(e.name for e in doc.experts) == ["e0", "e1", "e2"]
    assert [e.position for e in doc.experts] == [1, 2, 3] and doc.generation == 3
    # a held lock makes another writer wait, then time out with a clear error
    short = Registry(Storage(uri, filesystem=fs), lock_timeout_s=0.5)
    with regs[0]._get_lock().hold():
        with pytest.raises(RegistryLockTimeout, match="held by"):
            short.disable("e0")
