# DEV ONLY (not collected: name does not match test_*.py): test_serve.py with pre-trained adapters.
import pytest
from test_serve import *  # noqa
from see_ray.rehearsal import RehearsalBuffer, reconstruct
from see_ray.config import SEEConfig
from conftest import tiny_overrides


@pytest.fixture(scope="session")
def see_experts(tiny_model_path, two_tasks, pool):
    cfg = SEEConfig.from_yaml(None, tiny_overrides(tiny_model_path))
    buf = RehearsalBuffer.empty()
    out = []
    for i, t in enumerate(two_tasks, 1):
        ex = reconstruct(t, buf, pool, cfg.rehearsal)
        out.append({"name": f"expert{i}", "task": t.name, "path": f"/tmp/srv-exp/0.5/{t.name}", "examples": ex})
        buf.add_task(t, cfg.rehearsal)
    return {"experts": out, "buffer": buf}
