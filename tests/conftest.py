"""Shared fixtures: the tiny random Llama with the real tokenizer, a fast test config, synthetic tasks.

The tiny model is built once per machine (cached next to the converted SmolLM2 checkpoint, whose tokenizer
it reuses) so that the suite trains real adapters in seconds. Ray fixtures live in ``ray_fixtures.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from see_ray.config import SEEConfig
from see_ray.demo import arithmetic_task, general_pool, shout_task
from see_ray.model import build_tiny_model, cache_root

SHARED = Path(__file__).resolve().parents[2] / "shared"
SUPERNI = SHARED / "data" / "superni-cl"

# Two threads in the test process: the machine has two cores and Ray tests add processes of their own.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    path = cache_root() / "test-models" / "tiny-llama-v1"
    return str(build_tiny_model(path))


def tiny_overrides(model_path: str, **extra) -> list[str]:
    """Overrides that make the tiny model learn routing in about 100 steps.

    bf16 autocast is off: on CPU it is 10x slower for a model this small (the 49k-row output matmul).
    The high learning rate is what a random 64-wide network needs to move at all within a test budget.
    """
    base = {
        "model.name_or_path": model_path,
        "model.max_prompt_tokens": 64,
        "lora.r": 16,
        "lora.alpha": 32,
        "training.steps": 120,
        "training.batch_size": 8,
        "training.lr": 0.02,
        "training.bf16_autocast": False,
        "training.progress": False,
        "training.log_every": 20,
        "training.max_target_tokens": 8,
        "training.indicator_loss_weight": 10.0,
        "rehearsal.per_task_min": 16,
        "routing.max_new_tokens": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_cfg(tiny_model_path) -> SEEConfig:
    return SEEConfig.from_yaml(None, tiny_overrides(tiny_model_path))


@pytest.fixture(scope="session")
def two_tasks():
    """Two synthetic tasks with very different inputs (numbers vs words): learnable by the tiny model."""
    return [arithmetic_task(n=80, n_dev=12, n_test=12), shout_task(n=80, n_dev=12, n_test=12)]


@pytest.fixture(scope="session")
def pool():
    return general_pool(24)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SEE_RAY_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow (real SmolLM2); set SEE_RAY_SLOW=1 or run with -m slow")
    if "slow" in (config.getoption("-m") or ""):
        return
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
