"""API key parsing and checking (raystack.router.auth)."""

from __future__ import annotations

import cProfile
import hashlib
import json
import pstats
from datetime import datetime, timezone

import pytest
import yaml

from raystack.app import build_router
from raystack.config import ConfigError
from raystack.router.auth import YAML_LOADER, APIKeyError, APIKeys
from raystack.router.ledger import LEASE_S, KeyLimits, OverLimit, QuotaLedger
from raystack.router.quotas import over_limit_error
from raystack.router.usage import Cost, day_start, stored_days, totals
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


def test_a_key_file_is_parsed_once_however_many_keys_it_holds():
    """The router reads a changed key file on its event loop, every request waiting meanwhile: one YAML parse of
    the document (libyaml's where PyYAML has it), each entry built from its node of that parse. Serialising each
    entry and parsing it again, with the pure-Python parser, held the router 2.4 s over 10,000 keys
    (scripts/bench_scale.py); now 0.3 s."""
    text = "keys:\n" + "".join(f"  - name: k{i}\n    key: sk-{i}\n    weight: 2\n" for i in range(300))
    profile = cProfile.Profile()
    profile.enable()
    keys = APIKeys.parse(text, "keys.yaml")
    profile.disable()
    # Every parse of a YAML text enters PyYAML through one of these (safe_load through load).
    parses = sum(calls for (path, _, name), (_, calls, *_rest) in pstats.Stats(profile).stats.items()
                 if path == yaml.__file__ and name in ("compose", "compose_all", "load", "load_all"))
    assert parses == 1
    last = keys.grants[keys.check("Bearer sk-299")]
    assert (len(keys.grants), last.name, last.line, last.weight) == (300, "k299", 2 + 3 * 299, 2)
    assert YAML_LOADER is (yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader)


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


def ok(admission) -> bool:
    """Admitted: the ledger answers with a lease (maybe empty), not an OverLimit."""
    return isinstance(admission, dict)


def test_the_ledger_counts_a_minute_of_requests_and_the_requests_in_flight():
    ledger = QuotaLedger("app", hold_s=600, store=None)
    per_minute = KeyLimits(requests_per_minute=3)
    assert all(ok(ledger.admit("a", per_minute, f"r{t}", now=t)) for t in (0, 10, 20))
    assert ledger.admit("a", per_minute, "r30", now=30) == OverLimit("requests_per_minute", 30)  # r0 leaves at 60
    assert ok(ledger.admit("b", per_minute, "other key", now=30))  # each key its own
    assert ok(ledger.admit("a", per_minute, "r60", now=60.5))

    at_once = KeyLimits(concurrent_requests=2)
    assert ok(ledger.admit("c", at_once, "c1", now=0)) and ok(ledger.admit("c", at_once, "c2", now=0))
    assert ledger.admit("c", at_once, "c3", now=1).limit == "concurrent_requests"
    ledger.settle("c", "m", "c1", Cost(10, 5), now=1)
    assert ok(ledger.admit("c", at_once, "c3", now=2))
    assert ledger.admit("c", at_once, "c4", now=599).limit == "concurrent_requests"
    assert ok(ledger.admit("c", at_once, "c4", now=601))  # c2, never settled, lapsed after hold_s


def test_leases_far_from_a_limit_and_the_limit_still_holds_for_the_replicas_together():
    ledger = QuotaLedger("app", hold_s=600, store=None)
    limits = KeyLimits(requests_per_minute=100)
    assert ledger.admit("k", limits, "a0", now=0, replica="a", replicas=2) == {"requests_per_minute": 24}  # 99 // 4
    # b sees a's lease as used: (100 - 1 - 24 - 1) // 4
    assert ledger.admit("k", limits, "b0", now=0, replica="b", replicas=2) == {"requests_per_minute": 18}
    for i in range(10):
        ledger.record("k", f"a{i + 1}", now=0.1, replica="a")  # admitted from a's lease, told after
    admitted = 2 + 10
    while ok(ledger.admit("k", limits, f"b{admitted}", now=0.2, replica="b", replicas=2)):  # b asks: its lease ends
        admitted += 1
    assert admitted == 100 - 14  # a's lease may still take 14: lent, counted as used
    while ok(ledger.admit("k", limits, f"b{admitted}", now=0.2 + LEASE_S, replica="b", replicas=2)):
        admitted += 1
    assert admitted == 100  # never more, leases or not
    assert ledger.admit("k", KeyLimits(requests_per_minute=8), "n", now=70, replica="a", replicas=2) == {}  # near: none


def test_tokens_per_minute_counts_the_prompt_at_admission_and_the_answer_when_it_settles():
    ledger = QuotaLedger("app", hold_s=600, store=None)
    limits = KeyLimits(tokens_per_minute=100)
    assert ok(ledger.admit("a", limits, "r1", estimate=30, now=0))
    assert ok(ledger.admit("a", limits, "r2", estimate=30, now=1))
    assert ledger.admit("a", limits, "r3", estimate=50, now=2).limit == "tokens_per_minute"  # 60 + 50 > 100
    ledger.settle("a", "m", "r1", Cost(20, 5), now=3)  # the engine's count: 25, not the estimated 30
    assert ok(ledger.admit("a", limits, "r3", estimate=45, now=4))  # 25 + 30 + 45
    ledger.settle("a", "m", "r2", Cost(28, 60), now=5)
    refusal = ledger.admit("a", limits, "r4", estimate=10, now=6)  # 25 + 88 + 45 (r3 running) + 10
    assert refusal.limit == "tokens_per_minute" and refusal.retry_after_s == pytest.approx(59)  # r2 leaves at 65
    assert ledger.admit("a", limits, "r4", estimate=10, now=64).limit == "tokens_per_minute"
    assert ok(ledger.admit("a", limits, "r4", estimate=10, now=65.5))
    assert ledger.admit("a", limits, "huge", estimate=101, now=64).too_large == 101


def test_budgets_count_a_utc_day_or_month_and_refuse_with_insufficient_quota():
    day = datetime(2026, 11, 30, 12, tzinfo=timezone.utc).timestamp()
    ledger = QuotaLedger("app", hold_s=600, store=None)
    daily = KeyLimits(tokens_per_day=1000)
    assert ok(ledger.admit("a", daily, "r1", estimate=100, now=0, wall=day))
    ledger.settle("a", "m1", "r1", Cost(400, 500), now=1, wall=day)
    assert ok(ledger.admit("a", daily, "r2", estimate=60, now=2, wall=day))  # 900 used, 60 more
    refusal = ledger.admit("a", daily, "r3", estimate=50, now=3, wall=day + 60)  # 900 + 60 (running) + 50
    assert refusal == OverLimit("tokens_per_day", 12 * 3600 - 60, budget=True)
    assert ok(ledger.admit("a", daily, "r3", estimate=50, now=4, wall=day + 12 * 3600))  # a new UTC day
    monthly = KeyLimits(tokens_per_month=1000)
    assert ledger.admit("a", monthly, "r4", now=5, wall=day + 6 * 3600).limit == "tokens_per_month"  # 900 + 110
    assert ok(ledger.admit("a", monthly, "r4", now=6, wall=day + 13 * 3600))  # December

    err = over_limit_error("a", daily, refusal)
    assert (err.status, err.body()["error"]["type"], err.code, err.param) == (
        429, "insufficient_quota", "insufficient_quota", "tokens_per_day")
    assert err.headers["Retry-After"] == str(12 * 3600 - 60) and "renews in 11 h 59 min" in err.message


class DictStore:
    """Ray's GCS key-value store as the book uses it."""

    def __init__(self):
        self.kv = {}

    def get(self, key):
        return self.kv.get(key)

    def put(self, key, value):
        self.kv[key] = value

    def keys(self, prefix):
        return [k for k in self.kv if k.startswith(prefix)]


def test_the_book_outlives_its_ledger_and_reads_back_by_key_model_and_class():
    store = DictStore()
    noon = datetime(2026, 11, 30, 12, tzinfo=timezone.utc).timestamp()
    ledger = QuotaLedger("app", hold_s=600, store=store)
    ledger.settle("a", "m1", None, Cost(10, 20), now=0, wall=noon - 86400, priority="batch")
    ledger.settle("a", "m1", None, Cost(1, 2), now=0.5, wall=noon, priority="batch")
    ledger.settle("b", "m2", None, Cost(0, error=True), now=1, wall=noon)  # flushed: a second since the last
    ledger.settle("a", "m1", None, Cost(3, 4), now=1.5, wall=noon + 3600, priority="interactive")  # not yet
    assert len(store.kv) == 2  # a day each
    ledger.flush()

    again = QuotaLedger("app", hold_s=600, store=store)  # its router replica replaced
    assert again.book.tokens_since("a", day_start(noon), noon + 3600) == 10
    stored = stored_days(store, noon - 86400)
    assert totals(stored, noon - 86400) == {("app", "a", "m1", "batch"): [2, 11, 22, 0],
                                            ("app", "a", "m1", "interactive"): [1, 3, 4, 0],
                                            ("app", "b", "m2", "-"): [1, 0, 0, 1]}
    # from the hour of `since` on
    assert totals(stored, noon + 3600 + 1800) == {("app", "a", "m1", "interactive"): [1, 3, 4, 0]}
    assert stored_days(store, noon, app="other") == []


def test_a_day_booked_before_priority_classes_reads_as_unclassed_and_books_on():
    store = DictStore()
    noon = datetime(2026, 11, 30, 12, tzinfo=timezone.utc).timestamp()
    store.put("usage:app:2026-11-30", json.dumps({"12": {"a": {"m1": [2, 10, 20, 0]}}}).encode())  # the former rows
    ledger = QuotaLedger("app", hold_s=600, store=store)
    ledger.settle("a", "m1", None, Cost(1, 2), now=0, wall=noon, priority="batch")
    ledger.flush()
    assert ledger.book.tokens_since("a", day_start(noon), noon) == 33
    assert totals(stored_days(store, noon), noon) == {("app", "a", "m1", "-"): [2, 10, 20, 0],
                                                      ("app", "a", "m1", "batch"): [1, 1, 2, 0]}
