"""Add one expert to the SEE sequence: validate, reconstruct, train on Ray, validate, register, deploy.

(About 500 lines: the job's seven steps read top to bottom in one module, each step a function; training itself
is ``ray_train.py``, registration ``registry/``.)

On a running cluster::

    ray job submit --working-dir . -- python jobs/add_expert.py --task data/shout --name shout \\
        --storage /shared/see-ray-storage [--workers 2] [--replace] [--set training.epochs=2]

Locally (a local Ray instance is started)::

    python jobs/add_expert.py --task data/shout --name shout

Steps (each timed and printed in the summary):
1. validate the input: task data, names, config, general pool, registry state. Nothing is written, and the
   job exits with 2 and a clear message on bad input (including "name exists, use --replace");
2. build SEE's reconstructed training set from the registry's rehearsal buffer (positives + rehearsal
   negatives of every task in the sequence + general-pool negatives);
3. train on Ray Train + DeepSpeed (``see_ray.training.ray_train``);
4. validate the new expert on held-out data: calibrate its threshold on its own dev queries and on negatives it
   never trained on (the held-out share of the other tasks' rehearsal queries and of the general pool,
   ``rehearsal.calibration_share``), then measure its accept rate on its own dev queries and its reject rate on
   the other tasks' held-out queries, in the prompt forms it was trained on (with the task definition and/or
   input-only, per ``rehearsal.input_only_share``); the operating point and both error rates go into the registry
   record; below ``--min-accept`` / ``--min-reject`` nothing is registered and the job exits 1;
5. register it with its rehearsal samples (registry.py: files first, then an atomic swap of the document,
   under the registry lock). If another job registered an expert while this one trained, the new expert was
   not trained to reject that task: it is checked against that task's rehearsal queries under the lock and
   retrained once with the updated buffer if it fails (``--max-retrain``);
6. deploy it live if the serving application is running (``deploy_live``: the Serve issue fills it in);
7. print a summary: timings, validation figures, the new sequence, and one ``SEE_RAY_RESULT {json}`` line.

Exit codes: 0 success; 1 training or validation failed (nothing registered); 2 bad input (nothing written).
A job killed at any point leaves the registry as it was (see registry.py), and re-running it succeeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


from see_ray.config import ConfigError, SEEConfig
from see_ray.core.data import Task, TaskDataError, load_query_pool, load_task, validate_name
from see_ray.core.prompts import IndicatorError, Query
from see_ray.registry import (
    BaseModelIdentity,
    ExpertExists,
    ExpertRecord,
    Indicators,
    NewExpert,
    Registry,
    RegistryDoc,
    RegistryError,
    fault_point,
    format_sequence,
)
from see_ray.core.rehearsal import RehearsalBuffer, reconstruct
from see_ray.core.routing import accepts, calibrate_on_held_out, prompt_forms, threshold_of
from see_ray.registry.storage import Storage, StorageError, default_storage_uri, is_uri
from see_ray.config.train import JobConfig, RayTrainConfig, ValidationBars
from see_ray.training.ray_train import TrainOutcome, ensure_ray, train_on_ray

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
RESULT_PREFIX = "SEE_RAY_RESULT "
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in the entrypoint's env

log = logging.getLogger("add_expert")


class BadInput(Exception):
    """Step 1 refused the input; exit 2, nothing written."""


class Failed(Exception):
    """Training or validation failed; exit 1, nothing registered."""


class StaleTrainingSet(Exception):
    """An expert registered while we trained is not rejected well enough: retrain with it as negatives."""


# -- step 1: input --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="add_expert.py", description="Train, validate and register one SEE expert on a Ray cluster."
    )
    p.add_argument("--task", required=True, help="Task data: folder or .json (SuperNI) / .jsonl file.")
    p.add_argument("--name", required=True, help="Expert name (unique in the sequence).")
    p.add_argument("--task-name", help="Task name for rehearsal bookkeeping (default: the expert name).")
    p.add_argument("--definition", help="Task instruction, if the data carries none.")
    p.add_argument("--storage", help=f"Storage root (default ${'{'}SEE_RAY_STORAGE{'}'} or {default_storage_uri()}).")
    p.add_argument("--config", help="YAML with SEE sections and an optional ray_train section.")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="Config override.")
    p.add_argument("--workers", type=int, help="Ray Train workers (ray_train.num_workers).")
    p.add_argument("--gpu", action="store_true", help="Train on GPUs (ray_train.use_gpu).")
    p.add_argument("--replace", action="store_true", help="Train a new version of an existing expert.")
    p.add_argument("--general-pool", help="JSONL of general queries ({'input', 'definition'?}); default: the built-in pool "
                   "(chat and instruction-style requests of many task types, see_ray.tools.builtin.default_pool).")
    p.add_argument("--min-accept", type=float, default=ValidationBars().min_accept, help="Validation bar (0-1).")
    p.add_argument("--min-reject", type=float, default=ValidationBars().min_reject, help="Validation bar (0-1).")
    p.add_argument("--max-retrain", type=int, default=1, help="Retrains when a concurrent job changed the buffer.")
    p.add_argument("--threads", type=int, help="torch threads of this driver process for validation (default 1).")
    return p.parse_args(argv)


def in_ray_job() -> bool:
    return JOB_CONFIG_ENV in os.environ


def job_identity() -> dict:
    ident = {"host": socket.gethostname(), "pid": os.getpid()}
    raw = os.environ.get(JOB_CONFIG_ENV)
    if raw:
        try:
            meta = json.loads(raw).get("metadata") or {}
            ident["submission_id"] = meta.get("job_submission_id")
        except ValueError:
            pass
    return ident


def load_general_pool(path: str | None) -> list[Query]:
    """``--general-pool``: the built-in pool when not given (``tools.builtin.default_pool``: chat requests and a few
    hundred instruction-style queries of many task types), else the JSONL file (core.data.load_query_pool)."""
    if path is None:
        from see_ray.tools.builtin import default_pool

        return default_pool()
    try:
        return load_query_pool(path)
    except TaskDataError as e:
        raise BadInput(f"--general-pool {e}") from None


@dataclass
class Inputs:
    task: Task
    see: SEEConfig
    rt: RayTrainConfig
    bars: ValidationBars
    pool: list[Query]
    registry: Registry
    model_path: str
    indicators: Indicators
    base: BaseModelIdentity


def validate_inputs(args: argparse.Namespace) -> Inputs:
    """Step 1. Everything that can be wrong with the input is found here, before anything is written."""
    from see_ray.core.model import fingerprint, load_tokenizer, resolve_model_path
    from see_ray.core.prompts import resolve_indicators

    try:
        validate_name(args.name, "expert name")
        task = load_task(args.task, name=args.task_name or args.name, definition=args.definition)
        see, rt = JobConfig.from_yaml(args.config, args.set).split()
        bars = ValidationBars(min_accept=args.min_accept, min_reject=args.min_reject)
    except (TaskDataError, ConfigError, ValueError) as e:
        raise BadInput(str(e)) from None
    if args.workers is not None:
        if args.workers < 1:
            raise BadInput("--workers must be >= 1")
        rt.num_workers = args.workers
    if args.gpu:
        rt.use_gpu = True
    if not task.dev:
        raise BadInput(f"{args.task}: no dev instances to validate the expert on (give a dev split or more data)")
    if len(task.train) < rt.num_workers:
        raise BadInput(f"{args.task}: {len(task.train)} training instances cannot be split over {rt.num_workers} workers")
    storage_arg = args.storage or default_storage_uri()
    if in_ray_job() and not is_uri(storage_arg) and not os.path.isabs(os.path.expanduser(storage_arg)):
        # The entrypoint runs in a temporary copy of --working-dir: a relative root would vanish with it.
        raise BadInput(f"--storage {storage_arg!r}: use an absolute path or a URI inside a Ray job")
    pool = load_general_pool(args.general_pool)
    try:
        model_path = resolve_model_path(see.model)
        accept_id, reject_id = resolve_indicators(load_tokenizer(model_path), see.indicators)
        rt.deepspeed_dict(see)  # a missing or broken DeepSpeed file is bad input too
        base = BaseModelIdentity(name_or_path=see.model.name_or_path, fingerprint=fingerprint(model_path))
    except (IndicatorError, ConfigError, OSError) as e:
        raise BadInput(str(e)) from None
    try:
        registry = Registry(Storage(storage_arg))
        doc = registry.load()
        # names, the task, and the base model (one registry serves one base) before any training
        registry.check_can_add(args.name, task.name, args.replace, doc, base)
        if args.replace and doc.find(args.name) is None:
            print(f"note: --replace given but no expert {args.name!r} exists; adding it as new", flush=True)
    except (RegistryError, StorageError) as e:
        raise BadInput(str(e)) from None
    ind = Indicators(accept=see.indicators.accept, reject=see.indicators.reject, accept_id=accept_id, reject_id=reject_id)
    return Inputs(task, see, rt, bars, pool, registry, model_path, ind, base)


def check_storage_writable(registry: Registry) -> None:
    """Fail before training, not after it, when the storage root cannot be written (read-only mount, full
    disk, missing permissions): nothing is written but a probe file, which is removed again."""
    try:
        registry.storage.probe_writable()
    except OSError as e:
        raise Failed(f"storage {registry.storage.uri} is not writable ({_reason(e)}); nothing was trained or "
                     "registered, the registry is unchanged") from None


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


# -- step 2: the reconstructed training set -------------------------------------------------------------
def build_training_set(inp: Inputs, doc: RegistryDoc):
    """SEE step 1 (task reconstruction) from the registry's buffer; the task itself is never a negative."""
    buffer = inp.registry.rehearsal_buffer(doc, exclude={inp.task.name})
    examples = reconstruct(inp.task, buffer, inp.pool, inp.see.rehearsal, exclude={inp.task.name})
    counts = {
        "positives": sum(e.indicator == "accept" for e in examples),
        "rehearsal_negatives": sum(e.indicator == "reject" and e.source != "general" for e in examples),
        "general_negatives": sum(e.source == "general" for e in examples),
    }
    return examples, buffer, counts


# -- step 4: validation ---------------------------------------------------------------------------------
def other_task_queries(buffer: RehearsalBuffer, share: float, tasks: list[str] | None = None) -> dict[str, list[Query]]:
    return {
        t: prompt_forms([Query(s["input"], s.get("definition")) for s in samples], share)
        for t, samples in buffer.samples.items()
        if tasks is None or t in tasks
    }


def reject_rates(model, name: str, per_task: dict[str, list[Query]], thr: float) -> dict[str, float]:
    out = {}
    for t, qs in per_task.items():
        if qs:
            ps = model.decide(qs, name)
            out[t] = sum(not accepts(p, thr) for p in ps) / len(ps)
    return out


def validate_expert(model, inp: Inputs, buffer: RehearsalBuffer) -> dict:
    """Step 4, on held-out data only, in the prompt forms the expert was trained on: the threshold from its own dev
    queries and the negatives it never trained on (``core.routing.calibrate_on_held_out``: each earlier task's
    held-out rehearsal queries and the general pool's held-out queries), then the accept rate on its own dev
    queries and the reject rate on each negative source at the threshold routing will use."""
    name = inp.task.name
    held = calibrate_on_held_out(lambda qs: model.decide(qs, name), inp.task, buffer, inp.pool, inp.see)
    cal = held.calibration
    thr = threshold_of(cal.threshold, inp.see.routing)  # the routing rule, with the calibrated value as this expert's
    rejected = {src: sum(not accepts(p, thr) for p in ps) / len(ps) for src, ps in held.p_negatives.items()}
    per_task = {src: r for src, r in rejected.items() if src != "general"}
    n_other = sum(len(held.p_negatives[t]) for t in per_task)
    reject = sum(r * len(held.p_negatives[t]) for t, r in per_task.items()) / n_other if n_other else None
    return {
        "threshold": thr,
        "calibrated_threshold": cal.threshold,
        "calibration": cal.to_dict(),
        "accept_rate": sum(accepts(p, thr) for p in held.p_own) / len(held.p_own),
        "n_own": len(held.p_own),
        "reject_rate": reject,  # None for the first expert (no other task yet) or when no sample is held out
        "n_other": n_other,
        "reject_rate_per_task": per_task,
        "reject_rate_general_pool": rejected.get("general"),
        "n_general": len(held.p_negatives.get("general", [])),
        "min_accept": inp.bars.min_accept,
        "min_reject": inp.bars.min_reject,
        "p_own_mean": sum(held.p_own) / len(held.p_own),
    }


def passes(v: dict) -> bool:
    return v["accept_rate"] >= v["min_accept"] and (v["reject_rate"] is None or v["reject_rate"] >= v["min_reject"])


# -- step 6: live deployment hook -----------------------------------------------------------------------
def deploy_live(record: ExpertRecord, registry: Registry, see: SEEConfig) -> dict:
    """Step 6: deploy the newly registered expert into the running serving application.

    The expert becomes its own Serve application (so nothing running is redeployed), with
    the configuration the dispatcher serves with; once it has a running replica the dispatcher is told to
    refresh and puts it into its sequence (see_ray.serve.add_expert_live). The SEE application's name is
    ``$SEE_RAY_SERVE_APP`` (default ``see``). Returns {"deployed": bool, "serving": bool, "message": str, ...}.
    """
    from see_ray.serve import add_expert_live, live_app_for, serving_running

    app = os.environ.get("SEE_RAY_SERVE_APP", "see")
    conf, why = live_app_for(registry.storage.uri, app)
    if conf is None:
        return {"deployed": False, "serving": serving_running(), "message": f"{why}; expert registered only"}
    info = add_expert_live(record.name, app)
    seq = [e["name"] for e in info["sequence"]]
    apps = [e["app"] for e in info["sequence"] if e["name"] == record.name]
    if not apps:
        return {"deployed": False, "serving": True, "sequence": seq,
                "message": f"deployed, but the dispatcher does not list it yet (sequence {seq})"}
    return {"deployed": True, "serving": True, "sequence": seq,
            "message": f"deployed as Serve application {apps[0]!r}; dispatcher sequence now {seq}"}


# -- the job --------------------------------------------------------------------------------------------
@dataclass
class Timer:
    steps: dict[str, float] = field(default_factory=dict)

    def run(self, label: str, fn, *a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            self.steps[label] = self.steps.get(label, 0.0) + time.perf_counter() - t0
            print(f"[add_expert] {label}: {self.steps[label]:.1f} s", flush=True)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def warm_start_from(doc, name: str):
    """``training.warm_start``: the expert whose adapter the new one starts from, the newest active expert of
    the sequence (not an earlier version of the one being replaced); None for the first expert."""
    return next((e for e in reversed(doc.sequence(include_disabled=False)) if e.name != name), None)


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    timer = Timer()
    inp = timer.run("1_validate_input", validate_inputs, args)
    task, see, rt, registry = inp.task, inp.see, inp.rt, inp.registry
    check_storage_writable(registry)
    print(
        f"[add_expert] task {task.name}: {len(task.train)} train / {len(task.dev)} dev; registry {registry.storage.uri}; "
        f"{rt.num_workers} worker(s), deepspeed={rt.deepspeed}",
        flush=True,
    )
    import torch

    torch.set_num_threads(args.threads or see.model.num_threads or 1)
    ensure_ray()
    from see_ray.core.expert import SEEModel

    base = inp.base
    work = Path(tempfile.mkdtemp(prefix=f"see-add-{args.name}-"))
    model = None
    try:
        for attempt in range(args.max_retrain + 1):
            doc = registry.load()
            examples, buffer, counts = timer.run("2_reconstruct", build_training_set, inp, doc)
            print(f"[add_expert] reconstructed set: {counts}; negatives from tasks {buffer.tasks()}", flush=True)
            warm = warm_start_from(doc, args.name) if see.training.warm_start else None
            if warm is not None:
                print(f"[add_expert] warm start from expert {warm.name!r} v{warm.version}", flush=True)
            try:
                outcome: TrainOutcome = timer.run(
                    "3_train",
                    train_on_ray,
                    examples,
                    see,
                    rt,
                    name=args.name,
                    meta={"task": task.name, "attempt": attempt,
                          **({"init_from": f"{warm.name} v{warm.version}"} if warm is not None else {})},
                    storage=registry.storage,
                    output_dir=work / f"adapter-{attempt}",
                    # A configured folder is opened as is (shared in a cluster); otherwise every worker
                    # resolves model.name_or_path on its own node (the default is converted once per node).
                    model_path=see.model.name_or_path if os.path.isdir(see.model.name_or_path) else None,
                    init_expert=None if warm is None else {"storage": registry.storage.uri,
                                                           "record": warm.model_dump(mode="json")},
                )
            except Exception as e:  # Ray's TrainingFailedError and friends: the figures are in the message
                raise Failed(f"training failed: {e}") from e

            def _validate():
                nonlocal model
                if model is None:
                    model = SEEModel(see, inp.model_path)
                model.load_adapter(task.name, outcome.adapter_dir)
                return validate_expert(model, inp, buffer)

            v = timer.run("4_validate", _validate)
            print(
                f"[add_expert] validation: accept {_fmt(v['accept_rate'])} (bar {v['min_accept']}) on {v['n_own']} own "
                f"dev queries; reject {_fmt(v['reject_rate'])} (bar {v['min_reject']}) on {v['n_other']} other-task "
                f"queries {json.dumps({k: round(r, 3) for k, r in v['reject_rate_per_task'].items()})}; "
                f"threshold {v['threshold']:.3f}",
                flush=True,
            )
            if not passes(v):
                raise Failed(
                    f"expert {args.name!r} did not pass validation and was NOT registered: accept rate "
                    f"{_fmt(v['accept_rate'])} (need >= {v['min_accept']}), reject rate {_fmt(v['reject_rate'])} "
                    f"(need >= {v['min_reject']})"
                )
            trained_against = buffer.tasks()

            def check(current: RegistryDoc) -> None:
                """Under the lock: experts registered while we trained must be rejected too."""
                newer = [e for e in current.experts if e.task != task.name and e.task not in trained_against]
                if not newer:
                    return
                tasks = [e.task for e in newer]
                extra = reject_rates(
                    model, task.name,
                    other_task_queries(registry.rehearsal_buffer(current), see.rehearsal.input_only_share, tasks),
                    v["threshold"],
                )
                new.validation["checked_at_commit"] = extra  # recorded with the expert
                print(f"[add_expert] registered meanwhile: {tasks}; reject rates {extra}", flush=True)
                if any(r < inp.bars.min_reject for r in extra.values()):
                    raise StaleTrainingSet(tasks)

            samples = RehearsalBuffer.empty().add_task(task, see.rehearsal)
            new = NewExpert(
                name=args.name,
                task=task.name,
                adapter_dir=str(outcome.adapter_dir),
                rehearsal_samples=samples,
                base_model=base,
                indicators=inp.indicators,
                threshold=v["threshold"],
                calibration=v["calibration"],
                definition=task.definition,
                trained_against=trained_against,
                training={
                    "config": see.model_dump(mode="json"),
                    "ray_train": rt.model_dump(mode="json"),
                    "deepspeed": rt.deepspeed_dict(see),
                    "figures": outcome.metrics,
                    "examples": counts,
                    "run_name": outcome.run_name,
                    "checkpoint_uri": outcome.checkpoint_uri,
                    "fit_s": outcome.fit_s,
                },
                validation=v,
                job=job_identity(),
            )
            try:
                fault_point("register")
                record = timer.run("5_register", registry.add, new, replace=args.replace, check=check)
                break
            except OSError as e:  # storage became unwritable while we trained (StorageError is an OSError)
                raise Failed(
                    f"registering {args.name!r} failed: storage {registry.storage.uri} is not writable "
                    f"({_reason(e)}); nothing was registered, the registry is unchanged. Re-run the job once the "
                    "storage is writable again"
                ) from None
            except StaleTrainingSet as e:
                if attempt == args.max_retrain:
                    raise Failed(
                        f"experts for tasks {e.args[0]} were registered while {args.name!r} trained, and it does not "
                        "reject their queries well enough; re-submit the job"
                    ) from None
                print(f"[add_expert] retraining with the new rehearsal samples of {e.args[0]}", flush=True)
        deploy = timer.run("6_deploy", deploy_live, record, registry, see)
        print(f"[add_expert] deploy: {deploy['message']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # -- step 7: summary ------------------------------------------------------------------------------
    doc = registry.load()
    total = time.perf_counter() - t_start
    print("\n=== add_expert summary ===")
    print(f"expert      {record.name} v{record.version} (task {record.task}), position {record.position}")
    print(f"adapter     {record.adapter_uri}")
    print(f"training    {outcome.metrics.get('steps')} steps, {outcome.metrics.get('train_s', 0):.1f} s loop, "
          f"{outcome.metrics.get('tokens_per_s', 0):.0f} tokens/s, final loss {outcome.metrics.get('final_loss', 0):.4f}, "
          f"{rt.num_workers} worker(s)")
    cal = v["calibration"]
    print(f"validation  on held-out data: accept {_fmt(v['accept_rate'])} of {v['n_own']} own dev queries, reject "
          f"{_fmt(v['reject_rate'])} of {v['n_other']} other-task and {_fmt(v['reject_rate_general_pool'])} of "
          f"{v['n_general']} general-pool queries; threshold {v['threshold']:.3f} (calibrated: false rejection "
          f"{_fmt(cal['false_rejection'])}, false acceptance {_fmt(cal['false_acceptance'])})")
    print("timings     " + ", ".join(f"{k} {s:.1f} s" for k, s in timer.steps.items()) + f", total {total:.1f} s")
    print(f"sequence    ({see.routing.order}, as routing asks them):")
    print(format_sequence(doc.experts, see.routing.order))
    result = {
        "name": record.name,
        "version": record.version,
        "position": record.position,
        "adapter_uri": record.adapter_uri,
        "validation": record.validation,
        "training": outcome.metrics,
        "timings": timer.steps,
        "total_s": total,
        "deploy": deploy,
        "sequence": [e.name for e in doc.experts],
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return EXIT_OK


def _terminate(signum, frame):  # `ray job stop` sends SIGTERM: unwind so temporary folders are removed
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    args = parse_args(argv)
    try:
        return run(args)
    except BadInput as e:
        print(f"add_expert: bad input: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except ExpertExists as e:  # lost a race with a job that registered the same name meanwhile
        print(f"add_expert: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except (Failed, RegistryError) as e:
        print(f"add_expert: FAILED: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED


if __name__ == "__main__":  # python -m see_ray.training.add_expert
    sys.exit(main())
