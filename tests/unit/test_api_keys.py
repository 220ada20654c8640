"""API key parsing and checking (raystack.serving.auth)."""

from __future__ import annotations

import hashlib

import pytest

from raystack.app import build_router
from raystack.config import ConfigError
from raystack.serving.auth import APIKeyError, APIKeys
from raystack.serving.quotas import KeyLimits, QuotaLedger
from raystack.protocol import OpenAIError


def test_entries_from_a_file_or_an_env_var_with_optional_model_lists():
    keys = APIKeys.parse("sk-a\n  # comment\nsk-b: m1, m2  # trailing comment\n", "keys")
    a, b = keys.check("Bearer sk-a"), keys.check("bearer  sk-b")
    assert keys.may_use(a, "anything") and keys.may_use(b, "m2") and not keys.may_use(b, "m3")
    assert "sk-a" not in repr(keys.grants)  # only digests are kept
    assert len(APIKeys.parse("sk-1;sk-2: m", "env").grants) == 2
    assert sorted(g.name for g in keys.grants.values()) == ["line-1", "line-3"]


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


NAMED = """\
keys:
  - name: team-a
    key: sk-team-a
    models: [m1]
  - name: ops   # the file holds only the digest of ops' key
    sha256: %s
""" % hashlib.sha256(b"sk-ops").hexdigest()


def test_named_keys_by_key_or_digest_with_their_models(monkeypatch):
    monkeypatch.setenv("RAYSTACK_TEST_NAMED_KEYS", NAMED)
    keys = APIKeys.parse(NAMED, "keys.yaml")
    team, ops = keys.check("Bearer sk-team-a"), keys.check("Bearer sk-ops")
    assert keys.grants[team].name == "team-a" and keys.may_use(team, "m1") and not keys.may_use(team, "m2")
    assert keys.grants[ops].name == "ops" and keys.may_use(ops, "anything")
    with pytest.raises(APIKeyError) as unknown:
        APIKeys.load_for(["m2"], env="RAYSTACK_TEST_NAMED_KEYS")
    assert str(unknown.value) == ("environment variable RAYSTACK_TEST_NAMED_KEYS line 2: key team-a: no model 'm1' "
                                  "is served (models: m2)")


@pytest.mark.parametrize("text, problem", [
    ("keys:\n  - name: a\n    key: sk-1\n  - name: a\n    key: sk-2\n",
     "keys.yaml line 4: the name 'a' is taken by line 2"),
    ("keys:\n  - name: a\n    key: sk-1\n  - name: b\n    key: sk-1\n", "keys.yaml line 4: the same key as line 2"),
    ("keys:\n  - name: a\n    sha256: abc\n", "keys.yaml line 2: sha256: String should match"),
    ("keys:\n  - name: a\n", "keys.yaml line 2: entry: Value error, give exactly one of key:"),
    ("keys:\n  - name: a\n    key: sk-1\n    rpm: 5\n", "keys.yaml line 2: rpm: unknown field"),
    ("keys:\n  - name: a b\n    key: sk-1\n", "keys.yaml line 2: name: String should match pattern"),
    ("keys:\n  - name: a\n    key: sk-1\n    models: []\n", "keys.yaml line 2: models: List should have at least 1"),
    ("keys: [\n", "keys.yaml: not valid YAML"),
    ("keys: {}\n", "keys.yaml line 1: a named-keys document is `keys:` and a list"),
    ("sk-a\nsk b\n", "keys.yaml line 2: not `KEY` or `KEY: model, model`"),
])
def test_a_bad_key_file_is_refused_whole_naming_the_line_and_why(text, problem):
    with pytest.raises(APIKeyError) as err:
        APIKeys.parse(text, "keys.yaml")
    assert str(err.value).startswith(problem)


def test_config_check_reads_the_keys_where_this_machine_has_them(tmp_path, monkeypatch):
    from raystack.app import check_api_keys
    from raystack.config import parse_config

    models = [{"name": "m1", "backends": [{"name": "s", "engine": "synthetic"}]}]
    (tmp_path / "keys.yaml").write_text(NAMED)
    check_api_keys(parse_config({"models": models, "router": {"api_keys": {"file": str(tmp_path / "keys.yaml")}}}))
    with pytest.raises(ConfigError, match="line 2: key team-a: no model 'm1' is served"):
        check_api_keys(parse_config({"models": [models[0] | {"name": "m2"}],
                                     "router": {"api_keys": {"file": str(tmp_path / "keys.yaml")}}}))
    monkeypatch.setenv("RAYSTACK_TEST_KEYS", "sk-a;sk a")
    with pytest.raises(ConfigError, match="environment variable RAYSTACK_TEST_KEYS line 2"):
        check_api_keys(parse_config({"models": models, "router": {"api_keys": {"env": "RAYSTACK_TEST_KEYS"}}}))
    # Not on this machine (they live on the cluster's nodes): checked where the app is built.
    check_api_keys(parse_config({"models": models, "router": {"api_keys": {"file": str(tmp_path / "elsewhere")}}}))


def test_limits_are_read_with_the_key_and_a_bad_one_is_refused_by_line():
    keys = APIKeys.parse("keys:\n  - name: a\n    key: sk-a\n    requests_per_minute: 5\n    concurrent_requests: 2\n",
                         "keys.yaml")
    assert keys.grants[keys.check("Bearer sk-a")].limits == KeyLimits(requests_per_minute=5, concurrent_requests=2)
    with pytest.raises(APIKeyError, match="keys.yaml line 2: requests_per_minute: Input should be greater than"):
        APIKeys.parse("keys:\n  - name: a\n    key: sk-a\n    requests_per_minute: -1\n", "keys.yaml")


def test_the_ledger_counts_a_minute_of_requests_and_the_requests_in_flight():
    ledger = QuotaLedger(hold_s=600)
    per_minute = KeyLimits(requests_per_minute=3)
    assert [ledger.admit("a", per_minute, f"r{t}", now=t) for t in (0, 10, 20)] == [None] * 3
    assert ledger.admit("a", per_minute, "r30", now=30) == ("requests_per_minute", 30)  # r0 leaves the window at 60
    assert ledger.admit("b", per_minute, "other key", now=30) is None  # each key its own
    assert ledger.admit("a", per_minute, "r60", now=60.5) is None

    at_once = KeyLimits(concurrent_requests=2)
    assert ledger.admit("c", at_once, "c1", now=0) is None and ledger.admit("c", at_once, "c2", now=0) is None
    assert ledger.admit("c", at_once, "c3", now=1)[0] == "concurrent_requests"
    ledger.release("c", "c1")
    assert ledger.admit("c", at_once, "c3", now=2) is None
    assert ledger.admit("c", at_once, "c4", now=599)[0] == "concurrent_requests"
    assert ledger.admit("c", at_once, "c4", now=601) is None  # c2, never released, lapsed after hold_s
