"""Test-wide settings. Tests never reach beyond this machine: telemetry and usage reports of the
libraries underneath (Hugging Face Hub, vLLM, Ray) are off before any of them is imported, and the
servers the tests start inherit this environment."""

import os

for key, value in {
    "HF_HUB_DISABLE_TELEMETRY": "1",  # else huggingface_hub fetches an agent registry from its hub
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_worker_niceness": "0",  # as the Makefile and `raystack start` run Ray
}.items():
    os.environ[key] = value
