"""The `raystack` command line.

    raystack start --head | --address HEAD:PORT   start Ray on this node with its Ascend NPUs registered
    raystack status [--json]             nodes, NPUs (type, HBM, holders), Serve apps and replicas
    raystack estimate MODEL              weights, KV cache, and the NPUs a replica needs
    raystack config check FILE...        validate Serve deploy configs (schema, engine args, models)
    raystack models list                 embedded models and what the cache holds
    raystack models prepare SOURCE...    prepare an embedded model or download a hub model into the cache
    raystack bench --target M[@B]...     load-test an OpenAI endpoint: TTFT, TPOT, ITL, tokens/s per target
    raystack usage [--since 1d] [--json] requests and tokens per API key, model and priority class
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raystack.config import ConfigError
from raystack.engines.ascend_env import DEFAULT_ASCEND_HOME
from raystack.serve_file import load_serve_config


def _config_check(args: argparse.Namespace) -> int:
    from raystack.app import check_api_keys, check_deployable, resolve_parallelism
    from raystack.cluster.hbm_need import hbm_needs
    from raystack.cluster.placement import node_needs
    from raystack.models import sources

    failed = 0
    for path in args.files:
        try:
            for app_name, config in load_serve_config(path):
                cache = sources.cache_root(config.cache_dir)
                resolve_parallelism(config.models, cache)
                hbm = hbm_needs(config.models, cache, report=lambda line: print(f"raystack: {line}"))
                check_deployable(config.models, cache, hbm)
                check_api_keys(config)
                summary = ", ".join(
                    f"{m.name} <- {'/'.join(b.name for b in m.backends)}" for m in config.models
                )
                print(f"{path}: OK (router {app_name!r}: {summary})")
                for m in config.models:
                    for b in m.backends:
                        need = hbm.get((m.name, b.name))
                        hbm_text = f"; {need.gib:.1f} GiB HBM per NPU ({need.source})" if need else ""
                        print(f"  {m.name}@{b.name}: needs {node_needs(b)}{hbm_text}")
        except ConfigError as err:
            print(f"{path}: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _plan(args: argparse.Namespace) -> int:
    import json

    import yaml

    from raystack.app import resolve_parallelism
    from raystack.models import sources
    from raystack.plan import plan

    try:
        planned = {}
        for app_name, config in load_serve_config(args.config):
            resolve_parallelism(config.models, sources.cache_root(config.cache_dir))
            planned[app_name] = plan(config, args.nodes)
    except ConfigError as err:
        print(f"{args.config}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(planned, indent=2, default=str) if args.json else
          yaml.safe_dump(planned, sort_keys=False, default_flow_style=False, width=120))
    unknown = [line for p in planned.values() for line in p.get("unknown_hbm_needs", [])]
    for line in unknown:  # the plan is printed whole; what serve run would refuse is said last, plainly
        print(f"{args.config}: serve run would refuse {line}", file=sys.stderr)
    return 1 if unknown else 0


def _models_list(args: argparse.Namespace) -> int:
    from raystack.models import embedded, sources

    cache = sources.cache_root(args.cache_dir)
    print(f"cache: {cache}")
    for model_id, model in embedded.EMBEDDED_MODELS.items():
        state = "prepared" if embedded.is_prepared(model, cache, verify=False) else "not prepared"
        print(f"  {model_id:28} embedded ({model.pip_spec}, {model.license})  {state}")
    for kind in ("modelscope", "hf"):
        for done in sorted((cache / kind).glob("*/*/.raystack-complete")):
            ref = done.parent.relative_to(cache / kind)
            print(f"  {kind}://{ref}  downloaded")
    return 0


def _models_prepare(args: argparse.Namespace) -> int:
    from raystack.models import sources

    cache = sources.cache_root(args.cache_dir)
    for source in args.sources:
        try:
            path = sources.resolve(source, cache, progress=print)
        except sources.ModelSourceError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(path)
    return 0


def _simulated_npus(count: int, chip_type: str | None, hbm_gib: float | None):
    from raystack.cluster.chips import parse_chip
    from raystack.cluster.npu import NodeNPUs
    from raystack.cluster.npu_smi import NPUChip

    chip = parse_chip(chip_type or "")
    hbm_gib = hbm_gib or (chip.hbm_gib if chip else None)
    hbm_mb = int(hbm_gib * 1024) if hbm_gib else None
    chips = [NPUChip(i, 0, i, (chip_type or "").removeprefix("Ascend"), "OK", hbm_mb) for i in range(count)]
    return NodeNPUs(chips, [], chip and chip.model, hbm_gib, "simulated (--npus)", [], chip and chip.family)


def _start(args: argparse.Namespace) -> int:
    from raystack.cluster import node
    from raystack.cluster.npu import discover
    from raystack.engines.base import Where

    if args.npus is not None:
        npus = _simulated_npus(args.npus, args.npu_type, args.hbm_gib)
    else:
        npus = discover(log=lambda _: None)  # its notes and exclusions come back in plan.notices
    try:
        plan = node.plan_start(
            npus, head=args.head, address=args.address, port=args.port, ifname=args.ifname,
            extra_args=[a for a in args.ray_args if a != "--"], ray_bin=str(Path(sys.executable).with_name("ray")),
            engines=node.detect_engines(Where(ascend_home=Path(args.ascend_home))),
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for notice in plan.notices:
        print(f"raystack: {notice}")
    if args.dry_run:
        print(plan.render())
        return 0
    return node.run(plan)


def _status(args: argparse.Namespace) -> int:
    from raystack.cluster import status

    try:
        result = status.gather(args.address)
    except ConnectionError as err:
        print(f"error: no Ray cluster at {args.address}: {err}. Start one with `raystack start --head`.",
              file=sys.stderr)
        return 1
    print(status.to_json(result) if args.json else status.render(result))
    return 0


def _usage(args: argparse.Namespace) -> int:
    import json
    import time

    import ray

    from raystack.router import usage

    try:
        since = time.time() - usage.since_seconds(args.since)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as err:
        print(f"error: no Ray cluster at {args.address}: {err}. Start one with `raystack start --head`.",
              file=sys.stderr)
        return 1
    rows = usage.report(usage.GCSStore(), since, args.app)
    print(json.dumps(rows, indent=2) if args.json else usage.render(rows, args.since))
    return 0


def _estimate(args: argparse.Namespace) -> int:
    import json

    from raystack.cluster.estimate import EstimateError, estimate_source, format_estimate
    from raystack.config import Backend
    from raystack.models.sources import ModelSourceError

    default = Backend(name="estimate")  # a backend of the default engine, as a deploy config gets it
    try:
        size = estimate_source(args.model, Path(args.cache_dir) if args.cache_dir else None,
                               npu_type=args.npu_type, max_model_len=args.max_model_len, hbm_gib=args.hbm_gib,
                               gpu_memory_utilization=default.spec.memory_fraction(default))
    except (EstimateError, ModelSourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(size.as_dict(), indent=2) if args.json else format_estimate(size))
    return 0


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,6, not {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be 1 or more")
    return levels


def _bench(args: argparse.Namespace) -> int:
    import os
    import time

    from raystack.bench import datasets
    from raystack.bench.report import markdown
    from raystack.bench.run import BenchSettings, run_bench

    try:
        if args.dataset == "random":
            tokenizer = None
            if args.tokenizer:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            prompts = datasets.random_prompts(args.num_prompts, args.input_len, args.output_len,
                                              args.range_ratio, args.seed, tokenizer)
        elif args.dataset == "fixed":
            prompts = datasets.fixed_prompts(args.num_prompts, args.prompt or datasets.CHICKEN_AND_RABBIT,
                                             args.output_len)
        else:
            if not args.dataset_path:
                raise datasets.DatasetError("--dataset jsonl needs --dataset-path FILE")
            prompts = datasets.jsonl_prompts(args.dataset_path, args.num_prompts, args.output_len, args.seed)
    except datasets.DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = BenchSettings(
        base_url=args.base_url, targets=args.target, concurrency=args.concurrency,
        request_rate=args.request_rate, rounds=args.rounds, warmup=args.warmup, api=args.api,
        ignore_eos=args.ignore_eos, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        timeout_s=args.timeout, seed=args.seed,
    )
    out_dir = Path(args.out_dir or f"bench_results/{time.strftime('%Y%m%d-%H%M%S')}")
    rows = run_bench(settings, prompts, out_dir, progress=not args.no_progress)
    print(markdown(rows))
    print(f"\nwritten: {out_dir}/results.md, results.csv, results.json, results.png")
    failed = sum(row["failed"] for row in rows)
    if failed:
        errors = sorted({e for row in rows for e in row["errors"]})
        print(f"{failed} requests failed, e.g.: " + "; ".join(errors[:3]), file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    from raystack.cluster.estimate import DEFAULT_NPU_TYPE

    parser = argparse.ArgumentParser(prog="raystack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser("start", help="start Ray on this node with its Ascend NPUs registered")
    where = start.add_mutually_exclusive_group(required=True)
    where.add_argument("--head", action="store_true", help="start a new cluster's head node")
    where.add_argument("--address", help="join the cluster whose head is HEAD:PORT")
    start.add_argument("--port", type=int, default=6379, help="head's GCS port (with --head)")
    start.add_argument("--ifname", help="network interface for HCCL/Gloo (default: the one routing to the head)")
    start.add_argument("--npus", type=int, help="declare N NPUs instead of discovering them (simulation)")
    start.add_argument("--npu-type", help="chip type of the declared NPUs, e.g. Ascend910B3")
    start.add_argument("--hbm-gib", type=float, help="HBM per declared NPU in GiB")
    start.add_argument("--ascend-home", default=DEFAULT_ASCEND_HOME,
                       help=f"where the Ascend stack (CANN, MindIE) is installed (default {DEFAULT_ASCEND_HOME}); "
                            f"the engines found are set as node labels")
    start.add_argument("--dry-run", action="store_true", help="print the ray start command and env, run nothing")
    start.add_argument("ray_args", nargs=argparse.REMAINDER, help="after --: passed to ray start as-is")
    start.set_defaults(func=_start)

    status = sub.add_parser("status", help="nodes, NPUs, Serve applications and replicas")
    status.add_argument("--address", default="auto", help="Ray cluster address (default: the running one)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)

    estimate = sub.add_parser("estimate", help="size a model: weights, KV cache, NPUs per replica")
    estimate.add_argument("model", help="model source: embedded id, local path, modelscope://Org/Name, hf://Org/Name")
    estimate.add_argument("--npu-type", default=DEFAULT_NPU_TYPE, help=f"default: {DEFAULT_NPU_TYPE}")
    estimate.add_argument("--max-model-len", type=int, help="context to size the KV cache for (default: the model's)")
    estimate.add_argument("--hbm-gib", type=float, help="HBM per NPU, for a type raystack does not know")
    estimate.add_argument("--cache-dir")
    estimate.add_argument("--json", action="store_true")
    estimate.set_defaults(func=_estimate)

    from raystack.plan import DEFAULT_NODES

    planning = sub.add_parser("plan", help="what each backend's replicas will run on an NPU cluster, without NPUs")
    planning.add_argument("config", help="a Serve YAML file of raystack applications")
    planning.add_argument("--nodes", default=DEFAULT_NODES,
                          help="the cluster to plan for: COUNTxNPUS[:CHIP][+ENGINE...] joined by commas, +ENGINE the "
                               f"engines a node runs (+vllm, +mindie; default {DEFAULT_NODES})")
    planning.add_argument("--json", action="store_true")
    planning.set_defaults(func=_plan)

    config = sub.add_parser("config", help="deploy configs").add_subparsers(dest="action", required=True)
    check = config.add_parser("check", help="validate Serve YAML files of raystack applications")
    check.add_argument("files", nargs="+")
    check.set_defaults(func=_config_check)

    models = sub.add_parser("models", help="model sources and the model cache").add_subparsers(
        dest="action", required=True
    )
    listing = models.add_parser("list", help="embedded models and the cache's contents")
    listing.add_argument("--cache-dir")
    listing.set_defaults(func=_models_list)
    prepare = models.add_parser(
        "prepare", help="embedded id, modelscope://Org/Name or hf://Org/Name into the cache"
    )
    prepare.add_argument("sources", nargs="+")
    prepare.add_argument("--cache-dir", help="default: $RAYSTACK_CACHE_DIR or ~/.cache/raystack")
    prepare.set_defaults(func=_models_prepare)

    usage = sub.add_parser("usage", help="requests and tokens per API key, model and priority class "
                                         "(routers with api_keys)")
    usage.add_argument("--since", default="1d", help="how far back: 30m, 12h, 7d (default 1d; hourly totals)")
    usage.add_argument("--app", help="only this router application (default: every one)")
    usage.add_argument("--address", default="auto", help="Ray cluster address (default: the running one)")
    usage.add_argument("--json", action="store_true", help="machine-readable output")
    usage.set_defaults(func=_usage)

    bench = sub.add_parser("bench", help="load-test an OpenAI endpoint: several targets, interleaved")
    bench.add_argument("--base-url", default="http://127.0.0.1:8000", help="the endpoint, without /v1")
    bench.add_argument("--target", action="append", required=True,
                       help="a model as the endpoint names it; model@backend pins a raystack backend; repeat")
    bench.add_argument("--concurrency", type=_levels, default=[1], help="levels, e.g. 1,6 (default 1)")
    bench.add_argument("--request-rate", type=float, default=float("inf"),
                       help="requests/s, Poisson arrivals, at most --concurrency in flight (default inf: all at once)")
    bench.add_argument("--num-prompts", type=int, default=16, help="requests per target, level and round")
    bench.add_argument("--rounds", type=int, default=1, help="interleaved rounds per level (alternating order)")
    bench.add_argument("--warmup", type=int, default=1, help="uncounted requests per target and level")
    bench.add_argument("--dataset", choices=["random", "fixed", "jsonl"], default="random")
    bench.add_argument("--input-len", type=int, default=128, help="random: prompt length (words, or tokens with --tokenizer)")
    bench.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    bench.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths vary by this fraction")
    bench.add_argument("--tokenizer", help="random: the model's tokenizer (path) so lengths count its tokens")
    bench.add_argument("--prompt", help="fixed: the prompt (default: the chicken-and-rabbit puzzle)")
    bench.add_argument("--dataset-path", help='jsonl: lines of {"prompt": ...} or {"messages": [...]}')
    bench.add_argument("--api", choices=["chat", "completions"], default="chat")
    bench.add_argument("--ignore-eos", action="store_true", help="every answer runs to max_tokens (vLLM, MindIE)")
    bench.add_argument("--api-key", help="default: $OPENAI_API_KEY")
    bench.add_argument("--timeout", type=float, default=600, help="seconds per request")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out-dir", help="default: bench_results/<time>")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
