"""``see-ray serve``: start (or connect to) Ray, deploy the registry's experts, the base and the dispatcher.

    see-ray serve [--storage DIR] [--address ADDR] [--port 8000] [--mode sequential|concurrent]
                  [--serve-config serve.yaml] [--serve-set dispatch.width=8] [--config see.yaml] [--set ...]
                  [--detach]

Without ``--address`` (and without ``RAY_ADDRESS``) a local Ray instance is started in this process, and the
command keeps running (Ctrl-C stops serving); with ``--detach`` against a running cluster it returns once
everything is deployed. Hooked into ``see_ray.tools.cli`` through ``add_serve_subcommands(subparsers)``.
"""

from __future__ import annotations

import argparse
import os
import time


def add_serve_subcommands(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the registry's experts behind an OpenAI-compatible endpoint")
    p.add_argument("--config", help="YAML with SEE config sections (model, routing, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="SEE config override (repeatable)")
    p.add_argument("--serve-config", help="YAML with the serve settings (see see_ray/config/serve.py)")
    p.add_argument("--serve-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="serve config override, e.g. --serve-set expert.autoscaling.max_replicas=4 (repeatable)")
    p.add_argument("--storage", help="registry storage root (default $SEE_RAY_STORAGE or ~/see-ray-storage)")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--mode", choices=["sequential", "concurrent"], help="dispatch mode")
    p.add_argument("--num-cpus", type=int, help="CPUs of a locally started Ray (default: all)")
    p.add_argument("--detach", action="store_true", help="return after deploying (needs a running cluster)")
    p.set_defaults(fn=cmd_serve)


def serve_config_from_args(args):
    from see_ray.config.serve import ServeConfig

    sets = list(args.serve_set)
    if args.host:
        sets.append(f"host={args.host}")
    if args.port:
        sets.append(f"port={args.port}")
    if args.mode:
        sets.append(f"dispatch.mode={args.mode}")
    scfg = ServeConfig.from_yaml(args.serve_config, sets)
    if args.storage:
        scfg.storage = args.storage
    return scfg


def cmd_serve(args) -> int:
    import ray

    from see_ray.config import SEEConfig
    from see_ray.serve import deploy_all, url_of
    from see_ray.registry.storage import Storage, default_storage_uri

    see = SEEConfig.from_yaml(args.config, args.overrides)
    scfg = serve_config_from_args(args)
    storage = Storage(scfg.storage or default_storage_uri()).uri
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.detach and not address:
        raise SystemExit("see-ray serve: --detach needs a running cluster (--address or RAY_ADDRESS)")
    t0 = time.perf_counter()
    if address:
        print(f"[serve] connecting to Ray at {address}", flush=True)
        ray.init(address=address, log_to_driver=False)
    else:
        # as the project's local clusters: else Ray's token auth switches itself on and `ray job submit` fails
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        print("[serve] starting a local Ray instance", flush=True)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    print(f"[serve] registry {storage}", flush=True)
    auth = scfg.auth
    if not auth.api_key_file and not (auth.api_key_env and os.environ.get(auth.api_key_env)):
        where = "127.0.0.1 only" if scfg.host in ("127.0.0.1", "localhost", "::1") else f"{scfg.host}: EXPOSED"
        print(f"[serve] no API key configured ({auth.api_key_env or 'auth.api_key_file'}): the API is open "
              f"({where})", flush=True)
    info = deploy_all(see, scfg, storage, progress=lambda m: print(f"[serve] {m}", flush=True))
    url = url_of(scfg)
    print(f"[serve] ready in {time.perf_counter() - t0:.0f} s: {url}/v1 (model {scfg.model_name!r}, "
          f"{len(info['sequence'])} expert(s), mode {scfg.dispatch.mode})", flush=True)
    print(f"[serve] Ray cluster {ray.get_runtime_context().gcs_address} (`see-ray registry --address` it to "
          "change the live sequence)", flush=True)
    print(f"SEE_RAY_SERVE_URL={url}", flush=True)
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        from see_ray.serve.shared_weights import drop_holders

        print("[serve] stopping", flush=True)
        serve.shutdown()
        drop_holders()  # the nodes' shared base copies outlive Serve (detached holders) until dropped
        return 0


def build_standalone_parser() -> argparse.ArgumentParser:  # for `python -m see_ray.tools.serve_cli`
    ap = argparse.ArgumentParser(prog="see-ray")
    add_serve_subcommands(ap.add_subparsers(dest="command", required=True))
    return ap


if __name__ == "__main__":  # pragma: no cover
    import sys

    a = build_standalone_parser().parse_args(sys.argv[1:])
    sys.exit(a.fn(a))
