"""Security rules that need no cluster: the API key source, name validation on every entry point, pickle
adapters refused, one base model per registry, request limits. The same rules over real HTTP (401, 429,
413, 400) are in test_serve_reliability.py."""

from __future__ import annotations

import shutil

import pytest

from see_ray.serve.schema import APIError, ChatRequest, CompletionRequest, parse_body
from see_ray.core.expert import AdapterError, check_adapter_folder
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
from see_ray.tools.registry_cli import main as registry_main
from see_ray.config.serve import (
    APIKeyError,
    AuthSettings,
    LimitSettings,
    ServeConfig,
    load_api_key,
)

SECRET = "sk-test-0123456789abcdef"


# -- API key -----------------------------------------------------------------------------------------------
def test_api_key_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SEE_RAY_API_KEY", raising=False)
    assert load_api_key(AuthSettings()) is None  # no key anywhere: open API
    monkeypatch.setenv("SEE_RAY_API_KEY", SECRET)
    key = load_api_key(AuthSettings())
    assert key.get_secret_value() == SECRET
    assert SECRET not in repr(key) and SECRET not in str(key)  # masked if it ever reaches a log line
    assert load_api_key(AuthSettings(api_key_env=None)) is None
    f = tmp_path / "key"
    f.write_text("sk-from-file\n")
    assert load_api_key(AuthSettings(api_key_file=str(f))).get_secret_value() == "sk-from-file"  # file wins


def test_api_key_file_problems_are_named(tmp_path):
    with pytest.raises(APIKeyError, match=r"auth.api_key_file .*missing.*cannot read"):
        load_api_key(AuthSettings(api_key_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(APIKeyError, match="the file is empty"):
        load_api_key(AuthSettings(api_key_file=str(tmp_path / "empty")))


def test_key_never_in_config_dumps(tmp_path, monkeypatch):
    """The config names where the key is, never the key: dumps, reprs and YAML carry no secret."""
    monkeypatch.setenv("SEE_RAY_API_KEY", SECRET)
    f = tmp_path / "key"
    f.write_text(SECRET)
    scfg = ServeConfig.from_yaml(None, [f"auth.api_key_file={f}"])
    for text in (repr(scfg), str(scfg), scfg.model_dump_json()):
        assert SECRET not in text
    assert "api_key" not in ServeConfig.model_fields  # no field could ever hold the key itself


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


def test_model_name_in_config_is_validated():
    with pytest.raises(Exception, match="model_name"):
        ServeConfig(model_name="see/../x")


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


# -- request limits -----------------------------------------------------------------------------------------
def _err(raw: bytes, model=CompletionRequest, limits: LimitSettings | None = None) -> APIError:
    with pytest.raises(APIError) as e:
        parse_body(raw, model, limits or LimitSettings())
    return e.value


def test_limits_have_safe_defaults():
    lim = LimitSettings()
    assert lim.max_tokens == 256 and lim.max_prompt_chars == 16_000 and lim.max_body_bytes == 256 * 1024
    assert lim.max_concurrent_per_client == 32
    with pytest.raises(Exception):
        LimitSettings(max_concurrent_per_client=0)


def test_oversized_prompt_400_and_body_413():
    lim = LimitSettings(max_prompt_chars=100, max_body_bytes=2048)
    e = _err(b'{"model": "see", "prompt": "' + b"x" * 101 + b'"}', limits=lim)
    assert (e.status, e.code, e.param) == (400, "prompt_too_long", "prompt")
    body = b'{"model": "see", "messages": [{"role": "user", "content": "' + b"y" * 101 + b'"}]}'
    e = _err(body, ChatRequest, lim)
    assert (e.status, e.code, e.param) == (400, "prompt_too_long", "messages")
    e = _err(b'{"model": "see", "prompt": "' + b"z" * 3000 + b'"}', limits=lim)
    assert (e.status, e.code) == (413, "body_too_large")
    e = _err(b'{"model": "see", "prompt": "hi", "max_tokens": 257}')
    assert (e.status, e.param) == (422, "max_tokens")
