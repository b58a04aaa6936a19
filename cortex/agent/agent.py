"""The agent's loop: read the GPUs and the local mistralrs, report to the gateway, run what it sends back.

One report a round, one round an interval. The gateway answers each report with the commands it wants
run; the agent runs them one at a time in a separate task, so that reports keep flowing (and show
mistralrs going down and coming back) while a restart takes its time, and sends the next report as soon as
a command finishes instead of waiting out the interval. A result stays queued until a report carrying it
was accepted, so a result is never lost to a gateway outage.

Safety rules, each deliberate:

- The gateway only names a command *kind*. What runs is the agent's own ``--restart-cmd``; nothing from
  the reply reaches a command line. Unknown kinds come back as an error result and run nothing.
- A command id runs at most once: the gateway re-sends a command until it sees the result, and the
  agent remembers the ids it has handled.
- An unreachable or refusing gateway never stops the agent. It retries with exponential backoff and
  logs once per outage (again only when the kind of failure changes), and the token never appears in a
  log line (:class:`AgentConfig` keeps it out of its ``repr``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from pydantic import ValidationError

from cortex import __version__
from cortex.agent.nvml import GpuReading, NvmlReader
from cortex.agent.protocol import (
    COMMAND_KINDS,
    AgentCommand,
    CommandReport,
    MistralrsReport,
    ModelReport,
    Report,
)
from cortex.agent.runner import run_command

__all__ = ["Agent", "AgentConfig"]

log = logging.getLogger(__name__)

_REPORT_TIMEOUT_S = 10.0
_MAX_HANDLED_IDS = 4096
_MAX_PENDING_RESULTS = 64
_MAX_REPLY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent needs, already validated (see :func:`cortex.agent.cli.config_from_args`)."""

    node: str
    """The node's name as the gateway's ``[[nodes]]`` knows it."""
    gateway: str
    """Base URL of the gateway (``http://gateway:8000``)."""
    token: str = field(repr=False)
    """The node's ``agent_token``; never logged."""
    mistralrs: str
    """Base URL of the local mistralrs server."""
    restart_argv: tuple[str, ...]
    """The restart command, already split; run without a shell."""
    gpus: tuple[int, ...] | None = None
    """NVML indices to report; None for every device."""
    interval_s: float = 2.0
    """Seconds between reports."""
    restart_timeout_s: float = 300.0
    """Seconds a restart may take before it is killed."""
    max_backoff_s: float = 30.0
    """Longest wait between reports while the gateway is unreachable or refusing."""

    @property
    def report_url(self) -> str:
        """Where reports go."""
        return f"{self.gateway.rstrip('/')}/admin/agents/{quote(self.node, safe='')}/report"


@dataclass(frozen=True, slots=True)
class _Refused:
    """A report the gateway did not accept."""

    kind: str
    """What kind of failure: ``unreachable`` or ``http <status>``; a change of kind is logged again."""
    status: int | None
    detail: str


class Agent:
    """The per-node sidecar: reports every interval and runs the commands the gateway sends back.

    Args:
        config: The validated configuration.
        nvml: The GPU reader; the default reads ``config.gpus`` through NVML.
        clock: Wall clock for report and command times.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        nvml: NvmlReader | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._nvml = nvml if nvml is not None else NvmlReader(config.gpus)
        self._clock = clock
        self._results: list[CommandReport] = []
        self._handled: OrderedDict[str, None] = OrderedDict()
        self._commands: asyncio.Queue[AgentCommand] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._failures = 0
        self._outage: str | None = None
        self.reports_accepted = 0
        """Reports the gateway accepted so far (for tests and the exit log line)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Report until ``stop`` is set, then stop every task and process this call started."""
        await asyncio.to_thread(self._nvml.start)
        try:
            async with aiohttp.ClientSession() as session:
                worker = asyncio.create_task(self._command_worker(), name="agent-commands")
                loop = asyncio.create_task(self._report_loop(session), name="agent-reports")
                stopper = asyncio.create_task(stop.wait(), name="agent-stop")
                try:
                    await asyncio.wait({loop, stopper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (stopper, loop, worker):
                        task.cancel()
                    for task in (stopper, loop, worker):
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
        finally:
            await asyncio.to_thread(self._nvml.close)
        log.info("agent for node %r stopped after %d accepted reports", self.config.node, self.reports_accepted)

    # -- reporting --------------------------------------------------------------------------------------

    async def _report_loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                delay = await self._round(session)
            except Exception:  # a bug must not end the agent; say so and keep going
                log.exception("report round failed")
                delay = self.config.max_backoff_s
            await self._sleep(delay)

    async def _round(self, session: aiohttp.ClientSession) -> float:
        """Build and send one report; return how long to wait before the next."""
        report = await self.build_report(session)
        outcome = await self._send(session, report)
        if isinstance(outcome, _Refused):
            return self._note_failure(outcome)
        sent = {result.id for result in report.results}
        self._results = [r for r in self._results if r.id not in sent]
        self.reports_accepted += 1
        if self._outage is not None:
            log.info("gateway accepted a report again after %d failed attempts", self._failures)
        self._failures = 0
        self._outage = None
        self._accept(outcome)
        return self.config.interval_s

    async def build_report(self, session: aiohttp.ClientSession) -> Report:
        """Read the GPUs and the local mistralrs (concurrently) into one report."""
        started = self._clock()  # the report's time: every figure in it was read after this moment
        gpu_task = asyncio.create_task(asyncio.to_thread(self._nvml.read))
        try:
            mistralrs = await self._poll_mistralrs(session)
        finally:
            reading: GpuReading = await gpu_task
        return Report(
            node=self.config.node,
            agent_version=__version__,
            time=started,
            interval_s=self.config.interval_s,
            nvml=reading.nvml,
            gpus=list(reading.gpus),
            gpu_error=reading.error[:4096],
            mistralrs=mistralrs,
            results=list(self._results),
        )

    async def _poll_mistralrs(self, session: aiohttp.ClientSession) -> MistralrsReport:
        base = self.config.mistralrs.rstrip("/")
        timeout = aiohttp.ClientTimeout(total=min(5.0, max(1.0, self.config.interval_s)))
        try:
            async with session.get(f"{base}/health", timeout=timeout) as resp:
                await resp.read()
                if resp.status != 200:
                    return MistralrsReport(up=False, error=f"/health answered HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return MistralrsReport(up=False, error=f"/health: {_describe(exc)}"[:4096])
        try:
            async with session.get(f"{base}/v1/models", timeout=timeout) as resp:
                if resp.status != 200:
                    return MistralrsReport(up=True, error=f"/v1/models answered HTTP {resp.status}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return MistralrsReport(up=True, error=f"/v1/models: {_describe(exc)}"[:4096])
        models, problem = _parse_models(data)
        return MistralrsReport(up=True, models=models, error=problem)

    async def _send(self, session: aiohttp.ClientSession, report: Report) -> list[AgentCommand] | _Refused:
        """POST the report; the accepted commands, or why it was not accepted."""
        headers = {"Authorization": f"Bearer {self.config.token}"}
        try:
            async with session.post(
                self.config.report_url,
                json=report.model_dump(mode="json"),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=_REPORT_TIMEOUT_S),
                allow_redirects=False,
            ) as resp:
                raw = await resp.content.read(_MAX_REPLY_BYTES)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _Refused("unreachable", None, _describe(exc))
        if not 200 <= status < 300:
            return _Refused(f"http {status}", status, _error_message(raw))
        return self._parse_reply(raw)

    def _parse_reply(self, raw: bytes) -> list[AgentCommand]:
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            log.warning("gateway accepted the report but its reply is not JSON; ignoring the reply")
            return []
        items = data.get("commands") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return []
        commands: list[AgentCommand] = []
        for item in items:
            try:
                commands.append(AgentCommand.model_validate(item))
            except ValidationError:
                log.warning("ignoring a malformed command in the gateway's reply")
        return commands

    def _note_failure(self, refused: _Refused) -> float:
        """Log the failure if it starts an outage (or changes its kind); return the backoff."""
        self._failures += 1
        cfg = self.config
        backoff = min(cfg.max_backoff_s, cfg.interval_s * 2.0 ** min(self._failures - 1, 30))
        if refused.status in (401, 403):
            backoff = cfg.max_backoff_s
        if refused.kind != self._outage:
            self._outage = refused.kind
            if refused.status in (401, 403):
                log.error(
                    "gateway refused the report for node %r: HTTP %d, wrong or missing agent token "
                    "(check --token against nodes[].agent_token on the gateway); retrying every %g s",
                    cfg.node,
                    refused.status,
                    backoff,
                )
            elif refused.status == 404:
                log.error(
                    "gateway does not know node %r (HTTP 404: %s); check --node; retrying with backoff",
                    cfg.node,
                    refused.detail,
                )
            elif refused.status is not None:
                log.warning(
                    "gateway answered HTTP %d (%s); retrying with backoff up to %g s",
                    refused.status,
                    refused.detail,
                    cfg.max_backoff_s,
                )
            else:
                log.warning(
                    "gateway %s unreachable (%s); retrying with backoff up to %g s",
                    cfg.gateway,
                    refused.detail,
                    cfg.max_backoff_s,
                )
        return backoff

    async def _sleep(self, delay: float) -> None:
        """Wait ``delay`` seconds, or less when a finished command wants its result sent."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)
        self._wake.clear()

    # -- commands ---------------------------------------------------------------------------------------

    def _accept(self, commands: list[AgentCommand]) -> None:
        """Queue new commands; drop the ones already handled; answer unknown kinds with an error."""
        for command in commands:
            if command.id in self._handled:
                continue
            self._handled[command.id] = None
            while len(self._handled) > _MAX_HANDLED_IDS:
                self._handled.popitem(last=False)
            if command.kind not in COMMAND_KINDS:
                log.warning("gateway sent an unknown command kind %r (id %s); not run", command.kind, command.id)
                now = self._clock()
                self._add_result(
                    CommandReport(
                        id=command.id,
                        kind=command.kind,
                        error=f"unknown command kind {command.kind!r}: not run",
                        started_at=now,
                        finished_at=now,
                    )
                )
                continue
            self._commands.put_nowait(command)

    async def _command_worker(self) -> None:
        """Run queued commands one at a time (two overlapping restarts help nobody)."""
        while True:
            command = await self._commands.get()
            log.info("running the restart command %r (command %s)", self.config.restart_argv[0], command.id)
            result = await run_command(self.config.restart_argv, self.config.restart_timeout_s, clock=self._clock)
            if result.error:
                log.error("restart command %s failed: %s", command.id, result.error)
            else:
                log.info("restart command %s exited with %s", command.id, result.exit_code)
            self._add_result(
                CommandReport(
                    id=command.id,
                    kind=command.kind,
                    exit_code=result.exit_code,
                    output_tail=result.output_tail,
                    error=result.error,
                    started_at=result.started_at,
                    finished_at=result.finished_at,
                )
            )

    def _add_result(self, result: CommandReport) -> None:
        """Queue a result for the next report and send that report now."""
        self._results.append(result)
        del self._results[:-_MAX_PENDING_RESULTS]
        self._wake.set()


def _parse_models(data: Any) -> tuple[list[ModelReport], str]:
    """The model entries of a ``/v1/models`` answer, without the synthetic ``default``."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return [], "/v1/models: no data list in the answer"
    models: list[ModelReport] = []
    for entry in entries[:4096]:
        if not isinstance(entry, dict):
            continue
        model_id, status = entry.get("id"), entry.get("status")
        if not isinstance(model_id, str) or model_id == "default" or not model_id:
            continue
        models.append(ModelReport(id=model_id[:512], status=status[:512] if isinstance(status, str) else "unknown"))
    return models, ""


def _error_message(raw: bytes) -> str:
    """A short description of an error reply: its JSON message when there is one, else its start."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", errors="replace").strip() or "no body"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:200]
        if isinstance(err, str):
            return err[:200]
    return raw[:200].decode("utf-8", errors="replace").strip()


def _describe(exc: BaseException) -> str:
    """One line about a client error; a bare timeout has an empty message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
