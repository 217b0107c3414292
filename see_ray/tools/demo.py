"""``see-ray demo``: the whole system on one machine, through the same code as production.

A local Ray, every built-in demo task (``see_ray.tools.builtin``) added as an expert by the add-expert job
(``see_ray.training.add_expert``: reconstruction from the registry's rehearsal buffer, Ray Train + DeepSpeed,
validation, atomic registration), served by the same deploy function as ``see-ray serve``, and asked over real
HTTP with raw client queries.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from see_ray.config.constants import BASE
from see_ray.core.data import Task
from see_ray.core.prompts import Query
from see_ray.tools.builtin import demo_tasks, unrelated_queries

def write_task_folder(task: Task, folder: Path) -> Path:
    """A task as the job reads it: train/dev/test.jsonl (one {"input", "output"} per line) + definition.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", task.train), ("dev", task.dev), ("test", task.test)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for x in rows:
                f.write(json.dumps({"input": x.input, "output": x.outputs[0]}) + "\n")
    (folder / "definition.txt").write_text(task.definition)
    return folder


class _DropLines(io.TextIOBase):
    """stdout filter: the job's machine-readable result line is for `ray job` logs, not for the demo's reader."""

    def __init__(self, out, prefix: str):
        self.out, self.prefix, self.buf = out, prefix, ""

    def write(self, s: str) -> int:
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if not line.startswith(self.prefix):
                self.out.write(line + "\n")
        self.out.flush()
        return len(s)

    def flush(self) -> None:
        if self.buf and not self.buf.startswith(self.prefix):
            self.out.write(self.buf)
        self.buf = ""
        self.out.flush()


class _TrainProgress(threading.Thread):
    """Prints a job's training progress in the demo's own output. The demo does not forward worker logs (Ray
    Train, Ray Data and DeepSpeed flood a 2-core terminal); the run's rank-0 reports are read back from the
    metrics file Ray Train's controller writes at every report (see_ray.training.ray_train.METRICS_FILE)."""

    def __init__(self, storage, name: str, steps: int, log, period_s: float = 2.0):
        super().__init__(daemon=True)
        self.storage, self.name, self.steps, self.log, self.period_s = storage, name, steps, log, period_s
        self.done = threading.Event()
        self.run_name, self.seen = None, 0

    def run(self) -> None:
        while not self.done.wait(self.period_s):
            self.poll()
        self.poll()  # the final report

    def poll(self) -> None:
        from see_ray.training.ray_train import METRICS_FILE, progress_line

        try:
            runs = [r for r in self.storage.list_dir("runs") if r.startswith(f"{self.name}-")]
            if not runs:
                return
            run = max(runs)  # run names carry their start time; a retrain starts a new run
            history = json.loads(self.storage.read_text(f"runs/{run}/{METRICS_FILE}"))
        except (OSError, ValueError):  # not written yet, or being replaced
            return
        if run != self.run_name:
            self.run_name, self.seen = run, 0
        for m in history[self.seen :]:
            line = progress_line(self.name, self.steps, m)
            if line:
                self.log(f"    {line}")
        self.seen = len(history)


def _post_json(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} -> {e.code}: {e.read().decode(errors='replace')[:500]}") from None


def demo_queries(tasks: list[Task], per_task: int) -> list[tuple[Query, str]]:
    """(raw client query, expected answerer): each task's test inputs without the definition, then queries
    that belong to no expert (expected: the base model)."""
    out = [(task.query(x, with_definition=False), task.name) for task in tasks for x in task.test[:per_task]]
    return out + [(q, BASE) for q in unrelated_queries()]


def run_serve_demo(
    *,
    config: str | None = None,
    overrides: list[str] | None = None,
    serve_overrides: list[str] | None = None,
    storage: str,
    train_per_task: int = 96,
    queries_per_task: int = 3,
    workers: int = 2,
    min_accept: float | None = None,
    min_reject: float | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    keep_serving: bool = False,
    threads: int | None = None,
    general_pool: str | None = None,
    log=print,
) -> dict:
    """Run the demo; returns {"url", "results": [{query, expected, expert, answer, trace, ok}], "correct", ...}.

    ``address``: use that running cluster (its Serve proxy; the demo's applications are deleted at the end
    unless ``keep_serving``). None: start a local Ray on 127.0.0.1 and shut it down at the end (with
    ``keep_serving`` the call blocks, serving, until interrupted). ``threads``: torch threads of this process
    for the job's validation step (default: the cores Ray may use here). ``min_accept``/``min_reject``: the
    job's validation bars (default: the job's own). ``general_pool``: the jobs' ``--general-pool`` file (default:
    the job's built-in pool).
    """
    import ray

    from see_ray.serve import deploy_all, url_of
    from see_ray.config.serve import ServeConfig
    from see_ray.registry.storage import Storage
    from see_ray.config.train import JobConfig

    t_start = time.perf_counter()
    overrides = list(overrides or [])
    see, _ = JobConfig.from_yaml(config, overrides).split()  # the job's own config reader: bad input fails here
    scfg = ServeConfig.from_yaml(None, serve_overrides)
    from see_ray.training import add_expert as job

    root = Storage(storage)
    tasks = demo_tasks(n=train_per_task)
    started_ray = False
    if not ray.is_initialized():
        # as the project's local clusters: else Ray's token auth switches itself on and `ray job submit` fails
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if address:
            log(f"[1/5] connecting to Ray at {address}")
            ray.init(address=address, log_to_driver=False)
        else:
            log("[1/5] starting a local Ray instance (127.0.0.1)")
            # no dashboard: ~10 fewer processes on a small machine; worker logs stay in Ray's log files
            # (training progress is followed through _TrainProgress)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False)
            started_ray = True
    else:
        log("[1/5] using the connected Ray cluster")
    log(f"      {ray.cluster_resources().get('CPU', 0):.0f} CPUs; registry {root.uri}; model {see.model.name_or_path}")
    cpus = int(min(ray.cluster_resources().get("CPU", 1), os.cpu_count() or 1))
    threads = threads or max(1, cpus)
    # what the demo deploys (deleted at the end on a cluster that is not the demo's own)
    apps = [scfg.app_name, scfg.base_app, *(scfg.expert_app(t.name) for t in tasks)]
    import torch

    torch_threads = torch.get_num_threads()  # the job sets this process's threads for validation
    try:
        log(f"[2/5] training {len(tasks)} experts with the add-expert job (Ray Train, {workers} worker(s), "
            f"DeepSpeed; {see.training.budget()} each), registering each in the registry")
        work = Path(tempfile.mkdtemp(prefix="see-demo-tasks-"))
        try:
            for i, task in enumerate(tasks, 1):
                t0 = time.perf_counter()
                log(f"  -- expert {i}/{len(tasks)}: {task.name!r} ({task.definition})")
                argv = ["--task", str(write_task_folder(task, work / task.name)), "--name", task.name,
                        "--storage", root.uri, "--workers", str(workers), "--threads", str(threads),
                        *(["--min-accept", str(min_accept)] if min_accept is not None else []),
                        *(["--min-reject", str(min_reject)] if min_reject is not None else []),
                        *(["--general-pool", general_pool] if general_pool else []),
                        *(["--config", config] if config else [])]
                for o in overrides:
                    argv += ["--set", o]
                progress = _TrainProgress(root, task.name, see.training.steps, log)
                progress.start()
                try:
                    with contextlib.redirect_stdout(_DropLines(sys.stdout, job.RESULT_PREFIX)):
                        rc = job.main(argv)
                        sys.stdout.flush()
                finally:
                    progress.done.set()
                    progress.join(timeout=10)
                if rc != 0:
                    raise RuntimeError(f"the add-expert job failed for {task.name!r} (exit code {rc}); see above")
                log(f"  -- expert {task.name!r} registered in {time.perf_counter() - t0:.0f} s")
        finally:
            shutil.rmtree(work, ignore_errors=True)

        log("[3/5] deploying the registry's experts, the base model and the dispatcher on Ray Serve")
        info = deploy_all(see, scfg, root.uri, progress=lambda m: log(f"      {m}"))
        url = url_of(scfg)

        queries = demo_queries(tasks, queries_per_task)
        log(f"[4/5] asking {len(queries)} raw client queries over HTTP: POST {url}/v1/completions "
            f"(model {scfg.model_name!r}: routed by SEE; no task definition)")
        results = []
        for q, expected in queries:
            body = _post_json(f"{url}/v1/completions", {"model": scfg.model_name, "prompt": q.input})
            tr = body["see_routing"]
            answer = body["choices"][0]["text"]
            ok = tr["expert"] == expected
            results.append({"query": q.input, "expected": expected, "expert": tr["expert"], "answer": answer,
                            "trace": tr, "ok": ok})
            asked = ", ".join(f"{a['expert']} p={a['p_accept']:.2f}{'>=' if a['accepted'] else '<'}{a['threshold']:.2f}"
                              for a in tr["asks"])
            log(f"  {'ok ' if ok else 'XX '} {q.input!r:32.32} -> {tr['expert']:10} {answer!r:.40}")
            log(f"       why: {asked or 'no experts'}; {tr['hops']} hop(s), {tr['total_ms']:.0f} ms")
        correct = sum(r["ok"] for r in results)
        total_s = time.perf_counter() - t_start
        log(f"[5/5] routed {correct}/{len(results)} as expected; {total_s:.0f} s in all")
        log(f"      the endpoint: {url}/v1 (OpenAI API; model {scfg.model_name!r}, 'base', or an expert's name); "
            f"registry {root.uri}")
        out = {"url": url, "results": results, "correct": correct, "total": len(results), "total_s": total_s,
               "sequence": [e["name"] for e in info["sequence"]], "storage": root.uri}
        if keep_serving:
            log("      --keep-serving: serving until Ctrl-C; try:")
            log(f"      curl -s {url}/v1/completions -H 'content-type: application/json' "
                f"-d '{{\"model\": \"{scfg.model_name}\", \"prompt\": \"17 + 25\"}}'")
            if started_ray:
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
        return out
    finally:
        torch.set_num_threads(torch_threads)
        if not keep_serving:
            from ray import serve

            if started_ray:
                log("      shutting down the demo's Ray instance")
                serve.shutdown()
                ray.shutdown()
            else:
                for app in apps:  # a shared cluster: remove only what the demo deployed
                    if app in serve.status().applications:
                        serve.delete(app)
        elif started_ray:
            ray.shutdown()
