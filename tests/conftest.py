"""Fixtures of the whole suite: the tiny random Llama with the real tokenizer, its test config, synthetic tasks,
the general pool, and two experts trained once per session. Ray fixtures are in ``cluster/conftest.py``; plain
helpers in ``support.py``.

The tiny model is built once per machine (cached next to the converted SmolLM2 checkpoint, whose tokenizer
it reuses) so that the suite trains real adapters in seconds.
"""

from __future__ import annotations

import pytest
import torch

from see_ray.config import SEEConfig
from see_ray.core.model import build_tiny_model, cache_root
from see_ray.tools.builtin import arithmetic_task, general_pool, instruction_pool, shout_task

from support import tiny_overrides, torch_threads

# One thread in the test process: the machine has two cores, Ray tests add processes of their own, and a
# descheduled OpenMP thread makes the other spin (support.torch_threads).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts with one torch thread, whatever an earlier one left set (loading a model, training and
    the add-expert job set the process's thread count from their configs)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    path = cache_root() / "test-models" / "tiny-llama-v1"
    return str(build_tiny_model(path))


@pytest.fixture(scope="session")
def tiny_cfg(tiny_model_path) -> SEEConfig:
    """The SEE config of the tiny model (``support.tiny_overrides``). Shared: a test that changes a field
    restores it (monkeypatch)."""
    return SEEConfig.from_yaml(None, tiny_overrides(tiny_model_path))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    """The tiny model's tokenizer: SmolLM2's own."""
    from see_ray.core.model import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture
def encoder(tokenizer, tiny_cfg):
    """A fresh prompt/target encoder of the test config (its truncation counter starts at 0)."""
    from see_ray.core.prompts import PromptEncoder

    return PromptEncoder(tokenizer, tiny_cfg.indicators, tiny_cfg.model.max_prompt_tokens)


@pytest.fixture(scope="session")
def two_tasks():
    """Two synthetic tasks with very different inputs (numbers vs words): learnable by the tiny model."""
    return [arithmetic_task(n=80, n_dev=12, n_test=12), shout_task(n=80, n_dev=12, n_test=12)]


@pytest.fixture(scope="session")
def pool():
    """A general pool of both kinds the job's default pool holds, chat requests and instruction-style queries, 24
    each: the 64-wide random test model learns to reject this many (with the whole default pool, 64 sampled per
    expert, its second expert's p(ACCEPT) flattened to about 0.8 for every query)."""
    return general_pool(24) + instruction_pool(24)


# -- trained experts ------------------------------------------------------------------------------------------
# Training is the slow part of the core tests (about 25 s per expert on a quiet machine), so each expert is
# trained once per session and only when a test asks for it.
def _train(name: str, task, buffer, pool, cfg, model_path: str, out) -> dict:
    from see_ray.core.rehearsal import reconstruct
    from see_ray.core.trainer import train_adapter

    examples = reconstruct(task, buffer, pool, cfg.rehearsal)
    with torch_threads(1):  # session fixtures are set up before the function-scoped one_torch_thread
        result = train_adapter(examples, cfg, model_path, out, meta={"name": name, "task": task.name})
    return {"name": name, "task": task.name, "path": str(out), "examples": examples, "result": result}


@pytest.fixture(scope="session")
def see_expert1(tmp_path_factory, tiny_model_path, tiny_cfg, two_tasks, pool) -> dict:
    """Expert 1 on ``two_tasks[0]`` (arithmetic): its positives plus the general pool as negatives.
    ``{"name", "task", "path", "examples", "result"}``."""
    from see_ray.core.rehearsal import RehearsalBuffer

    out = tmp_path_factory.mktemp("experts") / "expert1"
    return _train("expert1", two_tasks[0], RehearsalBuffer.empty(), pool, tiny_cfg, tiny_model_path, out)


@pytest.fixture(scope="session")
def see_experts(see_expert1, tmp_path_factory, tiny_model_path, tiny_cfg, two_tasks, pool) -> dict:
    """Experts 1 and 2 in registration order (``{"experts": [e1, e2], "buffer"}``); expert 2 (shout) also
    rejects expert 1's rehearsal samples."""
    from see_ray.core.rehearsal import RehearsalBuffer

    buffer = RehearsalBuffer.empty()
    buffer.add_task(two_tasks[0], tiny_cfg.rehearsal)
    out = tmp_path_factory.mktemp("experts") / "expert2"
    expert2 = _train("expert2", two_tasks[1], buffer, pool, tiny_cfg, tiny_model_path, out)
    return {"experts": [see_expert1, expert2], "buffer": buffer}
