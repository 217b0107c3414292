"""The frozen base weights, shared by every model replica on a node through Ray's object store.

Why: an expert replica is the base model plus a LoRA adapter of a few MB. With a private copy of the base in
every replica, memory grows by a whole model per expert (SmolLM2-135M in fp32: 538 MB); shared, it grows by
one process's overhead per expert. The base is frozen, so one read-only copy per node serves every replica.

How:
1. One *holder* per (checkpoint, dtype, node): a detached, named actor ``see-base-weights-<fingerprint>-<dtype>-
   <node>`` in namespace ``see-ray``, pinned to its node. Its first ``ref()`` starts a one-shot task on the
   same node that loads the checkpoint exactly like the private path (``model.load_base_model``) and returns
   the parameters as numpy arrays. The holder *called* that task, so it owns the result: the weights live as
   long as the holder, not as long as whichever replica asked first (an object owned by a short-lived process
   dies with it). Replicas started later on the node (autoscaling, a live-added expert) get the same object.
   The task's worker exits after it (``max_calls=1``), so the loading copy, torch and transformers do not stay
   resident; the holder itself only imports ray.
2. Each replica ``ray.get``s the object: numpy arrays that are read-only views into the node's plasma store
   (shared memory in /dev/shm), not copies. It builds its model around them: parameters created on the meta
   device, then the shared tensors assigned (``torch.from_numpy``, no copy), tied weights re-tied (SmolLM2's
   lm_head *is* embed_tokens, shipped once), buffers such as the rotary ``inv_freq`` computed privately (a few
   KB; they are not parameters). Nothing writes the base: it is frozen, runs under ``inference_mode``, and LoRA
   only adds its own private weights next to it.
3. Every page is read once after building, so that the first request does not pay the page faults and PSS
   accounts the whole shared copy from the start (untouched shared pages are not charged to anyone).

``ServeConfig.share_base_weights=False`` keeps the private-copy path (for comparison: benchmarks/memory.py).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from itertools import chain
from typing import Any

HOLDER_NAMESPACE = "see-ray"
HOLDER_PREFIX = "see-base-weights-"
PAGE = 4096  # bytes per page: touching one byte per page faults the whole page in


@dataclass
class SharedWeights:
    """What a replica knows about the shared copy it maps (``ref`` keeps the object alive while it is used)."""

    ref: Any
    holder: str
    object_id: str
    nbytes: int


# -- numpy <-> torch ------------------------------------------------------------------------------------
def to_arrays(model) -> dict:
    """The model's parameters as numpy arrays (tied parameters once) plus their torch dtypes."""
    import torch

    params, dtypes = {}, {}
    for name, p in model.named_parameters():  # remove_duplicate=True: a tied lm_head appears once
        t = p.detach().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bits, view them back on arrival
            t = t.view(torch.int16)
        params[name] = t.numpy()
        dtypes[name] = str(p.dtype).removeprefix("torch.")
    return {"params": params, "dtypes": dtypes}


def _tensor(array, dtype: str):
    import torch

    with warnings.catch_warnings():  # read-only on purpose: the base is frozen and nothing may write it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(array)
    want = getattr(torch, dtype)
    return t.view(want) if t.dtype != want else t


def build_around(shared: dict, model_cfg, path: str):
    """A base model (and tokenizer) whose parameters are the given arrays, not copies of them."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from see_ray.core.model import ModelNotFoundError, freeze_base, load_tokenizer

    if model_cfg.num_threads:  # as load_base_model does on the private path
        torch.set_num_threads(model_cfg.num_threads)
    tok = load_tokenizer(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ModelNotFoundError(f"model.name_or_path: cannot load model config from {path!r}: {e}") from None
    # parameters on the meta device (no memory, no random init); buffers are real and computed as usual
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, model_cfg.dtype))
    state = {n: _tensor(a, shared["dtypes"][n]) for n, a in shared["params"].items()}
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign replaced embed_tokens' Parameter; the tied lm_head must follow it
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unexpected or left:
        raise RuntimeError(f"shared base weights do not fit {path}: unexpected={unexpected[:5]} missing={left[:5]}")
    try:  # what from_pretrained does on the private path (the folder's generation defaults)
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    return freeze_base(model, tok), tok


def prefault(shared: dict) -> None:
    """Read one byte of every page of the shared arrays (see the module docstring, point 3)."""
    for a in shared["params"].values():
        flat = a.reshape(-1).view("uint8")
        int(flat[::PAGE].sum())


# -- the per-node holder --------------------------------------------------------------------------------
def _load_arrays(model_cfg: dict, path: str) -> dict:
    """The one-shot loading task (runs in a worker that exits afterwards)."""
    from see_ray.config import ModelConfig
    from see_ray.core.model import load_base_model

    model, _ = load_base_model(ModelConfig.model_validate(model_cfg), path)
    return to_arrays(model)


class BaseWeightsHolder:
    """Owns the node's shared copy of one base checkpoint (see the module docstring, point 1)."""

    def __init__(self, model_cfg: dict, path: str, node_id: str):
        self._cfg, self._path, self._node = model_cfg, path, node_id
        self._ref = None

    def ref(self) -> list:
        """The object with the weights, in a list (a bare ObjectRef returned from a method would be resolved)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._ref is None:
            # num_cpus=0: replicas may hold every CPU of the node, and loading must not wait for one.
            task = ray.remote(num_cpus=0, max_calls=1, max_retries=1)(_load_arrays).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(self._node, soft=False),
            )
            self._ref = task.remote(self._cfg, self._path)
        return [self._ref]

    def reset(self, failed_object_id: str) -> None:
        """Forget an object a replica could not get (the loading task failed): the next ``ref()`` loads again."""
        if self._ref is not None and self._ref.hex() == failed_object_id:
            self._ref = None

    def info(self) -> dict:
        return {"pid": os.getpid(), "object_id": self._ref.hex() if self._ref is not None else None,
                "path": self._path, "node_id": self._node}


def holder_name(fingerprint: str, dtype: str, node_id: str) -> str:
    return f"{HOLDER_PREFIX}{fingerprint.removeprefix('hub:')[:16]}-{dtype}-{node_id[:16]}"


def get_holder(model_cfg, path: str, node_id: str | None = None):
    """The node's holder for this checkpoint and dtype, created on first use. Returns (handle, name)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from see_ray.core.model import fingerprint

    node_id = node_id or ray.get_runtime_context().get_node_id()
    name = holder_name(fingerprint(path), model_cfg.dtype, node_id)
    handle = ray.remote(BaseWeightsHolder).options(
        name=name, namespace=HOLDER_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1,  # a restarted holder loads again on the next ref()
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(model_cfg.model_dump(mode="json"), path, node_id)
    return handle, name


def load_shared_base(model_cfg, path: str):
    """(model, tokenizer, SharedWeights) for a replica: the base built around this node's shared copy."""
    import ray
    from ray.exceptions import RayError

    holder, name = get_holder(model_cfg, path)
    for attempt in range(2):
        [ref] = ray.get(holder.ref.remote())
        try:
            shared = ray.get(ref)
            break
        except RayError:  # the loading task failed (or the holder restarted): load once more, then give up
            if attempt:
                raise
            ray.get(holder.reset.remote(ref.hex()))
    model, tok = build_around(shared, model_cfg, path)
    prefault(shared)
    nbytes = sum(a.nbytes for a in shared["params"].values())
    return model, tok, SharedWeights(ref=ref, holder=name, object_id=ref.hex(), nbytes=nbytes)


def drop_holders() -> list[str]:
    """Kill every base-weights holder of the cluster (after serving stopped): frees their shared copies."""
    import ray
    from ray.util import list_named_actors

    killed = []
    for a in list_named_actors(all_namespaces=True):
        if a["namespace"] == HOLDER_NAMESPACE and a["name"].startswith(HOLDER_PREFIX):
            try:
                ray.kill(ray.get_actor(a["name"], namespace=HOLDER_NAMESPACE))
                killed.append(a["name"])
            except ValueError:  # gone in the meantime
                pass
    return killed


# -- memory introspection (/proc; Linux) -----------------------------------------------------------------
def pss_mib(pid: int) -> float:
    """Proportional set size of a process: its private pages plus its share of every shared page."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/smaps_rollup has no Pss line")


def mapping_of(pid: int, addr: int) -> dict | None:
    """The memory mapping of ``pid`` that contains ``addr``: its file, inode and page accounting (KiB)."""
    found: dict | None = None
    with open(f"/proc/{pid}/smaps") as f:
        lines = f.readlines()
    for line in lines:
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping header: start-end perms ...
            if found is not None:
                return found
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            if lo <= addr < hi:
                found = {"start": lo, "end": hi, "inode": int(head[4]), "path": " ".join(head[5:])}
        elif found is not None and head and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
            found[head[0][:-1].lower() + "_kib"] = int(head[1])
    return found


def describe_weights(model, shared: SharedWeights | None) -> dict:
    """Where this process' base weights live: for tests and the memory benchmark."""
    p = next(model.parameters())
    m = mapping_of(os.getpid(), p.data_ptr()) or {}
    return {
        "pid": os.getpid(),
        "pss_mib": pss_mib(os.getpid()),
        "shared": shared is not None,
        "object_id": shared.object_id if shared else None,
        "holder": shared.holder if shared else None,
        "shared_nbytes": shared.nbytes if shared else 0,
        "weights_bytes": sum(t.numel() * t.element_size() for t in model.parameters()),
        "first_param_ptr": p.data_ptr(),
        "first_param_mapping": m,
    }
