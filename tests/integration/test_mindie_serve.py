"""engine: mindie behind the router, on a real Ray node of 4 NPUs registered as `raystack start` registers a
node with MindIE (the stand-in daemon).

What a user of a MindIE backend notices: OpenAI requests answered through the router, MindIE's errors
in OpenAI's shape, a daemon that crashes mid-stream ending that stream with an error event and being
replaced, a hung daemon replaced, and nothing left running once the app is gone.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import ray

from raystack.config import backend_app_name
from tests.integration.conftest import deployed, synthetic
from tests.mindie_standin import install_mindie, model_weights, pids_started, port_free, starts
from tests.npu_nodes import engines_at, npu_node_args
from tests.processes import alive
from tests.serve_cluster import replica_actors, serve_cluster


def mindie_node(root: Path, npus: int) -> dict:
    """A node of `npus` Ascend910B3 chips as `raystack start` registers it where MindIE is installed (the
    stand-in under `root`): its resources and labels, engine-mindie included."""
    return npu_node_args("910B3", npus, 65536, engines=engines_at(ascend_home=install_mindie(root)))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    node = mindie_node(tmp_path_factory.mktemp("mindie-image"), 4)
    with serve_cluster(resources=node["resources"], labels=node["labels"]) as running:
        yield running.url


@pytest.fixture
def mindie(tmp_path: Path):
    control = tmp_path / "control"
    control.mkdir()
    return install_mindie(tmp_path), control, model_weights(tmp_path)


# Replicas drain for 15 s, so a replaced or failed one goes soon; the router lets no answer run longer (a
# backend's drain bound must cover the router's request_timeout_s: config/rules.py).
DRAIN_S = 15
ROUTER = {"request_timeout_s": DRAIN_S}


def mindie_model(mindie, replicas: int = 1, tensor: int = 1, name: str = "qwen3",
                 token_s: float = 0.02) -> list[dict[str, Any]]:
    home, control, weights = mindie
    backend = {
        "name": "mindie", "engine": "mindie", "parallelism": {"tensor": tensor, "pipeline": 1},
        "max_model_len": 4096, "mindie": {"ascend_home": str(home), "startup_timeout_s": 60},
        "env": {"STANDIN_CONTROL": str(control), "STANDIN_LOAD_S": "1", "STANDIN_TOKEN_S": str(token_s)},
        "resources": {"cpus": 0.1},
        "autoscaling": {"min_replicas": replicas, "max_replicas": replicas},
        "health_check_period_s": 1, "health_check_timeout_s": 10, "graceful_shutdown_timeout_s": DRAIN_S,
    }
    return [{"name": name, "source": str(weights), "backends": [backend]}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_answers_are_as_long_as_asked_or_as_the_context_allows_not_cut_at_512(server, mindie):
    """MindIE answers min(maxIterTimes, max_tokens, maxSeqLen - prompt) tokens; its shipped maxIterTimes is 512."""
    with deployed(server, "mindie-long", mindie_model(mindie, token_s=0.0005), router=ROUTER) as url:
        c = client(url)
        assert c.completions.create(model="qwen3", prompt="count", max_tokens=1000).usage.completion_tokens == 1000
        unbounded = c.completions.create(model="qwen3", prompt="count to the end").usage
        assert unbounded.completion_tokens == 4096 - unbounded.prompt_tokens  # max_model_len 4096, not 512


def test_openai_requests_work_through_the_router_and_each_replica_gets_its_own_npus(server, mindie):
    with deployed(server, "mindie-basic", mindie_model(mindie, replicas=2, tensor=2), router=ROUTER) as url:
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["qwen3"]
        whole = c.chat.completions.create(model="qwen3", messages=ask("how many legs"), max_tokens=5)
        assert whole.choices[0].finish_reason == "length" and len(whole.choices[0].message.content.split()) == 5
        assert whole.usage.completion_tokens == 5
        streamed = c.chat.completions.create(model="qwen3", messages=ask("how many legs"), max_tokens=5, stream=True,
                                             stream_options={"include_usage": True})
        chunks = list(streamed)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == whole.choices[0].message.content  # deterministic, streamed or not
        assert chunks[-1].usage.completion_tokens == 5
        completion = c.completions.create(model="qwen3@mindie", prompt="chickens and rabbits", max_tokens=3)
        assert len(completion.choices[0].text.split()) == 3
        pieces = [ch.choices[0].text for ch in c.completions.create(
            model="qwen3", prompt="chickens and rabbits", max_tokens=3, stream=True)]
        assert "".join(pieces) == completion.choices[0].text

        # MindIE's own refusal reaches the client in OpenAI's shape, with MindIE's reason.
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(model="qwen3", messages=ask("word " * 5000), max_tokens=5)
        assert "Messages token length must be in (0, 4096]" in refused.value.message

        # An engine failure mid-stream (MindIE writes it as plain text) ends that stream with MindIE's words;
        # the daemon is fine, so nothing is replaced.
        (mindie[1] / "stream_error").touch()
        with pytest.raises(openai.APIError, match="Engine callback timeout"):
            list(c.chat.completions.create(model="qwen3", messages=ask("a long answer"), max_tokens=20, stream=True))
        assert c.chat.completions.create(model="qwen3", messages=ask("fine?"), max_tokens=2).choices[0].message.content

    daemons = starts(mindie[1])
    assert len(daemons) == 2
    devices = [tuple(d["config"]["BackendConfig"]["npuDeviceIds"][0]) for d in daemons]
    assert sorted(n for ids in devices for n in ids) == [0, 1, 2, 3], "each replica its own 2 of the 4 NPUs"
    for seen in daemons:
        config = seen["config"]
        server_config, backend = config["ServerConfig"], config["BackendConfig"]
        model = backend["ModelDeployConfig"]["ModelConfig"][0]
        assert server_config["ipAddress"] == server_config["managementIpAddress"] == "127.0.0.1"
        assert server_config["port"] == server_config["managementPort"] == server_config["metricsPort"]
        assert server_config["httpsEnabled"] is False and server_config["interCommTLSEnabled"] is False
        assert model["modelName"] == "qwen3" and model["modelWeightPath"] == str(mindie[2]) and model["worldSize"] == 2
        assert backend["ModelDeployConfig"]["maxSeqLen"] == 4096
        assert backend["ScheduleConfig"]["maxBatchSize"] == 200
        assert seen["mode"] == "640" and seen["env"]["ASCEND_RT_VISIBLE_DEVICES"] is None
    assert_nothing_left(mindie[1])


def assert_nothing_left(control: Path) -> None:
    deadline = time.monotonic() + 20
    while [p for p in pids_started(control) if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids_started(control) if alive(p)], "a daemon or backend process outlived its replica"
    for seen in starts(control):
        server = seen["config"]["ServerConfig"]
        assert port_free(server["port"], seen["env"]["MIES_CONTAINER_IP"] or server["ipAddress"])


def served_soon(c: openai.OpenAI, within_s: float = 60) -> str:
    """The first answer the model gives within `within_s` (a replacement replica may be starting)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return c.chat.completions.create(model="qwen3", messages=ask("again"), max_tokens=3).choices[0].message.content
        except openai.APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_daemon_crashing_mid_stream_ends_the_stream_with_an_error_and_is_replaced(server, mindie):
    control = mindie[1]
    with deployed(server, "mindie-crash", mindie_model(mindie), router=ROUTER) as url:
        c = client(url)
        (control / "crash_mid_stream").touch()
        received = []
        with pytest.raises(openai.APIError) as broke:
            for chunk in c.chat.completions.create(model="qwen3", messages=ask("tell a story"), max_tokens=20,
                                                   stream=True):
                received.append(chunk.choices[0].delta.content)
        assert 1 <= len(received) < 20, "the stream started, then ended early"
        assert "failed mid-stream" in str(broke.value)
        assert served_soon(c)
        assert len(starts(control)) == 2, "a replacement daemon serves now"
        crashed = starts(control)[0]["pid"]
        assert not alive(crashed)
        # The crashed daemon's backends were left to its supervisor, which took them down.
        deadline = time.monotonic() + 20
        first_pids = pids_started(control)[:2]  # the first daemon and its backend
        while [p for p in first_pids if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in first_pids if alive(p)]
    assert_nothing_left(control)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1])


def test_a_replica_killed_either_way_leaves_nothing_and_its_replacement_waits_for_its_npus(server, mindie):
    """Two ways a replica dies. SIGKILL to its process (the OOM killer): its daemon's guard SIGTERMs the
    daemon, which takes 4 s to exit (as a loaded model may) while Ray has freed its NPUs at once; the
    replacement, on the same 4 NPUs, must wait instead of starting beside it. ray.kill (Serve's way to
    stop a replica that does not stop): Ray SIGKILLs the replica's direct children, and the guard must
    outlive that to stop the daemon's own children."""
    control = mindie[1]
    models = mindie_model(mindie, tensor=4)
    models[0]["backends"][0]["env"]["STANDIN_TERM_S"] = "4"
    with deployed(server, "mindie-replace", models, router=ROUTER) as url:
        c = client(url)
        assert served_soon(c)
        [first] = starts(control)
        os.kill(parent_of(first["pid"]), signal.SIGKILL)
        assert served_soon(c, within_s=90)
        assert not (control / "npu_conflicts").exists(), (control / "npu_conflicts").read_text()
        first_gone, second = starts(control)
        assert not alive(first["pid"]) and alive(second["pid"])

        [replica] = replica_actors(backend_app_name("mindie-replace", "qwen3", "mindie"), "LLMServer-qwen3-mindie")
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
        assert served_soon(c, within_s=90)
        assert len(starts(control)) == 3 and not (control / "npu_conflicts").exists()
        second_group = pids_started(control)[5:10]  # the second daemon and its 4 backends
        deadline = time.monotonic() + 30
        while [p for p in second_group if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in second_group if alive(p)], "the killed replica's daemon or backends outlived it"
    assert_nothing_left(control)


def test_an_engine_failing_on_its_side_gets_no_more_requests_and_is_replaced(server, mindie):
    """One of two daemons starts failing every generation (424) while its /health stays 200. The request
    that meets it is resent to the other replica; later requests do not meet it; its next health check
    probes the engine, fails, and Serve replaces the replica."""
    control = mindie[1]
    with deployed(server, "mindie-failing", mindie_model(mindie, replicas=2), router=ROUTER) as url:
        c = client(url)
        assert served_soon(c)
        (control / "fail_generation").touch()
        answers = []
        for i in range(12):
            if i % 2:
                chunks = list(c.chat.completions.create(model="qwen3", messages=ask(f"q{i}"), max_tokens=3,
                                                        stream=True))
                answers.append("".join(ch.choices[0].delta.content or "" for ch in chunks))
            else:
                answers.append(c.chat.completions.create(model="qwen3", messages=ask(f"q{i}"),
                                                         max_tokens=3).choices[0].message.content)
        assert all(len(a.split()) == 3 for a in answers), answers
        assert not (control / "fail_generation").exists(), "a daemon met the failure"
        deadline = time.monotonic() + 60
        while len(starts(control)) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(starts(control)) == 3, "the failing replica was replaced"
        failed = [line.split() for line in (control / "failed_generations").read_text().splitlines()]
        # Serve starts the replacement while it stops the failed replica (graceful_shutdown_timeout_s DRAIN_S):
        # the failed daemon is gone once that stop is over, not necessarily when the new one starts.
        deadline = time.monotonic() + 30
        while alive(int(failed[0][0])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(int(failed[0][0])), "the failed replica's daemon outlived its replica"
        # The client's requests are chats; the replica's own health probes, completions. One chat met it.
        assert [endpoint for _, endpoint in failed].count("chat") == 1, failed
    assert_nothing_left(control)


def test_a_hung_daemon_fails_its_health_check_and_is_replaced(server, mindie):
    control = mindie[1]
    with deployed(server, "mindie-hang", mindie_model(mindie), router=ROUTER) as url:
        c = client(url)
        (control / "hang").touch()
        assert served_soon(c, within_s=90)
        assert len(starts(control)) == 2
    assert_nothing_left(control)


def test_mindie_figures_reach_prometheus_under_raystacks_names(server, mindie):
    """Token counts and queue lengths come from MindIE's own /metrics; latencies from the replica's proxy."""
    from tests.integration.test_metrics_serve import scrape
    from tests.prometheus import total

    with deployed(server, "mindie-metrics", mindie_model(mindie, name="metered"), router=ROUTER) as url:
        c = client(url)
        prompt = completion = 0
        for _ in range(3):
            chunks = list(c.chat.completions.create(model="metered", messages=ask("how many legs"), max_tokens=6,
                                                    stream=True, stream_options={"include_usage": True}))
            prompt, completion = prompt + chunks[-1].usage.prompt_tokens, completion + chunks[-1].usage.completion_tokens
        whole = c.chat.completions.create(model="metered", messages=ask("how many legs"), max_tokens=4)
        prompt, completion = prompt + whole.usage.prompt_tokens, completion + whole.usage.completion_tokens

        wanted = {"model": "metered", "backend": "mindie"}  # this module's other tests serve qwen3
        deadline = time.monotonic() + 90  # health checks scrape MindIE each second; Ray exports every few
        while True:
            samples = scrape()
            if (total(samples, "ray_raystack_generation_tokens_total", **wanted) == completion
                    and total(samples, "ray_raystack_e2e_request_latency_seconds_count", **wanted) == 4) \
                    or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert completion == 3 * 6 + 4
    assert total(samples, "ray_raystack_generation_tokens_total", **wanted) == completion
    assert total(samples, "ray_raystack_prompt_tokens_total", **wanted) == prompt
    assert total(samples, "ray_raystack_time_to_first_token_seconds_count", **wanted) == 3
    assert total(samples, "ray_raystack_time_per_output_token_seconds_count", **wanted) == 3
    assert total(samples, "ray_raystack_inter_token_latency_seconds_count", **wanted) == 3 * 5
    assert total(samples, "ray_raystack_e2e_request_latency_seconds_count", **wanted) == 4
    assert any(n == "ray_raystack_requests_running" and l.get("backend") == "mindie" for n, l, _ in samples)


def test_a_client_that_leaves_mid_stream_stops_the_generation_in_mindie(server, mindie):
    import asyncio
    import urllib.request

    from tests.prometheus import parse_prometheus, total

    def running_in_daemon() -> float:
        [seen] = starts(mindie[1])
        port = seen["config"]["ServerConfig"]["metricsPort"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return total(parse_prometheus(text), "num_requests_running")

    with deployed(server, "mindie-leave", mindie_model(mindie), router=ROUTER) as url:
        async def start_and_leave() -> None:
            async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0) as c:
                async def one() -> None:  # 300 tokens at 20 ms: 6 s, unless abandoned
                    stream = await c.chat.completions.create(model="qwen3", messages=ask("go on"), max_tokens=300,
                                                             stream=True)
                    async for _ in stream:
                        break
                    await stream.close()
                await asyncio.gather(*(one() for _ in range(3)))

        asyncio.run(start_and_leave())
        left = time.monotonic()
        while running_in_daemon() and time.monotonic() - left < 3:
            time.sleep(0.1)
        assert running_in_daemon() == 0, "MindIE still generates for clients that left"


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
           "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


def test_tools_json_and_reasoning_reach_only_the_backends_that_honour_them(server, mindie):
    """MindIE answers tools (tool_choice auto) and response_format; it forces no call, so a named or required
    tool_choice is refused by name; a synthetic backend answers neither. A model with both: each request goes
    only where it can be answered, never silently stripped of the field. With enable_reasoning, MindIE's
    thinking comes back apart, under both names clients read."""
    [model] = mindie_model(mindie)
    model["backends"][0]["mindie"]["model_options"] = {"qwen3": {"enable_reasoning": True}}
    model["backends"].append(synthetic("synthetic", ttft_ms=1, tokens_per_s=0))
    with deployed(server, "mindie-features", [model], router=ROUTER) as url:
        c = client(url)
        whole = c.chat.completions.create(model="qwen3@mindie", messages=ask("2 + 2?"), max_tokens=8).choices[0]
        thinking = whole.message.model_extra["reasoning_content"]
        assert thinking and whole.message.model_extra["reasoning"] == thinking and whole.message.content
        assert len(thinking.split()) + len(whole.message.content.split()) == 8
        deltas = [ch.choices[0].delta.model_extra for ch in c.chat.completions.create(
            model="qwen3@mindie", messages=ask("2 + 2?"), max_tokens=8, stream=True) if ch.choices]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == thinking
        assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
        off = c.chat.completions.create(model="qwen3@mindie", messages=ask("2 + 2?"), max_tokens=8,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert off.choices[0].message.model_extra.get("reasoning_content") is None
        assert len(off.choices[0].message.content.split()) == 8

        for _ in range(6):  # weight 1:1, yet every tools request goes to MindIE
            raw = c.chat.completions.with_raw_response.create(model="qwen3", messages=ask("weather in Paris?"),
                                                              tools=TOOLS)
            assert raw.headers["x-raystack-backend"] == "mindie"
            [call] = raw.parse().choices[0].message.tool_calls
            assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        pieces = [ch.choices[0].delta.tool_calls or [] for ch in c.chat.completions.create(
            model="qwen3", messages=ask("weather in Paris?"), tools=TOOLS, stream=True) if ch.choices]
        assert "".join(p.function.arguments or "" for parts in pieces for p in parts) == call.function.arguments

        schema = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
        raw = c.chat.completions.with_raw_response.create(model="qwen3", messages=ask("json"), response_format=schema)
        assert raw.headers["x-raystack-backend"] == "mindie"
        assert json.loads(raw.parse().choices[0].message.content) == {"city": "Paris"}

        named = {"type": "function", "function": {"name": "get_weather"}}
        with pytest.raises(openai.BadRequestError) as nobody:
            c.chat.completions.create(model="qwen3", messages=ask("weather?"), tools=TOOLS, tool_choice=named)
        assert nobody.value.body["param"] == "tool_choice" and nobody.value.code == "unsupported_by_backend"
        assert "mindie: MindIE does not force a tool call" in nobody.value.message
        assert "synthetic: the synthetic engine answers filler words" in nobody.value.message
        with pytest.raises(openai.BadRequestError) as pinned:
            c.chat.completions.create(model="qwen3@synthetic", messages=ask("json"), response_format=schema)
        assert pinned.value.body["param"] == "response_format"
        assert "Backend `synthetic` of `qwen3` cannot take this request" in pinned.value.message
        assert "Its backends that can: mindie" in pinned.value.message
        # MindIE's own rule on a function name (CheckToolObject) reaches the client as its 400.
        dotted = [{"type": "function", "function": {"name": "weather.get", "parameters": WEATHER}}]
        with pytest.raises(openai.BadRequestError, match="MindIE: Parameter tools function name is invalid"):
            c.chat.completions.create(model="qwen3", messages=ask("weather?"), tools=dotted)
        # Plain requests still go to both.
        served = {c.chat.completions.with_raw_response.create(model="qwen3", messages=ask(f"hi {i}"), max_tokens=2)
                  .headers["x-raystack-backend"] for i in range(12)}
        assert served == {"mindie", "synthetic"}


def save_lora(folder: Path, in_width: int, out_width: int, rank: int = 4) -> Path:
    """A PEFT LoRA directory adapting q_proj of layer 0, as MindIE's lora_manager reads one."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8,
                                                            "target_modules": ["q_proj"]}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": np.zeros((rank, in_width), np.float16),
               f"{prefix}.lora_B.weight": np.zeros((out_width, rank), np.float16)},
              str(folder / "adapter_model.safetensors"))
    return folder


def test_lora_adapters_are_served_by_mindie_where_they_are_held_and_refused_where_they_do_not_fit(
        server, mindie, tmp_path):
    """MindIE loads the model's adapters at start (LoraModules) and answers through one when `model` names it;
    the router sends an adapter's requests only to backends that serve adapters, and to the replica that
    holds it; an adapter made for another model is a 400 and never reaches MindIE's config."""
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"model.layers.0.self_attn.q_proj.weight": np.zeros((32, 16), np.float16)},
              str(mindie[2] / "model.safetensors"))
    [model] = mindie_model(mindie, replicas=2)
    model["adapters"] = [{"name": "qwen3-sql", "source": str(save_lora(tmp_path / "sql", 16, 32))},
                         {"name": "other-model-lora", "source": str(save_lora(tmp_path / "other", 8, 32))}]
    model["backends"][0]["adapters_per_replica"] = 2
    model["backends"].append(synthetic("synthetic", ttft_ms=1, tokens_per_s=0))
    with deployed(server, "mindie-lora", [model], router=ROUTER) as url:
        c = client(url)
        listed = {m.id: m.model_extra for m in c.models.list().data}
        assert listed["qwen3-sql"]["parent"] == "qwen3" and listed["qwen3-sql"]["backends"] == ["mindie"]

        def answer(name: str) -> tuple[str, str, str]:
            raw = c.completions.with_raw_response.create(model=name, prompt="select", max_tokens=4)
            return raw.parse().choices[0].text, raw.headers["x-raystack-backend"], raw.headers["x-raystack-replica"]

        adapted, backend, holder = answer("qwen3-sql")
        assert backend == "mindie" and adapted != answer("qwen3@mindie")[0]
        time.sleep(3)  # the replica reports what it holds to Serve's controller, which tells the router
        assert {answer("qwen3-sql") for _ in range(8)} == {(adapted, "mindie", holder)}
        assert len({answer("qwen3@mindie")[2] for _ in range(12)}) == 2  # the model itself: both replicas

        with pytest.raises(openai.BadRequestError) as pinned:
            c.completions.create(model="qwen3-sql@synthetic", prompt="select", max_tokens=4)
        assert pinned.value.code == "unsupported_by_backend" and "serves no LoRA adapter" in pinned.value.message
        with pytest.raises(openai.BadRequestError) as foreign:
            c.completions.create(model="other-model-lora", prompt="select", max_tokens=4)
        assert "was not made for model `qwen3`" in foreign.value.message and foreign.value.body["param"] == "model"
        assert "takes inputs 8 wide; the model's takes 16" in foreign.value.message
        with pytest.raises(openai.NotFoundError, match=r"LoRA adapters: other-model-lora \(of qwen3\), qwen3-sql"):
            c.completions.create(model="qwen3-sq1", prompt="select", max_tokens=4)

    for seen in starts(mindie[1]):
        deploy = seen["config"]["BackendConfig"]["ModelDeployConfig"]
        assert deploy["LoraModules"] == [{"name": "qwen3-sql", "path": str(tmp_path / "sql"), "baseModelName": "qwen3"}]
        assert deploy["maxLoras"] == 1 and deploy["maxLoraRank"] == 4
    assert_nothing_left(mindie[1])
