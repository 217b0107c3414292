"""The arguments of the SEE application in a Serve config file (``see_ray.serve:build_app``)."""

from __future__ import annotations

from pydantic import Field

from see_ray.config.base import ConfigBase


class AppArgs(ConfigBase):
    """``args`` of the SEE application in a Serve config file (``import_path: see_ray.serve:build_app``).

    Paths are read where the application is built, i.e. on the cluster: ship the files in the image or the
    application's ``runtime_env``, or give everything as overrides.
    """

    storage: str | None = Field(
        None, description="Registry storage URI every node can reach (s3://, gs://, an NFS path, file://...). "
        "None: serve.storage, else $SEE_RAY_STORAGE on the cluster, else ~/see-ray-storage.")
    config: str | None = Field(None, description="YAML with SEE config sections (model, routing, ...).")
    set: list[str] = Field(default_factory=list, description="SEE config overrides, 'section.field=value'.")
    serve_config: str | None = Field(None, description="YAML with the serve settings (see_ray/config/serve.py).")
    serve_set: list[str] = Field(
        default_factory=list, description="Serve config overrides, 'field=value' (e.g. 'expert.num_gpus=1').")
