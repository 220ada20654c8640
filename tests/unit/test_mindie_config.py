"""MindIE's config.json as a replica writes it, from the default config.json MindIE ships (the public
sample in tests/fixtures/mindie)."""

import json
import stat
from pathlib import Path

import pytest

from raystack.config import BackendApp, ConfigError, RouterConfig, parse_args
from raystack.engines.mindie.config import (
    MindIEConfigError,
    MindIEPlan,
    deep_merge,
    mindie_timeouts,
    render_config,
    write_config,
)
from raystack.engines.mindie.engine import plan_for
from raystack.engines.mindie.settings import MindIESettings
from tests import FIXTURES

DEFAULT = FIXTURES / "mindie" / "config.default.json"
PLAN = MindIEPlan(model_name="qwen3-32b", weight_path="/models/Qwen3-32B", npu_ids=[4, 5], port=41234,
                  max_seq_len=32768, max_input_token_len=30720, max_batch_size=64, max_prefill_tokens=32768,
                  max_iter_times=32768, multi_nodes_infer_port=41235, cache_block_size=128)


@pytest.fixture
def default():
    return json.loads(DEFAULT.read_text())


def test_every_field_raystack_owns_is_set(default):
    config = render_config(default, PLAN)
    server = config["ServerConfig"]
    assert (server["ipAddress"], server["managementIpAddress"]) == ("127.0.0.1", "127.0.0.1")
    assert server["port"] == server["managementPort"] == server["metricsPort"] == 41234
    assert server["httpsEnabled"] is False and server["interCommTLSEnabled"] is False
    assert server["openAiSupport"] == "vllm"
    backend = config["BackendConfig"]
    assert backend["npuDeviceIds"] == [[4, 5]]
    assert backend["multiNodesInferEnabled"] is False and backend["interNodeTLSEnabled"] is False
    assert backend["multiNodesInferPort"] == 41235  # never the shipped 1120: two replicas on a node would collide
    deploy = backend["ModelDeployConfig"]
    assert (deploy["maxSeqLen"], deploy["maxInputTokenLen"]) == (32768, 30720)
    [model] = deploy["ModelConfig"]
    assert (model["modelName"], model["modelWeightPath"], model["worldSize"]) == ("qwen3-32b", "/models/Qwen3-32B", 2)
    schedule = backend["ScheduleConfig"]
    assert (schedule["maxBatchSize"], schedule["maxPrefillTokens"], schedule["cacheBlockSize"]) == (64, 32768, 128)
    # The shipped maxIterTimes (512) would cut every answer at 512 tokens: it follows the context instead.
    assert (default["BackendConfig"]["ScheduleConfig"]["maxIterTimes"], schedule["maxIterTimes"]) == (512, 32768)


def test_the_release_defaults_stay_and_the_default_is_not_changed(default):
    before = json.dumps(default, sort_keys=True)
    config = render_config(default, PLAN)
    assert json.dumps(default, sort_keys=True) == before
    assert config["ServerConfig"]["maxLinkNum"] == default["ServerConfig"]["maxLinkNum"]
    assert config["BackendConfig"]["ScheduleConfig"]["maxPrefillBatchSize"] == default["BackendConfig"]["ScheduleConfig"]["maxPrefillBatchSize"]
    assert config["BackendConfig"]["ModelDeployConfig"]["ModelConfig"][0]["backendType"] == "atb"


def test_overrides_merge_last_object_by_object(default):
    overrides = {"ServerConfig": {"tokenTimeout": 1200},
                 "BackendConfig": {"ScheduleConfig": {"maxBatchSize": 8, "maxIterTimes": 2048}},
                 "LogConfig": {"dynamicLogLevel": "debug"}}
    config = render_config(default, PLAN, MindIESettings(overrides=overrides))
    assert config["ServerConfig"]["tokenTimeout"] == 1200 and config["ServerConfig"]["port"] == 41234
    schedule = config["BackendConfig"]["ScheduleConfig"]
    assert (schedule["maxBatchSize"], schedule["maxIterTimes"], schedule["cacheBlockSize"]) == (8, 2048, 128)
    assert config["LogConfig"]["dynamicLogLevel"] == "debug"
    assert deep_merge({"a": [1, 2], "b": {"c": 1}}, {"a": [3], "b": {"d": 2}}) == {"a": [3], "b": {"c": 1, "d": 2}}


def test_a_multi_node_replica_gives_this_nodes_world_size(default):
    # MindIE's convention (its two-node A2 sample): worldSize counts this node's NPUs; the whole world is
    # the rank table's (WORLD_SIZE), which MindIE reads in multi-node mode.
    plan = MindIEPlan(**{**PLAN.__dict__, "npu_ids": list(range(8)), "multi_node": True})
    config = render_config(default, plan)
    assert config["BackendConfig"]["npuDeviceIds"] == [list(range(8))]
    assert config["BackendConfig"]["ModelDeployConfig"]["ModelConfig"][0]["worldSize"] == 8
    assert config["BackendConfig"]["multiNodesInferEnabled"] is True


def test_a_multi_node_master_keeps_its_management_plane_on_loopback(default):
    # MIES_CONTAINER_IP puts the inference plane on the node's IP; /stopService, /health and /metrics
    # (managementIpAddress) stay on loopback, at a port of their own so they do not join that listener.
    plan = MindIEPlan(**{**PLAN.__dict__, "ip": "10.0.0.7", "multi_node": True, "management_port": 41236})
    server = render_config(default, plan)["ServerConfig"]
    assert (server["ipAddress"], server["port"]) == ("10.0.0.7", 41234)
    assert (server["managementIpAddress"], server["managementPort"], server["metricsPort"]) == ("127.0.0.1", 41236, 41236)
    assert server["allowAllZeroIpListening"] is False
    assert plan.management_url == "http://127.0.0.1:41236" and PLAN.management_url == "http://127.0.0.1:41234"


def test_a_broken_default_is_named(default):
    del default["BackendConfig"]["ScheduleConfig"]
    with pytest.raises(MindIEConfigError, match="BackendConfig.ScheduleConfig"):
        render_config(default, PLAN)


def test_written_with_mode_640_and_nothing_left_beside_it(default, tmp_path):
    path = tmp_path / "conf" / "config.json"
    write_config(render_config(default, PLAN), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert json.loads(path.read_text())["ServerConfig"]["port"] == 41234
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def mindie_app(router_timeout_s: float | None = None, **mindie) -> BackendApp:
    args = {"model": {"name": "qwen3-32b", "source": "/models/Qwen3-32B"},
            "backend": {"name": "mindie", "engine": "mindie", "device": "npu", "max_model_len": 4096, "mindie": mindie}}
    if router_timeout_s is not None:  # as config check assembles it: the drain bound follows the router's
        args["backend"]["graceful_shutdown_timeout_s"] = router_timeout_s
    return parse_args(BackendApp, args)


def rendered_timeouts(default, app: BackendApp) -> tuple[int, int]:
    plan = plan_for("qwen3-32b", Path("/models/Qwen3-32B"), app.backend, [0, 1], ports=(41234, 41235, 0, 0))
    server = render_config(default, plan, app.backend.mindie)["ServerConfig"]
    return server["tokenTimeout"], server["e2eTimeout"]


def test_mindie_lets_an_answer_run_as_long_as_the_router_does(default):
    # The shipped 600/600 would end answers at 10 minutes; the router's default bound is 3600 s.
    assert (default["ServerConfig"]["tokenTimeout"], default["ServerConfig"]["e2eTimeout"]) == (600, 600)
    assert rendered_timeouts(default, mindie_app()) == (3600, 3600)
    assert rendered_timeouts(default, mindie_app(900.5)) == (901, 901)
    # Beyond MindIE's ranges (tokenTimeout [1, 3600], e2eTimeout [1, 65535]) each stops at its bound.
    assert rendered_timeouts(default, mindie_app(7200)) == (3600, 7200)
    assert mindie_timeouts(100000) == (3600, 65535) and mindie_timeouts(0.2) == (1, 1)
    overridden = mindie_app(overrides={"ServerConfig": {"tokenTimeout": 1200}})
    assert rendered_timeouts(default, overridden) == (1200, 3600)  # overrides still win


def test_config_check_refuses_a_router_bound_mindie_would_cut():
    from raystack.config.rules import backend_problems

    def _backend_problems(router: RouterConfig, app: BackendApp) -> list[str]:
        return backend_problems(router, app.backend, app.withheld_env)

    assert _backend_problems(RouterConfig(request_timeout_s=3600), mindie_app(3600)) == []
    [problem] = _backend_problems(RouterConfig(request_timeout_s=7200), mindie_app(7200))
    assert problem.startswith("router.request_timeout_s (7200 s) is longer than MindIE lets a non-streamed answer "
                              "run: its ServerConfig.tokenTimeout, at most 3600 s")
    assert "mindie.overrides: {ServerConfig: {tokenTimeout: 3600}}" in problem
    accepted = mindie_app(7200, overrides={"ServerConfig": {"tokenTimeout": 3600}})
    assert _backend_problems(RouterConfig(request_timeout_s=7200), accepted) == []
    [problem] = _backend_problems(RouterConfig(request_timeout_s=70000), mindie_app(70000))
    assert problem.startswith("router.request_timeout_s (70000 s) is longer than MindIE lets any answer run: its "
                              "ServerConfig.e2eTimeout is at most 65535 s")


@pytest.mark.parametrize("key, value", [("tokenTimeout", 3601), ("tokenTimeout", 0), ("e2eTimeout", 65536),
                                        ("e2eTimeout", 1.5)])
def test_overrides_outside_mindies_timeout_ranges_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"mindie.overrides.ServerConfig.{key} must be whole seconds in "):
        mindie_app(overrides={"ServerConfig": {key: value}})
