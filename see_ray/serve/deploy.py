"""Building and deploying the SEE applications on Ray Serve.

Layout on the cluster: every expert is its own Serve *application*, so adding, replacing or removing one never
redeploys (and never restarts) anything else; redeploying one application with all experts restarted every
replica, even for a change of configuration only.

    application  see-expert-<name>   deployment <name>       replica.ExpertDeployment: base model + that adapter
    application  see-base            deployment base         replica.BaseDeployment: the base model alone
    application  see                 deployment dispatcher   ingress.Dispatcher: FastAPI ingress at '/', no model

(application names and route prefix from the serve settings: ``expert_app``, ``base_app``, ``app_name``,
``route_prefix``). ``deploy_all`` deploys the registry's active experts and the base, waits until they run,
then the dispatcher; ``build_app`` is the same for Serve config files (``import_path: see_ray.serve:build_app``).
Adding and removing experts while serving: ``live.py``.
"""

# No `from __future__ import annotations` here: Serve validates build_app's args against its real annotation.
import json
import logging
import time

from ray import serve

from see_ray.config import SEEConfig
from see_ray.config.app import AppArgs
from see_ray.config.constants import BASE_DEPLOYMENT
from see_ray.config.serve import ServeConfig
from see_ray.serve.ingress import Dispatcher
from see_ray.serve.replica import BaseDeployment, ExpertDeployment

log = logging.getLogger(__name__)


def _dump(cfg) -> dict:
    return json.loads(cfg.model_dump_json())


def model_fingerprint(record: dict | None, storage_uri: str | None, see_cfg: dict, serve_cfg: dict) -> str:
    """What a model replica was built from: the record (None: the base), storage, SEE config and the parts of
    the serve config a model replica uses (its replica settings and batching). ``build_app`` leaves a running
    model application alone when this is unchanged, so that re-applying a Serve config restarts nothing."""
    import hashlib

    scfg = ServeConfig.model_validate(serve_cfg)
    replica = scfg.base if record is None else scfg.expert_settings(record["name"])
    doc = {"record": record, "storage": storage_uri, "see": see_cfg,
           "replica": _dump(replica), "batch": _dump(scfg.batch)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expert_app(rec, see: SEEConfig, scfg: ServeConfig, storage_uri: str):
    r = scfg.expert_settings(rec.name)
    return ExpertDeployment.options(
        name=rec.name,
        ray_actor_options=r.actor_options(),
        autoscaling_config=r.autoscaling.serve_dict(),
        max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests,
    ).bind(rec.model_dump(mode="json"), storage_uri, _dump(see), _dump(scfg))


def base_app(see: SEEConfig, scfg: ServeConfig):
    r = scfg.base
    return BaseDeployment.options(
        ray_actor_options=r.actor_options(),
        autoscaling_config=r.autoscaling.serve_dict(),
        max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests,
    ).bind(_dump(see), _dump(scfg))


def dispatcher_app(see: SEEConfig, scfg: ServeConfig, storage_uri: str):
    return Dispatcher.options(
        num_replicas=scfg.dispatcher_replicas,
        ray_actor_options={"num_cpus": scfg.dispatcher_num_cpus},
    ).bind(_dump(see), _dump(scfg), storage_uri)


def start_serve(scfg: ServeConfig) -> None:
    """Start Serve's HTTP proxy on host:port (a no-op when Serve already runs on this cluster)."""
    serve.start(http_options={"host": scfg.host, "port": scfg.port})


def url_of(scfg: ServeConfig) -> str:
    """The API's base URL (OpenAI clients append /v1/...)."""
    return f"http://{scfg.host}:{scfg.port}{scfg.route_prefix.rstrip('/')}"


def check_base_of(recs, see: SEEConfig) -> None:
    """Raise BaseModelMismatch if any record was trained on another base than ``see.model`` (fingerprints)."""
    from see_ray.core.model import fingerprint, resolve_model_path
    from see_ray.registry import check_served_base

    if recs:
        path = resolve_model_path(see.model)
        check_served_base(recs, fingerprint(path), see.model.name_or_path)


def _running_fingerprint(app: str, deployment: str) -> str | None:
    """The fingerprint a RUNNING model application reports (None: absent, not running, or not answering)."""
    st = serve.status().applications.get(app)
    if st is None or str(getattr(st.status, "value", st.status)) != "RUNNING":
        return None
    try:
        return serve.get_deployment_handle(deployment, app).info.remote().result(timeout_s=30).get("fingerprint")
    except Exception:  # a replica that cannot answer is redeployed
        return None


def deploy_models(see: SEEConfig, scfg: ServeConfig, storage_uri: str, progress=print,
                  keep_unchanged: bool = False) -> list[str]:
    """Deploy the registry's active experts and the base, each as its own application, and wait until they
    run. ``keep_unchanged``: leave applications alone whose replicas were built from the same inputs
    (``model_fingerprint``). Returns the applications (re)deployed."""
    from ray.serve import RunTarget

    from see_ray.registry import Registry

    recs = [r for r in Registry(storage_uri).list() if r.status == "active"]
    check_base_of(recs, see)  # before anything is deployed; every expert replica checks again
    see_d, scfg_d = _dump(see), _dump(scfg)
    wanted = [(scfg.expert_app(r.name), r.name, model_fingerprint(r.model_dump(mode="json"), storage_uri, see_d, scfg_d),
               lambda r=r: expert_app(r, see, scfg, storage_uri)) for r in recs]
    wanted.append((scfg.base_app, BASE_DEPLOYMENT, model_fingerprint(None, None, see_d, scfg_d),
                   lambda: base_app(see, scfg)))
    targets, kept = [], []
    for app, dep, fp, make in wanted:
        if keep_unchanged and _running_fingerprint(app, dep) == fp:
            kept.append(app)
        else:
            targets.append(RunTarget(make(), name=app, route_prefix=None))
    t0 = time.perf_counter()
    progress(f"deploying {len(recs)} expert(s) {[r.name for r in recs]} and the base model"
             + (f" (unchanged, kept running: {kept})" if kept else "") + " ...")
    if targets:
        serve.run_many(targets, wait_for_applications_running=True)
    progress(f"model deployments running after {time.perf_counter() - t0:.0f} s")
    return [t.name for t in targets]


def deploy_all(see: SEEConfig, scfg: ServeConfig, storage_uri: str, progress=print) -> dict:
    """Deploy the registry's active experts, the base and the dispatcher (all applications at once)."""
    start_serve(scfg)
    t0 = time.perf_counter()
    deploy_models(see, scfg, storage_uri, progress)
    progress("deploying the dispatcher ...")
    serve.run(dispatcher_app(see, scfg, storage_uri), name=scfg.app_name, route_prefix=scfg.route_prefix)
    info = serve.get_app_handle(scfg.app_name).refresh.remote().result()
    progress(f"serving at {url_of(scfg)} ({time.perf_counter() - t0:.0f} s); sequence "
             f"{[e['name'] for e in info['sequence']]}")
    return info


def build_app(args: AppArgs):
    """Serve application builder for config files (``serve deploy``, KubeRay's ``serveConfigV2``).

    Builds the configs from ``args``, deploys the registry's experts and the base as their own applications
    (the same layout and code as ``deploy_all``; unchanged running ones are kept, so re-applying a config
    restarts nothing) and waits until they run, then returns the dispatcher application, which Serve deploys
    under the config's name and route_prefix. Those must equal ``app_name`` / ``route_prefix`` of the serve
    settings (the dispatcher refuses to start otherwise): jobs find the application by that name.
    Waiting here keeps the SEE application DEPLOYING until its experts can answer, so a RayService switches
    traffic to a new cluster only once the whole sequence is up.
    """
    from see_ray.registry.storage import Storage, default_storage_uri

    if isinstance(args, dict):  # Serve validates against the annotation; direct callers may pass a dict
        args = AppArgs.model_validate(args)
    see = SEEConfig.from_yaml(args.config, args.set)
    scfg = ServeConfig.from_yaml(args.serve_config, args.serve_set)
    storage = Storage(args.storage or scfg.storage or default_storage_uri()).uri
    scfg.storage = storage
    deploy_models(see, scfg, storage, progress=log.info, keep_unchanged=True)
    return dispatcher_app(see, scfg, storage)
