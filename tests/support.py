"""Plain helpers shared by the test files (no fixtures: those are in ``conftest.py`` and ``cluster/conftest.py``).

Imported as ``from support import ...``: pytest's default import mode puts this folder (the rootdir of
``tests/conftest.py``, which has no ``__init__.py``) on ``sys.path`` before any test module is imported.
Test files never import ``conftest`` itself: with two ``conftest.py`` files in the tree, the name ``conftest``
means whichever was imported last.
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"  # the deployment configs: Serve config, KubeRay manifests, Grafana, Prometheus
SHARED = REPO.parent / "shared"  # the project's data checkout beside the repository, where there is one
SUPERNI = SHARED / "data" / "superni-cl"

# The SEE config overrides of every test with the tiny model.
# - bf16 autocast is off: on CPU it is 10x slower for a model this small (the 49k-row output matmul).
# - lr 0.01 with an indicator weight of 30: a random 64-wide network cannot learn the answers, and with weight 1
#   their loss drowns the routing signal (a second expert stayed at a constant p=0.98).
# - input_only_share 0.5, as the real model is trained: half the prompts without the task definition, so the
#   learning test checks raw client queries too (arithmetic's digits and shout's lowercase words tell them apart).
# - 120 steps: the tiny model learns routing in about 100 steps.
TINY_OVERRIDES = {
    "model.max_prompt_tokens": 64,
    "lora.r": 16,
    "lora.alpha": 32,
    "training.steps": 120,
    "training.batch_size": 8,
    "training.lr": 0.01,
    "training.bf16_autocast": False,
    "training.progress": False,
    "training.log_every": 20,
    "training.max_target_tokens": 8,
    "training.indicator_loss_weight": 30.0,
    "rehearsal.input_only_share": 0.5,
    "rehearsal.per_task_min": 16,
    "rehearsal.general_pool_size": "null",  # the whole (small) test pool
    "routing.max_new_tokens": 8,
}


def tiny_overrides(model_path: str, **extra) -> list[str]:
    """``section.field=value`` overrides for the tiny model at ``model_path``; ``extra`` adds or replaces some."""
    return [f"{k}={v}" for k, v in {"model.name_or_path": model_path, **TINY_OVERRIDES, **extra}.items()]


def set_args(overrides: list[str], flag: str = "--set") -> list[str]:
    """Overrides as command-line arguments: ``[flag, o1, flag, o2, ...]``."""
    return [a for o in overrides for a in (flag, o)]


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` torch threads. One is the fastest on 2 shared cores: measured with other test
    processes busy (load 8 on 2 cores), one tiny-model training step took 2.1-2.5 s with 1 thread and 11-13 s
    with 2, because a descheduled OpenMP thread makes the other spin."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


# -- task files ---------------------------------------------------------------------------------------------
SUPERNI_DEFINITION = "Add the two numbers."  # superni_file's default task definition


def superni_file(path: Path, n: int, definition: str | None = SUPERNI_DEFINITION, start: int = 0,
                 extra: list | None = None) -> Path:
    """Write a SuperNI task file with ``n`` instances (plus the noise fields real files carry)."""
    doc = {
        "Contributors": ["x"],
        "Definition": [definition] if definition is not None else [],
        "Positive Examples": [],
        "Instances": [
            {"id": f"t-{i}", "input": f"{i} + 1", "output": [str(i + 1), f"{i + 1}."]}
            for i in range(start, start + n)
        ]
        + (extra or []),
    }
    path.write_text(json.dumps(doc))
    return path


# -- registry records -------------------------------------------------------------------------------------
def fake_adapter(folder: Path, seed: int = 0) -> Path:
    """A minimal PEFT-format folder (check_adapter_folder accepts it); content differs per seed."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({"w": torch.full((4,), float(seed))}, str(folder / "adapter_model.safetensors"))
    (folder / "see_meta.json").write_text("{}")
    return folder


def new_expert(tmp: Path, name: str, task: str | None = None, seed: int = 0, **kw):
    """A registry ``NewExpert`` with every field filled and a fake adapter folder under ``tmp``."""
    from see_ray.registry import BaseModelIdentity, Indicators, NewExpert

    task = task or name
    return NewExpert(
        name=name,
        task=task,
        adapter_dir=str(fake_adapter(tmp / f"src-{name}-{seed}", seed)),
        rehearsal_samples=[{"input": f"{task} q{i}", "definition": f"do {task}", "output": "x"} for i in range(3)],
        base_model=BaseModelIdentity(name_or_path="tiny", fingerprint="abc"),
        indicators=Indicators(accept=" accept", reject=" reject", accept_id=1, reject_id=2),
        threshold=0.6,
        definition=f"do {task}",
        trained_against=kw.pop("trained_against", []),
        training={"config": {"training": {"steps": 3}}, "figures": {"final_loss": 0.1}},
        validation={"accept_rate": 1.0, "reject_rate": 0.9},
        job={"submission_id": "test"},
        **kw,
    )


def register_expert(registry, expert: dict, cfg, threshold: float | None = None):
    """Put an in-process trained expert (the ``see_expert1`` / ``see_experts`` fixtures' dicts) into a registry."""
    from see_ray.core.model import fingerprint
    from see_ray.registry import BaseModelIdentity, Indicators, NewExpert

    # the real fingerprint: serving refuses adapters whose base differs from the served one
    base = BaseModelIdentity(name_or_path=cfg.model.name_or_path, fingerprint=fingerprint(cfg.model.name_or_path))
    return registry.add(
        NewExpert(
            name=expert["name"],
            task=expert["task"],
            adapter_dir=expert["path"],
            base_model=base,
            indicators=Indicators(accept=cfg.indicators.accept, reject=cfg.indicators.reject),
            threshold=threshold,
            rehearsal_samples=[
                {"input": e.query.input, "definition": e.query.definition}
                for e in expert["examples"] if e.indicator == "accept"
            ][:16],
        )
    )


# -- serving --------------------------------------------------------------------------------------------------
# The ServeConfig overrides of the served test system (and of every extra dispatcher or `see-ray serve` run over it)
SERVE_TEST_OVERRIDES = [
    "dispatch.registry_poll_s=1",
    "batch.wait_s=0.002",
    # the autoscaling test drives one expert to its max while the others stay at their min
    "expert.autoscaling.max_replicas=2",
    "expert.autoscaling.target_ongoing_requests=1",
    "expert.autoscaling.upscale_delay_s=1",
    "expert.autoscaling.downscale_delay_s=4",
    "expert.autoscaling.look_back_period_s=2",
    "base.autoscaling.max_replicas=1",
]


def load_driver():
    """``benchmarks/load.py`` as a module: the bounded HTTP load driver (``load``, ``run_load``) and its request
    bodies (``chat_body``). Imported by path: ``benchmarks/`` is not a package."""
    import importlib.util
    import sys

    if "see_load" not in sys.modules:
        spec = importlib.util.spec_from_file_location("see_load", REPO / "benchmarks" / "load.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["see_load"] = module  # before exec: its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["see_load"]


def grafana_metrics() -> set[str]:
    """Every metric name the Grafana dashboard (``cluster/grafana-dashboard.json``) queries; each panel has a query."""
    import re

    dash = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    names = set()
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names |= set(re.findall(r"\b(ray_[a-z_]+)\b", t["expr"]))
    return names


def running_replicas(app: str, deployment: str) -> int:
    """How many replicas of a Serve deployment are RUNNING (0 when the application or deployment is absent)."""
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None or deployment not in st.deployments:
        return 0
    return sum(n for k, n in st.deployments[deployment].replica_states.items()
               if str(getattr(k, "value", k)) == "RUNNING")
