"""Ray Train + DeepSpeed training of one expert on the session's Ray head, called directly (``train_on_ray``).

2 CPU workers with DeepSpeed ZeRO-2 on the tiny model; the reported adapter loads with
``PeftModel.from_pretrained``; the data set is sharded (each worker sees its part, not the whole set); metrics
are reported every ``log_every`` steps; missing resources fail fast. One worker with DeepSpeed is what every
add-expert job runs (test_add_expert_job.py checks its figures).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from see_ray.config import SEEConfig
from see_ray.config.train import RayTrainConfig
from see_ray.core.rehearsal import RehearsalBuffer, reconstruct
from see_ray.training.ray_train import train_on_ray

from support import tiny_overrides

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def examples(two_tasks, pool, tiny_cfg):
    return reconstruct(two_tasks[0], RehearsalBuffer.empty(), pool, tiny_cfg.rehearsal)


def config(tiny_model_path, steps: int) -> SEEConfig:
    return SEEConfig.from_yaml(
        None, tiny_overrides(tiny_model_path, **{"training.steps": steps, "training.log_every": 10})
    )


def check_adapter(path: Path, tiny_model_path: str) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (path / "adapter_model.safetensors").exists() and (path / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = PeftModel.from_pretrained(base, str(path))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    return json.loads((path / "see_meta.json").read_text())


@pytest.mark.timeout(600)
def test_train_on_ray_with_deepspeed_on_two_workers(ray_head, examples, tiny_model_path, tmp_path):
    workers = 2
    cfg = config(tiny_model_path, steps=30)
    rt = RayTrainConfig(num_workers=workers, deepspeed="zero2", cpus_per_worker=0.5)
    out = train_on_ray(
        examples, cfg, rt, name=f"t{workers}", meta={"task": "arithmetic"}, storage=str(tmp_path / "store"),
        model_path=tiny_model_path,
    )
    meta = check_adapter(out.adapter_dir, tiny_model_path)
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


@pytest.mark.timeout(300)
def test_missing_resources_fail_fast(ray_head, examples, tiny_model_path, tmp_path):
    """Ray Train by itself retries starting its worker group every 60 s without end while the cluster lacks the
    resources (e.g. CPUs held by Serve replicas): the job must fail with a clear error instead."""
    cfg = config(tiny_model_path, steps=2)
    rt = RayTrainConfig(num_workers=1, cpus_per_worker=64, start_timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        train_on_ray(examples, cfg, rt, name="toobig", storage=str(tmp_path / "store"), model_path=tiny_model_path)
    assert time.monotonic() - t0 < 120
    assert "CPU" in str(err.value) or "resources" in str(err.value).lower() or "timed out" in str(err.value).lower()
