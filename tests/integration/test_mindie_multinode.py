"""A MindIE replica spanning two nodes, on a real multi-node Ray cluster simulated on one machine.

Two nodes (127.0.0.2 and 127.0.0.3), each 2 NPUs with MindIE as `raystack start` registers them; a stand-in hccn_tool on PATH answers their NIC
addresses. One replica with tensor 2 x pipeline 2 must run one daemon per node from one rank table built
from Ray's placement, the master on the replica's node taking the requests, and leave nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import openai
import pytest

from raystack.config import ConfigError
from tests.serve_cluster import serve_cluster
from tests.integration.conftest import deployed
from tests.integration.test_mindie_serve import ROUTER, assert_nothing_left, ask, mindie_model, mindie_node
from tests.mindie_standin import install_hccn_tool, install_mindie, model_weights, starts

NODE_IPS = ["127.0.0.2", "127.0.0.3"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tools = install_hccn_tool(tmp_path_factory.mktemp("tools")).parent
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{tools}:{path}"  # the nodes' raylets, hence their workers, inherit it
    # A proxy in the nodes' environment, as many clusters have: the daemons must not inherit it.
    proxies = {k: "http://proxy.invalid:3128" for k in ("http_proxy", "https_proxy")}
    try:
        # No CPU on the head: the router runs on a node with the proxy too, and must reach the replicas past it.
        nodes = [mindie_node(tmp_path_factory.mktemp("mindie-image"), 2) for _ in NODE_IPS]
        with serve_cluster([{**node, "node_ip_address": ip, "env_vars": {**node["env_vars"], **proxies}}
                            for node, ip in zip(nodes, NODE_IPS)], head={"num_cpus": 0}) as running:
            yield running.url
    finally:
        os.environ["PATH"] = path


@pytest.fixture
def mindie(tmp_path: Path):
    control = tmp_path / "control"
    control.mkdir()
    return install_mindie(tmp_path), control, model_weights(tmp_path)


def test_one_replica_runs_a_daemon_per_node_from_one_rank_table(server, mindie):
    models = mindie_model(mindie)
    models[0]["backends"][0]["parallelism"] = {"tensor": 2, "pipeline": 2}
    # Through Serve's proxy (a router listening itself would run on the head, which has no CPU here).
    with deployed(server, "mindie-2nodes", models, router={**ROUTER, "port": None}) as url:
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
        answer = c.chat.completions.create(model="qwen3", messages=ask("how many legs"), max_tokens=4)
        assert len(answer.choices[0].message.content.split()) == 4
        streamed = list(c.chat.completions.create(model="qwen3", messages=ask("how many legs"), max_tokens=4,
                                                  stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == answer.choices[0].message.content

        # The master takes requests on its node's IP; its management plane (/stopService, /health, /info)
        # and metrics answer on loopback only.
        [master] = [d for d in starts(mindie[1])
                    if d["env"]["MIES_CONTAINER_IP"] == d["rank_table"]["server_list"][0]["container_ip"]]
        master_ip, server_config = master["env"]["MIES_CONTAINER_IP"], master["config"]["ServerConfig"]
        business = f"http://{master_ip}:{server_config['port']}"
        management = f"http://127.0.0.1:{server_config['managementPort']}"
        assert httpx.get(f"{business}/v1/models").status_code == 200
        for path in ("/health", "/info", "/metrics"):
            assert httpx.get(f"{business}{path}").status_code == 404, path
            assert httpx.get(f"{management}{path}").status_code == 200, path
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{master_ip}:{server_config['managementPort']}/health")

    daemons = starts(mindie[1])
    assert sorted(d["env"]["MIES_CONTAINER_IP"] for d in daemons) == NODE_IPS, "one daemon on each node"
    [table] = {str(d["rank_table"]): d["rank_table"] for d in daemons}.values()  # the same table everywhere
    assert table["version"] == "1.0" and table["status"] == "completed" and table["server_count"] == "2"
    assert sorted(s["container_ip"] for s in table["server_list"]) == NODE_IPS
    assert [d["rank_id"] for s in table["server_list"] for d in s["device"]] == ["0", "1", "2", "3"]
    # NIC addresses are hccn_tool's, for the device ids Ray granted (0 and 1 on each simulated node).
    assert [d["device_ip"] for d in table["server_list"][0]["device"]] == ["192.1.45.172", "192.2.167.33"]
    master_ip = table["server_list"][0]["container_ip"]
    # One master port and one multiNodesInferPort, the master's, on every node (never the shipped 1120).
    [(master_port, infer_port)] = {(d["env"]["MASTER_PORT"], d["config"]["BackendConfig"]["multiNodesInferPort"])
                                   for d in daemons}
    assert int(master_port) > 1024 and infer_port != 1120
    for seen in daemons:
        env, config = seen["env"], seen["config"]
        assert env["WORLD_SIZE"] == "4" and env["MASTER_IP"] == master_ip
        # MindIE's rank-table guide and GPUStack's multi-node settings; the proxy the test set is gone.
        assert (env["HCCL_CONNECT_TIMEOUT"], env["ATB_LLM_HCCL_ENABLE"], env["HCCL_OP_EXPANSION_MODE"]) == ("7200", "1", "AIV")
        assert env["http_proxy"] is None and env["https_proxy"] is None
        assert env["RANK_TABLE_FILE"] and config["BackendConfig"]["multiNodesInferEnabled"] is True
        assert config["BackendConfig"]["interNodeTLSEnabled"] is False
        assert config["BackendConfig"]["ModelDeployConfig"]["ModelConfig"][0]["worldSize"] == 2  # per node
    assert_nothing_left(mindie[1])


def test_a_router_that_would_listen_on_a_head_without_cpus_is_refused_with_what_to_do(server, mindie):
    with pytest.raises(ConfigError, match=r"reserve 0.1 CPU there, but the head has 0. Set router.cpus: 0"):
        with deployed(server, "mindie-no-head", mindie_model(mindie), router=ROUTER):
            pass
