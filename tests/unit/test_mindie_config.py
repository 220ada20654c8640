"""MindIE's config.json as a replica writes it, from the default config.json MindIE ships (the public
sample in tests/fixtures/mindie)."""

import json
import stat

import pytest

from raystack.engines.mindie.config import MindIEConfigError, MindIEPlan, deep_merge, render_config, write_config
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
    assert config["ServerConfig"]["tokenTimeout"] == default["ServerConfig"]["tokenTimeout"]
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
