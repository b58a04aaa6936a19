"""The gateway's side of the node agents: authenticated reports in, commands out, restarts awaited.

Headless on purpose: no aiohttp server code lives here, only state and asyncio, so that the admin route is
three lines in the gateway and every rule (who may report, when a report goes stale, when a command is
done) is tested without a socket. The gateway passes each ``POST /admin/agents/{node}/report`` to
:meth:`AgentHub.handle_report` and sends back the status and body it returns.

A command is handed out with every reply until the agent reports its result, because a reply can be lost
on its way back; the agent runs each command id at most once, so re-sending is harmless. A restart that
nobody waits for any more (the caller timed out) is withdrawn, so an agent that comes back an hour later
does not restart a node nobody asked about.

Reports are judged by the gateway's clock at arrival, never the agent's (node clocks drift): one is fresh
for three of the agent's own intervals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cortex.agent.protocol import AgentCommand, CommandReport, Report
from cortex.config import Settings, format_validation_error
from cortex.engine.state import AgentInfo, GpuInfo

__all__ = ["STALE_AFTER_INTERVALS", "AgentHub", "RestartOutcome"]

log = logging.getLogger(__name__)

STALE_AFTER_INTERVALS = 3
"""A report is stale once it is older than this many of the agent's reporting intervals."""


@dataclass(frozen=True, slots=True)
class RestartOutcome:
    """What became of a restart requested through a node's agent."""

    ok: bool
    """The agent ran its restart command and it exited 0."""
    message: str
    """One line for logs, the console and ``cortex restart``."""
    exit_code: int | None = None
    """The restart command's exit status; None when it did not run, was killed or never reported."""
    output_tail: str = ""
    """The end of the command's output, as the agent reported it."""
    command_id: str = ""
    """The id of the command sent to the agent; empty when none was sent."""
    duration_s: float | None = None
    """How long the command ran on the node, by the agent's clock."""


@dataclass(slots=True)
class _Pending:
    """A command waiting for its result."""

    command: AgentCommand
    future: asyncio.Future[CommandReport]
    waiters: int = 0
    handed_out: bool = False


@dataclass(slots=True)
class _Seen:
    """The last accepted report of one node's agent."""

    report: Report
    seen_at: float
    last_command: dict[str, Any] | None = None
    published: AgentInfo | None = None
    """The info as :meth:`AgentHub._publish` last announced it (to tell real changes from new reports)."""


@dataclass(slots=True)
class _Node:
    token_digest: bytes | None
    """SHA-256 of the configured agent token; None when the token is empty (reports refused)."""
    seen: _Seen | None = None
    pending: dict[str, _Pending] = field(default_factory=dict)


class AgentHub:
    """Holds what every node's agent last reported and the commands waiting for each agent.

    Args:
        settings: The gateway's settings; ``nodes[].agent_token`` decides who may report.
        on_change: Called (synchronously) whenever what :meth:`info` returns changes other than by the
            mere passing of ``seen_at``; the engine rebuilds its snapshot then.
        clock: Wall clock, replaceable in tests.
    """

    def __init__(
        self,
        settings: Settings,
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        tokens = {node.name: node.agent_token.get_secret_value() for node in settings.nodes}
        self._nodes: dict[str, _Node] = {
            name: _Node(_digest(token) if token else None) for name, token in tokens.items()
        }
        self._on_change = on_change
        self._clock = clock

    # -- reports ----------------------------------------------------------------------------------------

    def authenticate(self, node: str, authorization: str | None) -> tuple[int, dict[str, Any]] | None:
        """None when ``authorization`` carries the node's agent token, else the status and body to answer.

        The gateway calls this before it reads a report's body, so that a client without the token
        cannot make it read or parse anything (:meth:`handle_report` checks again, for direct callers).

        Returns:
            None, or 404 for an unknown node, or 401 for a missing or wrong token or a node without one.
        """
        entry = self._nodes.get(node)
        if entry is None:
            return 404, _error(f"unknown node {node!r}", "not_found_error")
        if entry.token_digest is None:
            log.warning("refused an agent report for node %r: its agent_token is empty", node)
            return 401, _error(f"agent reports for node {node!r} are disabled (no agent_token)", "authentication_error")
        presented = _bearer(authorization)
        if presented is None or not hmac.compare_digest(_digest(presented), entry.token_digest):
            log.warning("refused an agent report for node %r: missing or wrong token", node)
            return 401, _error("missing or wrong agent token", "authentication_error")
        return None

    def handle_report(self, node: str, authorization: str | None, body: object) -> tuple[int, dict[str, Any]]:
        """Authenticate, validate and store one agent report.

        Args:
            node: The ``{node}`` of the route.
            authorization: The request's ``Authorization`` header (``Bearer TOKEN``), or None.
            body: The decoded JSON body (anything: it is validated here).

        Returns:
            The HTTP status and JSON body to answer with: 200 and ``{"commands": [...]}`` (the node's
            unacknowledged commands); 404 for an unknown node; 401 for a missing or wrong token, or when
            the node has no ``agent_token``; 400 for a malformed report. Errors are
            ``{"error": {"message", "type"}}``.
        """
        denied = self.authenticate(node, authorization)
        if denied is not None:
            return denied
        entry = self._nodes[node]
        try:
            report = Report.model_validate(body)
        except ValidationError as exc:
            problems = "; ".join(format_validation_error(exc)[:5])
            return 400, _error(f"malformed report: {problems}", "invalid_request_error")
        if report.node != node:
            return 400, _error(f"report is for node {report.node!r}, sent to {node!r}", "invalid_request_error")

        last_command = entry.seen.last_command if entry.seen is not None else None
        for result in report.results:
            last_command = result.model_dump(mode="json")
            pending = entry.pending.pop(result.id, None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(result)
            elif pending is None:
                log.info("agent of %r reported command %s, which nobody waits for any more", node, result.id)
        published = entry.seen.published if entry.seen is not None else None
        entry.seen = _Seen(report=report, seen_at=self._clock(), last_command=last_command, published=published)
        self._publish(node, entry)

        for pending in entry.pending.values():
            pending.handed_out = True
        return 200, {"commands": [p.command.model_dump(mode="json") for p in entry.pending.values()]}

    def info(self, node: str) -> AgentInfo | None:
        """What the node's agent last reported, with ``fresh`` as of now; None before its first report."""
        entry = self._nodes.get(node)
        if entry is None or entry.seen is None:
            return None
        return self._info(entry.seen, self._clock())

    def vram(self, node: str) -> tuple[int, int] | None:
        """``(total_mb, used_mb)`` summed over the node's GPUs, from a fresh report with every GPU read.

        None when there is no fresh report, no NVML, no GPU, or a GPU could not be read (a partial sum
        would understate both figures): the caller falls back to ``/v1/system/info``.
        """
        info = self.info(node)
        if info is None or not info.fresh or not info.nvml or not info.gpus or info.gpu_error:
            return None
        return sum(g.total_mb for g in info.gpus), sum(g.used_mb for g in info.gpus)

    def seen(self, node: str) -> bool:
        """Whether the node's agent has reported since the gateway started (fresh or not)."""
        entry = self._nodes.get(node)
        return entry is not None and entry.seen is not None

    def refresh(self) -> None:
        """Announce reports that went stale since the last call (call it from a periodic loop).

        Freshness changes with time alone; :meth:`handle_report` only sees arrivals, so an agent that
        stops reporting is noticed here.
        """
        for name, entry in self._nodes.items():
            if entry.seen is not None:
                self._publish(name, entry)

    # -- commands ---------------------------------------------------------------------------------------

    async def restart(self, node: str, timeout_s: float) -> RestartOutcome:
        """Have the node's agent run its restart command, and wait for the result.

        A restart already waiting for the same node is joined rather than doubled. When the wait ends
        without a result and nobody else waits, the command is withdrawn (unless the agent already has
        it: then it may still run, and its result shows up in :meth:`info`'s ``last_command``).

        Args:
            node: The node's name.
            timeout_s: Seconds to wait for the agent's result.

        Returns:
            The outcome; immediately ``ok=False`` with ``"no agent for NODE: restart skipped"`` when the
            node has no fresh agent report.
        """
        entry = self._nodes.get(node)
        if entry is None:
            return RestartOutcome(ok=False, message=f"unknown node {node!r}: restart skipped")
        info = self.info(node)
        if info is None or not info.fresh:
            return RestartOutcome(ok=False, message=f"no agent for {node}: restart skipped")
        pending = next((p for p in entry.pending.values() if p.command.kind == "restart"), None)
        if pending is None:
            command = AgentCommand(id=uuid.uuid4().hex, kind="restart")
            pending = _Pending(command, asyncio.get_running_loop().create_future())
            entry.pending[command.id] = pending
            log.info("queued restart %s for the agent of %r", command.id, node)
        pending.waiters += 1
        command_id = pending.command.id
        try:
            result = await asyncio.wait_for(asyncio.shield(pending.future), timeout_s)
        except TimeoutError:
            where = "took the command but reported no result" if pending.handed_out else "did not fetch the command"
            return RestartOutcome(
                ok=False,
                message=f"restart of {node}: the agent {where} within {timeout_s:g} s",
                command_id=command_id,
            )
        finally:
            pending.waiters -= 1
            if pending.waiters == 0 and not pending.future.done():
                entry.pending.pop(command_id, None)
                pending.future.cancel()
        return _outcome(node, result)

    # -- internals --------------------------------------------------------------------------------------

    def _info(self, seen: _Seen, now: float) -> AgentInfo:
        report = seen.report
        return AgentInfo(
            seen_at=seen.seen_at,
            version=report.agent_version,
            fresh=now - seen.seen_at < STALE_AFTER_INTERVALS * report.interval_s,
            mistralrs_up=report.mistralrs.up,
            gpus=tuple(
                GpuInfo(index=g.index, name=g.name, total_mb=g.total_mb, used_mb=g.used_mb, util_pct=g.util_pct)
                for g in report.gpus
            ),
            nvml=report.nvml,
            gpu_error=report.gpu_error,
            last_command=seen.last_command,
        )

    def _publish(self, node: str, entry: _Node) -> None:
        """Call ``on_change`` when the info differs from what was last announced (``seen_at`` aside)."""
        assert entry.seen is not None
        current = dataclasses.replace(self._info(entry.seen, self._clock()), seen_at=0.0)
        if current == entry.seen.published:
            return
        entry.seen.published = current
        try:
            self._on_change()
        except Exception:  # a broken listener must not turn an agent report into a 500
            log.exception("agent hub on_change callback failed (node %r)", node)


def _outcome(node: str, result: CommandReport) -> RestartOutcome:
    duration = max(0.0, result.finished_at - result.started_at)
    if result.error:
        message = f"restart of {node} failed: {result.error}"
    elif result.exit_code == 0:
        message = f"restart of {node}: the restart command exited 0 after {duration:.1f} s"
    else:
        message = f"restart of {node} failed: the restart command exited {result.exit_code}"
    return RestartOutcome(
        ok=result.ok,
        message=message,
        exit_code=result.exit_code,
        output_tail=result.output_tail,
        command_id=result.id,
        duration_s=duration,
    )


def _bearer(authorization: str | None) -> str | None:
    """The token of a ``Bearer TOKEN`` header; None when absent or of another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _digest(token: str) -> bytes:
    """Hash before comparing, so that the comparison takes the same time whatever the lengths.

    ``surrogateescape``: a header with bytes that are not UTF-8 reaches here as surrogates; encoding them
    back cannot fail, and such a token simply does not match.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}
