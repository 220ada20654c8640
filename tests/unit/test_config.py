"""Deploy configs: the shipped ones pass, mistakes fail with the field's path and a fix."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raystack.app import build_backend, deployment_options
from raystack.config import Backend, ConfigError, parse_config
from raystack.serve_file import load_serve_config
from tests import prime_model_configs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "deploy_configs").glob("*.yaml"))


def shipped_args(name: str = "local.yaml") -> dict:
    """The whole service a shipped file declares (its router and models), as config check assembles it."""
    [(_, config)] = load_serve_config(ROOT / "deploy_configs" / name)
    return config.model_dump(mode="json")


def backend_args(name: str = "local.yaml") -> dict:
    """The args of a shipped file's first backend application."""
    return yaml.safe_load((ROOT / "deploy_configs" / name).read_text())["applications"][1]["args"]


def local_args() -> dict:
    return shipped_args("local.yaml")


def test_shipped_configs_pass_config_check(capsys, monkeypatch, tmp_path):
    from raystack.cli import main  # in this process: vLLM, which it imports to check engine arguments, loads once

    monkeypatch.setenv("RAYSTACK_CACHE_DIR", str(prime_model_configs(tmp_path)))  # their models' config.json
    assert main(["config", "check", *map(str, CONFIGS)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if ": OK (" in line] == list(map(str, CONFIGS))
    assert "  qwen3-32b@vllm: needs a vLLM-Ascend node: raystack.io/engine-vllm in 0.23,0.32; 47.3 GiB HBM per NPU " \
           "(config.json in the cache)" in out.splitlines()
    assert "  qwen3-32b@mindie: needs a MindIE node: raystack.io/engine-mindie in 2.0,2.1,2.2,2.3,3.0; 47.3 GiB HBM " \
           "per NPU (config.json in the cache)" in out.splitlines()


def test_qwen3_config_is_tp2_on_910b_with_autoscaling():
    [(_, config)] = load_serve_config(ROOT / "deploy_configs/qwen3.yaml")
    backend = config.models[0].backends[0]
    assert config.models[0].source == "modelscope://Qwen/Qwen3-32B"
    assert (backend.device, backend.parallelism.tensor, backend.accelerator.type) == ("npu", 2, "Ascend910B")
    assert (backend.autoscaling.min_replicas, backend.autoscaling.max_replicas) == (1, 4)


def test_qwen3_serves_vllm_and_mindie_under_one_name_and_every_npu_config_has_a_mindie_peer():
    [(_, config)] = load_serve_config(ROOT / "deploy_configs/qwen3.yaml")
    [model] = config.models
    assert model.name == "qwen3-32b" and [b.engine for b in model.backends] == ["vllm", "mindie"]
    for path in CONFIGS:
        for _, config in load_serve_config(path):
            for model in config.models:
                engines = {b.engine: b for b in model.backends}
                if "vllm" in engines and engines["vllm"].device == "npu":
                    mindie = engines.get("mindie")
                    assert mindie is not None, f"{path.name}: {model.name} has no MindIE backend"
                    assert mindie.parallel.tensor in {b.parallel.tensor for b in model.backends if b.engine == "vllm"}
                    # Tuned as deliberately as vLLM: GPUStack's MindIE settings (ascend_mindie.py)
                    assert {"MINDIE_LLM_FRAMEWORK_BACKEND": "ATB", "MINDIE_ASYNC_SCHEDULING_ENABLE": "1",
                            "ATB_WORKSPACE_MEM_ALLOC_ALG_TYPE": "3", "TASK_QUEUE_ENABLE": "1"}.items() <= mindie.env.items()


def test_mindie_settings_belong_to_engine_mindie_on_npus():
    with pytest.raises(ValueError, match="engine: mindie runs on Ascend NPUs only"):
        Backend.model_validate({"name": "m", "engine": "mindie", "device": "cpu"})
    with pytest.raises(ValueError, match="engine_args are vLLM's"):
        Backend.model_validate({"name": "m", "engine": "mindie", "engine_args": {"dtype": "bfloat16"}})
    with pytest.raises(ValueError, match="mindie: applies to engine: mindie only"):
        Backend.model_validate({"name": "m", "engine": "vllm", "mindie": {}})
    backend = Backend.model_validate({"name": "m", "engine": "mindie", "parallelism": {"tensor": 8, "pipeline": 2}})
    assert backend.mindie.npu_memory_fraction == 0.9
    options = deployment_options(backend)
    # One daemon per node: the replica holds its node's 8 NPUs; the second node is one bundle of 8.
    assert options["ray_actor_options"]["resources"] == {"NPU": 8}
    assert [b["NPU"] for b in options["placement_group_bundles"]] == [8, 8]
    assert options["placement_group_strategy"] == "STRICT_SPREAD"


def test_unknown_key_is_named_by_its_path(tmp_path):
    raw = yaml.safe_load((ROOT / "deploy_configs/local.yaml").read_text())
    raw["applications"][1]["args"]["backend"]["max_model_lenght"] = 10
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "raystack.cli", "config", "check", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "applications[1].args.backend.max_model_lenght: unknown key" in result.stderr


def test_misspelt_engine_arg_suggests_the_right_one():
    args = backend_args()
    args["backend"]["engine_args"] = {"enforce_eagr": True}
    with pytest.raises(ConfigError, match=r"engine_args\.enforce_eagr: not a vLLM engine argument \(did you mean 'enforce_eager'\?\)"):
        build_backend(args)


@pytest.mark.parametrize("serving_args, message", [
    ({"tool_call_parsr": "hermes"}, "serving_args.tool_call_parsr: not a vLLM serving option (vLLM's BaseFrontendArgs; "
                                    "the HTTP server's own options are the router's) (did you mean 'tool_call_parser'?)"),
    ({"port": 9000}, "serving_args.port: not a vLLM serving option"),  # the HTTP server's: the router's
    ({"tool_call_parser": "hermez"}, "serving_args.tool_call_parser: hermez: not a tool call parser vLLM ships "
                                     "(did you mean 'hermes'?)"),
    ({"enable_auto_tool_choice": True}, "serving_args.enable_auto_tool_choice: needs tool_call_parser too"),
])
def test_a_wrong_vllm_serving_option_is_refused_with_the_fix(serving_args, message):
    args = backend_args()
    args["backend"]["serving_args"] = serving_args
    with pytest.raises(ConfigError) as err:
        build_backend(args)
    assert message in str(err.value)


def test_a_misspelt_reasoning_parser_is_refused_with_the_closest_name():
    args = backend_args()
    args["backend"]["engine_args"]["reasoning_parser"] = "deepseek-r1"
    with pytest.raises(ConfigError, match=r"engine_args.reasoning_parser: deepseek-r1: not a reasoning parser vLLM "
                                          r"ships \(did you mean 'deepseek_r1'\?\)"):
        build_backend(args)


def test_qwen3_configs_parse_tools_and_reasoning_and_r1_configs_reasoning():
    for path in CONFIGS:
        for _, config in load_serve_config(path):
            for model in config.models:
                for backend in (b for b in model.backends if b.engine == "vllm" and b.device == "npu"):
                    where = f"{path.name}: {model.name}@{backend.name}"
                    if model.name.startswith("qwen3"):
                        assert backend.engine_args["reasoning_parser"] == "qwen3", where
                        assert backend.serving_args == {"enable_auto_tool_choice": True,
                                                        "tool_call_parser": "hermes"}, where
                    else:
                        assert model.name.startswith("deepseek-r1-distill"), where
                        assert backend.engine_args["reasoning_parser"] == "deepseek_r1", where


def test_missing_local_model_fails_before_deploying(tmp_path):
    args = backend_args()
    args["model"]["source"] = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match=r"model smollm2: source: .*no-such-model is not a directory"):
        build_backend(args)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a["models"][0]["backends"][0]["autoscaling"].update(min_replicas=3, max_replicas=2),
         "min_replicas (3) is greater than max_replicas (2)"),
        (lambda a: a["models"][0]["backends"][0].update(parallelism={"tensor": 2}),
         "parallelism above 1 needs device: npu"),
        (lambda a: a["models"].append(dict(a["models"][0])), "model names must be unique"),
        (lambda a: a["models"][0].update(name="bad name!"), "models[0].name"),
        (lambda a: a.pop("models"), "models: Field required"),
        (lambda a: a["models"][0].pop("source"),
         "models[0]: Value error, source: required, because backend 'vllm' (engine: vllm) loads the model"),
        (lambda a: a["models"][0]["backends"][0].update(synthetic={"ttft_ms": 1}),
         "synthetic: applies to engine: synthetic only"),
        (lambda a: a["models"][0]["backends"][0].update(engine="synthetic"), "engine_args apply to engine: vllm only"),
        (lambda a: a["models"][0]["backends"][0].update(engine="synthetic", engine_args={}, device="npu"),
         "engine: synthetic runs no model and needs no NPU"),
        (lambda a: a["models"][0]["backends"][0].update(engine="synthetic", engine_args={}, serving_args={"x": 1}),
         "serving_args apply to engine: vllm only"),
        (lambda a: a["models"][0]["backends"][0].update(engine="synthetic", engine_args={}, synthetic={"ttft": 1}),
         "models[0].backends[0].synthetic.ttft: unknown key"),
        # What MindIE would refuse at start, refused by config check instead.
        (lambda a: (a["models"][0].update(name="qwen3-"), a["models"][0]["backends"][0].update(
            engine="mindie", device="npu", engine_args={}, serving_args={})),
         "engine: mindie serves the model as ModelConfig.modelName, and MindIE refuses 'qwen3-'"),
        (lambda a: a["models"][0]["backends"][0].update(
            engine="mindie", device="npu", engine_args={}, serving_args={},
            mindie={"model_options": {"qwen3": {"enable_reasoning": "yes"}}}),
         "model_options.qwen3.enable_reasoning must be true or false"),
        (lambda a: a["models"][0]["backends"][0].update(engine="mindie", device="npu", engine_args={}, max_model_len=4096,
                                                        mindie={"max_prefill_tokens": 2048}),
         "mindie.max_prefill_tokens (2048) is below max_input_token_len (max_model_len, 4096)"),
        (lambda a: a["models"][0]["backends"][0].update(engine="mindie", device="npu", engine_args={}, mindie={
            "max_input_token_len": 8192, "max_prefill_tokens": 4096}),
         "max_prefill_tokens (4096) is below max_input_token_len (8192); MindIE refuses that"),
        (lambda a: a["models"][0]["backends"][0].update(device="npu", accelerator={"type": "Ascend999"}),
         "unknown NPU type 'Ascend999'"),
    ],
)
def test_invalid_configs_say_what_is_wrong(change, message):
    args = local_args()
    change(args)
    with pytest.raises(ConfigError) as err:
        parse_config(args)
    assert message in str(err.value)


def test_cpu_backend_reserves_one_cpu_and_router_fits_beside_it_on_two_cores():
    config = parse_config(local_args())
    options = deployment_options(config.models[0].backends[0])
    assert options["ray_actor_options"]["num_cpus"] + config.router.cpus <= 2
    assert "placement_group_bundles" not in options
    assert options["max_constructor_retry_count"] == 3  # a replica that cannot start fails fast


def test_npu_tensor_parallel_backend_gets_one_npu_bundle_per_rank():
    backend = Backend(name="v", device="npu", parallelism={"tensor": 2, "pipeline": 2},
                      accelerator={"type": "Ascend910B"}, resources={"cpus": 4})
    options = deployment_options(backend)
    bundles = options["placement_group_bundles"]
    assert len(bundles) == 4 and all(b["NPU"] == 1 for b in bundles)
    assert bundles[0]["CPU"] == 4 and all("CPU" not in b for b in bundles[1:])
    # Ascend910B is the A2 family: every bundle on a node `raystack start` labelled so (910B1..B4-1 alike),
    # which runs vLLM on NPUs (vllm-ascend) in a series raystack knows
    selector = {"raystack.io/npu-family": "Ascend910B", "raystack.io/engine-vllm": "in(0.23,0.32)"}
    assert options["placement_group_bundle_label_selector"] == [selector]
    assert options["ray_actor_options"]["label_selector"] == selector


def test_each_npu_engine_selects_its_own_nodes_and_cpu_or_engine_free_backends_select_none():
    from ray._private.label_utils import validate_label_selector

    mindie = deployment_options(Backend(name="m", engine="mindie", parallelism={"tensor": 2}))
    selector = mindie["ray_actor_options"]["label_selector"]
    assert selector == {"raystack.io/engine-mindie": "in(2.0,2.1,2.2,2.3,3.0)"}
    assert validate_label_selector(selector) is None  # what Ray itself checks before it schedules
    # The embedded CPU default runs on the node `serve run` starts by itself, which has no label.
    cpu = deployment_options(parse_config(local_args()).models[0].backends[0])
    assert "label_selector" not in cpu["ray_actor_options"]
    plugin = Backend(name="t", engine="toy", device="npu", parallelism={"tensor": 1})  # tests/toy_engine.py
    assert "label_selector" not in deployment_options(plugin)["ray_actor_options"]


def test_autoscaling_defaults_scale_on_load():
    autoscaling = parse_config(local_args()).models[0].backends[0].autoscaling.to_serve()
    assert 0 < autoscaling["target_ongoing_requests"] < 100  # Ray Serve LLM's 1e9 never scales


def test_every_backend_queue_is_bounded_and_routed_by_the_models_policy():
    args = local_args()
    args["models"][0]["routing"] = {"policy": "prefix_affinity", "affinity_slack": 2}
    model = parse_config(args).models[0]
    options = deployment_options(model.backends[0], model.routing)
    assert options["max_queued_requests"] == 128  # beyond it: 429, never an unbounded queue
    router_config = options["request_router_config"]
    assert router_config.request_router_class.endswith(":BackendRequestRouter")
    assert router_config.request_router_kwargs == {"policy": "prefix_affinity", "affinity_slack": 2,
                                                   "prefix_chars": 2048, "kv_load_tokens": 256}


def test_weighted_routing_needs_some_weight():
    args = local_args()
    args["models"][0]["routing"] = {"policy": "weighted"}
    args["models"][0]["backends"][0]["weight"] = 0
    with pytest.raises(ConfigError, match="weighted needs a backend with weight above 0"):
        parse_config(args)


def test_synthetic_backend_has_no_source_defaults_to_cpu_and_a_tenth_of_a_core():
    config = parse_config(shipped_args("synthetic.yaml"))
    [model] = config.models
    assert model.source is None and not model.loads_model
    backend = Backend(name="s", engine="synthetic")
    assert (backend.device, backend.replica_cpus) == ("cpu", 0.1)
    assert backend.synthetic.model_dump() == {"ttft_ms": 50, "tokens_per_s": 50, "output_tokens": 64,
                                                "startup_s": 0}
    options = deployment_options(model.backends[0])
    assert 2 * options["ray_actor_options"]["num_cpus"] + config.router.cpus <= 2  # 2 replicas + router
    assert "resources" not in options["ray_actor_options"]


def test_build_backend_resolves_no_source_for_a_synthetic_model():
    assert build_backend(backend_args("synthetic.yaml")) is not None


def test_a_model_may_mix_a_synthetic_backend_with_a_real_one():
    args = local_args()
    args["models"][0]["backends"].append({"name": "synthetic", "engine": "synthetic"})
    model = parse_config(args).models[0]
    assert model.loads_model and [b.replica_cpus for b in model.backends] == [1, 0.1]


def test_api_keys_are_off_locally_and_on_in_every_cluster_config():
    assert parse_config(local_args()).router.api_keys is None
    for name in ("qwen3.yaml", "qwen3-14b.yaml", "deepseek-r1-distill-qwen-7b.yaml",
                 "deepseek-r1-distill-qwen-14b.yaml", "deepseek-r1-distill-qwen-32b.yaml"):
        assert parse_config(shipped_args(name)).router.api_keys.env == "RAYSTACK_API_KEYS", name


def test_a_proxy_timeout_shorter_than_the_routers_is_refused(tmp_path):
    # As the cluster configs had it: Serve's proxy at 600 s cut 600-3600 s answers with no error event.
    raw = yaml.safe_load((ROOT / "deploy_configs/qwen3.yaml").read_text())
    raw["http_options"]["request_timeout_s"] = 600
    (tmp_path / "past_no_proxy.yaml").write_text(yaml.safe_dump(raw))
    assert load_serve_config(tmp_path / "past_no_proxy.yaml")  # one hop: the router listens itself
    raw["proxy_location"] = "EveryNode"  # the router reached through Serve's proxy
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"request_timeout_s \(600 s\) is shorter than router.request_timeout_s"):
        load_serve_config(tmp_path / "short.yaml")
    raw["applications"][0]["args"]["request_timeout_s"] = 600
    (tmp_path / "aligned.yaml").write_text(yaml.safe_dump(raw))
    assert load_serve_config(tmp_path / "aligned.yaml")


def qwen3_file() -> dict:
    return yaml.safe_load((ROOT / "deploy_configs/qwen3.yaml").read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f["applications"][1].update(route_prefix="/vllm"), "set route_prefix: null. A backend answers through its router"),
        (lambda f: f["applications"][2]["args"].update(withheld_env=[]), "withheld_env must name RAYSTACK_API_KEYS"),
        (lambda f: f["applications"][2]["args"].update(model={"name": "qwen3-32b", "source": "modelscope://Qwen/Qwen3-14B"}),
         "the backends of model qwen3-32b disagree on what it is"),
        (lambda f: f["applications"][2]["args"]["backend"].update(name="vllm"), "backend names within a model must be unique"),
        (lambda f: f["applications"][2]["args"].update(router="other"), "router: other is not an application of this file"),
        (lambda f: f["applications"][1]["args"]["backend"].update(graceful_shutdown_timeout_s=60),
         "backend.graceful_shutdown_timeout_s (60 s) is shorter than router.request_timeout_s (3600 s)"),
        (lambda f: f["applications"].pop(0), "no application has import_path: raystack.app:build_router"),
        (lambda f: f["applications"][1].update(name="qwen3-32b.vllm"),
         "(qwen3-32b.vllm): name this application raystack.qwen3-32b.vllm, after its router, model and backend"),
        (lambda f: f["applications"].append({"name": "lonely", "route_prefix": "/lonely", "args": {"port": 8001},
                                             "import_path": "raystack.app:build_router"}),
         "no backend application names the router lonely"),
        (lambda f: f["applications"].append({"name": "second", "route_prefix": "/second",
                                             "import_path": "raystack.app:build_router"}),
         "routers raystack and second would both listen on port 8000: give each its own port"),
        (lambda f: (f.update(proxy_location="EveryNode"), f["applications"][0]["args"].update(port=8000)),
         "router port 8000 is Serve's proxy's port (http_options.port, proxy_location: EveryNode)"),
    ],
)
def test_a_file_whose_applications_do_not_fit_together_is_refused(tmp_path, change, message):
    raw = qwen3_file()
    change(raw)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_serve_config(tmp_path / "bad.yaml")
    assert message in str(err.value)


def test_a_whole_config_splits_into_the_applications_a_file_would_hold():
    config = parse_config(shipped_args("qwen3.yaml"))
    apps = config.backend_apps("raystack")
    assert list(apps) == ["raystack.qwen3-32b.vllm", "raystack.qwen3-32b.mindie"]
    assert all(app.withheld_env == ["RAYSTACK_API_KEYS"] and app.router == "raystack" for app in apps.values())
    assert parse_config(config.assemble(config.router, list(apps.values())).model_dump()) == config


def test_a_file_of_the_former_single_application_format_says_what_replaced_it(tmp_path):
    raw = {"applications": [{"name": "raystack", "route_prefix": "/", "import_path": "raystack.app:build_app",
                             "args": {"models": [{"name": "m", "backends": [{"name": "s", "engine": "synthetic"}]}]}}]}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"raystack.app:build_app \(one application for the router and all "
                                          r"backends\) is replaced by a router application"):
        load_serve_config(tmp_path / "old.yaml")
    from raystack.app import build_app  # what `serve run` of such a file calls

    with pytest.raises(ConfigError, match="one application per backend"):
        build_app(raw["applications"][0]["args"])


def test_validators_check_and_leave_what_they_are_given_as_it_is():
    from raystack.config import BackendApp, RouterConfig

    backend = Backend(name="s", engine="synthetic")
    app = BackendApp(model={"name": "m"}, backend=backend)
    assert backend.graceful_shutdown_timeout_s is None and backend.longest_answer_s == 3600
    assert app.backend.graceful_shutdown_timeout_s == 3600  # a backend application's own default bound
    whole = parse_config({"router": {"request_timeout_s": 60}, "models": [{"name": "m", "backends": [backend]}]})
    assert backend.graceful_shutdown_timeout_s is None
    assert whole.models[0].backends[0].longest_answer_s == 60  # in a whole config, its router's
    for built in (backend, app.backend, Backend(name="c", device="cpu", parallelism="auto"),
                  Backend(name="m", engine="mindie", mindie=None)):  # `mindie:` with nothing under it
        assert Backend.model_validate(built.model_dump()) == built  # as a replica and Serve's user_config get it
    assert Backend(name="c", device="cpu", parallelism="auto").parallel.world_size == 1
    assert Backend(name="m", engine="mindie", mindie=None).mindie.npu_memory_fraction == 0.9
    with pytest.raises(ConfigError, match="graceful_shutdown_timeout_s \\(30 s\\) is shorter than "
                                          "router.request_timeout_s \\(60 s\\)"):
        parse_config({"router": {"request_timeout_s": 60},
                      "models": [{"name": "m", "backends": [{"name": "s", "engine": "synthetic",
                                                             "graceful_shutdown_timeout_s": 30}]}]})
    assert RouterConfig().request_timeout_s == 3600


def test_the_running_router_leaves_out_a_backend_that_breaks_a_rule_with_it_and_serves_the_rest():
    from raystack.config import BackendApp, RouterConfig
    from raystack.router.catalogue import BackendRef, Catalogue

    router = RouterConfig(api_keys={"env": "KEYS"})
    good = BackendApp(model={"name": "m"}, backend={"name": "s", "engine": "synthetic"}, withheld_env=["KEYS"])
    leaky = BackendApp(model={"name": "m"}, backend={"name": "t", "engine": "synthetic"})  # withholds another
    catalogue = Catalogue.of(router, [BackendRef("raystack.m.s", "d", good), BackendRef("raystack.m.t", "d", leaky)])
    assert [b.name for b in catalogue.models["m"].backends] == ["s"] and list(catalogue.refs) == [("m", "s")]
