"""Serving SEE on Ray Serve (see ``app`` for the layout on the cluster).

``see_ray.serve:build_app`` is the application builder that Serve config files and the KubeRay manifests name.
Names are resolved lazily so that importing a submodule (the HTTP schema, say) does not import Ray Serve.
"""

import importlib


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    app = importlib.import_module("see_ray.serve.app")
    try:
        return getattr(app, name)
    except AttributeError:
        raise AttributeError(f"module 'see_ray.serve' has no attribute {name!r}") from None
