"""``see-ray registry list|show|disable|enable|remove``: the registry from the command line.

Hooked into ``see_ray/tools/cli.py`` with ``add_registry_subcommands(subparsers)``; every subcommand sets
``args.fn`` to a function ``(args) -> exit code`` (registry errors become a message and exit code 2).
Reading needs no cluster (the registry is a document in the storage root); writes on an object-store root
need a Ray cluster for the lock (RAY_ADDRESS).

Serving follows the registry: with ``--address`` (or ``RAY_ADDRESS``) pointing at the cluster that serves this
registry, ``disable`` and ``remove`` take the expert out of the dispatcher's sequence first and then tear its
deployment down (``serve.remove_expert_live``), and ``enable`` deploys it again and puts it back
(``serve.add_expert_live``). Without an address the running dispatcher still drops a disabled or removed
expert from its sequence at its next registry poll, but its deployment keeps running.
Also runnable alone: ``python -m see_ray.tools.registry_cli list``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from see_ray.registry import Registry, RegistryError, format_sequence
from see_ray.registry.storage import StorageError, default_storage_uri


def add_registry_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add ``registry`` with its own subcommands to an argparse ``subparsers`` object; returns its parser."""
    p = subparsers.add_parser("registry", help="list and manage the registered experts")
    p.add_argument(
        "--storage", default=None, help=f"storage root (default $SEE_RAY_STORAGE or {default_storage_uri()})"
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster serving this registry (default $RAY_ADDRESS): disable/remove/"
        "enable then change the live sequence and deployments too; without one, serving is not touched"
    )
    p.add_argument("--app", default="see", help="Serve application of the SEE dispatcher (default see)")
    sub = p.add_subparsers(dest="registry_command", metavar="{list,show,disable,enable,remove}")
    sub.required = True

    q = sub.add_parser("list", help="the expert sequence, in routing order")
    q.add_argument("--order", choices=["newest_first", "oldest_first"], default="newest_first")
    q.add_argument("--json", action="store_true", help="print the records as JSON")
    q.add_argument("--retired", action="store_true", help="also list replaced and removed versions")
    q.set_defaults(fn=_guard(_list))

    q = sub.add_parser("show", help="one expert's full record (JSON)")
    q.add_argument("name")
    q.set_defaults(fn=_guard(_show))

    for cmd, helptext in (("disable", "keep in the sequence, but routing skips it"), ("enable", "undo disable")):
        q = sub.add_parser(cmd, help=helptext)
        q.add_argument("name")
        q.set_defaults(fn=_guard(_set_status), action=cmd)

    q = sub.add_parser("remove", help="take an expert out of the sequence (files kept unless --purge)")
    q.add_argument("name")
    q.add_argument("--purge", action="store_true", help="also delete every version's adapter and rehearsal files")
    q.set_defaults(fn=_guard(_remove))
    return p


def _registry(args) -> Registry:
    return Registry(args.storage or default_storage_uri())


def _list(args) -> int:
    doc = _registry(args).load()
    if args.json:
        out = {"experts": [e.model_dump(mode="json") for e in doc.experts]}
        if args.retired:
            out["retired"] = [e.model_dump(mode="json") for e in doc.retired]
        print(json.dumps(out, indent=2))
        return 0
    print(format_sequence(doc.experts, args.order))
    if args.retired and doc.retired:
        print("\nretired:")
        for e in doc.retired:
            print(f"  {e.name} v{e.version} ({e.status}) {e.adapter_uri}")
    return 0


def _show(args) -> int:
    print(json.dumps(_registry(args).get(args.name).model_dump(mode="json"), indent=2))
    return 0


def _set_status(args) -> int:
    reg = _registry(args)
    rec = reg.disable(args.name) if args.action == "disable" else reg.enable(args.name)
    print(f"{rec.name}: {rec.status}")
    return _sync_serving(args, reg, rec.name, active=args.action == "enable")


def _remove(args) -> int:
    reg = _registry(args)
    rec = reg.remove(args.name, purge=args.purge)
    print(f"{rec.name}: removed{' and purged' if args.purge else ' (files kept; --purge deletes them)'}")
    return _sync_serving(args, reg, rec.name, active=False)


def _sync_serving(args, reg: Registry, name: str, active: bool) -> int:
    """Apply a registry change to the live service (when one serves this registry on the given cluster).

    The registry is the source of truth and already changed; a failure here leaves serving behind it (the
    dispatcher's poll still drops an inactive expert), is reported, and exits 1.
    """
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        print("serving: not touched (no --address or RAY_ADDRESS)")
        return 0
    try:
        import ray

        from see_ray.serve import add_expert_live, live_app_for, remove_expert_live

        if not ray.is_initialized():
            # as the project's local clusters: else Ray's token auth switches itself on and `ray job submit` fails
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address=address, log_to_driver=False)
        conf, why = live_app_for(reg.storage.uri, args.app)
        if conf is None:
            print(f"serving: not touched ({why})")
            return 0
        if active:
            info = add_expert_live(name, args.app)
            what = "deployed and put into the sequence"
        else:
            info = remove_expert_live(name, args.app)
            what = "taken out of the sequence, then its deployment torn down"
    except Exception as e:  # noqa: BLE001 - the registry change stands; say what did not happen
        print(f"see-ray registry: the registry changed, but updating serving at {address} failed: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"serving: {name} {what}; sequence now {[e['name'] for e in info['sequence']]}")
    return 0


def _guard(fn):
    """Registry and storage errors become one line on stderr and exit code 2 (no traceback)."""

    def run(args) -> int:
        try:
            return fn(args)
        except (RegistryError, StorageError) as e:
            print(f"see-ray registry: {e}", file=sys.stderr)
            return 2

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="see-ray")
    add_registry_subcommands(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "registry":  # standalone: `python -m see_ray.tools.registry_cli list`
        argv = ["registry", *argv]
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
