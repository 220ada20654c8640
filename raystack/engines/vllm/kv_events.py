"""The KV cache events a vLLM replica publishes for `routing: kv_aware`, and what routers need to read them.

vLLM's scheduler publishes every block its prefix cache stores or drops (BlockStored, BlockRemoved,
AllBlocksCleared) on a ZeroMQ PUB socket, when `kv_events_config` asks it to (KVEventsConfig in
vllm/config/kv_events.py: the same fields in 0.23.0 and 0.32.0; ZmqEventPublisher in
vllm/distributed/kv_events.py). Each replica publishes on ports free on its own node, under a topic of its
own, and tells the routers where (VLLMEngine.kv_events, which LLMServer hands to Serve as replica metadata).

A router matches a prompt's blocks to a replica's only if it hashes them as that replica's EngineCore does:
the same hash function (`prefix_caching_hash_algo`) and the same seed of the first block's parent (NONE_HASH,
init_none_hash in vllm/v1/core/kv_cache_utils.py). vLLM 0.23.0 derives it from PYTHONHASHSEED when set and
from os.urandom otherwise, a different seed in every process; 0.32.0 from PYTHONHASHSEED when set, else a
fixed default for sha256 and a random one for xxhash. So a replica that publishes events sets PYTHONHASHSEED
for its engine when the user has not: the same known seed on every replica, under both vLLMs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raystack.engines.supervised import free_ports

if TYPE_CHECKING:
    from raystack.config import Backend

# The seed a publishing replica gives its engine when PYTHONHASHSEED is not set. A fixed, public seed is safe
# with a cryptographic hash (collisions stay infeasible; vLLM 0.32 makes the same argument for its own fixed
# default), not with xxhash, for which rules() asks for the user's own. Python reads PYTHONHASHSEED when each
# of the engine's processes starts and refuses anything but an integer in [0, 4294967295] or "random".
HASH_SEED = "20260429"
HASH_SEED_ENV = "PYTHONHASHSEED"
# prefix_caching_hash_algo values whose seed may be known (PrefixCachingHashAlgo in vllm/config/cache.py lists
# sha256, sha256_cbor, xxhash, xxhash_cbor in 0.23.0 and 0.32.0; sha256 is the default in both).
CRYPTOGRAPHIC_HASHES = ("sha256", "sha256_cbor")


def rules(backend: Backend) -> None:
    """What a vLLM backend under kv_aware must not set; ValueError with the fix."""
    engine_args = backend.engine_args
    if engine_args.get("enable_prefix_caching") is False:
        raise ValueError("kv_aware routes by the blocks of each replica's prefix cache, and this backend turns it "
                         "off: remove engine_args.enable_prefix_caching (vLLM's default is on), or choose another "
                         "routing.policy")
    if "kv_events_config" in engine_args:
        raise ValueError("under kv_aware raystack sets vLLM's kv_events_config itself (ports free on each "
                         "replica's node, a topic per replica): remove engine_args.kv_events_config")
    if engine_args.get("data_parallel_size", 1) > 1:
        raise ValueError("under kv_aware a replica reports one engine's KV cache events: remove "
                         "engine_args.data_parallel_size and scale with replicas instead")
    seed = backend.env.get(HASH_SEED_ENV)
    if seed is not None and not (seed.isdigit() and int(seed) <= 0xFFFFFFFF):
        raise ValueError(f"env.{HASH_SEED_ENV} must be an integer from 0 to 4294967295 (Python refuses anything "
                         f"else when the engine's processes start), not {seed!r}")
    algo = engine_args.get("prefix_caching_hash_algo", "sha256")
    if algo not in CRYPTOGRAPHIC_HASHES and seed is None:
        raise ValueError(f"prefix_caching_hash_algo {algo} is not collision resistant, so its seed must stay "
                         f"secret (vLLM keeps it random for that reason), but routers must know it: set env."
                         f"{HASH_SEED_ENV} to an integer of your own, or use sha256")


@dataclass(frozen=True)
class Publisher:
    """Where one replica's engine publishes its KV cache events: a PUB socket on `port` and a ROUTER socket on
    `replay_port` that answers a subscriber's request for the batches since a sequence number (vLLM keeps
    the last buffer_steps, 10,000 by default), every message under `topic`."""

    topic: str
    port: int
    replay_port: int

    @classmethod
    def on_free_ports(cls, topic: str) -> Publisher:
        port, replay_port = free_ports(2)
        return cls(topic, port, replay_port)

    def engine_config(self) -> dict[str, Any]:
        """vLLM's kv_events_config (engine argument), binding every interface of the node: vLLM binds an
        endpoint with `*` and connects to any other (ZmqEventPublisher._socket_setup), so a node's own IP is
        no choice. The events carry the token ids of prompts, unauthenticated, as vLLM's own: keep the nodes'
        ports reachable from the cluster only, as Ray's."""
        return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{self.port}",
                "replay_endpoint": f"tcp://*:{self.replay_port}", "topic": self.topic}

    def address(self, node_ip: str, block_size: int, hash_algo: str, hash_seed: str | None,
                vllm_series: str) -> dict[str, Any]:
        """What a router needs to follow this replica's KV cache: where to subscribe and replay, the topic, and
        how to hash a prompt as the engine does (block_size tokens a block, hash_algo, hash_seed: NONE_HASH =
        hash_algo(hash_seed)). `vllm`: the engine's series, for whoever reads the metadata: the wire formats
        differ (0.23 encodes each event as an array, 0.32 as a map with its `type`; both in
        vllm/distributed/kv_events.py), and the router's decoder tells them apart by itself (router/kv_events.py)."""
        host = f"[{node_ip}]" if ":" in node_ip else node_ip
        return {"endpoint": f"tcp://{host}:{self.port}", "replay": f"tcp://{host}:{self.replay_port}",
                "topic": self.topic, "block_size": block_size, "hash_algo": hash_algo, "hash_seed": hash_seed,
                "vllm": vllm_series}


def seed_the_engine(hash_algo: str) -> str | None:
    """The seed the engine about to start will hash blocks with: PYTHONHASHSEED as this replica's environment
    has it (its backend's env, or its node's), else raystack's, set here for the engine's processes (EngineCore
    is a child process, and vLLM reads the variable with os.getenv there). None only for a non-cryptographic
    hash without one (rules() refuses that under kv_aware)."""
    if HASH_SEED_ENV not in os.environ and hash_algo in CRYPTOGRAPHIC_HASHES:
        os.environ[HASH_SEED_ENV] = HASH_SEED
    return os.environ.get(HASH_SEED_ENV)
