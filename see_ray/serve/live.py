"""Changing the running SEE application: add or remove one expert without redeploying anything else, and find
the running application (its configs, its registry).

``add_expert_live`` deploys the expert as its own application and tells the dispatcher to refresh;
``remove_expert_live`` takes the expert out of every dispatcher replica's sequence, waits for its in-flight
asks, then deletes its application. Both need Ray connected to the cluster that serves.
"""

import time

from ray import serve

from see_ray.config import SEEConfig
from see_ray.config.serve import ServeConfig
from see_ray.core.data import validate_name
from see_ray.serve.deploy import check_base_of, expert_app


def dispatcher_handle(scfg: ServeConfig | None = None, app_name: str | None = None):
    return serve.get_app_handle(app_name or (scfg.app_name if scfg else ServeConfig().app_name))


def add_expert_live(name: str, app_name: str = "see", timeout_s: float = 300.0) -> dict:
    """Deploy a registered expert as its own application and put it into the running dispatcher's sequence.

    Uses the configs the dispatcher serves with (so the replica matches the others) and the dispatcher's
    registry. Nothing running is redeployed: the new application starts, and once it has a running replica
    the dispatcher is told to refresh. Returns the dispatcher's new sequence info.
    """
    from see_ray.registry import Registry

    d = dispatcher_handle(app_name=app_name)
    conf = d.configs.remote().result(timeout_s=60)
    see, scfg, storage = SEEConfig.model_validate(conf["see"]), ServeConfig.model_validate(conf["serve"]), conf["storage"]
    rec = Registry(storage).get(name)  # validates the name
    check_base_of([rec], see)
    serve.run(expert_app(rec, see, scfg, storage), name=scfg.expert_app(name), route_prefix=None)
    deadline = time.monotonic() + timeout_s
    while True:
        info = d.refresh.remote().result(timeout_s=60)
        if any(e["name"] == name for e in info["sequence"]) or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def remove_expert_live(name: str, app_name: str = "see", drain_timeout_s: float = 60.0) -> dict:
    """Take an expert out of the sequence first, then tear down its deployment.

    Call after the registry marked it disabled/removed: the dispatcher refreshes (it drops the expert from
    new walks), waits until every dispatcher replica has polled and the expert's in-flight asks finished,
    and only then deletes the expert's application.
    """
    validate_name(name, "expert name")
    d = dispatcher_handle(app_name=app_name)
    conf = d.configs.remote().result(timeout_s=60)
    scfg = ServeConfig.model_validate(conf["serve"])
    info = d.refresh.remote().result(timeout_s=60)
    if any(e["name"] == name for e in info["sequence"]):
        raise RuntimeError(f"expert {name!r} is still active in the registry; disable or remove it there first")
    time.sleep(scfg.dispatch.registry_poll_s * 1.5)  # other dispatcher replicas poll on their own
    deadline = time.monotonic() + drain_timeout_s
    while d.inflight_of.remote(name).result(timeout_s=30) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    app = scfg.expert_app(name)
    if app in serve.status().applications:
        serve.delete(app)
    return d.refresh.remote().result(timeout_s=60)


def dispatcher_configs(app_name: str = "see") -> dict | None:
    """The configs of the running SEE application ``app_name``, or None if it is not running."""
    if app_name not in serve.status().applications:
        return None
    return dispatcher_handle(app_name=app_name).configs.remote().result(timeout_s=60)


def serving_running() -> bool:
    """Is a Ray Serve controller alive on the connected cluster? (looked up by name; nothing is started)."""
    import ray

    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except Exception:  # ValueError: no controller; anything else (no Serve, unreachable GCS): not running either
        return False


def live_app_for(storage_uri: str, app_name: str = "see") -> tuple[dict | None, str]:
    """The configs of the running SEE application ``app_name`` if it serves the registry at ``storage_uri``;
    else None and why not. Ray must be connected. Used by the add-expert job (step 6) and the registry CLI."""
    from see_ray.registry.storage import Storage

    if not serving_running():
        return None, "serving is not running"
    conf = dispatcher_configs(app_name)
    if conf is None:
        return None, f"Serve is running but has no SEE application {app_name!r}"
    if Storage(conf["storage"]).uri != Storage(storage_uri).uri:
        return None, f"the running SEE application serves the registry {conf['storage']}, not {storage_uri}"
    return conf, "serving"
