"""The engine seam: what serving and the deploy config ask of an inference engine, and the registry.

An engine is one module, or one package for a large one, that exposes `ENGINE`, an EngineSpec: its
name in the deploy config, its settings block, its config rules, its placement on the cluster, and its
class (imported only where a replica runs it, so the router and `config check` never load vLLM).
config/, app.py and cluster/ ask the registry and never name an engine. Engines beyond the built-in
ones register through the `raystack.engines` entry-point group, as a package declares
`[project.entry-points."raystack.engines"] myengine = "mypackage.engine:ENGINE"`.

An engine answers one OpenAI request body with an Answer: either a whole JSON response (a completion,
or an error in OpenAI's shape) or a stream of server-sent-event strings (`data: {...}\\n\\n`, ending
with `data: [DONE]\\n\\n`).
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Literal, Mapping, Protocol

from raystack.engines.ascend_env import DEFAULT_ASCEND_HOME

if TYPE_CHECKING:
    from pydantic import BaseModel

    from raystack.config import Backend, RouterConfig
    from raystack.observability.metrics import ReplicaMetrics

RequestKind = Literal["chat", "completion"]
Device = Literal["cpu", "npu"]
Strategy = Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"]  # Ray's placement-group strategies


@dataclass(frozen=True)
class Answer:
    """An engine's answer: a whole JSON body with its HTTP status, or a stream of SSE strings."""

    status: int = 200
    body: dict[str, Any] | None = None
    stream: AsyncIterator[str] | None = None

    @classmethod
    def whole(cls, status: int, body: dict[str, Any]) -> Answer:
        return cls(status=status, body=body)

    @classmethod
    def streamed(cls, chunks: AsyncIterator[str]) -> Answer:
        return cls(stream=chunks)


class Engine(Protocol):
    def __init__(self, model_name: str, model_path: Path | None, backend: Backend,
                 metrics: ReplicaMetrics | None = None) -> None:
        """`model_path` is None for an engine that loads no model (EngineSpec.loads_model). The engine
        reports its requests' latencies and token counts to `metrics`."""

    async def start(self) -> None:
        """Load the model; return when the engine can take requests."""

    async def generate(self, kind: RequestKind, body: dict[str, Any]) -> Answer:
        """Answer one OpenAI chat or completion request."""

    def stats(self) -> dict[str, int]:
        """The engine's own load now: `running` (requests it is generating for) and `waiting` (requests
        it holds but has not scheduled); an engine may add more counts."""

    async def check_health(self) -> None:
        """Raise if the engine cannot serve any more (Serve then replaces the replica)."""

    # An engine whose spec says serves_adapters is built with `adapters=` (name -> AdapterFiles) as well, and:
    async def load_adapter(self, name: str) -> None:
        """Make adapter `name` ready for requests (its name is then their `model`); raise AdapterLoadError."""

    # An engine whose spec says publishes_kv_events is built with `kv_events_topic=` as well, and:
    def kv_events(self) -> dict[str, Any] | None:
        """Where, once started, it publishes its KV cache events, and what a router needs to read them (the
        block size and hashing); None when it publishes none."""

    async def shutdown(self) -> None:
        """Stop the engine and every process it started."""


@dataclass(frozen=True)
class Placement:
    """Where one replica runs. `replica` is what the replica's own actor holds besides its CPUs; with
    `bundles`, Serve reserves a placement group per replica and the replica runs in bundle 0 (the
    replica's CPUs are added to it). `node_bundles` are the bundles that each run a part of the engine
    on a node of their own (MindIE's per-node daemons). `tensor_group`: with one bundle per rank over
    several nodes, the ranks of a tensor-parallel group, which must share a node but which Ray cannot be
    told to keep together; the replica checks where they landed before its engine starts
    (cluster/rank_layout.py). The engine says how many NPUs go where; which nodes qualify
    (`label_selector`) is the backend's choice, added by cluster/placement.py."""

    replica: dict[str, float] = field(default_factory=dict)
    bundles: tuple[dict[str, float], ...] = ()
    strategy: Strategy = "PACK"
    node_bundles: tuple[int, ...] = ()
    tensor_group: int = 0
    label_selector: dict[str, str] = field(default_factory=dict)  # node labels every NPU must be on


def rank_per_npu(backend: Backend) -> Placement:
    """The default placement of an NPU engine: one {NPU: 1} bundle per tensor x pipeline rank, the replica
    in bundle 0 with the first rank; a one-NPU replica holds its NPU itself, with no placement group.
    One bundle per rank because vLLM's Ray executor makes one worker of each bundle that holds an NPU
    (vLLM 0.23 v1/executor/ray_executor_v2.py, ray_utils.get_bundles_sorted_by_node).

    pipeline 1: the group fits one node, and STRICT_PACK keeps it there (a tensor-parallel all-reduce
    runs on every layer: over the network it would crawl). pipeline > 1 (the config asks for several
    nodes): PACK, the strategy that splits a tensor-parallel group least. Ray has no primitive for "these
    bundles on one node, those on another": STRICT_PACK cannot span nodes, STRICT_SPREAD puts every rank
    on a node of its own, SPREAD deals ranks over nodes one by one (a group split as soon as there are more
    nodes than stages), and per-stage bundles of `tensor` NPUs (which STRICT_SPREAD would keep whole) give
    vLLM one worker per stage. Ray's PACK (src/ray/raylet/scheduling/policy/bundle_scheduling_policy.cc,
    BundlePackSchedulingPolicy) takes the node with the most free resources, puts as many bundles there
    as fit, then the next node: on nodes whose free NPUs are whole multiples of `tensor` (the usual case,
    tensor = NPUs per node and whole nodes free) every group stays whole. Otherwise the replica's own check
    fails it, naming the split (cluster/rank_layout.py)."""
    parallel = backend.parallel
    if parallel.world_size == 1:
        return Placement(replica={"NPU": 1})
    ranks = tuple({"NPU": 1} for _ in range(parallel.world_size))
    if parallel.pipeline == 1:
        return Placement(bundles=ranks, strategy="STRICT_PACK")
    return Placement(bundles=ranks, strategy="PACK", tensor_group=parallel.tensor)


@dataclass(frozen=True)
class Refusal:
    """Why a backend cannot take a request: the request field it cannot honour (OpenAI's `param`), and
    what it lacks, said so that the user knows what to change."""

    param: str
    reason: str


def _takes_everything(kind: RequestKind, body: dict[str, Any], backend: Backend) -> Refusal | None:
    return None


def _no_problems(backend: Backend, where: str) -> list[str]:
    return []


def _no_rules(backend: Backend) -> None:
    pass


def _any_name(model_name: str) -> None:
    pass


def _honours_any_router(backend: Backend, router: RouterConfig) -> list[str]:
    return []


def _as_the_default_engine(backend: Backend) -> float:
    """An engine that does not say how much HBM it takes is sized as the default engine sizes a backend (vLLM:
    its gpu_memory_utilization, which a backend of another engine does not set)."""
    return engine_spec(DEFAULT_ENGINE).memory_fraction(backend)


@dataclass(frozen=True)
class PlannedNode:
    """A node as `raystack plan` imagines it: its IP, the device ids of its NPUs, their family."""

    ip: str
    npu_ids: tuple[int, ...]
    chip_family: str | None = None


def _nothing_more(model_name: str, model_path: Path, backend: Backend, nodes: list[PlannedNode]) -> dict[str, Any]:
    return {}


def _no_priority(backend: Backend) -> bool:
    return False


def _no_running_limit(backend: Backend) -> int | None:
    return None


@dataclass(frozen=True)
class Where:
    """Where `raystack start` looks for the engines of its node: the Ascend home (CANN, MindIE), the Python
    path (None: this Python's sys.path) and the environment."""

    ascend_home: Path = Path(DEFAULT_ASCEND_HOME)
    python_path: tuple[str, ...] | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass(frozen=True)
class Found:
    """What `raystack start` found of an engine on its node. `version`: in full, as it is printed (None: not
    installed here); `series`: "major.minor", the value of the engine's node label (None: no label, `note`
    says why); `note`: where it looked, or what is wrong with what it found; `warning`: what the environment
    raystack start runs in (which every Ray worker inherits) lacks for an engine that is there, with the fix."""

    version: str | None = None
    series: str | None = None
    note: str = ""
    warning: str = ""


def version_series(version: str) -> str | None:
    """"0.23.0+empty" -> "0.23", "2.1.RC2.B080" -> "2.1": the release series a node label carries (a label
    value takes [a-zA-Z0-9_.-] only, Ray's label_utils.LABEL_REGEX, so never a local part like "+empty")."""
    match = re.search(r"(\d+)\.(\d+)", version)
    return f"{int(match[1])}.{int(match[2])}" if match else None


@dataclass(frozen=True)
class NodeSoftware:
    """What a node must have installed to run this engine's NPU replicas, and how `raystack start` finds it.
    `raystack start` sets `label` = the series it found; a `device: npu` replica goes only to nodes whose
    label is one of `series`, the series raystack runs on."""

    label: str  # e.g. raystack.io/engine-vllm
    series: tuple[str, ...]
    planned: str  # the series a node of `raystack plan --nodes ...+ENGINE` offers: what the README installs
    name: str  # what people call it on a node: "vLLM-Ascend", "MindIE"
    install: str  # how to get such a node, said to the user when none is there
    detect: Callable[[Where], Found]

    def selector(self) -> str:
        """The label selector's condition: Ray's `in(a,b)`, written without spaces (Ray's C++ parser splits
        at ',' and does not trim)."""
        return f"in({','.join(self.series)})"

    def needs(self) -> str:
        """The node a replica needs, in words: "a vLLM-Ascend node: raystack.io/engine-vllm in 0.23,0.32"."""
        return f"a {self.name} node: {self.label} in {','.join(self.series)}"


@dataclass(frozen=True)
class EngineSpec:
    """Everything the rest of raystack knows about one engine."""

    name: str  # `engine:` in the deploy config; also the key of its settings block
    engine_class: str  # "module:Class", imported where a replica runs it
    settings: type[BaseModel] | None = None  # the backend's `<name>:` block, if the engine has one
    loads_model: bool = True  # False: needs no `source` (engine: synthetic)
    devices: tuple[Device, ...] = ("npu",)  # where it runs; the first is the default
    takes_engine_args: bool = False  # whether `engine_args` are this engine's
    # Whether it serves the model's LoRA adapters: its class then takes `adapters` (name -> AdapterFiles,
    # each checked to fit the model) and has load_adapter (Engine below).
    serves_adapters: bool = False
    # Whether it publishes its KV cache events for routing: kv_aware: its class then takes `kv_events_topic=`
    # (the topic to publish under; None: publish none) and has kv_events() (Engine below). Its replicas'
    # addresses reach the routers as Serve replica metadata (replica/server.py). An engine that does not is
    # routed least_loaded under kv_aware.
    publishes_kv_events: bool = False
    # Rules on a backend whose engine publishes KV cache events under kv_aware (raise ValueError with the fix).
    kv_events_rules: Callable[[Backend], None] = _no_rules
    default_max_model_len: int | None = None  # when neither the config nor (later) the model says
    replica_cpus: dict[Device, float] = field(default_factory=lambda: {"cpu": 1.0, "npu": 2.0})
    # Rules on a backend beyond its fields' types (raise ValueError with the fix); they check, never set.
    validate: Callable[[Backend], None] = _no_rules
    # Rules on the name clients use for the model, which the engine serves it under (raise ValueError).
    check_model_name: Callable[[str], None] = _any_name
    # Likewise for a LoRA adapter's name (an engine that serves_adapters).
    check_adapter_name: Callable[[str], None] = _any_name
    # What this machine can tell before anything is scheduled: ["  where: problem", ...].
    check_deployable: Callable[[Backend, str], list[str]] = _no_problems
    # What of its router's settings the engine cannot honour (config/rules.py, wherever a backend meets its router):
    # ["problem with the fix", ...].
    router_problems: Callable[[Backend, RouterConfig], list[str]] = _honours_any_router
    # Where a `device: npu` replica runs; CPU replicas hold only their CPUs.
    placement: Callable[[Backend], Placement] = rank_per_npu
    # The share of each NPU's HBM the engine takes (what `raystack estimate`'s rule sizes within).
    memory_fraction: Callable[[Backend], float] = _as_the_default_engine
    # A request field the backend cannot honour (tools it has no parser for, say): the router sends such a
    # request to the model's other backends, or answers 400 with the Refusal, instead of letting the
    # engine drop the field silently. Given the request as parsed (protocol.parse_request).
    refuses: Callable[[RequestKind, dict[str, Any], Backend], Refusal | None] = _takes_everything
    # Whether its scheduler serves requests by their `priority` field (vLLM's sense: lower first), which the
    # router then sets to the request's class rank (router/priority.py); else the router removes the field
    # and its own queue alone orders the backend's requests.
    schedules_by_priority: Callable[[Backend], bool] = _no_priority
    # The most requests one replica's engine runs at once, if it bounds them below max_ongoing_requests
    # (vLLM's max_num_seqs): what a priority class's max_share is a share of.
    running_limit: Callable[[Backend], int | None] = _no_running_limit
    # What a replica will run, for `raystack plan` (engine arguments, config files, environment), from the
    # model's path on the nodes and the nodes a replica lands on.
    plan: Callable[[str, Path, Backend, list[PlannedNode]], dict[str, Any]] = _nothing_more
    # What a node needs to run its `device: npu` replicas (raystack start labels such nodes); None: they run
    # on any NPU node.
    node_software: NodeSoftware | None = None

    def engine_type(self) -> type[Engine]:
        module, cls = self.engine_class.split(":")
        return getattr(importlib.import_module(module), cls)


# The built-in engines: each module's ENGINE. Loading a spec module loads no engine library.
BUILT_IN = ("raystack.engines.vllm:ENGINE", "raystack.engines.mindie:ENGINE", "raystack.engines.synthetic:ENGINE")
DEFAULT_ENGINE = "vllm"
ENTRY_POINT_GROUP = "raystack.engines"


def _load(path: str) -> EngineSpec:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


@functools.cache
def registry() -> dict[str, EngineSpec]:
    """Every engine by name: the built-in ones, then those installed packages register."""
    specs = [_load(path) for path in BUILT_IN]
    specs += [point.load() for point in entry_points(group=ENTRY_POINT_GROUP)]
    engines: dict[str, EngineSpec] = {}
    for spec in specs:
        if spec.name in engines:
            raise RuntimeError(f"two engines are registered as {spec.name!r}: {engines[spec.name].engine_class} "
                               f"and {spec.engine_class}")
        engines[spec.name] = spec
    return engines


def engine_spec(name: str) -> EngineSpec:
    return registry()[name]


def node_software() -> dict[str, NodeSoftware]:
    """Engine name -> what a node needs to run it, for every engine that says."""
    return {name: spec.node_software for name, spec in registry().items() if spec.node_software}


@dataclass(frozen=True)
class AdapterFiles:
    """A LoRA adapter a replica serves: its directory, checked to fit the model, and its LoRA rank."""

    path: Path
    rank: int


class AdapterLoadError(RuntimeError):
    """The engine could not load an adapter; the message is the engine's."""


def create_engine(model_name: str, model_path: Path | None, backend: Backend,
                  metrics: ReplicaMetrics | None = None, adapters: dict[str, AdapterFiles] | None = None,
                  kv_events_topic: str | None = None) -> Engine:
    """`kv_events_topic`: publish KV cache events under this topic, if the engine can (publishes_kv_events)."""
    engine_type = engine_spec(backend.engine).engine_type()
    options: dict[str, Any] = {}
    if backend.spec.serves_adapters:
        options["adapters"] = adapters or {}
    if backend.spec.publishes_kv_events:
        options["kv_events_topic"] = kv_events_topic
    return engine_type(model_name, model_path, backend, metrics, **options)
