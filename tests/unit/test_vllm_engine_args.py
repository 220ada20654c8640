"""The vLLM engine arguments raystack builds pass vLLM's own validation (create_engine_config).

Tensor parallel with vLLM's Ray executor cannot run on this CPU platform (vLLM: "current platform cpu
does not support ray"), so the NPU path is checked up to where vLLM validates it, on a real checkpoint.
"""

from raystack.config import Backend
from raystack.engines.vllm.args import CPU_DEFAULT_KV_CACHE_BYTES, build_engine_args
from raystack.models.sources import resolve


def vllm_config(backend: Backend):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = build_engine_args("smollm2", resolve("smollm2-135m-instruct"), backend)
    return args, AsyncEngineArgs(**args).create_engine_config()


def test_npu_tensor_parallel_backend_uses_the_ray_executor():
    # SmolLM2-135M has 9 attention heads: tensor parallel 3 divides them.
    backend = Backend(name="v", device="npu", parallelism={"tensor": 3}, max_model_len=2048,
                      engine_args={"dtype": "bfloat16"})
    args, config = vllm_config(backend)
    assert args["served_model_name"] == ["smollm2"]
    assert config.parallel_config.distributed_executor_backend == "ray"
    assert config.parallel_config.tensor_parallel_size == 3
    assert config.parallel_config.world_size == 3
    assert config.model_config.max_model_len == 2048


def test_cpu_backend_gets_a_fixed_kv_cache_instead_of_a_ram_fraction():
    backend = Backend(name="v", device="cpu", max_model_len=1024)
    args, config = vllm_config(backend)
    assert args["enforce_eager"] is True
    assert config.cache_config.kv_cache_memory_bytes == CPU_DEFAULT_KV_CACHE_BYTES
    # an explicit setting in the deploy config wins over the default
    explicit = Backend(name="v", device="cpu", engine_args={"gpu_memory_utilization": 0.3})
    assert "kv_cache_memory_bytes" not in build_engine_args("m", resolve("smollm2-135m-instruct"), explicit)


def test_serving_options_reach_vllms_serving_layer_as_vllm_serve_would_set_them():
    from raystack.engines.vllm.compat import vllm_api
    from raystack.engines.vllm.engine import serve_namespace

    backend = Backend(name="v", device="cpu", engine_args={"reasoning_parser": "qwen3"},
                      serving_args={"enable_auto_tool_choice": True, "tool_call_parser": "hermes",
                                    "response_role": "model"})
    args = serve_namespace(vllm_api(), build_engine_args("m", resolve("smollm2-135m-instruct"), backend),
                           backend.serving_args)
    # What init_app_state reads to build vLLM's chat serving: the parsers, the role; defaults stay vLLM's.
    assert (args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser, args.response_role) == (
        True, "hermes", "qwen3", "model")
    assert args.chat_template is None and args.served_model_name == ["m"]


def test_a_mapping_engine_argument_becomes_vllms_config_object_as_vllm_serve_makes_it():
    from raystack.engines.vllm.compat import vllm_api
    from raystack.engines.vllm.engine import serve_namespace

    vllm = vllm_api()
    backend = Backend(name="v", device="cpu", engine_args={
        "reasoning_parser": "olmo3", "structured_outputs_config": {"enable_in_reasoning": True}})
    args = serve_namespace(vllm, build_engine_args("m", resolve("smollm2-135m-instruct"), backend), {})
    engine_args = vllm.AsyncEngineArgs.from_cli_args(args)
    # a dict here failed the replica at start ("'dict' object has no attribute 'reasoning_parser'")
    assert engine_args.structured_outputs_config.enable_in_reasoning is True


def test_a_replica_under_kv_aware_publishes_kv_cache_events_where_vllm_serve_would_take_them():
    """What VLLMEngine.start builds from the arguments (serve_namespace, then vLLM's own parser and config):
    vLLM's KVEventsConfig on the replica's ports and topic, with the prefix cache it reports on."""
    from raystack.engines.vllm.compat import vllm_api
    from raystack.engines.vllm.engine import serve_namespace
    from raystack.engines.vllm.kv_events import Publisher

    vllm = vllm_api()
    backend = Backend(name="v", device="cpu", max_model_len=1024)
    plain = build_engine_args("m", resolve("smollm2-135m-instruct"), backend)
    assert "kv_events_config" not in plain
    publisher = Publisher("replica-1", 5601, 5602)
    args = build_engine_args("m", resolve("smollm2-135m-instruct"), backend,
                             kv_events=publisher.engine_config())
    assert {key: value for key, value in args.items() if key != "kv_events_config"} == plain
    config = vllm.AsyncEngineArgs.from_cli_args(serve_namespace(vllm, args, {})).create_engine_config()
    events = config.kv_events_config
    assert (events.enable_kv_cache_events, events.publisher, events.endpoint, events.replay_endpoint, events.topic) == (
        True, "zmq", "tcp://*:5601", "tcp://*:5602", "replica-1")
    # What the replica reports to routers: vLLM's defaults, as settled for the CPU platform.
    assert config.cache_config.enable_prefix_caching is True
    assert config.cache_config.prefix_caching_hash_algo == "sha256"
    assert config.cache_config.block_size == 128


def test_enable_prompt_tokens_details_is_a_serving_option_of_vllm():
    from raystack.engines.vllm.args import build_serving_args, check_serving_args

    check_serving_args(build_serving_args(Backend(name="v", device="cpu"), kv_events=True))


def test_vllm_schedules_by_the_request_class_unless_the_backend_chooses_fcfs():
    """Priority scheduling by default: vLLM's scheduler config takes it, and the router then tells the
    engine each request's class (its `priority`); a backend that chooses fcfs gets no such field."""
    from raystack.engines.vllm import ENGINE

    backend = Backend(name="v", device="cpu", max_model_len=1024, engine_args={"max_num_seqs": 4})
    args, config = vllm_config(backend)
    assert args["scheduling_policy"] == "priority" and config.scheduler_config.policy == "priority"
    assert ENGINE.schedules_by_priority(backend) and ENGINE.running_limit(backend) == 4
    fcfs = Backend(name="v", device="cpu", max_model_len=1024, engine_args={"scheduling_policy": "fcfs"})
    assert vllm_config(fcfs)[1].scheduler_config.policy == "fcfs"
    assert not ENGINE.schedules_by_priority(fcfs) and ENGINE.running_limit(fcfs) is None
