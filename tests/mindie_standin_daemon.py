"""A stand-in `mindieservice_daemon`: MindIE Service as its operator and its HTTP clients see it.

It refuses to start without the Ascend scripts' environment (check_env) or with another Python's
(check_python: a virtualenv's bin, packages or libraries, PYTHONHOME). It reads the config.json MindIE would read ($MIES_CONFIG_JSON_PATH, else
$MIES_INSTALL_PATH/conf/config.json) and refuses one MindIE could not run with, printing an error and
exiting 1. It opens its ports only after a load delay, then serves the OpenAI endpoints
(`openAiSupport: vllm`) with deterministic output (tools and response_format as MindIE-LLM@8b4871ad
handles them: see offered_tools and json_answer), the management endpoints (health, info,
stopService) and, with MIES_SERVICE_MONITOR_MODE=1, Prometheus /metrics. Like MindIE it runs a backend
process per NPU in its process group.

Test switches (never MindIE's): STANDIN_LOAD_S (load delay, default 1), STANDIN_TOKEN_S (time per
token, default 0.01), STANDIN_TERM_S (how long it takes to exit after SIGTERM, default 0), and
STANDIN_CONTROL, a directory where a test drops files: `crash_mid_stream`
(the next stream claiming it dies after 3 tokens, leaving its backends behind as a crash would),
`hang` (the daemon claiming it stops answering anything), `fail_load` (the next start fails loading
weights), `fail_generation` (the daemon claiming it fails every generation from then on with MindIE's
424 Generation Error, noting each (pid, endpoint) in STANDIN_CONTROL/failed_generations, while its /health stays 200). Every process it starts is appended to STANDIN_CONTROL/pids. There it also keeps which
daemon holds which NPU, and refuses (as the hardware would) an NPU a live daemon of its node holds,
noting it in STANDIN_CONTROL/npu_conflicts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

from aiohttp import web

WORDS = ["the", "river", "carries", "light", "across", "stone", "and", "every", "bend", "keeps", "a", "small",
         "song", "of", "rain", "for", "morning"]
CONTROL = os.environ.get("STANDIN_CONTROL")
TOKEN_S = float(os.environ.get("STANDIN_TOKEN_S", "0.01"))
# MindIE-LLM single_req_vllm_openai_infer_interface.cpp CheckToolObject: a function name MindIE accepts.
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_\u4e00-\u9fa5-]{1,64}$")


def log(level: str, message: str) -> None:
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] [{os.getpid()}] [{level}] {message}", flush=True)


def fail(message: str) -> None:
    """As MindIE's daemon: the reason on stdout, then SIGKILL to its whole process group."""
    print(message, flush=True)
    print("Failed to init endpoint! Please check the service log or console output.", flush=True)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def claim(name: str) -> bool:
    """Take a control file: only one daemon acts on it."""
    if not CONTROL:
        return False
    try:
        os.unlink(os.path.join(CONTROL, name))
        return True
    except FileNotFoundError:
        return False


def record_pid(pid: int, role: str) -> None:
    if CONTROL:
        with open(os.path.join(CONTROL, "pids"), "a") as f:
            f.write(f"{pid} {role}\n")


def get(config: dict, path: str, kind: type | tuple[type, ...]):
    node = config
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            fail(f"config.json: required item {path} is missing")
        node = node[key]
    if not isinstance(node, kind) or (kind is int and isinstance(node, bool)):
        fail(f"config.json: {path} has the wrong type ({type(node).__name__})")
    return node


# What the Ascend scripts set that MindIE's libraries need (the CANN toolkit's, nnal/atb's, atb-models' and
# mindie's set_env.sh; MindIE-LLM environment_variable.md: ATB_HOME_PATH and ATB_SPEED_HOME_PATH "必须配置").
REQUIRED_ENV = {"ASCEND_HOME_PATH": "ascend-toolkit/set_env.sh", "ATB_HOME_PATH": "nnal/atb/set_env.sh",
                "ATB_SPEED_HOME_PATH": "atb-models/set_env.sh", "MINDIE_LLM_HOME_PATH": "mindie/set_env.sh"}
MODEL_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,254}[A-Za-z0-9])?")


def check_env() -> None:
    """As MindIE's libraries fail to load without the Ascend stack's environment."""
    for key, script in REQUIRED_ENV.items():
        if not os.environ.get(key):
            fail(f"{key} is not set: error while loading shared libraries (source {script} first)")


def virtualenv_of(entry: str) -> str | None:
    """The virtualenv `entry` lies in (the directory holding pyvenv.cfg, PEP 405), if any."""
    path = os.path.realpath(entry or ".")
    while True:
        if os.path.isfile(os.path.join(path, "pyvenv.cfg")):
            return path
        if os.path.dirname(path) == path:
            return None
        path = os.path.dirname(path)


def check_python() -> None:
    """As MindIE breaks when another Python's environment reaches it: it runs on its own Python (3.10 or 3.11,
    MindIE-LLM scripts/install.sh) installed outside any virtualenv, embeds it (llm_daemon.cpp: Py_Initialize),
    and starts `mindie_llm_backend`, that Python's console script, through PATH (src/executor/executor.cpp)."""
    if os.environ.get("PYTHONHOME"):
        fail(f"Fatal Python error: init_fs_encoding: failed to get the Python codec of the filesystem encoding "
             f"(PYTHONHOME={os.environ['PYTHONHOME']}: another Python's home)")
    if os.environ.get("VIRTUAL_ENV"):
        fail(f"ModuleNotFoundError: No module named 'mindie_llm' (VIRTUAL_ENV={os.environ['VIRTUAL_ENV']}: "
             f"another Python's virtualenv is active)")
    problems = {"PATH": "execvp mindie_llm_backend failed: ModuleNotFoundError: No module named 'mindie_llm'",
                "PYTHONPATH": "ImportError: the embedded Python imports another Python's packages",
                "LD_LIBRARY_PATH": "error while loading shared libraries: libtorch_python.so: undefined symbol"}
    for key, problem in problems.items():
        for entry in filter(None, os.environ.get(key, "").split(os.pathsep)):
            venv = virtualenv_of(entry)
            if venv:
                fail(f"{problem} ({key} holds {entry}, in the virtualenv {venv})")


def load_config() -> tuple[str, dict]:
    install = os.environ.get("MIES_INSTALL_PATH")
    if not install:
        fail("MIES_INSTALL_PATH is not set; source mindie-service's set_env.sh")
    path = os.environ.get("MIES_CONFIG_JSON_PATH") or os.path.join(install, "conf", "config.json")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        fail(f"config file {path} does not exist")
    if st.st_mode & 0o137:
        fail(f"Check path: config.json failed, by: Check Other group permission failed: Required permisssion is "
             f"640, but got permission is {st.st_mode & 0o777:o}")
    if st.st_uid != os.getuid():
        fail(f"Check path: config.json failed, by: owner id diff: current process user id is {os.getuid()}, "
             f"file owner id is {st.st_uid}")
    try:
        with open(path) as f:
            return path, json.load(f)
    except json.JSONDecodeError as err:
        fail(f"config file {path} is not valid JSON: {err}")


def planes(server: dict, ports: dict[str, int]) -> dict[tuple[str, int], set[str]]:
    """Address -> the planes it serves, as MindIE-LLM's server_config.cpp and http_server.cpp decide
    (the layouts that code accepts; the others exit as it does)."""
    ip = os.environ.get("MIES_CONTAINER_IP") or server["ipAddress"]  # the env wins (server_config.cpp:618-625)
    # Not MIES_CONTAINER_IP: the management IP falls back to the config's IPs only (627-635).
    management_ip = os.environ.get("MIES_CONTAINER_MANAGEMENT_IP") or server.get("managementIpAddress") or server["ipAddress"]
    port, management, metrics = ports["port"], ports["managementPort"], ports["metricsPort"]
    for each in {port, management, metrics}:  # IsPortUsed binds INADDR_ANY (http_server.cpp:218-244)
        with socket.socket() as probe:
            try:
                probe.bind(("", each))
            except OSError:
                fail(f"port {each} is used")
    if ip == management_ip:
        if port == metrics != management:
            fail("port is invalid")
        layout: dict[tuple[str, int], set[str]] = {}
        for plane, address in (("inference", (ip, port)), ("management", (ip, management)), ("metrics", (ip, metrics))):
            layout.setdefault(address, set()).add(plane)
        return layout
    if port == management:  # another IP, the same port: the management routes go with the business ones
        return {(ip, port): {"inference", "management"}, (management_ip, metrics): {"metrics"}}
    if management == metrics:
        return {(ip, port): {"inference"}, (management_ip, management): {"management", "metrics"}}
    return {(ip, port): {"inference"}, (management_ip, management): {"management"}, (management_ip, metrics): {"metrics"}}


def check_config(config: dict) -> dict:
    """The parts of config.json this daemon uses; exits on anything MindIE would refuse."""
    server = get(config, "ServerConfig", dict)
    ports = {}
    for key in ("port", "managementPort", "metricsPort"):
        ports[key] = server.get(key, ports.get("port")) if key == "managementPort" else get(config, f"ServerConfig.{key}", int)
        if not isinstance(ports[key], int) or not 1024 <= ports[key] <= 65535:  # server_config.cpp:379-384
            fail(f"config.json: ServerConfig.{key} {ports[key]} is out of range [1024, 65535]")
    # Compulsory (server_config.cpp g_serverParamsConstraint; param_checker.cpp CheckJsonParamType) and in
    # range, seconds (server_config.cpp CheckParam; param_checker.h CheckMaxMinValue): MindIE-LLM@8b4871a.
    for key, most in (("tokenTimeout", 3600), ("e2eTimeout", 65535)):
        if key not in server:
            fail(f"[ParamChecker::CheckJsonParamType] {key}: missing compulsory field")
        value = server[key]
        if not isinstance(value, int) or isinstance(value, bool):
            fail(f"The type of param {key} should be int32_t, but got {type(value).__name__}")
        if value > most:
            fail(f"serverConfig.{key} [{value}] is out of bound [{most}]")
        if value < 1:
            fail(f"serverConfig.{key} [{value}] is less than [1]")
    for key in ("ipAddress", "managementIpAddress"):  # CheckIp, common_util.cpp
        if server.get(key) == "0.0.0.0" and not server.get("allowAllZeroIpListening"):
            fail("config.json: listening on 0.0.0.0 needs allowAllZeroIpListening true")
    if get(config, "ServerConfig.httpsEnabled", bool):
        install = os.environ["MIES_INSTALL_PATH"]
        for key in ("tlsCert", "tlsPk"):
            cert = os.path.join(install, get(config, f"ServerConfig.{key}", str))
            if not os.path.isfile(cert):
                fail(f"httpsEnabled is true but ServerConfig.{key} {cert} does not exist; "
                     f"provide the certificates or set httpsEnabled false")
    backend = get(config, "BackendConfig", dict)
    devices = get(config, "BackendConfig.npuDeviceIds", list)
    if len(devices) != 1 or not isinstance(devices[0], list) or not devices[0] \
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices[0]):
        fail(f"config.json: BackendConfig.npuDeviceIds must be one non-empty list of device ids, got {devices}")
    deploy = get(config, "BackendConfig.ModelDeployConfig", dict)
    max_seq = get(config, "BackendConfig.ModelDeployConfig.maxSeqLen", int)
    max_input = get(config, "BackendConfig.ModelDeployConfig.maxInputTokenLen", int)
    if not 0 < max_input <= max_seq:
        fail(f"config.json: maxInputTokenLen ({max_input}) must be in (0, maxSeqLen {max_seq}]")
    models = deploy.get("ModelConfig")
    if not isinstance(models, list) or len(models) != 1:
        fail("config.json: ModelDeployConfig.ModelConfig must hold exactly one model")
    model = models[0]
    for key, kind in [("modelName", str), ("modelWeightPath", str), ("worldSize", int)]:
        if not isinstance(model.get(key), kind):
            fail(f"config.json: ModelConfig[0].{key} is missing or has the wrong type")
    if not MODEL_NAME.fullmatch(model["modelName"]):  # model_deploy_config.cpp
        fail("The string length is [1, 256] and consists of a match of the type [a-zA-Z0-9_.-]. "
             "The first and last characters must be characters or digits.")
    weights = model["modelWeightPath"]
    if not os.path.isdir(weights) or os.path.islink(weights):
        fail(f"modelWeightPath {weights} is not a directory (or is a symlink)")
    if os.getuid() != 0 and os.stat(weights).st_mode & 0o027:
        fail(f"Path permission exceeds maximum allowed: {weights}, actual=0{os.stat(weights).st_mode & 0o777:o}, "
             f"limit=0750")
    try:
        with open(os.path.join(weights, "config.json")) as f:
            model_config = json.load(f)
        model_config["torch_dtype"], model_config["vocab_size"]
    except (OSError, ValueError, KeyError) as err:
        fail(f"read {weights}/config.json failed (torch_dtype and vocab_size are required): {err!r}")
    # MindIE-LLM router.py: the LLM options of the weights' model type (ModelConfig[0].models.<model_type>)
    options = (model.get("models") or {}).get(model_config.get("model_type"), {})
    if not isinstance(options.get("enable_reasoning", False), bool):
        fail("config.json: models.*.enable_reasoning must be a bool")
    adapters = lora_modules(deploy, model["modelName"])
    schedule = get(config, "BackendConfig.ScheduleConfig", dict)
    for key in ("maxBatchSize", "maxPrefillTokens", "cacheBlockSize"):
        if get(config, f"BackendConfig.ScheduleConfig.{key}", int) <= 0:
            fail(f"config.json: ScheduleConfig.{key} must be positive")
    if schedule["maxPrefillTokens"] < max_input:
        fail("The value of maxPrefillTokens should not be less than maxInputTokenLen.")
    max_iter = get(config, "BackendConfig.ScheduleConfig.maxIterTimes", int)
    if max_iter == 0:
        fail("The value of ScheduleParam.maxIterTimes can not be 0.")
    if get(config, "ServerConfig.port", int) == get(config, "BackendConfig.multiNodesInferPort", int):
        fail("Endpoint port cannot be equal to multiNodesInferPort.")
    world = model["worldSize"]
    local = devices[0]
    master = True
    if backend.get("multiNodesInferEnabled"):
        # As MindIE: npuDeviceIds and worldSize come from this node's entry in the rank table.
        local, master = check_ranktable()
        world = len(local)
        if backend.get("interNodeTLSEnabled", True):
            fail("interNodeTLSEnabled is true but no security/grpc certificates exist; set it false")
    elif world != len(local):
        fail(f"config.json: worldSize {world} != {len(local)} npuDeviceIds")
    return {"planes": planes(server, ports), "model": model["modelName"], "devices": local, "max_seq": max_seq,
            "max_input": max_input, "max_batch": schedule["maxBatchSize"], "world": world, "master": master,
            "max_iter": max_iter, "reasoning": options.get("enable_reasoning", False), "adapters": adapters}


def lora_modules(deploy: dict, model_name: str) -> dict[str, str]:
    """The LoRA adapters MindIE loads at start, by name (MindIE-LLM@8b4871ad model_deploy_config.cpp, and
    mindie_llm/runtime/lora/lora_manager.py for what an adapter directory must hold and its rank)."""
    adapters: dict[str, str] = {}
    max_loras, max_rank = deploy.get("maxLoras", 0), deploy.get("maxLoraRank", 0)
    for module in deploy.get("LoraModules") or []:
        if not all(isinstance(module.get(key), str) for key in ("name", "path", "baseModelName")):
            fail("config.json: LoraModules entries need name, path and baseModelName strings")
        if module["baseModelName"] != model_name:
            log("WARN", f"baseModelName {module['baseModelName']} does not exist and corresponding lora adpater is "
                        f"ignored")
            continue
        path = module["path"]
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not os.path.isfile(os.path.join(path, name)):
                fail(f"LoRA {module['name']}: {path} has no {name}")
        with open(os.path.join(path, "adapter_config.json")) as f:
            rank = json.load(f).get("r", 0)
        if not 0 < rank <= 1024 or (max_rank and rank > max_rank):
            fail("[INVALID LORA RANK], LoRA rank is greater than the max_lora_rank config.")
        adapters.setdefault(module["name"], path)  # a repeated name keeps its first path
    if max_loras and len(adapters) > max_loras:
        fail("[LORA MEMORY ERROR], No empty LoRA slots.")
    return adapters


def check_ranktable() -> tuple[list[int], bool]:
    """Multi-node: RANK_TABLE_FILE (mode 640) must list this node (MIES_CONTAINER_IP); returns this node's
    device ids and whether it is the master (holds rank 0)."""
    path = os.environ.get("RANK_TABLE_FILE")
    if not path or not os.path.isfile(path):
        fail("multiNodesInferEnabled is true but RANK_TABLE_FILE is not set to a file")
    if os.stat(path).st_mode & 0o137:
        fail(f"check permission of {path} failed: it must not exceed 640")
    with open(path) as f:
        table = json.load(f)
    servers = table.get("server_list") or fail("rank table has no server_list")
    if str(len(servers)) != table.get("server_count") or not 2 <= len(servers) <= 60:
        fail("rank table: server_count must be a string equal to len(server_list), in [2, 60]")
    if table.get("status") != "completed" or table.get("version") != "1.0":
        fail("rank table: status must be \"completed\" and version \"1.0\"")
    if len({len(s.get("device", [])) for s in servers}) != 1:
        fail("rank table: every server must have the same number of devices")
    for server in servers:
        for device in server["device"]:
            if not all(isinstance(device.get(k), str) for k in ("device_id", "device_ip", "rank_id")):
                fail("rank table: device_id, device_ip and rank_id must be strings")
    me = os.environ.get("MIES_CONTAINER_IP") or fail("MIES_CONTAINER_IP is not set (this node's IP in the rank table)")
    mine = [s for s in servers if s.get("container_ip") == me]
    if len(mine) != 1:
        fail(f"rank table: no server with container_ip {me}")
    ranks = [int(d["rank_id"]) for s in servers for d in s["device"]]
    if ranks != list(range(len(ranks))):
        fail("rank table: rank_id must run 0..n-1 over the servers in order, then their devices")
    world = os.environ.get("WORLD_SIZE")
    if world is not None and int(world) != len(ranks):
        fail(f"WORLD_SIZE {world} != {len(ranks)} ranks in the rank table")
    return [int(d["device_id"]) for d in mine[0]["device"]], any(d["rank_id"] == "0" for d in mine[0]["device"])


class Daemon:
    def __init__(self, settings: dict):
        self.s = settings
        self.running = 0
        self.waiting = 0
        self.stopping = False
        self.hung = False
        self.failing = False  # its model backend broke: every generation fails, /health stays 200
        self.counts = {"received": 0, "success": 0, "failed": 0, "prompt": 0, "generated": 0}
        self.backends: list[subprocess.Popen] = []

    def start_backends(self) -> None:
        for device in self.s["devices"]:
            p = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(60)"])
            record_pid(p.pid, f"backend npu{device}")
            self.backends.append(p)

    def stop_backends(self) -> None:
        for p in self.backends:
            p.kill()
            p.wait()

    async def hang_check(self) -> None:
        if self.hung or claim("hang"):
            self.hung = True
            log("ERROR", "told to hang")
            await asyncio.Event().wait()

    # --- management plane ---
    def stopped(self) -> web.Response:
        return web.json_response({"error": "The service has been stopped.", "error_type": "Service Unavailable"},
                                 status=503)

    async def health(self, request: web.Request) -> web.Response:
        await self.hang_check()
        return self.stopped() if self.stopping else web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        await self.hang_check()
        return self.stopped() if self.stopping else web.Response(status=200)

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({"model": self.s["model"], "maxSeqLen": self.s["max_seq"],
                                  "maxBatchSize": self.s["max_batch"], "npuDeviceIds": self.s["devices"]})

    async def stop_service(self, request: web.Request) -> web.Response:
        """As MindIE: refuse new requests, answer once the running ones finished; the process stays."""
        if self.stopping:
            return web.Response(status=500)
        self.stopping = True
        while self.running or self.waiting:
            await asyncio.sleep(0.05)
        log("INFO", "service stopped: all requests finished")
        return web.Response(status=200)

    # --- metrics plane ---
    async def metrics(self, request: web.Request) -> web.Response:
        if os.environ.get("MIES_SERVICE_MONITOR_MODE") != "1":
            return web.json_response({"error": "Environment variable MIES_SERVICE_MONITOR_MODE is not set.",
                                      "error_type": "Incomplete Generation"}, status=500)
        c = self.counts
        label = f'{{model_name="{self.s["model"]}"}}'
        lines = []
        for name, kind, value in [
            ("request_received_total", "counter", c["received"]), ("request_success_total", "counter", c["success"]),
            ("request_failed_total", "counter", c["failed"]), ("num_requests_running", "gauge", self.running),
            ("num_requests_waiting", "gauge", self.waiting), ("num_requests_swapped", "gauge", 0),
            ("prompt_tokens_total", "counter", c["prompt"]), ("generation_tokens_total", "counter", c["generated"]),
        ]:
            lines += [f"# HELP {name} {name}", f"# TYPE {name} {kind}", f"{name}{label} {value}"]
        lines += ["# HELP time_to_first_token_seconds ttft", "# TYPE time_to_first_token_seconds histogram"]
        for le in ("0.01", "0.1", "1", "+Inf"):
            lines.append(f'time_to_first_token_seconds_bucket{{model_name="{self.s["model"]}",le="{le}"}} {c["success"]}')
        lines += [f"time_to_first_token_seconds_sum{label} {c['success'] * TOKEN_S}",
                  f"time_to_first_token_seconds_count{label} {c['success']}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    # --- inference plane ---
    async def models(self, request: web.Request) -> web.Response:
        card = {"object": "model", "created": int(time.time()), "owned_by": "MindIE Server"}
        return web.json_response({"object": "list", "data": [
            card | {"id": self.s["model"], "parent": "null"},  # as MindIE writes it: the string
            *(card | {"id": name, "parent": self.s["model"]} for name in self.s["adapters"])]})

    def error(self, status: int, message: str, kind: str = "Input Validation Error") -> web.Response:
        """MindIE's error shape: flat, not OpenAI's; 422 for a request it cannot take."""
        self.counts["failed"] += 1
        return web.json_response({"error": message, "error_type": kind}, status=status)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.infer(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.infer(request, chat=False)

    async def infer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        await self.hang_check()
        self.counts["received"] += 1
        if self.stopping:
            return self.error(503, "The service has been stopped", "Service Unavailable")
        if self.failing or claim("fail_generation"):
            self.failing = True
            if CONTROL:
                with open(os.path.join(CONTROL, "failed_generations"), "a") as f:
                    f.write(f"{os.getpid()} {'chat' if chat else 'completion'}\n")
            return self.error(424, "Generation failed: the model backend stopped responding", "Generation Error")
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return self.error(422, "Failed to parse request context to json")
        if not isinstance(body, dict):
            return self.error(422, "Failed to parse request context to json")
        model = body.get("model")
        if model != self.s["model"] and model not in self.s["adapters"]:
            return self.error(422, "Model not found")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return self.error(422, "messages must be a non-empty list")
            prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return self.error(422, "prompt must be a string")
        prompt_tokens = len(prompt.split()) + (4 * len(body.get("messages", [])) if chat else 0)
        if prompt_tokens > self.s["max_input"]:
            return self.error(422, f"Messages token length must be in (0, {self.s['max_input']}], "
                                   f"but got {prompt_tokens}")
        # As MindIE: no max_tokens means maxIterTimes, and the answer is min(maxIterTimes, max_tokens,
        # maxSeqLen - prompt) tokens long (service_parameter_configuration.md; infer_param.cpp).
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or self.s["max_iter"]
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return self.error(422, "max_tokens must be greater than 0")
        max_tokens = min(max_tokens, self.s["max_iter"], self.s["max_seq"] - prompt_tokens)
        if max_tokens < 1:
            return self.error(422, f"the input leaves no room to generate within maxSeqLen {self.s['max_seq']}")
        if "stream_options" in body:  # MindIE parses no stream_options; an unknown field is refused here
            return self.error(422, "stream_options is not supported by this endpoint")
        tools, problem = offered_tools(body) if chat else ([], None)
        structured, problem = (None, problem) if problem else json_answer(body)
        if problem:
            return self.error(422, problem)
        if tools:  # the "model" calls the first tool it is shown, with arguments of its schema
            function = tools[0]["function"]
            call = {"type": "function", "id": f"call_{uuid.uuid4().hex[:8]}",
                    "function": {"name": function["name"],
                                 "arguments": json.dumps(instance_of(function.get("parameters") or {}))}}
            return await self.call(request, body, call, prompt_tokens)
        if structured is not None:
            words = structured.split(" ")[:max_tokens]  # MindIE cuts at max_tokens, JSON or not
        else:
            start = (sum(prompt.encode()) + (sum(model.encode()) if model != self.s["model"] else 0)) % len(WORDS)
            words = [WORDS[(start + i) % len(WORDS)] for i in range(max_tokens)]
        finish = "stop" if structured is not None and " ".join(words) == structured else "length"
        # enable_reasoning: the thinking parsed out into reasoning_content, unless the request turns it off
        # (chat_template_kwargs.enable_thinking: MindIE's AssignThinkingConfig; docs .../enable_reasoning.md)
        thinking = (chat and structured is None and self.s["reasoning"]
                    and (body.get("chat_template_kwargs") or {}).get("enable_thinking", True) is not False)
        reasoning_words = min(3, len(words) - 1) if thinking else 0
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words),
                 "completion_tokens_details": {"reasoning_tokens": reasoning_words}}
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        self.running += 1
        try:
            if not body.get("stream"):
                await asyncio.sleep(TOKEN_S * len(words))
                text = " ".join(words[reasoning_words:])
                message = {"role": "assistant", "content": text}
                if reasoning_words:
                    message["reasoning_content"] = " ".join(words[:reasoning_words])
                choice = ({"index": 0, "message": message, "finish_reason": finish}
                          if chat else {"index": 0, "text": text, "finish_reason": finish})
                self.count_success(usage)
                return web.json_response({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                          "created": created, "model": model, "choices": [choice],
                                          "usage": usage})
            return await self.stream(request, body, chat, rid, created, words, usage, finish, reasoning_words)
        finally:
            self.running -= 1

    async def call(self, request, body, call: dict, prompt_tokens: int) -> web.StreamResponse:
        """A tool call, as MindIE answers it (atb_llm/models/base/tool_call_parser.py; the vLLM delta shape
        when streamed): finish_reason tool_calls; streamed, the call's id and name first, then its arguments,
        every chunk repeating the role, usage on the last."""
        arguments = call["function"]["arguments"]
        pieces = arguments.split(" ")
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces) + 3,
                 "total_tokens": prompt_tokens + len(pieces) + 3}
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": body["model"]}
        if not body.get("stream"):
            self.count_success(usage)
            message = {"role": "assistant", "content": "", "tool_calls": [call]}
            return web.json_response({**head, "choices": [{"index": 0, "message": message,
                                                           "finish_reason": "tool_calls"}], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        parts = [{"index": 0, "type": "function", "id": call["id"], "function": {"name": call["function"]["name"]}}]
        parts += [{"index": 0, "function": {"arguments": p if i == 0 else " " + p}} for i, p in enumerate(pieces)]
        for i, part in enumerate(parts):
            await asyncio.sleep(TOKEN_S)
            last = i == len(parts) - 1
            chunk = {**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"role": "assistant", "tool_calls": [part]},
                 "finish_reason": "tool_calls" if last else None}], **({"usage": usage} if last else {})}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        self.count_success(usage)
        await response.write_eof()
        return response

    def count_success(self, usage: dict) -> None:
        self.counts["success"] += 1
        self.counts["prompt"] += usage["prompt_tokens"]
        self.counts["generated"] += usage["completion_tokens"]

    async def stream(self, request, body, chat, rid, created, words, usage, finish_reason,
                     reasoning_words: int = 0) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        crash = claim("crash_mid_stream")
        engine_error = claim("stream_error")
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(choice: dict, extra: dict | None = None) -> None:
            chunk = {"id": rid, "object": kind, "created": created, "model": body["model"],
                     "choices": [choice], **(extra or {})}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        for i, word in enumerate(words):
            await asyncio.sleep(TOKEN_S)
            if crash and i == 3:  # as the OOM killer would: no cleanup, backends left to the supervisor
                os.kill(os.getpid(), signal.SIGKILL)
            if engine_error and i == 3:  # as MindIE: plain text into the open stream, then it closes
                await response.write(b"Engine callback timeout: the engine did not answer within tokenTimeout")
                await response.write_eof()
                self.counts["failed"] += 1
                return response
            text = word if i in (0, reasoning_words) else " " + word
            field = "reasoning_content" if i < reasoning_words else "content"
            last = i == len(words) - 1
            finish = finish_reason if last else None
            extra = {"usage": usage} if last else None  # MindIE: usage rides on the finishing chunk
            if chat:
                delta = {"role": "assistant", field: text} if i == 0 else {field: text}
                await send({"index": 0, "delta": delta, "finish_reason": finish}, extra)
            else:
                await send({"index": 0, "text": text, "finish_reason": finish}, extra)
        await response.write(b"data: [DONE]\n\n")
        self.count_success(usage)
        await response.write_eof()
        return response


def _tool_problem(tool) -> str | None:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        return "Parameter tools item must be an object with type function"
    if not TOOL_NAME.match(str(tool["function"].get("name", ""))):
        return "Parameter tools function name is invalid"
    return None


def offered_tools(body: dict) -> tuple[list[dict], str | None]:
    """The tools MindIE puts in the chat template, or its 422 message (MindIE-LLM@8b4871ad
    single_req_vllm_openai_infer_interface.cpp: GetToolChoiceAsString, CheckToolObject, FilterToolChoice):
    none -> no tools; auto, required or unset -> all (required forces nothing); a named function -> that
    one only, none when it is not among them. tool_choice without tools is ignored."""
    tools = body.get("tools")
    if tools is None:
        return [], None
    if not isinstance(tools, list):
        return [], "Tools not array"
    for tool in tools:
        if problem := _tool_problem(tool):
            return [], problem
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            return [], "Parameter tool_choice string not in [none, auto, required]"
        return ([] if choice == "none" else tools), None
    if not isinstance(choice, dict):
        return [], "Parameter tool_choice not string or object"
    if problem := _tool_problem(choice):
        return [], problem
    return [t for t in tools if t["function"]["name"] == choice["function"]["name"]], None


def instance_of(schema: dict):
    """A value of a JSON schema: what constrained decoding lets the stand-in's "model" say."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: instance_of(sub) for name, sub in properties.items()
                if name in schema.get("required", properties)}
    return {"array": lambda: [instance_of(schema.get("items", {}))], "string": lambda: WORDS[0],
            "integer": lambda: 1, "number": lambda: 1.5, "boolean": lambda: True, "null": lambda: None}[kind]()


def json_answer(body: dict) -> tuple[str | None, str | None]:
    """The JSON text a response_format asks for (None: plain text), or MindIE's 422 message
    (MindIE-LLM@8b4871ad src/server/endpoint/utils/infer_param.cpp AssignResponseFormat)."""
    response_format = body.get("response_format")
    if response_format is None:
        return None, None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None, None
    if kind == "json_object":
        return json.dumps({"answer": " ".join(WORDS[:3])}), None
    if kind != "json_schema":
        return None, f"Parameter response_format.type must be 'json_object', 'json_schema' or 'text', got '{kind}'"
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not 1 <= len(str(spec.get("name") or "")) <= 64:
        return None, "Parameter response_format.json_schema.name must be a string of 1 to 64 characters"
    if not isinstance(spec.get("schema"), dict):
        return None, "Parameter response_format.json_schema.schema must be an object"
    return json.dumps(instance_of(spec["schema"])), None


def routes(daemon: Daemon, planes: set[str]) -> web.Application:
    app = web.Application()
    if "inference" in planes:
        app.router.add_post("/v1/chat/completions", daemon.chat)
        app.router.add_post("/v1/completions", daemon.completions)
        app.router.add_get("/v1/models", daemon.models)
    if "management" in planes:
        app.router.add_get("/health", daemon.health)
        app.router.add_get("/v2/health/live", daemon.health)
        app.router.add_get("/v2/health/ready", daemon.ready)
        app.router.add_get("/info", daemon.info)
        app.router.add_get("/stopService", daemon.stop_service)
    if "metrics" in planes:
        app.router.add_get("/metrics", daemon.metrics)
    return app


async def serve(settings: dict) -> None:
    daemon = Daemon(settings)
    daemon.start_backends()
    loop = asyncio.get_running_loop()

    def terminate() -> None:  # SIGTERM: MindIE takes its process group down with it, then aborts
        print("Daemon is killing, please wait about 1 seconds...", flush=True)
        time.sleep(float(os.environ.get("STANDIN_TERM_S", "0")))  # a slow exit holds the NPUs meanwhile
        daemon.stop_backends()
        os.abort()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    load_s = float(os.environ.get("STANDIN_LOAD_S", "1"))
    log("INFO", f"loading {settings['model']} on NPUs {settings['devices']} ({load_s:g} s)")
    await asyncio.sleep(load_s)
    if claim("fail_load"):
        daemon.stop_backends()
        fail("load weights failed: out of NPU memory")
    by_address = settings["planes"]
    if not settings["master"]:  # as MindIE: only the rank-0 node takes requests
        log("INFO", "Multi Nodes infer slave instance need not init TokenizerProcessPool and HttpWrapper")
        by_address = {}
    for (ip, port), planes in by_address.items():
        runner = web.AppRunner(routes(daemon, planes), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, ip, port).start()
        except OSError as err:
            daemon.stop_backends()
            fail(f"Management or Business or Metrics Http server listen port is occupied: {ip}:{port}: {err}")
    print("Daemon start success!", flush=True)
    await asyncio.Event().wait()


RECORDED_ENV = ("MIES_INSTALL_PATH", "MIES_CONFIG_JSON_PATH", "MIES_SERVICE_MONITOR_MODE", "NPU_MEMORY_FRACTION",
                "OMP_NUM_THREADS", "MINDIE_LOG_TO_STDOUT", "ASCEND_RT_VISIBLE_DEVICES", "RANK_TABLE_FILE",
                "WORLD_SIZE", "MIES_CONTAINER_IP", "MASTER_IP", "MASTER_PORT", "HCCL_CONNECT_TIMEOUT",
                "HCCL_OP_EXPANSION_MODE", "ATB_LLM_HCCL_ENABLE", "http_proxy", "https_proxy", *REQUIRED_ENV,
                "ATB_WORKSPACE_MEM_ALLOC_ALG_TYPE", "TASK_QUEUE_ENABLE", "PATH", "PYTHONPATH", "PYTHONHOME",
                "VIRTUAL_ENV", "LD_LIBRARY_PATH", "PYTORCH_INSTALL_PATH")


def record_start(path: str, config: dict) -> None:
    """For the tests: what this daemon was given."""
    if not CONTROL:
        return
    folder = os.path.join(CONTROL, "started")
    os.makedirs(folder, exist_ok=True)
    seen = {"pid": os.getpid(), "config_path": path, "mode": f"{os.stat(path).st_mode & 0o777:o}", "config": config,
            "env": {k: os.environ.get(k) for k in RECORDED_ENV}, "cwd": os.getcwd(),
            "rank_table": json.load(open(os.environ["RANK_TABLE_FILE"])) if os.environ.get("RANK_TABLE_FILE") else None}
    # Named by start time, so that sorting the names orders the starts (by pid, 998 sorts after 1019).
    with open(os.path.join(folder, f"{time.time_ns()}-{os.getpid()}.json"), "w") as f:
        json.dump(seen, f)


def main() -> None:
    try:
        os.setpgrp()  # as MindIE: it leads its own process group, which it kills on failure
    except PermissionError:
        pass  # already a session leader (started that way), hence its group's leader
    record_pid(os.getpid(), "daemon")
    check_env()
    check_python()
    path, config = load_config()
    log("INFO", f"read config {path}")
    record_start(path, config)
    if not os.access(os.getcwd(), os.W_OK) or os.path.basename(os.getcwd()) == "bin":
        fail(f"the working directory {os.getcwd()} must be writable and not bin/: kernel_meta is written there")
    settings = check_config(config)
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if visible is not None and max(settings["devices"]) >= len(visible.split(",")):
        fail(f"npuDeviceIds {settings['devices']} are not all visible: ASCEND_RT_VISIBLE_DEVICES={visible} "
             f"renumbers the NPUs from 0")
    take_npus(settings["devices"])
    asyncio.run(serve(settings))


def take_npus(devices: list[int]) -> None:
    """As the hardware: an NPU another live daemon of this node holds cannot be used (its memory is
    taken). The tests' control folder keeps who holds which."""
    if not CONTROL:
        return
    folder = os.path.join(CONTROL, "npus")
    os.makedirs(folder, exist_ok=True)
    node = os.environ.get("MIES_CONTAINER_IP") or "local"
    for device in devices:
        path = os.path.join(folder, f"{node}-{device}")
        try:
            holder = int(open(path).read())
        except (OSError, ValueError):
            holder = None
        if holder and holder != os.getpid() and alive(holder):
            with open(os.path.join(CONTROL, "npu_conflicts"), "a") as f:
                f.write(f"{os.getpid()} {node} {device} {holder}\n")
            fail(f"aclrtSetDevice failed: NPU {device} is in use by process {holder} (out of device memory)")
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    main()
