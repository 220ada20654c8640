"""What a vLLM replica under routing: kv_aware publishes and tells routers (engines/vllm/kv_events.py), and the
config rules that keep its events usable. vLLM itself is not loaded here: test_vllm_engine_args.py checks that
vLLM takes the kv_events_config, tests/integration/test_kv_events_serve.py that a real replica publishes."""

from __future__ import annotations

import socket

import pytest

from raystack.config import Backend, ConfigError, Model, parse_config
from raystack.engines.vllm.args import build_serving_args
from raystack.engines.supervised import free_ports
from raystack.engines.vllm.kv_events import HASH_SEED, Publisher, seed_the_engine
from tests.unit.test_config import local_args


def kv_aware(**backend_changes) -> dict:
    args = local_args()
    args["models"][0]["routing"] = {"policy": "kv_aware"}
    args["models"][0]["backends"][0].update(backend_changes)
    return args


def test_kv_aware_is_a_routing_policy_of_the_config():
    [model] = parse_config(kv_aware()).models
    assert model.routing.policy == "kv_aware"


def test_kv_aware_takes_backends_that_publish_no_events_beside_those_that_do():
    args = kv_aware()
    args["models"][0]["backends"].append({"name": "synthetic", "engine": "synthetic"})
    assert [b.spec.publishes_kv_events for b in parse_config(args).models[0].backends] == [True, False]
    mindie = Model(name="m", source="/models/m", routing={"policy": "kv_aware"},
                   backends=[{"name": "mindie", "engine": "mindie", "device": "npu"}])
    assert not mindie.backends[0].spec.publishes_kv_events


@pytest.mark.parametrize("engine_args, env, message", [
    ({"enable_prefix_caching": False}, {}, "this backend turns it off: remove engine_args.enable_prefix_caching"),
    ({"kv_events_config": {"enable_kv_cache_events": True}}, {}, "remove engine_args.kv_events_config"),
    ({"data_parallel_size": 2}, {}, "remove engine_args.data_parallel_size"),
    ({"prefix_caching_hash_algo": "xxhash"}, {}, "set env.PYTHONHASHSEED to an integer of your own, or use sha256"),
    ({}, {"PYTHONHASHSEED": "secret"}, "env.PYTHONHASHSEED must be an integer from 0 to 4294967295"),
])
def test_kv_aware_refuses_a_vllm_backend_whose_events_could_not_be_followed(engine_args, env, message):
    args = kv_aware(env=env)
    args["models"][0]["backends"][0]["engine_args"].update(engine_args)
    with pytest.raises(ConfigError) as err:
        parse_config(args)
    assert "backend 'vllm' under routing.policy kv_aware: " in str(err.value)
    assert message in str(err.value)


def test_the_same_settings_pass_under_another_policy_and_a_seed_of_the_users_makes_xxhash_fine():
    args = local_args()
    args["models"][0]["backends"][0]["engine_args"].update(enable_prefix_caching=False, prefix_caching_hash_algo="xxhash")
    parse_config(args)
    args = kv_aware(env={"PYTHONHASHSEED": "4242"})
    args["models"][0]["backends"][0]["engine_args"]["prefix_caching_hash_algo"] = "xxhash"
    parse_config(args)


def test_free_ports_are_distinct_and_bindable_on_every_interface():
    ports = free_ports(2)
    assert len(set(ports)) == 2
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("", port))


def test_the_publisher_binds_every_interface_and_routers_connect_to_the_nodes_ip():
    publisher = Publisher("r1", 5601, 5602)
    assert publisher.engine_config() == {
        "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5601",
        "replay_endpoint": "tcp://*:5602", "topic": "r1"}
    assert publisher.address("10.0.0.7", 128, "sha256", HASH_SEED, "0.32") == {
        "endpoint": "tcp://10.0.0.7:5601", "replay": "tcp://10.0.0.7:5602", "topic": "r1", "block_size": 128,
        "hash_algo": "sha256", "hash_seed": HASH_SEED, "vllm": "0.32"}
    assert publisher.address("fd00::7", 128, "sha256", None, "0.23")["endpoint"] == "tcp://[fd00::7]:5601"


def test_the_engine_gets_raystacks_seed_unless_the_replica_has_one(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # so that monkeypatch restores the variable as it was, after
    monkeypatch.delenv("PYTHONHASHSEED")  # seed_the_engine sets it
    assert seed_the_engine("sha256") == HASH_SEED
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    assert seed_the_engine("sha256_cbor") == "7"  # the user's (backend env, or the node's) wins
    monkeypatch.delenv("PYTHONHASHSEED")
    # xxhash's seed must stay secret: never raystack's public one (config check asks for the user's)
    assert seed_the_engine("xxhash") is None
    assert int(HASH_SEED) <= 0xFFFFFFFF  # what Python takes as PYTHONHASHSEED


def test_publishing_replicas_report_cached_prompt_tokens_unless_the_config_says_otherwise():
    backend = Backend(name="v", device="cpu", serving_args={"response_role": "model"})
    assert build_serving_args(backend) == {"response_role": "model"}
    assert build_serving_args(backend, kv_events=True) == {"enable_prompt_tokens_details": True,
                                                            "response_role": "model"}
    explicit = Backend(name="v", device="cpu", serving_args={"enable_prompt_tokens_details": False})
    assert build_serving_args(explicit, kv_events=True) == {"enable_prompt_tokens_details": False}


def test_a_replica_whose_engine_publishes_no_events_tells_the_routers_nothing():
    from tests.unit.test_request_passes import synthetic_replica

    replica = synthetic_replica()
    replica.backend = Backend(name="synthetic", engine="synthetic")
    assert replica.record_replica_metadata() == {}
