"""One mindieservice_daemon on this node: its config.json, its environment, its start, readiness and stop.

The replica runs one (and, when a replica spans nodes, a MindIENode actor runs one on each other node).
Only the replica talks to it, over loopback (a multi-node master's inference plane is on the node's IP:
config.py). Its NPUs are claimed before it starts, and stay claimed until its last process has exited
(npu_claim.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from raystack.cluster.chips import FAMILY_LABEL
from raystack.engines.mindie.config import MindIEPlan, render_config, write_config
from raystack.engines.mindie.environment import MindIEEnvironmentError, daemon_env, own_env
from raystack.engines.mindie.settings import DAEMON, MindIESettings
from raystack.engines.npu_claim import NPUClaim, NPUClaimTimeout
from raystack.engines.supervised import SupervisedProcess

logger = logging.getLogger("ray.serve")

STARTED_LINE = "Daemon start success!"  # printed by every daemon, also by multi-node slaves that open no port
PROGRESS_EVERY_S = 30  # a readiness wait of minutes says it is still alive
CLAIM_MARGIN_S = 30  # past a gone engine's grace period, how long its NPUs may take to be free


class MindIEStartError(RuntimeError):
    """The daemon could not start; the message carries its last log lines and what to do."""


def load_default_config(install: Path) -> dict[str, Any]:
    daemon = install / DAEMON
    shipped = install / "conf" / "config.json"
    if not os.access(daemon, os.X_OK):
        raise MindIEStartError(
            f"{daemon} is missing or not executable: run MindIE replicas on MindIE nodes (MindIE's image, the "
            f"README's \"On an Ascend NPU cluster\"), and set mindie.ascend_home to where MindIE is installed (or "
            f"mindie.install_path, or MIES_INSTALL_PATH, to its mindie-service directory)"
        )
    try:
        return json.loads(shipped.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MindIEStartError(f"cannot read MindIE's shipped {shipped}: {err}") from None


def ranktable_env(ranktable: dict[str, Any], path: Path, plan: MindIEPlan) -> dict[str, str]:
    """What points a daemon of a multi-node replica at its rank table and its master (MindIE-LLM
    docs/zh/user_guide/user_manual/rank_table_file_configuration.md)."""
    servers = ranktable["server_list"]
    return {
        "RANK_TABLE_FILE": str(path),
        "RANKTABLEFILE": str(path),  # the name MindIE releases before 2.0 read
        "MIES_CONTAINER_IP": plan.ip,  # finds this node in the table; the master binds its port to it
        "MASTER_IP": servers[0]["container_ip"],  # the guide: the first server's IP
        "MASTER_PORT": str(plan.master_port),  # a free port of the master's (the guide: any free port)
        "WORLD_SIZE": str(sum(len(s["device"]) for s in servers)),
    }


def _node_ip() -> str:
    """This node's IP as Ray knows it (several simulated Ray nodes may share a machine)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _node_chip_family() -> str | None:
    """The chip family `raystack start` labelled this node with, if Ray runs here."""
    import ray

    return ray.get_runtime_context().get_node_labels().get(FAMILY_LABEL) if ray.is_initialized() else None


class MindIEDaemon:
    """`ranktable` makes it one node of a multi-node replica; `serves_http` is False on the nodes that do
    not hold rank 0 (MindIE's slaves open no port: they are ready once they print STARTED_LINE)."""

    def __init__(self, plan: MindIEPlan, settings: MindIESettings, name: str, backend_env: dict[str, str],
                 ranktable: dict[str, Any] | None = None, serves_http: bool = True):
        self.plan = plan
        self.settings = settings
        self.name = name
        self.backend_env = backend_env
        self.ranktable = ranktable
        self.serves_http = serves_http
        self.install = settings.install(dict(os.environ))
        self.workdir: Path | None = None
        self.process: SupervisedProcess | None = None
        self.claim: NPUClaim | None = None
        self.url = f"http://{plan.ip}:{plan.port}"

    @property
    def config_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "config.json"

    async def start(self, session: aiohttp.ClientSession | None, kill_grace_s: float) -> None:
        await self._claim_npus(kill_grace_s)
        try:
            await self._start(session, kill_grace_s)
        except BaseException:
            if self.process is None or self.process.pid is None:  # else stop() releases it
                self.claim.release()
            raise

    async def _claim_npus(self, kill_grace_s: float) -> None:
        """This node's NPUs of the replica, once no other engine holds them (npu_claim.py): the daemon of a
        replica that died may take up to its guard's grace period to go."""
        self.claim = NPUClaim(_node_ip(), self.plan.npu_ids)
        try:
            waited = await self.claim.acquire(kill_grace_s + CLAIM_MARGIN_S)
        except NPUClaimTimeout as err:
            raise MindIEStartError(f"{self.name} cannot start: {err}") from None
        if waited >= 1:
            logger.info("%s waited %.0f s for NPUs %s: an engine that is gone still held them", self.name, waited,
                        self.plan.npu_ids)

    async def _start(self, session: aiohttp.ClientSession | None, kill_grace_s: float) -> None:
        default = load_default_config(self.install)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"raystack-mindie-{self.name}-"))
        write_config(render_config(default, self.plan, self.settings), self.config_path)
        own = own_env(self.settings, self.install, self.config_path)
        multi_node = self._write_ranktable() if self.ranktable is not None else None
        try:
            env = await asyncio.to_thread(daemon_env, self.settings, self.backend_env, own, multi_node,
                                          _node_chip_family())
        except MindIEEnvironmentError as err:
            raise MindIEStartError(f"{self.name} cannot start: {err}") from None
        # cwd: MindIE writes kernel_meta/ into its working directory, which must be writable.
        self.process = SupervisedProcess(self.name, [str(self.install / DAEMON)], env, cwd=str(self.workdir),
                                         log=logger, kill_grace_s=kill_grace_s, watch_for=STARTED_LINE,
                                         pass_fds=tuple(self.claim.fds))
        logger.info("starting %s on NPUs %s, port %d (config %s)", self.name, self.plan.npu_ids, self.plan.port,
                    self.config_path)
        await self.process.start()
        self.claim.held_by(self.process.pid)
        await self.wait_ready(session)

    def _write_ranktable(self) -> dict[str, str]:
        """Writes the rank table beside config.json; returns the env that points this daemon at it."""
        path = self.workdir / "ranktable.json"
        write_config(self.ranktable, path)  # mode 640 as well: MindIE checks it the same way
        return ranktable_env(self.ranktable, path, self.plan)

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        """Until /health answers 200 (MindIE opens its port only after the model has loaded); on a node
        that serves no HTTP, until the daemon says it started."""
        started = time.monotonic()
        deadline = started + self.settings.startup_timeout_s
        next_progress = started + PROGRESS_EVERY_S
        while True:
            why = self.exited()
            if why:
                raise MindIEStartError(f"{self.name} did not start: {why}")
            ready = await self.healthy(session, timeout_s=2) if self.serves_http else self.process.seen.is_set()
            if ready:
                logger.info("%s ready after %.0f s", self.name, time.monotonic() - started)
                return
            now = time.monotonic()
            if now > deadline:
                await self.process.stop()
                raise MindIEStartError(
                    f"{self.name} did not open port {self.plan.port} within mindie.startup_timeout_s "
                    f"({self.settings.startup_timeout_s:g} s); raise it for a large model. Its last lines:\n"
                    f"{self.process.tail()}")
            if now > next_progress:
                logger.info("%s still loading the model (%.0f s so far, timeout %g s)", self.name, now - started,
                            self.settings.startup_timeout_s)
                next_progress = now + PROGRESS_EVERY_S
            await asyncio.sleep(0.5)

    async def healthy(self, session: aiohttp.ClientSession, timeout_s: float) -> bool:
        try:
            async with session.get(f"{self.plan.management_url}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def exited(self) -> str | None:
        """Why the daemon is gone, or None while it runs."""
        if self.process is None or self.process.returncode is None:
            return None
        code = self.process.returncode
        # MindIE SIGKILLs its own process group when it cannot start, and aborts after a SIGTERM.
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return f"{self.name} exited ({how}). Its last lines:\n{self.process.tail()}"

    async def stop(self, session: aiohttp.ClientSession | None, drain_s: float, kill_grace_s: float) -> None:
        """Drain (MindIE's GET /stopService refuses new requests and answers once the running ones have
        finished), then SIGTERM to its process group, SIGKILL after the grace period."""
        if self.process is not None and self.process.returncode is None and session is not None and drain_s > 0:
            try:
                async with session.get(f"{self.plan.management_url}/stopService", timeout=aiohttp.ClientTimeout(total=drain_s)):
                    pass
            except (aiohttp.ClientError, TimeoutError):
                pass  # not answering, or still draining: the signals below
        if self.process is not None:
            await self.process.stop(kill_grace_s)
        if self.claim is not None:
            self.claim.release()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
