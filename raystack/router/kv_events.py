"""vLLM's KV cache events as the router receives them: the wire format, and a subscriber per replica.

vLLM's scheduler publishes what its block pool caches and evicts when `kv_events_config` enables it
(publisher `zmq`). The format, read from vllm/distributed/kv_events.py (ZmqEventPublisher, KVEventBatch):
  - each batch is one ZeroMQ multipart message on a PUB socket: [topic, seq, payload], `seq` an 8-byte
    big-endian counter from 0 per publisher (so it restarts with the engine), `payload` a msgpack
    KVEventBatch: the array [ts, events, data_parallel_rank];
  - an event is a tagged union of BlockStored, BlockRemoved and AllBlocksCleared. vLLM 0.23 encodes each
    event as an array, its tag first: ["BlockStored", block_hashes, parent_block_hash, token_ids,
    block_size, lora_id, medium, lora_name, extra_keys, group_idx, ...]; later versions (0.32 here) dropped
    array_like from KVCacheEvent, so an event is a map with its tag under "type" and trailing defaults left
    out. Both are decoded here; fields a version adds at the end are ignored, fields it lacks default;
  - a block hash is bytes (the engine's 32-byte digest) or, by default (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES,
    on in 0.23 and 0.32), the digest's low 64 bits as an int (kv_cache_utils.maybe_convert_block_hash);
  - replay: with `replay_endpoint` the publisher also binds a ROUTER socket and keeps its last
    `buffer_steps` batches. A client sends [b"", start seq (8 bytes big-endian)] from a DEALER socket; the
    publisher answers each buffered batch with seq >= start, then an end marker, seq -1 (8 bytes, signed)
    with an empty payload (ZmqEventPublisher._service_replay). vLLM 0.32 sends a batch as
    [b"", topic, seq, payload] and the end as [b"", b"", -1, b""]; 0.23 leaves the topic out: [b"", seq,
    payload] and [b"", -1, b""]. It serves replay between two batches of its queue, so an answer may take
    a tenth of a second or more.

This module imports no vLLM: the router's Python need not have it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

import msgspec
import zmq

logger = logging.getLogger(__name__)

BlockHash = bytes | int


# --- the wire format -------------------------------------------------------------------------------------
# Events as maps (vLLM after 0.23): msgspec matches the "type" key to the class name. Every field but the
# hashes has a default, so an older engine's shorter event decodes too.

class BlockStored(msgspec.Struct, tag=True, gc=False):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None = None
    token_ids: list[int] = []
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None  # "GPU" for the engine's own block pool, "CPU"/"STORAGE" for offload tiers
    lora_name: str | None = None
    extra_keys: list[Any] | None = None  # per block: LoRA name, multimodal ids, cache_salt; None if none
    group_idx: int | None = None  # the KV cache group (one per attention type; 0 for most models)


class BlockRemoved(msgspec.Struct, tag=True, gc=False):
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, gc=False):
    pass


# The same events as arrays (vLLM 0.23): subclasses, so isinstance(event, BlockStored) holds for both forms.
class _BlockStoredArray(BlockStored, tag="BlockStored", array_like=True):
    pass


class _BlockRemovedArray(BlockRemoved, tag="BlockRemoved", array_like=True):
    pass


class _AllBlocksClearedArray(AllBlocksCleared, tag="AllBlocksCleared", array_like=True):
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KvEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]  # decoded one by one: msgspec takes no union of array and map structs
    data_parallel_rank: int | None = None


_batch_decoder = msgspec.msgpack.Decoder(KvEventBatch)
_map_event_decoder = msgspec.msgpack.Decoder(BlockStored | BlockRemoved | AllBlocksCleared)
_array_event_decoder = msgspec.msgpack.Decoder(_BlockStoredArray | _BlockRemovedArray | _AllBlocksClearedArray)


def _is_msgpack_array(raw: msgspec.Raw) -> bool:
    first = memoryview(raw)[0]
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)  # fixarray, array 16, array 32


def decode_events(payload: bytes) -> list[KvEvent]:
    """The events of one batch's payload, in the engine's order; msgspec.DecodeError if it is none."""
    batch = _batch_decoder.decode(payload)
    return [(_array_event_decoder if _is_msgpack_array(raw) else _map_event_decoder).decode(raw)
            for raw in batch.events]


def block_hash_int(block_hash: BlockHash) -> int:
    """One form for a block hash, whichever the engine sends: the low 64 bits of the digest read big-endian,
    which is what an engine with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES (the default) sends already
    (kv_cache_utils.maybe_convert_block_hash)."""
    if isinstance(block_hash, int):
        return block_hash & 0xFFFF_FFFF_FFFF_FFFF
    return int.from_bytes(block_hash[-8:], "big")


SEQ_BYTES = 8
END_SEQ = (-1).to_bytes(SEQ_BYTES, "big", signed=True)  # the replay's end marker


# --- the subscriber --------------------------------------------------------------------------------------

class KvEventSubscriber:
    """Follows one replica's KV events on a thread of its own and hands each batch's events, in sequence
    order, to `on_events`. When batches are lost (a gap in the sequence, a publisher restarted, the
    connection dropped, a batch that does not decode) it replays the missing ones from `replay_endpoint`
    if given and the publisher still holds them; otherwise it calls `on_lost` (the replica's index is no
    longer true: drop it), replays what the publisher still holds onto the empty index (a partial index is
    never a false one), and carries on. A subscriber that starts late catches up the same way.

    The callbacks run on the subscriber's thread: they must be thread-safe with the router's readers and
    quick, as the thread reads nothing while they run (ZeroMQ buffers up to its high-water mark).
    """

    POLL_MS = 100  # how long close() may wait for the thread to notice
    REPLAY_TIMEOUT_S = 2.0

    def __init__(self, endpoint: str, on_events: Callable[[Sequence[KvEvent]], None],
                 on_lost: Callable[[], None], *, topic: str = "", replay_endpoint: str | None = None,
                 name: str = ""):
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.on_events = on_events
        self.on_lost = on_lost
        self.last_seq: int | None = None  # the last batch applied; None before the first or after a loss
        self.batches = 0  # applied, live or replayed
        self.losses = 0  # times on_lost was called
        self._stop = threading.Event()
        self._ctx = zmq.Context.instance()
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{name or endpoint}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stops the thread, which closes its own sockets (a ZeroMQ socket belongs to one thread)."""
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, self.topic)
            sub.connect(self.endpoint)
            poller = zmq.Poller()
            poller.register(sub, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while not self._stop.is_set():
                ready = dict(poller.poll(self.POLL_MS))
                if monitor in ready:
                    monitor.recv_multipart()
                    # The engine may have restarted (its cache empty, its seq from 0) or batches were lost
                    # while disconnected: what the index holds is no longer known to be true.
                    self._lose("disconnected")
                if sub in ready:
                    self._receive(sub.recv_multipart())
        except Exception:
            logger.exception("KV event subscriber for %s stopped", self.endpoint)
            self.on_lost()  # nobody follows the replica now: its index would only grow stale
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    def _receive(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or frames[0] != self.topic or len(frames[1]) != SEQ_BYTES:
            return  # another topic sharing the prefix, or not a batch
        seq = int.from_bytes(frames[1], "big")
        if self.last_seq is not None and seq <= self.last_seq:
            # A PUB socket's sequence only grows: a smaller one is a new publisher (the engine restarted).
            self._lose(f"sequence went back from {self.last_seq} to {seq}")
        expected = 0 if self.last_seq is None else self.last_seq + 1
        # With nothing applied yet (the index empty), any run of batches up to this one is true as far as it
        # goes; in the middle of the stream only the whole gap is.
        if seq > expected and not self._replay(expected, seq, suffix_will_do=self.last_seq is None):
            if self.last_seq is not None:
                self._lose(f"batches {expected}..{seq - 1} missed")
                self._replay(0, seq, suffix_will_do=True)  # rebuild what the publisher still holds
        self._apply(seq, frames[2])

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            events = decode_events(payload)
        except (msgspec.DecodeError, ValueError):
            logger.warning("KV event batch %d from %s does not decode", seq, self.endpoint)
            self._lose(f"batch {seq} undecodable")
        else:
            try:
                self.on_events(events)
            except Exception:
                logger.exception("applying KV event batch %d from %s failed", seq, self.endpoint)
                self._lose(f"batch {seq} not applied")
            else:
                self.batches += 1
        self.last_seq = seq

    def _lose(self, why: str) -> None:
        logger.info("KV events from %s: %s; the replica's index is dropped", self.endpoint, why)
        self.last_seq = None
        self.losses += 1
        self.on_lost()

    def _replay(self, start: int, end: int, suffix_will_do: bool = False) -> bool:
        """Applies batches start..end-1 from the publisher's replay buffer, or with `suffix_will_do` the last
        of them it still holds; False if it applied none or, without `suffix_will_do`, not all (no replay
        endpoint, no answer in time, or the buffer has moved past `start`)."""
        if self.replay_endpoint is None:
            return False
        dealer = self._ctx.socket(zmq.DEALER)  # one per replay: a late answer to an earlier one is never read
        try:
            dealer.connect(self.replay_endpoint)
            dealer.send_multipart([b"", start.to_bytes(SEQ_BYTES, "big")])
            batches = []
            while dealer.poll(int(self.REPLAY_TIMEOUT_S * 1000)):
                frames = dealer.recv_multipart()[1:]  # after the empty delimiter
                seq_bytes, payload = frames[-2:] if len(frames) in (2, 3) else (END_SEQ, b"")  # topic or not
                if seq_bytes == END_SEQ:
                    break
                seq = int.from_bytes(seq_bytes, "big")
                if start <= seq < end:
                    batches.append((seq, payload))
                if seq >= end - 1:
                    break  # the rest is newer than the batch that showed the gap
            else:
                logger.warning("KV event replay from %s: no answer in %.1f s", self.replay_endpoint,
                               self.REPLAY_TIMEOUT_S)
                return False
        finally:
            dealer.close(linger=0)
        if not batches or [seq for seq, _ in batches] != list(range(end - len(batches), end)):
            return False
        if batches[0][0] != start and not suffix_will_do:
            return False  # the buffer has moved past `start`
        for seq, payload in batches:
            self._apply(seq, payload)
        return True
