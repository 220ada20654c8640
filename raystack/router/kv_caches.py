"""KvCaches: what one router process knows of its backends' replicas' KV caches, kept true by following the
KV cache events of each replica that publishes them (kv_aware routing).

A vLLM replica of a model routed kv_aware says in its Serve metadata where its engine publishes (replica/
server.py record_replica_metadata; VLLMEngine.kv_events): endpoint, replay endpoint, topic, and how the engine
hashes blocks (block size, algorithm, seed). Serve hands that to every request router of the backend with
each replica set it broadcasts (RunningReplica.replica_metadata), and the request router passes the set here
(replica_choice.update_replicas): a new replica is followed from then on, a replica gone (removed, replaced,
restarted under a new id) is unfollowed and its index dropped. A subscriber that loses batches it cannot
replay drops its replica's index itself (kv_events.KvEventSubscriber): a replica is never credited with
blocks it may no longer hold. A replica without events (MindIE, an engine not publishing) has no index and
matches nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Mapping, Sequence

from raystack.router.kv_events import KvEventSubscriber
from raystack.router.kv_index import KvIndex
from raystack.router.prompt_blocks import DEFAULT_SEED, BlockHasher

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Hashing:
    """How an engine hashes its blocks: a request hashed the same way matches its events."""

    block_size: int
    algorithm: str
    seed: str

    @classmethod
    def of(cls, address: Mapping[str, Any]) -> Hashing:
        return cls(int(address["block_size"]), address["hash_algo"], address.get("hash_seed") or DEFAULT_SEED)


class KvCaches:
    def __init__(self, index: KvIndex | None = None):
        self.index = index or KvIndex()
        self._followed: dict[str, tuple[str, KvEventSubscriber]] = {}  # replica -> (its endpoint, subscriber)
        self._deployment_replicas: dict[str, set[str]] = {}  # backend deployment -> replicas followed
        self._hashing: dict[str, Hashing] = {}  # backend deployment -> how its engines hash
        self._hashers: dict[Hashing, BlockHasher] = {}
        self._lock = threading.Lock()  # follow() runs on Serve's routing threads, readers on the event loop

    def follow(self, deployment: str, replicas: Iterable[tuple[str, Mapping[str, Any] | None]]) -> None:
        """The replicas of `deployment` Serve runs now, each (replica id, its metadata's `kv_events` or None):
        follow those that publish, forget the rest."""
        publishing = {replica: address for replica, address in replicas if address}
        with self._lock:
            for replica in self._deployment_replicas.get(deployment, set()) - publishing.keys():
                self._unfollow(replica)
            for replica, address in publishing.items():
                followed = self._followed.get(replica)
                if followed is not None and followed[0] == address["endpoint"]:
                    continue
                if followed is not None:  # the same replica publishing elsewhere: what it held is gone
                    self._unfollow(replica)
                try:
                    hashing = Hashing.of(address)
                    self._hashers.setdefault(hashing, BlockHasher(hashing.block_size, hashing.algorithm,
                                                                  hashing.seed))
                except (KeyError, TypeError, ValueError) as err:  # an engine hashing in a way not computed here
                    logger.warning("replica %s of %s: its KV events cannot be matched (%s); routed by load",
                                   replica, deployment, err)
                    continue
                self._hashing[deployment] = hashing
                self._followed[replica] = (address["endpoint"], KvEventSubscriber(
                    address["endpoint"], partial(self.index.apply, replica), partial(self.index.drop, replica),
                    topic=address.get("topic", ""), replay_endpoint=address.get("replay"), name=replica))
            self._deployment_replicas[deployment] = set(publishing) & self._followed.keys()
            if not self._deployment_replicas[deployment]:
                self._hashing.pop(deployment, None)

    def _unfollow(self, replica: str) -> None:
        _, subscriber = self._followed.pop(replica)
        subscriber.close()
        self.index.drop(replica)

    def hasher(self, deployments: Sequence[str]) -> BlockHasher | None:
        """The block hasher of the first of `deployments` whose replicas publish (the backends of one model
        share its tokenizer; engines hashing otherwise simply match nothing of another's hashes)."""
        with self._lock:
            for deployment in deployments:
                hashing = self._hashing.get(deployment)
                if hashing is not None:
                    return self._hashers[hashing]
        return None

    def followed(self, deployment: str) -> set[str]:
        with self._lock:
            return set(self._deployment_replicas.get(deployment, ()))

    def matched(self, replica: str, hashes: Sequence[int]) -> int:
        """How many of a request's leading blocks the replica's KV cache holds now."""
        return self.index.matched(replica, hashes) if hashes else 0

    def close(self) -> None:
        with self._lock:
            for replica in list(self._followed):
                self._unfollow(replica)
            self._deployment_replicas.clear()
            self._hashing.clear()
