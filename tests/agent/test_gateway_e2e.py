"""The node agent end to end against the real gateway.

Each test runs a simulated mistralrs node as its own process (``python -m cortex.sim``), the real gateway
in-process (:class:`~cortex.engine.engine.Engine` + :func:`~cortex.proxy.app.serve`) and, where the test
needs one, the real agent process (``python -m cortex.agent``). The VRAM test runs the agent in-process
instead, because it injects a fake NVML reader (no GPU here). Every process a test starts is stopped in a
``finally``, including a simulator started by the restart script, found through its pid file.

The restart script (:func:`write_restart_script`) is what an operator's ``systemctl restart mistralrs``
stands for: it stops the simulator named by the pid file, starts a fresh one on the same port in the
background, records the new pid and exits 0. It appends a line to a counter file on every run, so a test
can prove that one restart command ran exactly once.

Processes take seconds to start on a loaded machine, so each test spawns its simulator, its agent and, where
it runs one, a "warm" CLI (:class:`WarmCli`) together, and starts the gateway on a port chosen beforehand;
the agent retries until the gateway answers. The last three tests are in-process (a failing restart
command, and a defrag trim that runs without the agent): what they check does not need the processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from cortex.agent.agent import Agent, AgentConfig
from cortex.agent.nvml import GpuReading, NvmlReader
from cortex.agent.protocol import GpuReport
from cortex.config import EvictionSettings, GatewaySettings, ModelSettings, NodeSettings, PollSettings, Settings
from cortex.engine.agents import STALE_AFTER_INTERVALS
from cortex.engine.commands import CommandResult, RestartNode
from cortex.engine.engine import Engine
from cortex.engine.events import DefragFinished, DefragStarted, Event, ModelUnloaded
from cortex.engine.lifecycle import RestartResult
from cortex.proxy.app import serve
from cortex.sim import SimModel, SimNode
from tests.agent.fakes import free_port, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOKEN = "gw-e2e-agent-token-7f3a9c"
WRONG_TOKEN = "wrong-agent-token-c0ffee"
INTERVAL_S = 0.2
"""The agent's reporting interval in these tests (a report goes stale after three)."""

Node = dict[str, Any]


# -- processes ------------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """This environment without CORTEX_* settings, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it holds no socket any more)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    match = re.search(r"^State:\s+(\S)", status, re.MULTILINE)
    return match is not None and match.group(1) not in ("Z", "X")


async def _stop_pid(pid: int) -> None:
    """SIGTERM a process that is not our child, SIGKILL it after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while _alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not _alive(pid):
            return


async def _stop_child(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class SimProcess:
    """``python -m cortex.sim`` on a fixed port; its pid is kept in ``sim.pid`` (the restart script rewrites it).

    Args:
        tmp_path: Where the pid file, the counter file, the logs and the restart script go.
        args: The simulator's model flags at first start (``--model m1=1000 --unloaded m2`` ...).
        restart_args: The model flags the restart script starts the fresh simulator with; ``args`` if None.
    """

    def __init__(self, tmp_path: Path, args: Sequence[str], restart_args: Sequence[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pid_file = tmp_path / "sim.pid"
        self.counter = tmp_path / "restarts.txt"
        self.log = tmp_path / "sim.log"
        common = ["--port", str(self.port), "--vram-mb", "8192", "--load-s", "0.1", "--tok-s", "0"]
        self.argv = [sys.executable, "-m", "cortex.sim", *common, *args]
        self.restart_argv = [sys.executable, "-m", "cortex.sim", *common, *(restart_args or args)]
        self.script = write_restart_script(tmp_path, self)
        self.first_pid = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def restart_cmd(self) -> str:
        """The agent's ``--restart-cmd``."""
        return shlex.join(["bash", str(self.script)])

    @property
    def pid(self) -> int:
        """The pid of the simulator running now (the first one, or the one the restart script started)."""
        return int(self.pid_file.read_text().strip())

    def restarts(self) -> list[str]:
        """One line per run of the restart script."""
        return self.counter.read_text().splitlines() if self.counter.exists() else []

    async def start(self, *, wait: bool = True) -> None:
        with self.log.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=child_env(), cwd=REPO
            )
        self.first_pid = self._proc.pid
        self.pid_file.write_text(f"{self._proc.pid}\n")
        if wait:
            await self.wait_healthy(20.0)

    async def wait_healthy(self, within: float) -> None:
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=1)) as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise AssertionError(f"the simulator on {self.url} did not answer /health within {within} s")
                await asyncio.sleep(0.05)

    async def models(self) -> dict[str, str]:
        """The simulator's own view: model id → status."""
        async with aiohttp.ClientSession() as session, session.get(f"{self.url}/v1/models") as resp:
            data = await resp.json()
        return {m["id"]: m["status"] for m in data["data"] if m["id"] != "default"}

    async def stop(self) -> None:
        """Stop the simulator we started and any the restart script started."""
        if self._proc is not None:
            await _stop_child(self._proc)
        with contextlib.suppress(OSError, ValueError):
            pid = self.pid
            if pid != self.first_pid:
                await _stop_pid(pid)


_RESTART_SCRIPT = """\
#!/usr/bin/env bash
# Restart the simulated mistralrs: stop the one in the pid file, start a fresh one on the same port.
set -u
echo "restart $$" >> {counter}
old=$(cat {pid_file} 2>/dev/null || true)
if [ -n "$old" ]; then
  echo "stopping sim pid $old"
  kill -TERM "$old" 2>/dev/null || true
  for _ in $(seq 200); do   # up to 10 s; a zombie counts as stopped (its socket is closed)
    state=$(awk '/^State:/ {{print $2}}' /proc/"$old"/status 2>/dev/null || true)
    if [ -z "$state" ] || [ "$state" = Z ]; then break; fi
    sleep 0.05
  done
fi
nohup {argv} >> {log} 2>&1 < /dev/null &
echo "$!" > {pid_file}
echo "sim restarted as pid $!"
exit 0
"""


def write_restart_script(tmp_path: Path, sim: SimProcess) -> Path:
    """Write the restart script for ``sim`` into ``tmp_path`` (see the module docstring)."""
    script = tmp_path / "restart sim.sh"  # a space: the agent splits --restart-cmd like a shell, runs no shell
    script.write_text(
        _RESTART_SCRIPT.format(
            counter=shlex.quote(str(sim.counter)),
            pid_file=shlex.quote(str(sim.pid_file)),
            argv=shlex.join(sim.restart_argv),
            log=shlex.quote(str(sim.log)),
        )
    )
    return script


@contextlib.asynccontextmanager
async def sim_process(
    tmp_path: Path, args: Sequence[str], restart_args: Sequence[str] | None = None, *, wait: bool = True
) -> AsyncIterator[SimProcess]:
    """A running simulator; with ``wait=False`` yielded as soon as it is spawned (call ``wait_healthy``)."""
    sim = SimProcess(tmp_path, args, restart_args)
    try:
        await sim.start(wait=wait)
        yield sim
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def agent_process(
    tmp_path: Path, gateway: str, sim: SimProcess, *, token: str = TOKEN, extra: Sequence[str] = ()
) -> AsyncIterator[asyncio.subprocess.Process]:
    """The real agent (``python -m cortex.agent``) for node ``a``; the token goes in by environment."""
    env = child_env()
    env["CORTEX_AGENT_TOKEN"] = token
    args = ["--node", "a", "--gateway", gateway, "--mistralrs", sim.url, "--restart-cmd", sim.restart_cmd]
    args += ["--interval", str(INTERVAL_S), "--restart-timeout", "20", "--max-backoff", "0.4", *extra]
    with (tmp_path / "agent.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cortex.agent",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=REPO,
        )
    try:
        yield proc
    finally:
        await _stop_child(proc)


# -- the gateway ----------------------------------------------------------------------------------------


def gateway_address() -> tuple[str, str]:
    """A free loopback ``listen`` for the gateway and its URL, known before the gateway starts.

    Processes start slowly on a loaded machine, so the agent is spawned first and finds the gateway up a
    moment later (it retries an unreachable gateway with backoff, up to ``--max-backoff``).
    """
    port = free_port()
    return f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"


def make_settings(
    endpoint: str,
    models: Sequence[tuple[str, int]],
    *,
    listen: str = "127.0.0.1:0",
    token: str = TOKEN,
    eviction: EvictionSettings | None = None,
) -> Settings:
    return Settings(
        gateway=GatewaySettings(
            listen=listen, metrics_listen="", drain_s=5.0, queue_timeout_s=30.0, first_byte_timeout_s=30.0
        ),
        poll=PollSettings(interval_s=0.2, timeout_s=1.0),
        eviction=eviction or EvictionSettings(),
        nodes=[NodeSettings(name="a", endpoint=endpoint, vram_mb=8192, pinned=["m1"], agent_token=SecretStr(token))],
        models=[ModelSettings(id=model, vram_mb=mb) for model, mb in models],
    )


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, settings: Settings) -> AsyncIterator[tuple[Engine, str]]:
    """The real gateway in-process, ready (node ``a`` polled); yields the engine and its base URL."""
    async with Engine(settings, state_path=tmp_path / "state.json") as eng, serve(eng) as servers:
        await asyncio.wait_for(eng.ready.wait(), 10)
        host, port = servers.api
        yield eng, f"http://{host}:{port}"


async def fleet_node(url: str) -> Node:
    """Node ``a`` as ``GET /admin/fleet`` shows it."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/admin/fleet") as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
    (node,) = [n for n in data["nodes"] if n["name"] == "a"]
    assert isinstance(node, dict)
    return node


async def wait_node(url: str, predicate: Callable[[Node], bool], within: float, what: str) -> Node:
    """Poll ``/admin/fleet`` until node ``a`` satisfies ``predicate``; return that view."""
    deadline = time.monotonic() + within
    while True:
        node = await fleet_node(url)
        if predicate(node):
            return node
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}; last view: {node}")
        await asyncio.sleep(0.05)


def slot_states(node: Node) -> dict[str, str]:
    return {slot["model_id"]: slot["state"] for slot in node["slots"]}


def agent_fresh(node: Node) -> bool:
    return node["agent"] is not None and bool(node["agent"]["fresh"])


async def chat(url: str, model: str) -> tuple[int, str]:
    """One small OpenAI chat completion through the gateway: (status, body)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=40)) as resp,
    ):
        return resp.status, await resp.text()


_WARM_CLI = (
    "import json, sys\n"
    "import cortex.admin_client, cortex.cli\n"
    "argv = json.loads(sys.stdin.readline() or 'null')\n"
    "raise SystemExit(2 if argv is None else cortex.cli.main(argv))\n"
)


class WarmCli:
    """The ``cortex`` CLI in a process spawned ahead of time: it imports the CLI, then waits for its arguments.

    ``python -m cortex`` is ``SystemExit(cortex.cli.main())``; this runs the same ``main`` with the arguments
    it reads from stdin, so the seconds a Python start takes on a loaded machine overlap the test's setup.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def spawn(cls, cwd: Path) -> WarmCli:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WARM_CLI,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_env(),
            cwd=cwd,
        )
        return cls(proc)

    async def run(self, *args: str) -> tuple[int, str, str]:
        """``cortex ARGS`` (bounded): (exit code, stdout, stderr)."""
        line = json.dumps(list(args)).encode() + b"\n"
        out, err = await asyncio.wait_for(self.proc.communicate(line), 40)
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), err.decode()

    async def close(self) -> None:
        await _stop_child(self.proc)


def cli_config(tmp_path: Path) -> Path:
    """A config file for the CLI's admin commands (the gateway URL comes from ``--gateway``)."""
    path = tmp_path / "cortex.toml"
    path.write_text('[gateway]\nlisten = "127.0.0.1:9"\nmetrics_listen = ""\n')
    return path


@contextlib.asynccontextmanager
async def collect_events(eng: Engine) -> AsyncIterator[list[Event]]:
    """Every engine event published inside the block, in order."""
    events: list[Event] = []
    before = eng.bus.subscribers
    stream = eng.subscribe()

    async def pump() -> None:
        async for event in stream:
            events.append(event)

    task = asyncio.create_task(pump())
    await wait_until(lambda: eng.bus.subscribers > before, 5, "the event subscription")
    try:
        yield events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await stream.aclose()  # type: ignore[attr-defined]


def restarts_metric(eng: Engine) -> float | None:
    match = re.search(
        r'^cortex_node_restarts_total\{node="a"\} (\S+)$', eng.metrics.exposition().decode(), re.MULTILINE
    )
    return None if match is None else float(match.group(1))


class FixedNvml(NvmlReader):
    """One fake GPU with fixed figures (this machine has none)."""

    def __init__(self, total_mb: int, used_mb: int) -> None:
        super().__init__(None)
        self.gpu = GpuReport(index=0, name="Fake GPU", total_mb=total_mb, used_mb=used_mb, util_pct=7.0)

    def start(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def read(self) -> GpuReading:
        return GpuReading(nvml=True, gpus=(self.gpu,))


@dataclass
class Rig:
    """One test's processes and gateway."""

    eng: Engine
    url: str
    """The gateway's base URL."""
    sim: SimProcess
    agent: asyncio.subprocess.Process | None
    cli: WarmCli | None


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path,
    sim_args: Sequence[str],
    models: Sequence[tuple[str, int]],
    *,
    restart_args: Sequence[str] | None = None,
    agent_token: str | None = TOKEN,
    eviction: EvictionSettings | None = None,
    cli: bool = False,
) -> AsyncIterator[Rig]:
    """The simulator process, the agent process (unless ``agent_token`` is None) and the gateway, all up.

    With ``cli``, a :class:`WarmCli` too.

    The processes are spawned together (each takes seconds to import on a loaded machine); the gateway
    starts once the simulator answers, and the agent finds it on its next retry. Everything stops in
    reverse order on the way out.
    """
    listen, url = gateway_address()
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(sim_process(tmp_path, sim_args, restart_args, wait=False))
        agent = None
        if agent_token is not None:
            agent = await stack.enter_async_context(agent_process(tmp_path, url, sim, token=agent_token))
        warm = None
        if cli:
            warm = await WarmCli.spawn(tmp_path)
            stack.push_async_callback(warm.close)
        await sim.wait_healthy(20)
        settings = make_settings(sim.url, models, listen=listen, eviction=eviction)
        eng, _ = await stack.enter_async_context(gateway(tmp_path, settings))
        yield Rig(eng, url, sim, agent, warm)


# -- tests ----------------------------------------------------------------------------------------------


async def test_reports_flow_into_the_fleet(tmp_path: Path) -> None:
    async with rig(tmp_path, ["--model", "m1=1000"], [("m1", 1000)]) as r:
        node = await wait_node(r.url, agent_fresh, 15, "the agent's first report in /admin/fleet")
        agent = node["agent"]
        assert agent["mistralrs_up"] is True
        assert agent["version"]
        assert agent["last_command"] is None
        assert agent["seen_at"] == pytest.approx(time.time(), abs=5)
        if agent["nvml"]:  # a machine with a GPU after all: its figures win
            assert agent["gpus"]
            assert node["vram_source"] == "agent"
        else:  # no NVML here: said in the report, no GPU figures, the node's own figures stay in use
            assert agent["gpus"] == []
            assert "NVML unavailable" in agent["gpu_error"]
            for _ in range(10):  # over several more reports
                node = await fleet_node(r.url)
                assert agent_fresh(node)
                assert node["vram_source"] == "system_info"
                assert node["vram_used_mb"] == 1300  # the sim's 300 MiB base + m1
                await asyncio.sleep(INTERVAL_S / 2)
        assert r.eng.agents.seen("a")
        assert r.agent is not None
        assert r.agent.returncode is None
    assert TOKEN not in (tmp_path / "agent.log").read_text()


async def test_a_wrong_token_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def refusals() -> int:
        return sum("refused an agent report" in record.getMessage() for record in caplog.records)

    async with rig(tmp_path, ["--model", "m1=1000"], [("m1", 1000)], agent_token=WRONG_TOKEN) as r:
        await wait_until(lambda: refusals() >= 3, 15, "three refused reports from the agent process")
        assert r.agent is not None
        assert r.agent.returncode is None
        report_url = f"{r.url}/admin/agents/a/report"
        async with aiohttp.ClientSession() as session:  # the route itself: 401, whatever the wrong credential
            body = {"node": "a", "time": 1.0, "interval_s": 1.0, "nvml": False, "mistralrs": {"up": True}}
            wrong: tuple[dict[str, str], ...] = (
                {"Authorization": f"Bearer {WRONG_TOKEN}"},
                {},
                {"Authorization": f"Basic {TOKEN}"},
            )
            for headers in wrong:
                for data in (json.dumps(body), "not json"):  # the token is checked before the body is judged
                    async with session.post(report_url, data=data, headers=headers) as resp:
                        text = await resp.text()
                        assert resp.status == 401, (headers, data, text)
                        assert WRONG_TOKEN not in text
                        assert TOKEN not in text
            # the right token with a body that is not JSON: 400, in the hub's error shape
            async with session.post(report_url, data="not json", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
                assert error["type"] == "invalid_request_error"
                assert error["message"].startswith("malformed report")
        assert (await fleet_node(r.url))["agent"] is None
        assert not r.eng.agents.seen("a")
    gateway_log = "\n".join(record.getMessage() for record in caplog.records)
    assert "missing or wrong token" in gateway_log
    agent_log = (tmp_path / "agent.log").read_text()
    assert agent_log.count("wrong or missing agent token") == 1  # said once per outage, not per report
    for text in (gateway_log, caplog.text, agent_log):
        assert WRONG_TOKEN not in text
        assert TOKEN not in text


async def test_agent_vram_is_preferred_while_fresh(tmp_path: Path) -> None:
    async with rig(tmp_path, ["--model", "m1=1000"], [("m1", 1000)], agent_token=None) as r:
        node = await fleet_node(r.url)
        assert (node["vram_source"], node["vram_used_mb"]) == ("system_info", 1300)
        config = AgentConfig(
            node="a", gateway=r.url, token=TOKEN, mistralrs=r.sim.url, restart_argv=("false",), interval_s=INTERVAL_S
        )
        agent = Agent(config, nvml=FixedNvml(total_mb=8192, used_mb=5000))
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            node = await wait_node(r.url, lambda n: n["vram_source"] == "agent", 10, "vram_source agent")
            assert node["vram_total_mb"] == 8192
            assert node["vram_used_mb"] == 5000  # the agent's figure (above the 1000 MiB estimate)
            assert node["agent"]["nvml"] is True
            assert node["agent"]["gpus"] == [
                {"index": 0, "name": "Fake GPU", "total_mb": 8192, "used_mb": 5000, "util_pct": 7.0}
            ]
            await asyncio.sleep(4 * INTERVAL_S)  # still fresh while reports keep coming
            node = await fleet_node(r.url)
            assert (node["vram_source"], node["vram_used_mb"]) == ("agent", 5000)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        assert agent.reports_accepted >= 3
        info = r.eng.agents.info("a")
        assert info is not None
        last_report = info.seen_at  # by the gateway's clock
        node = await wait_node(r.url, lambda n: n["vram_source"] != "agent", 10, "the fall-back to system_info")
        assert time.time() - last_report >= STALE_AFTER_INTERVALS * INTERVAL_S  # not before three intervals
        assert (node["vram_source"], node["vram_used_mb"]) == ("system_info", 1300)
        assert node["agent"]["fresh"] is False


async def test_a_restart_command_restarts_the_simulator(tmp_path: Path) -> None:
    sim_args = ["--model", "m1=1000", "--unloaded", "m2=1000"]
    async with rig(tmp_path, sim_args, [("m1", 1000), ("m2", 1000)], cli=True) as r:
        eng, sim = r.eng, r.sim
        await wait_node(r.url, agent_fresh, 15, "the agent's first report")
        first_pid = sim.pid
        assert restarts_metric(eng) in (None, 0.0)

        config = str(cli_config(tmp_path))
        assert r.cli is not None
        cli = asyncio.create_task(r.cli.run("restart", "a", "--gateway", r.url, "--config", config))
        await wait_until(lambda: "a" in eng.lifecycle.defragging, 20, "the restart to begin")
        second = await eng.submit(RestartNode("a"))  # a second restart meanwhile is refused, not queued
        assert (second.ok, second.message) == (False, "a is already restarting")
        code, out, err = await cli

        assert (code, out.strip()) == (0, "restarted a"), err
        assert sim.pid != first_pid
        node = await wait_node(
            r.url,
            # the agent's report after the restart (an earlier one may have caught mistralrs still starting)
            lambda n: (
                n["status"] == "up"
                and slot_states(n).get("m1") == "loaded"
                and agent_fresh(n)
                and n["agent"]["mistralrs_up"] is True
            ),
            15,
            "node a up with m1 loaded after the restart, and the agent seeing mistralrs up",
        )
        last = node["agent"]["last_command"]
        assert last is not None
        assert (last["kind"], last["exit_code"], last["error"]) == ("restart", 0, "")
        assert f"stopping sim pid {first_pid}" in last["output_tail"]
        assert last["output_tail"].rstrip().endswith(f"sim restarted as pid {sim.pid}")
        assert node["agent"]["mistralrs_up"] is True
        assert node["cycles"] == 0
        assert slot_states(node) == {"m1": "loaded", "m2": "unloaded"}
        assert await sim.models() == {"m1": "loaded", "m2": "unloaded"}
        assert _alive(sim.pid)
        assert not _alive(first_pid)
        assert restarts_metric(eng) == 1.0
        # exactly once, even after more reports (the gateway re-sends a command until it sees the result)
        info = eng.agents.info("a")
        assert info is not None
        later = info.seen_at + 3 * INTERVAL_S
        await wait_until(lambda: (i := eng.agents.info("a")) is not None and i.seen_at > later, 5, "more reports")
        assert len(sim.restarts()) == 1
        assert restarts_metric(eng) == 1.0


async def test_defrag_restarts_through_the_agent(tmp_path: Path) -> None:
    models = [("m1", 3000), ("m2", 3000), ("m3", 3000)]
    declared = [arg for model, mb in models for arg in ("--model", f"{model}={mb}")]
    # m1 loaded, m2 and m3 listed but unloaded; the restarted process loads all three (as mistralrs does)
    initial = [*declared, "--unloaded", "m2", "--unloaded", "m3"]
    eviction = EvictionSettings(defrag_after_cycles=1, min_resident_s=0, headroom_mb=0, strategy="lru")
    async with (
        rig(tmp_path, initial, models, restart_args=declared, eviction=eviction) as r,
        collect_events(r.eng) as events,
    ):
        eng, sim, url = r.eng, r.sim, r.url
        await wait_node(url, agent_fresh, 15, "the agent's first report")
        first_pid = sim.pid

        status, body = await chat(url, "m2")
        assert status == 200, body
        node = await fleet_node(url)
        assert slot_states(node) == {"m1": "loaded", "m2": "loaded", "m3": "unloaded"}  # 300 + 6000 of 8192
        assert node["cycles"] == 0

        # m3 does not fit beside m1 and m2: m2 is evicted (LRU; m1 is pinned), one cycle, then the defrag
        m3 = asyncio.create_task(chat(url, "m3"))
        await wait_until(lambda: any(isinstance(e, DefragStarted) for e in events), 20, "DefragStarted")
        started = next(e for e in events if isinstance(e, DefragStarted))
        assert (started.node, started.cycles) == ("a", 1)
        statuses_seen: set[str] = set()

        async def watch() -> None:
            while True:
                node = eng.snapshot().node("a")
                if node is not None:
                    statuses_seen.add(node.status.value)
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        # requests during the restart: the only node is drained, so they wait in the model's queue
        during = [asyncio.create_task(chat(url, model)) for model in ("m1", "m1", "m3")]
        try:
            await wait_until(lambda: any(isinstance(e, DefragFinished) for e in events), 30, "DefragFinished")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        finished = next(e for e in events if isinstance(e, DefragFinished))
        assert finished.ok, finished.message
        assert "restarting" in statuses_seen, statuses_seen

        status, body = await asyncio.wait_for(m3, 30)
        assert status == 200, body
        replies = await asyncio.wait_for(asyncio.gather(*during), 30)
        assert [status for status, _ in replies] == [200, 200, 200], replies

        assert sim.pid != first_pid
        assert len(sim.restarts()) == 1
        unloads = [(e.model, e.reason) for e in events if isinstance(e, ModelUnloaded)]
        assert unloads == [("m2", "evict"), ("m2", "defrag")]  # evicted, then trimmed after the restart
        assert [e.kind for e in events if isinstance(e, DefragStarted | DefragFinished)] == [
            "defrag_started",
            "defrag_finished",
        ]
        node = await fleet_node(url)
        assert node["status"] == "up"
        assert node["cycles"] == 0
        assert slot_states(node) == {"m1": "loaded", "m2": "unloaded", "m3": "loaded"}
        assert await sim.models() == {"m1": "loaded", "m2": "unloaded", "m3": "loaded"}
        assert restarts_metric(eng) == 1.0
        last = node["agent"]["last_command"]
        assert last is not None
        assert last["exit_code"] == 0


async def test_cli_restart_without_an_agent_is_skipped(tmp_path: Path) -> None:
    async with rig(tmp_path, ["--model", "m1=1000"], [("m1", 1000)], agent_token=None, cli=True) as r:
        config = str(cli_config(tmp_path))
        assert r.cli is not None
        code, out, err = await r.cli.run("restart", "a", "--gateway", r.url, "--config", config)

        assert code == 1
        assert out == ""
        assert err.strip().splitlines() == ["cortex: no agent for a: restart skipped"]
        assert r.sim.restarts() == []
        assert r.sim.pid == r.sim.first_pid
        assert _alive(r.sim.pid)
        node = await fleet_node(r.url)
        assert (node["status"], node["agent"]) == ("up", None)
        assert slot_states(node) == {"m1": "loaded"}
        assert restarts_metric(r.eng) in (None, 0.0)


async def failing_restart(tmp_path: Path) -> tuple[CommandResult, Engine, list[Event]]:
    """``RestartNode`` with an agent whose restart command exits 3 (all in-process: the failure is the point)."""
    sim = SimNode([SimModel("m1", 1000)], load_s=0.05, tok_s=0)
    port = await sim.start()
    try:
        settings = make_settings(f"http://127.0.0.1:{port}", [("m1", 1000)])
        async with gateway(tmp_path, settings) as (eng, url), collect_events(eng) as events:
            argv = ("bash", "-c", "echo 'mistralrs.service not found' >&2; exit 3")
            config = AgentConfig(
                node="a", gateway=url, token=TOKEN, mistralrs=sim.url, restart_argv=argv, interval_s=INTERVAL_S
            )
            stop = asyncio.Event()
            task = asyncio.create_task(Agent(config, nvml=FixedNvml(8192, 1300)).run(stop))
            try:
                await wait_node(url, agent_fresh, 10, "the agent's first report")
                result = await asyncio.wait_for(eng.submit(RestartNode("a")), 20)
                node = await fleet_node(url)
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
            last = node["agent"]["last_command"]
            assert last is not None
            assert (last["exit_code"], last["output_tail"]) == (3, "mistralrs.service not found\n")
            assert (node["status"], slot_states(node), node["cycles"]) == ("up", {"m1": "loaded"}, 0)  # undrained
            assert restarts_metric(eng) in (None, 0.0)  # only restarts that worked count
            return result, eng, list(events)
    finally:
        await sim.stop()


async def test_a_failing_restart_command_is_reported(tmp_path: Path) -> None:
    result, _eng, events = await failing_restart(tmp_path)

    assert not result.ok
    assert "exited 3" in result.message
    finished = [e for e in events if isinstance(e, DefragFinished)]
    assert len(finished) == 1
    assert not finished[0].ok


async def test_a_failing_restart_says_so_once(tmp_path: Path) -> None:
    result, _eng, _events = await failing_restart(tmp_path)

    assert result.message.count("restart of a") == 1, result.message


async def test_defrag_keeps_a_model_requests_wait_for(tmp_path: Path) -> None:
    # In-process and without the agent: the trim is the lifecycle's step, whatever restarted the node.
    sim = SimNode(
        [SimModel("m1", 3000), SimModel("m2", 3000, loaded=False), SimModel("m3", 3000, loaded=False)],
        vram_mb=8192,
        load_s=0.05,
        tok_s=0,
    )
    await sim.start()
    restarts: list[str] = []
    gate = asyncio.Event()

    async def restart(node: str, timeout_s: float) -> RestartResult:
        restarts.append(node)
        await gate.wait()
        await sim.restart()  # a restarted mistralrs loads every configured model: m2 is back
        return RestartResult(ok=True, message="restarted")

    eviction = EvictionSettings(defrag_after_cycles=1, min_resident_s=0, headroom_mb=0, strategy="lru")
    settings = make_settings(sim.url, [("m1", 3000), ("m2", 3000), ("m3", 3000)], eviction=eviction)
    try:
        async with gateway(tmp_path, settings) as (eng, url), collect_events(eng) as events:
            eng.lifecycle.restart = restart
            eng.lifecycle.agent_alive = lambda _node: True
            assert (await chat(url, "m2"))[0] == 200
            m3 = asyncio.create_task(chat(url, "m3"))  # evicts m2: one cycle, then the defrag
            await wait_until(lambda: bool(restarts), 10, "the defrag's restart")
            m2 = asyncio.create_task(chat(url, "m2"))  # a request for the evicted model, during the restart
            await wait_until(lambda: eng.fleet.queued.get("m2", 0) == 1, 10, "the m2 request to queue")
            gate.set()
            replies = await asyncio.wait_for(asyncio.gather(m3, m2), 20)
            assert [status for status, _ in replies] == [200, 200]
            await asyncio.sleep(0.5)  # room for a second defrag to begin

            unloads = [(e.model, e.reason) for e in events if isinstance(e, ModelUnloaded)]
            assert ("m2", "defrag") not in unloads, unloads  # requests wait for it: it should stay resident
            assert len(restarts) == 1
    finally:
        gate.set()
        await sim.stop()
