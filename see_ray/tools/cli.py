"""The ``see-ray`` command line.

    see-ray demo                      the whole system locally: train, register, serve, query (README command 1)
    see-ray add-expert --task DIR ... add one expert (the Ray job's pipeline; jobs/add_expert.py runs the same)
    see-ray bench quality --data DIR  SEE vs SeqFT / Replay / MTL / Oracle on a task sequence
    see-ray config                    print the default configuration as YAML
    see-ray registry ...              inspect and edit the expert registry
    see-ray serve                     serve the registry's experts over an OpenAI-compatible HTTP API
    see-ray status                    expert sequence, deployments and replicas, storage, dashboard URL

Every command takes ``--config FILE.yaml`` and repeated ``--set section.field=value`` overrides.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from see_ray.config import ConfigError, SEEConfig


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with config sections (model, lora, training, routing, ...)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set training.steps=60 (repeatable)",
    )


def _load_config(args, defaults: list[str] | None = None) -> SEEConfig:
    return SEEConfig.from_yaml(args.config, (defaults or []) + args.overrides)


# -- demo -------------------------------------------------------------------------------------------------
DEMO_DEFAULTS = [
    # 1.5 passes over each expert's training set (its 96 instances, the earlier tasks' rehearsal negatives and 64
    # general-pool negatives): 30-37 steps of batch 8 per expert (docs/results.md, the demo); lr and rehearsal sizes
    # as in the quality benchmark's demo runs.
    "training.epochs=1.5",
    "training.lr=0.001",
    "rehearsal.per_task_min=24",
    "routing.max_new_tokens=24",
]


def cmd_demo(args) -> int:
    if args.in_process:
        return _demo_in_process(args)
    import shutil

    from see_ray.tools.demo import run_serve_demo
    from see_ray.core.model import cache_root

    storage = args.storage
    if storage is None:  # the demo's own registry: every run starts from an empty one
        storage = str(cache_root() / "demo-storage")
        shutil.rmtree(storage, ignore_errors=True)
    # Replicas keep serve's default of one thread each. Measured here on 2 cores with the demo's registry: 12
    # queries one after another took 13.7 s with 1 thread per replica and 15.1 s with 2, and 12 at once 10.6 s
    # against 36.5 s (four 2-thread replicas computing together oversubscribe two cores).
    serve_sets = ([f"port={args.port}"] if args.port else []) + args.serve_set
    res = run_serve_demo(
        config=args.config, overrides=DEMO_DEFAULTS + args.overrides, serve_overrides=serve_sets, storage=storage,
        train_per_task=args.train_per_task, queries_per_task=args.queries_per_task, workers=args.workers,
        address=args.address, num_cpus=args.num_cpus, keep_serving=args.keep_serving,
        log=lambda m: print(m, flush=True),
    )
    return 0 if res["correct"] == res["total"] else 1


def _demo_in_process(args) -> int:
    """The demo without Ray: one process trains the experts and routes (the SEE method alone)."""
    from see_ray.tools.builtin import default_pool, demo_tasks
    from see_ray.tools.demo import demo_queries
    from see_ray.core.expert import SEEModel
    from see_ray.core.rehearsal import RehearsalBuffer, reconstruct
    from see_ray.core.router import Router
    from see_ray.core.routing import ExpertSpec, calibrate_on_held_out
    from see_ray.core.trainer import train_adapter

    cfg = _load_config(args, DEMO_DEFAULTS)
    out = Path(args.out)
    t0 = time.perf_counter()
    print(f"[1/3] loading base model {cfg.model.name_or_path}", flush=True)
    model = SEEModel(cfg)
    tasks, pool = demo_tasks(n=args.train_per_task), default_pool()
    buffer, experts = RehearsalBuffer.empty(), []
    print(f"[2/3] training {len(tasks)} experts ({cfg.training.budget()} each), newest asked first", flush=True)
    for task in tasks:
        examples = reconstruct(task, buffer, pool, cfg.rehearsal)
        n_neg = sum(e.indicator == "reject" for e in examples)
        print(f"  expert {task.name!r}: {len(examples) - n_neg} positives, {n_neg} negatives", flush=True)
        path = out / "adapters" / task.name
        stats = train_adapter(examples, cfg, model.model_path, path, meta={"name": task.name, "task": task.name})
        model.load_adapter(task.name, path)
        thr = calibrate_on_held_out(lambda qs: model.decide(qs, task.name), task, buffer, pool, cfg).calibration.threshold
        experts.append(ExpertSpec(task.name, task.name, str(path), thr))
        buffer.add_task(task, cfg.rehearsal)
        print(f"    loss {stats['first_loss']:.2f} -> {stats['final_loss']:.2f}, {stats['train_s']:.0f} s, threshold {thr:.2f}", flush=True)
    router = Router(model, experts, cfg.routing)
    print("[3/3] asking raw client queries (no task definition)", flush=True)
    pairs = demo_queries(tasks, args.queries_per_task)
    results = router.route([q for q, _ in pairs])
    correct = 0
    for (q, exp), r in zip(pairs, results):
        ok = r.expert == exp
        correct += ok
        asked = ", ".join(f"{a.expert} p={a.p_accept:.2f}{'>=' if a.accepted else '<'}{a.threshold:.2f}" for a in r.trace)
        print(f"  {'ok ' if ok else 'XX '} {q.input!r:32.32} -> {r.expert:10} {r.answer!r:.40}")
        print(f"       why: {asked}")
    print(
        f"routed {correct}/{len(pairs)} as expected; {time.perf_counter() - t0:.0f} s in all; adapters in {out}/adapters",
        flush=True,
    )
    return 0


# -- bench ------------------------------------------------------------------------------------------------
# --general-pool-tasks values that name a built-in pool, and how the report lists them
BUILTIN_POOLS = {
    "builtin": "builtin (see_ray.tools.builtin.general_pool)",
    "builtin-instructions": "builtin-instructions (see_ray.tools.builtin.general_pool + 16 instruction families)",
    "default": "default (see_ray.tools.builtin.default_pool: the add-expert job's default pool)",
}


def prepare_quality_bench(args):
    """The benchmark ``see-ray bench quality ARGS`` runs: (QualityBench, the report's facts about its data, the
    methods asked for). Also used by benchmarks/second_signal.py, which re-evaluates a run's experts."""
    from see_ray.tools.bench import METHODS, QualityBench
    from see_ray.core.data import TaskDataError, load_benchmark, load_task
    from see_ray.core.rehearsal import general_pool_from_tasks

    cfg = _load_config(args)
    all_tasks = load_benchmark(args.data)
    names = [t.name for t in all_tasks]

    def known(flag: str, chosen: list[str]) -> None:
        for n in chosen:
            if n not in names:
                raise SystemExit(f"{flag}: unknown task {n!r}")

    # --holdout: taken out of the order before the sequence is formed, and the unknown tasks of the OOD figures
    holdout = args.holdout.split(",") if args.holdout else []
    known("--holdout", holdout)
    ordered = [t for t in all_tasks if t.name not in holdout]
    seq = ordered[: args.tasks]
    rest = ordered[args.tasks :]
    # "builtin": the generic requests of see_ray.tools.builtin.general_pool, so that every task of the benchmark can be in
    # the sequence or held out as OOD (with all 10 SuperNI-CL tasks used, no task is left to serve as the pool);
    # "builtin-instructions": half of them, half instruction-style requests of other task families;
    # "default": the add-expert job's default pool (chat + a few hundred instruction-style requests).
    builtin_pool = args.general_pool_tasks in BUILTIN_POOLS
    if builtin_pool:
        pool_names = []
    elif args.general_pool_tasks:
        pool_names = args.general_pool_tasks.split(",")
    else:
        pool_names = [t.name for t in rest[:2]]
    known("--general-pool-tasks", pool_names)
    ood_names = args.ood_tasks.split(",") if args.ood_tasks else (
        holdout or [t.name for t in rest if t.name not in pool_names])
    known("--ood-tasks", ood_names)
    seq_names = {t.name for t in seq}
    for n in ood_names:
        if n in pool_names or n in seq_names:
            raise SystemExit(f"--ood-tasks: {n!r} is in the sequence or the general pool, so it is not out of distribution")
    by_name = {t.name: t for t in all_tasks}
    sub = dict(train=args.train_per_task, dev=args.dev_per_task, test=args.test_per_task)
    seq = [t.subsample(**sub) for t in seq]
    if builtin_pool:
        from see_ray.tools.builtin import builtin_pool as make_builtin_pool

        pool = make_builtin_pool(args.general_pool_tasks, args.pool_per_task)
    else:
        pool = general_pool_from_tasks([by_name[n].subsample(**sub) for n in pool_names], per_task=args.pool_per_task)
    # --pool-dir: task-shaped general negatives, every task file of a folder (e.g. ../shared/data/superni-pool)
    pool_dir_tasks = []
    if args.pool_dir:
        files = sorted(Path(args.pool_dir).glob("*.json*"))
        if not files:
            raise SystemExit(f"--pool-dir: no task files (*.json, *.jsonl) in {args.pool_dir}")
        try:
            extra = [load_task(f) for f in files]
        except TaskDataError as e:
            raise SystemExit(f"--pool-dir: {e}") from None
        clash = [t.name for t in extra if t.name in names]
        if clash:
            raise SystemExit(f"--pool-dir: {clash} are benchmark tasks; a probe or sequence task is never a negative")
        pool_dir_tasks = [t.name for t in extra]
        pool = pool + general_pool_from_tasks(extra, per_task=args.pool_per_task)
    ood = [by_name[n].subsample(**sub) for n in ood_names]
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    out = Path(args.out)
    reuse = Path(args.reuse_adapters) if args.reuse_adapters else None
    if reuse is not None and not reuse.is_dir():
        raise SystemExit(f"--reuse-adapters: {reuse} is not a folder")
    from see_ray.core.model import cache_root

    cache = None if args.no_cache else Path(args.cache) if args.cache else cache_root() / "bench"
    bench = QualityBench(seq, pool, ood, cfg, out, reuse_adapters=reuse, cache_dir=cache, recompute=args.recompute)
    facts = {
        "tasks": [t.name for t in seq],
        "general_pool_tasks": ([BUILTIN_POOLS[args.general_pool_tasks]] if builtin_pool else pool_names) + pool_dir_tasks,
        "general_pool_size": len(pool),
        "ood_tasks": ood_names,
        "subsample": sub,
        "config": cfg.model_dump(mode="json"),
    }
    return bench, facts, methods


def cmd_bench_quality(args) -> int:
    from see_ray.tools.bench import machine_description, write_report

    bench, facts, methods = prepare_quality_bench(args)
    out = bench.out
    t0 = time.perf_counter()

    def report(res: dict, complete: bool = False) -> None:
        result = {
            "command": "see-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "machine": machine_description(),
            "complete": complete,
            **facts,
            "methods": res,
            "timings_s": {**bench.timings, "training": bench.train_s, "total": time.perf_counter() - t0},
            "adapters_from_cache": list(bench.cached_adapters),
        }
        if "SEE" in res:
            result["eval_wall_s"] = res["SEE"].get("eval_wall_s")
            result["ood"] = {**res["SEE"]["ood"], "protocol": args.protocol_name or None}
        if bench.reused:
            result["reused_adapters"] = dict(bench.reused)
        write_report(result, out)

    report(bench.run(methods, on_method_done=report), complete=True)
    print((out / "quality.md").read_text())
    print(f"wrote {out}/quality.json, quality.md and plots/")
    return 0


def cmd_config(args) -> int:
    print(_load_config(args).to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="see-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole system on this machine with the real small model: local Ray, three "
                       "demo experts trained by the add-expert job, served on Ray Serve, asked over HTTP")
    _add_config_args(p)
    p.add_argument("--storage", help="registry root of the demo (default: a fresh one under ~/.cache/see-ray/)")
    p.add_argument("--train-per-task", type=int, default=96, help="training instances per demo task")
    p.add_argument("--queries-per-task", type=int, default=3, help="test queries asked per task")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per expert (DeepSpeed ZeRO-2)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--serve-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="serve config override (see see_ray/config/serve.py), repeatable")
    p.add_argument("--address", help="use this running Ray cluster instead of starting a local one")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--keep-serving", action="store_true", help="keep serving after the demo (Ctrl-C stops)")
    p.add_argument("--in-process", action="store_true",
                   help="the SEE method alone, without Ray: train and route in this process")
    p.add_argument("--out", default="see-ray-output/demo", help="--in-process: where adapters are written")
    p.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser("quality", help="SEE vs SeqFT / Replay / MTL / Oracle on a SuperNI-CL task sequence")
    _add_config_args(q)
    q.add_argument("--data", required=True, help="benchmark folder (task folders + order.txt)")
    q.add_argument("--tasks", type=int, default=5, help="first N tasks of the order form the sequence")
    q.add_argument("--train-per-task", type=int, default=100)
    q.add_argument("--dev-per-task", type=int, default=20)
    q.add_argument("--test-per-task", type=int, default=30)
    q.add_argument("--general-pool-tasks", help="comma-separated tasks used as general negatives "
                   "(default: the 2 tasks after the sequence), 'builtin' for see-ray's generic requests, or "
                   "'builtin-instructions' for half generic requests, half instruction-style tasks of other families")
    q.add_argument("--pool-per-task", type=int, default=32,
                   help="general-pool queries per pool task (builtin pools: twice this many in all)")
    q.add_argument("--ood-tasks", help="comma-separated tasks for the OOD figures (default: the --holdout tasks, "
                   "else all remaining)")
    q.add_argument("--holdout", help="comma-separated benchmark tasks taken out of the order before the sequence is "
                   "formed: never trained on, never negatives; they are the unknown tasks of the OOD figures")
    q.add_argument("--pool-dir", help="a folder of task files (e.g. ../shared/data/superni-pool) added to the general "
                   "pool as task-shaped negatives, --pool-per-task queries each; none may be a benchmark task")
    q.add_argument("--protocol-name", help="name of the protocol, recorded in the report's 'ood' section")
    q.add_argument("--cache", help="where decisions, answers and trained adapters are kept across runs "
                   "(see_ray/tools/eval_cache.py; default: bench/ under the see-ray cache folder)")
    q.add_argument("--no-cache", action="store_true", help="compute everything in this run, keep nothing")
    q.add_argument("--recompute", action="store_true", help="take trained adapters from the cache, but compute every "
                   "decision and answer again (measures SEE's evaluation time, eval_wall_s)")
    q.add_argument("--methods", help=f"comma-separated subset of {','.join(('SEE', 'SeqFT', 'Replay', 'MTL', 'Oracle'))}")
    q.add_argument("--out", default="see-ray-output/quality", help="output folder")
    q.add_argument("--reuse-adapters", metavar="DIR",
                   help="take each adapter from DIR/<name> (the adapters/ folder of an earlier run with the same "
                   "tasks, subsample and training config) instead of training it; the report lists what was reused. "
                   "For re-evaluating trained experts after a change at inference time, or resuming a stopped run")
    q.set_defaults(fn=cmd_bench_quality)

    a = sub.add_parser("add-expert", add_help=False,
                       help="add one expert: the Ray job's pipeline (jobs/add_expert.py); --help lists its flags")
    a.add_argument("job_args", nargs=argparse.REMAINDER)  # listed in --help; main() hands them to the job

    c = sub.add_parser("config", help="print the effective configuration")
    _add_config_args(c)
    c.set_defaults(fn=cmd_config)

    from see_ray.tools.registry_cli import add_registry_subcommands
    from see_ray.tools.serve_cli import add_serve_subcommands

    from see_ray.tools.status import add_status_subcommand

    add_registry_subcommands(sub)
    add_serve_subcommands(sub)
    add_status_subcommand(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["add-expert"]:  # the job's own parser reads every flag, --help included
        from see_ray.training.add_expert import main as add_expert_main

        return add_expert_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"see-ray: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
