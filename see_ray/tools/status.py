"""``see-ray status``: the expert sequence, each expert's deployment state and replicas, storage, dashboard.

    see-ray status [--storage URI] [--address ADDR] [--app see] [--json]

Reads the registry (no cluster needed) and, when a Ray cluster is reachable (``--address``, ``$RAY_ADDRESS``,
else the local one), Serve's status and the running SEE application's own view (which registry it serves, which
experts are in its sequence). Without a cluster, or without Serve, it still prints the registry's sequence and
says plainly that serving is not running. Nothing is started or changed.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from see_ray.core.routing import ordered
from see_ray.registry import Registry, RegistryError
from see_ray.registry.storage import Storage, StorageError, default_storage_uri


def add_status_subcommand(subparsers) -> None:
    p = subparsers.add_parser("status", help="expert sequence, deployments and replicas, storage, dashboard URL")
    p.add_argument("--storage", help="registry storage root (default: the one the running application serves, "
                   "else $SEE_RAY_STORAGE or ~/see-ray-storage)")
    p.add_argument("--address", help="Ray cluster (GCS) address (default $RAY_ADDRESS, else the local cluster)")
    p.add_argument("--app", default=None, help="the SEE Serve application (default $SEE_RAY_SERVE_APP or 'see')")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(fn=cmd_status)


def _state(x: Any) -> str:
    return str(getattr(x, "value", x))


def _running_replicas(dep_status) -> int:
    if dep_status is None:
        return 0
    return sum(n for k, n in dep_status.replica_states.items() if _state(k) == "RUNNING")


def _connect(address: str | None) -> tuple[dict | None, str | None]:
    """(ray info, None) when a cluster is reachable, else (None, why not)."""
    import ray

    if ray.is_initialized():
        from ray._private.worker import get_dashboard_url

        return {"address": "(this process's cluster)", "dashboard": _http(get_dashboard_url())}, None
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    if "://" in target:
        return None, f"{target!r} is not a GCS address (give host:port of the head, e.g. 127.0.0.1:6379)"
    # Probe first: ray.init retries an unreachable GCS for minutes, and a status command must answer quickly.
    from ray._private.services import canonicalize_bootstrap_address

    try:
        gcs = canonicalize_bootstrap_address(target)
    except Exception as e:  # no cluster recorded for "auto", or a malformed address
        return None, f"no Ray cluster found at {target!r} ({str(e).splitlines()[0][:160]})"
    if gcs is None:
        return None, f"no Ray cluster found at {target!r}"
    host, _, port = gcs.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        return None, f"no Ray cluster reachable at {gcs} ({e.strerror or e})"
    try:
        ctx = ray.init(address=gcs, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as e:
        return None, f"no Ray cluster reachable at {target!r} ({str(e).splitlines()[0][:160]})"
    return {"address": ctx.address_info.get("gcs_address", target), "dashboard": _http(ctx.dashboard_url)}, None


def _http(url: str | None) -> str | None:
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def collect(storage: str | None = None, address: str | None = None, app: str | None = None) -> dict:
    """The status as a dict (what ``--json`` prints)."""
    from see_ray.config.serve import ServeConfig

    app = app or os.environ.get("SEE_RAY_SERVE_APP", "see")
    out: dict[str, Any] = {"ray": None, "serving": {"running": False, "app": app}}
    ray_info, why = _connect(address)
    serve_status, conf, seq_info = None, None, None
    if ray_info is None:
        out["serving"]["message"] = f"serving is not running: {why}"
    else:
        out["ray"] = ray_info
        from ray import serve

        from see_ray.serve import dispatcher_configs, dispatcher_handle, serving_running

        if not serving_running():
            out["serving"]["message"] = "serving is not running: no Ray Serve on this cluster (start it: see-ray serve)"
        else:
            serve_status = serve.status().applications
            if app not in serve_status:
                out["serving"]["message"] = (f"serving is not running: Ray Serve runs applications "
                                             f"{sorted(serve_status)} but no SEE application {app!r} (--app)")
            else:
                out["serving"]["status"] = _state(serve_status[app].status)
                try:
                    conf = dispatcher_configs(app)
                    seq_info = dispatcher_handle(app_name=app).refresh.remote().result(timeout_s=60)
                except Exception as e:  # the application exists but its dispatcher does not answer
                    out["serving"]["message"] = f"application {app!r} is {out['serving']['status']} but its " \
                                                f"dispatcher does not answer ({type(e).__name__})"
    scfg = ServeConfig.model_validate(conf["serve"]) if conf else ServeConfig(app_name=app)
    served_storage = conf["storage"] if conf else None
    uri = Storage(storage or served_storage or default_storage_uri()).uri
    out["storage"] = uri
    if conf:
        from see_ray.serve import url_of

        out["serving"].update(running=True, url=url_of(scfg), storage=served_storage,
                              mode=conf["serve"]["dispatch"]["mode"], order=conf["see"]["routing"]["order"])
        if served_storage and Storage(served_storage).uri != uri:
            out["serving"]["message"] = f"note: the running application serves the registry {served_storage}"
        disp = serve_status[app].deployments.get("dispatcher")
        base = serve_status.get(scfg.base_app)
        out["serving"]["dispatcher_replicas"] = _running_replicas(disp)
        out["serving"]["base"] = {
            "app": scfg.base_app, "state": _state(base.status) if base else "not deployed",
            "replicas": _running_replicas(base.deployments.get("base")) if base else 0,
        }
    order = out["serving"].get("order", "newest_first")
    recs = Registry(uri).list()
    in_seq = {e["name"] for e in (seq_info or {}).get("sequence", [])}
    experts = []
    for rec in ordered(recs, order):
        e = {"name": rec.name, "task": rec.task, "version": rec.version, "position": rec.position,
             "registry_status": rec.status, "threshold": rec.threshold}
        if conf:  # expert applications are named by the running SEE application's settings: only then known
            st = serve_status.get(scfg.expert_app(rec.name))
            e["app"] = scfg.expert_app(rec.name)
            e["deployment"] = _state(st.status) if st else "not deployed"
            e["replicas"] = _running_replicas(st.deployments.get(rec.name)) if st else 0
            e["in_sequence"] = rec.name in in_seq
        experts.append(e)
    out["experts"] = experts
    return out


def format_status(st: dict) -> str:
    s = st["serving"]
    lines = [f"storage     {st['storage']}"]
    if st["ray"]:
        lines.append(f"ray         {st['ray']['address']}   dashboard {st['ray']['dashboard'] or '(not running)'}")
    else:
        lines.append("ray         (no cluster)")
    if s["running"]:
        b = s["base"]
        lines.append(f"serving     {s['url']}/v1  application {s['app']!r} {s['status']}, mode {s['mode']}, "
                     f"dispatcher {s['dispatcher_replicas']} replica(s), base {b['state']} {b['replicas']} replica(s)")
    if s.get("message"):
        lines.append(("serving     " if not s["running"] else "            ") + s["message"])
    ex = st["experts"]
    order = s.get("order", "newest_first")
    lines.append(f"expert sequence ({order.replace('_', ' ')}; {len(ex)} expert(s)):")
    if not ex:
        lines.append("  (no experts registered)")
        return "\n".join(lines)
    head = f"  {'#':>2} {'name':<20} {'task':<18} {'ver':>3} {'registry':<9} {'deployment':<13} {'replicas':>8}"
    lines.append(head + ("  in sequence" if s["running"] else ""))
    for i, e in enumerate(ex, 1):
        row = (f"  {i:>2} {e['name']:<20} {e['task']:<18} {e['version']:>3} {e['registry_status']:<9} "
               f"{e.get('deployment', '-'):<13} {e.get('replicas', '-')!s:>8}")
        if s["running"]:
            row += "  " + ("yes" if e.get("in_sequence") else "no")
        lines.append(row)
    return "\n".join(lines)


def cmd_status(args) -> int:
    try:
        st = collect(args.storage, args.address, args.app)
    except (RegistryError, StorageError) as e:
        print(f"see-ray status: {e}")
        return 2
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0
