"""API key parsing and checking (raystack.serving.auth)."""

from __future__ import annotations

import pytest

from raystack.app import build_router
from raystack.config import ConfigError
from raystack.serving.auth import APIKeyError, APIKeys
from raystack.protocol import OpenAIError


def test_entries_from_a_file_or_an_env_var_with_optional_model_lists():
    keys = APIKeys.parse("sk-a\n  # comment\nsk-b: m1, m2  # trailing comment\n", "keys")
    a, b = keys.check("Bearer sk-a"), keys.check("bearer  sk-b")
    assert keys.may_use(a, "anything") and keys.may_use(b, "m2") and not keys.may_use(b, "m3")
    assert "sk-a" not in repr(keys.allowed)  # only digests are kept
    assert len(APIKeys.parse("sk-1;sk-2: m", "env").allowed) == 2


@pytest.mark.parametrize("header", [None, "", "sk-a", "Basic sk-a", "Bearer ", "Bearer sk-z"])
def test_missing_or_unknown_keys_are_401(header):
    with pytest.raises(OpenAIError) as err:
        APIKeys.parse("sk-a", "keys").check(header)
    assert err.value.status == 401 and err.value.headers == {"WWW-Authenticate": "Bearer"}


def test_forbidden_model_is_403():
    keys = APIKeys.parse("sk-b: m1", "keys")
    with pytest.raises(OpenAIError) as err:
        keys.require(keys.check("Bearer sk-b"), "m2")
    assert err.value.status == 403 and err.value.param == "model"


def test_a_source_without_keys_stops_the_deploy_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("RAYSTACK_TEST_KEYS", raising=False)
    with pytest.raises(APIKeyError, match="RAYSTACK_TEST_KEYS is unset"):
        APIKeys.load(env="RAYSTACK_TEST_KEYS")
    (tmp_path / "empty").write_text("# nobody yet\n")
    with pytest.raises(APIKeyError, match="holds no API key"):
        APIKeys.load(file=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot read .*missing"):
        build_router({"api_keys": {"file": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError, match="exactly one of env"):
        build_router({"api_keys": {}})
