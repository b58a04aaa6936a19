"""``cortex agent``: flags and environment variables in, a running :class:`~cortex.agent.agent.Agent` out.

The agent runs on GPU nodes under systemd, where environment files are the usual way to pass settings
(and the only decent way to pass a token: a flag shows in ``ps``). So every flag falls back to a
``CORTEX_AGENT_*`` variable, and both go through the same validation in :func:`config_from_args`. The
agent does not read ``cortex.toml``: that file lives on the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

from cortex.agent.agent import Agent, AgentConfig

__all__ = ["AgentUsageError", "add_agent_arguments", "config_from_args", "run_agent"]

log = logging.getLogger(__name__)

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DEFAULT_INTERVAL_S = 2.0  # poll.interval_s's default: the agent reports as often as the gateway polls
_DEFAULT_RESTART_TIMEOUT_S = 300.0
_DEFAULT_MAX_BACKOFF_S = 30.0

_T = TypeVar("_T")


class AgentUsageError(ValueError):
    """A missing or invalid agent setting; its message is one line naming the flag."""


# flag destination -> (flag, environment variable)
_SOURCES: dict[str, tuple[str, str]] = {
    "node": ("--node", "CORTEX_AGENT_NODE"),
    "gateway": ("--gateway", "CORTEX_AGENT_GATEWAY"),
    "token": ("--token", "CORTEX_AGENT_TOKEN"),
    "mistralrs": ("--mistralrs", "CORTEX_AGENT_MISTRALRS"),
    "restart_cmd": ("--restart-cmd", "CORTEX_AGENT_RESTART_CMD"),
    "gpus": ("--gpus", "CORTEX_AGENT_GPUS"),
    "interval": ("--interval", "CORTEX_AGENT_INTERVAL"),
    "restart_timeout": ("--restart-timeout", "CORTEX_AGENT_RESTART_TIMEOUT"),
    "max_backoff": ("--max-backoff", "CORTEX_AGENT_MAX_BACKOFF"),
}
_REQUIRED = ("node", "gateway", "token", "mistralrs", "restart_cmd")


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the agent's flags to a (sub)parser. Each flag falls back to its ``CORTEX_AGENT_*`` variable.

    Args:
        parser: The parser of ``cortex agent`` (or of ``python -m cortex.agent``).
    """
    group = parser.add_argument_group("agent", "each flag can also be set by the environment variable shown")

    def add(dest: str, metavar: str, text: str) -> None:
        flag, env = _SOURCES[dest]
        group.add_argument(flag, dest=dest, metavar=metavar, default=None, help=f"{text} [${env}]")

    add("node", "NAME", "this node's name in the gateway's [[nodes]] (required)")
    add("gateway", "URL", "base URL of the gateway, e.g. http://gateway:8000 (required)")
    add(
        "token",
        "TOKEN",
        "the node's agent_token; prefer the environment variable, flags show in ps (required)",
    )
    add("mistralrs", "URL", "base URL of the local mistralrs, e.g. http://127.0.0.1:1234 (required)")
    add(
        "restart_cmd",
        "CMD",
        "command that restarts mistralrs, split like a shell would but run without one, e.g. "
        '"systemctl restart mistralrs"; a command that leaves a daemon running should redirect its output '
        "(required)",
    )
    add("gpus", "0,1", "NVML indices of the GPUs to report (default: every GPU)")
    add("interval", "S", f"seconds between reports (default {_DEFAULT_INTERVAL_S:g}, as poll.interval_s)")
    add("restart_timeout", "S", f"seconds before a restart is killed (default {_DEFAULT_RESTART_TIMEOUT_S:g})")
    add(
        "max_backoff",
        "S",
        f"longest wait between reports while the gateway fails (default {_DEFAULT_MAX_BACKOFF_S:g})",
    )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Resolve flags, then environment variables, into a validated :class:`AgentConfig`.

    Args:
        args: Parsed arguments from a parser set up by :func:`add_agent_arguments`.
        environ: The environment (default: ``os.environ``).

    Raises:
        AgentUsageError: one line naming the missing or invalid flag(s).
    """
    env = os.environ if environ is None else environ
    values: dict[str, str | None] = {}
    for dest, (_flag, var) in _SOURCES.items():
        value = getattr(args, dest, None)
        values[dest] = value if value not in (None, "") else (env.get(var) or None)
    missing = [dest for dest in _REQUIRED if not values[dest]]
    if missing:
        flags = ", ".join(_SOURCES[d][0] for d in missing)
        envs = ", ".join(_SOURCES[d][1] for d in missing)
        raise AgentUsageError(f"missing {flags} (set the flag or {envs})")

    node = _required(values, "node")
    if not _NODE_NAME.match(node):
        raise AgentUsageError(f"--node: {node!r} is not a node name (letters, digits, '.', '_', '-')")
    try:
        restart_argv = tuple(shlex.split(_required(values, "restart_cmd")))
    except ValueError as exc:
        raise AgentUsageError(f"--restart-cmd: cannot split the command: {exc}") from None
    if not restart_argv:
        raise AgentUsageError("--restart-cmd: the command is empty")
    return AgentConfig(
        node=node,
        gateway=_url(values, "gateway"),
        token=_required(values, "token"),
        mistralrs=_url(values, "mistralrs"),
        restart_argv=restart_argv,
        gpus=_gpus(values["gpus"]),
        interval_s=_seconds(values, "interval", _DEFAULT_INTERVAL_S, upper=3600.0),
        restart_timeout_s=_seconds(values, "restart_timeout", _DEFAULT_RESTART_TIMEOUT_S),
        max_backoff_s=_seconds(values, "max_backoff", _DEFAULT_MAX_BACKOFF_S),
    )


def run_agent(args: argparse.Namespace) -> int:
    """Run the agent until SIGINT or SIGTERM (blocking).

    Args:
        args: Parsed arguments from a parser set up by :func:`add_agent_arguments`.

    Returns:
        0 after a clean stop; 2 when a setting is missing or invalid (one line on stderr says which).
    """
    try:
        config = config_from_args(args)
    except AgentUsageError as exc:
        sys.stderr.write(f"cortex agent: {exc}\n")
        return 2
    if not logging.getLogger().handlers:
        verbose = getattr(args, "verbose", 0)
        logging.basicConfig(
            level=logging.DEBUG if isinstance(verbose, int) and verbose > 0 else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    return asyncio.run(_serve(config))


async def _serve(config: AgentConfig) -> int:
    """Run the agent in this loop until a stop signal arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "agent for node %r: reporting to %s every %g s; mistralrs at %s; restart command %r",
        config.node,
        config.gateway,
        config.interval_s,
        config.mistralrs,
        config.restart_argv[0],
    )
    try:
        await Agent(config).run(stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0


def _required(values: Mapping[str, str | None], dest: str) -> str:
    value = values[dest]
    assert value is not None  # checked by the caller
    return value


def _url(values: Mapping[str, str | None], dest: str) -> str:
    value = _required(values, dest)
    parts = urlsplit(value)
    try:
        _ = parts.port
    except ValueError:
        raise AgentUsageError(f"{_SOURCES[dest][0]}: {value!r} has a bad port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AgentUsageError(f"{_SOURCES[dest][0]}: {value!r} is not a URL (expected http://HOST:PORT)")
    return value.rstrip("/")


def _gpus(value: str | None) -> tuple[int, ...] | None:
    if value is None or value.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    for part in value.split(","):
        index = _convert(part.strip(), int, "--gpus", "a comma-separated list of GPU indices like 0,1")
        if index < 0:
            raise AgentUsageError(f"--gpus: {index} is not a GPU index")
        if index not in out:
            out.append(index)
    return tuple(out)


def _seconds(values: Mapping[str, str | None], dest: str, default: float, *, upper: float | None = None) -> float:
    value = values[dest]
    if value is None:
        return default
    flag = _SOURCES[dest][0]
    seconds = _convert(value, float, flag, "seconds")
    if not seconds > 0 or (upper is not None and seconds > upper) or seconds != seconds:
        limit = f" and at most {upper:g}" if upper is not None else ""
        raise AgentUsageError(f"{flag}: expected seconds above 0{limit}, got {value!r}")
    return seconds


def _convert(value: str, kind: Callable[[str], _T], flag: str, expected: str) -> _T:
    try:
        return kind(value)
    except ValueError:
        raise AgentUsageError(f"{flag}: expected {expected}, got {value!r}") from None
