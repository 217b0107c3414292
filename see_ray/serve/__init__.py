"""Serving SEE on Ray Serve, one module per role:

    schema.py          the OpenAI-compatible HTTP schema, its errors, and the FastAPI application (no Ray)
    ingress.py         Dispatcher: the Serve deployment behind the HTTP API (registry following, admission,
                       endpoints, streaming, metrics); it holds no model
    walk.py            Walker: SEE's walk over the served experts, forced models, re-sent calls (no Ray)
    replica.py         ExpertDeployment / BaseDeployment: the model replicas, batched
    deploy.py          building and deploying the applications; ``build_app`` for Serve config files
    live.py            adding and removing an expert while serving
    shared_weights.py  one copy of the base weights per node, mapped by the CPU replicas

One completion request reads through ingress.py -> walk.py -> replica.py -> core/expert.py (the routing rule
itself: core/routing.py); ``ingress``'s docstring traces it, ``deploy``'s shows the layout on the cluster.

``see_ray.serve:build_app`` is the application builder that Serve config files and the KubeRay manifests name.
The names below are resolved lazily, so that importing one submodule (the HTTP schema, say) does not import
Ray Serve.
"""

import importlib

# name -> the module that defines it (callers import these from see_ray.serve)
_HOMES = {
    # deploy.py
    "build_app": "deploy",
    "deploy_all": "deploy",
    "deploy_models": "deploy",
    "start_serve": "deploy",
    "url_of": "deploy",
    "check_base_of": "deploy",
    "model_fingerprint": "deploy",
    "expert_app": "deploy",
    "base_app": "deploy",
    "dispatcher_app": "deploy",
    # live.py
    "add_expert_live": "live",
    "remove_expert_live": "live",
    "dispatcher_handle": "live",
    "dispatcher_configs": "live",
    "serving_running": "live",
    "live_app_for": "live",
    # the deployments and the walk
    "Dispatcher": "ingress",
    "Walker": "walk",
    "ExpertDeployment": "replica",
    "BaseDeployment": "replica",
    "ModelReplica": "replica",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'see_ray.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"see_ray.serve.{home}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
