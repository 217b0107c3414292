"""Security rules that need no cluster: name validation on every entry point, pickle adapters refused, one
base model per registry."""

from __future__ import annotations

import shutil

import pytest

from see_ray.expert import AdapterError, check_adapter_folder
from see_ray.registry import (
    BaseModelIdentity,
    BaseModelMismatch,
    ExpertRecord,
    Indicators,
    NewExpert,
    Registry,
    RegistryError,
    check_served_base,
)
from see_ray.registry_cli import main as registry_main

# -- names --------------------------------------------------------------------------------------------------
BAD_NAMES = ["../etc", "a/b", "x;rm -rf ~", "$(id)", "a b", "", ".hidden", "-flag", "n" * 65, "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_registry_refuses_bad_names_everywhere(tmp_path, name):
    reg = Registry(str(tmp_path / "reg"))
    for call in (lambda: reg.get(name), lambda: reg.disable(name), lambda: reg.enable(name),
                 lambda: reg.remove(name, purge=True), lambda: reg.check_can_add(name, "task", False),
                 lambda: reg.check_can_add("ok", name, False)):
        with pytest.raises(RegistryError, match="invalid: use 1-64 characters"):
            call()
    assert not (tmp_path / "reg" / "registry.json").exists()


def test_registry_cli_refuses_bad_name(tmp_path, capsys):
    assert registry_main(["--storage", str(tmp_path), "remove", "../../etc", "--purge"]) == 2
    assert "expert name '../../etc' is invalid" in capsys.readouterr().err


# -- adapters -----------------------------------------------------------------------------------------------
def test_pickle_next_to_safetensors_is_refused(see_expert1, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(see_expert1["path"], folder)
    check_adapter_folder(folder)  # a clean folder passes
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterError, match=r"pickle-format file\(s\) \['adapter_model.bin'\]; only safetensors"):
        check_adapter_folder(folder)


def _new(name: str, task: str, adapter: str, fp: str) -> NewExpert:
    return NewExpert(name=name, task=task, adapter_dir=adapter,
                     base_model=BaseModelIdentity(name_or_path="base-" + fp, fingerprint=fp),
                     indicators=Indicators(accept=" accept", reject=" reject"))


def test_registry_refuses_adapter_of_another_base(see_expert1, tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    reg.add(_new("one", "t1", see_expert1["path"], "a" * 64))
    before = (tmp_path / "reg" / "registry.json").read_bytes()
    with pytest.raises(BaseModelMismatch, match=r"trained on base base-bbb.*fingerprint bbbbbbbbbbbb.*\['one'\]"):
        reg.add(_new("two", "t2", see_expert1["path"], "b" * 64))
    assert (tmp_path / "reg" / "registry.json").read_bytes() == before
    assert not (tmp_path / "reg" / "adapters" / "two").exists()
    # replacing the only expert with one of a new base is allowed (it leaves no other base behind)
    rec = reg.add(_new("one", "t1", see_expert1["path"], "b" * 64), replace=True)
    assert rec.version == 2


def test_serving_refuses_records_of_another_base(see_expert1, tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    rec: ExpertRecord = reg.add(_new("one", "t1", see_expert1["path"], "a" * 64))
    check_served_base([rec], "a" * 64, "served")
    with pytest.raises(BaseModelMismatch, match=r"refusing to serve .*one \(base base-aaa.*served base served"):
        check_served_base([rec], "c" * 64, "served")
