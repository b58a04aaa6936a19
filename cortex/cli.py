"""The ``cortex`` command: parse arguments, load settings, dispatch.

Config errors are reported here, once, as ``key.path: problem`` lines on stderr with exit code 2, so every
subcommand that reads the config fails the same way. Subcommands that talk to a running gateway
(``status``, ``pin``...) live in :mod:`cortex.admin_client`; ``agent`` and ``sim`` bring their own flags.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from cortex import __version__
from cortex.config import (
    ConfigFileError,
    Settings,
    find_config_file,
    format_validation_error,
    load_settings,
)
from cortex.errors import ListenError

__all__ = ["build_parser", "main"]

_ADMIN_MODEL = ("pin", "unpin", "load", "unload")
_ADMIN_NODE = ("drain", "undrain", "restart")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="cortex",
        description="One OpenAI- and Anthropic-compatible endpoint and a live console for a mistral.rs fleet.",
    )
    _global_flags(parser, suppress=False)
    # Subcommands take the same global flags with SUPPRESS defaults, so `cortex --config X status` keeps X.
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, suppress=True)
    parser.add_argument("--version", action="version", version=f"cortex {__version__}")
    _serve_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_flags(sub.add_parser("serve", parents=[common], help="run the gateway (default)"), suppress=True)
    sub.add_parser("check-config", parents=[common], help="validate the config and print the resolved settings")
    attach = sub.add_parser(
        "attach", parents=[common], help="the console for a gateway running elsewhere (headless, remote)"
    )
    attach.add_argument("url", nargs="?", help="the gateway's base URL (default: from the config's gateway.listen)")
    attach.add_argument("--token", help="admin token (default: the config's gateway.admin_token, for its own gateway)")
    mode = attach.add_mutually_exclusive_group()
    mode.add_argument("--read-only", action="store_true", default=None, help="no actions (the default without a token)")
    mode.add_argument(
        "--read-write",
        dest="read_only",
        action="store_false",
        help="allow actions without a token (a loopback gateway)",
    )
    reload = sub.add_parser("reload", parents=[common], help="make a running gateway re-read its config file")
    reload.add_argument("--token", help="admin token (default: the config's gateway.admin_token)")
    _gateway_flag(reload)

    status = sub.add_parser("status", parents=[common], help="print the fleet from a running gateway")
    status.add_argument("--json", action="store_true", help="the full snapshot as JSON")
    _gateway_flag(status)
    for action in _ADMIN_MODEL:
        p = sub.add_parser(action, parents=[common], help=f"{action} a model on a running gateway")
        p.add_argument("model")
        p.add_argument("--node", help="only this node")
        if action == "unload":
            p.add_argument("--force", action="store_true", help="also unload (and unpin) a pinned model")
        _gateway_flag(p)
    for action in _ADMIN_NODE:
        p = sub.add_parser(action, parents=[common], help=f"{action} a node on a running gateway")
        p.add_argument("node")
        _gateway_flag(p)

    # `agent` and `sim` parse their own flags (see _own_parser): importing them costs a second that
    # `cortex status` should not pay.
    for name, text in (
        ("agent", "the per-node sidecar"),
        ("sim", "run one simulated mistral.rs node"),
        ("replay", "replay a traffic trace under each eviction strategy (virtual time)"),
    ):
        sub.add_parser(name, help=text)
    return parser


def _global_flags(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    default: dict[str, object] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument(
        "--config",
        metavar="PATH",
        help="config file (else $CORTEX_CONFIG, ./cortex.toml, ~/.config/cortex/cortex.toml)",
        **default,  # type: ignore[arg-type]
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        help="more logging (-vv for debug)",
        **(default or {"default": 0}),  # type: ignore[arg-type]
    )


def _own_command(argv: list[str]) -> tuple[int, str] | None:
    """Where `agent` or `sim` stands as the subcommand, if it does."""
    skip = False
    for index, token in enumerate(argv):
        if skip:
            skip = False
            continue
        if token == "--config":
            skip = True
            continue
        if token.startswith("-"):
            continue
        return (index, token) if token in ("agent", "sim", "replay") else None
    return None


def _own_parser(name: str, add: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"cortex {name}")
    _global_flags(parser, suppress=False)
    add(parser)
    return parser


def _serve_flags(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    flag: dict[str, object] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument("--no-tui", action="store_true", help="run headless (for services); logs go to stderr", **flag)  # type: ignore[arg-type]
    p.add_argument("--demo", action="store_true", help="run on three simulated nodes with synthetic traffic", **flag)  # type: ignore[arg-type]
    p.add_argument("--read-only", action="store_true", help="console without actions", **flag)  # type: ignore[arg-type]
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="headless log format",
        **(flag or {"default": "text"}),  # type: ignore[arg-type]
    )


def _gateway_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", metavar="URL", help="gateway base URL (default: from the config's gateway.listen)")


def _settings(args: argparse.Namespace, *, demo: bool = False) -> tuple[Settings, Path | None] | int:
    """The settings and the file they came from (None: defaults and ``CORTEX_*`` only), or exit code 2."""
    try:
        path = (
            None if demo and not args.config and not os.environ.get("CORTEX_CONFIG") else find_config_file(args.config)
        )
        return load_settings(path), path
    except ConfigFileError as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        for line in format_validation_error(exc):
            print(line, file=sys.stderr)
        return 2


NO_NODES = "nodes: no [[nodes]] configured (try `cortex --demo`)"


def _check_config(settings: Settings, path: Path | None) -> int:
    """Say which file was read, then print the resolved settings; the same refusals as serving them."""
    if path is None:
        print(
            "cortex: no config file found (--config, $CORTEX_CONFIG, ./cortex.toml, ~/.config/cortex/cortex.toml); "
            "defaults and CORTEX_* variables only",
            file=sys.stderr,
        )
    else:
        print(f"cortex: read {path.resolve()}", file=sys.stderr)
    if not settings.nodes:
        print(NO_NODES, file=sys.stderr)
        return 2
    print(settings.model_dump_json(indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cortex`` console script."""
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`cortex status --json | head`): no traceback. Point stdout at /dev/null so
        # the interpreter's own flush at exit does not fail the same way again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a writer stopped by its reader


def _main(argv: Sequence[str] | None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    own = _own_command(args_list)
    if own is not None:
        index, name = own
        rest = args_list[:index] + args_list[index + 1 :]
        if name == "agent":
            from cortex.agent.cli import add_agent_arguments, run_agent

            return run_agent(_own_parser("agent", add_agent_arguments).parse_args(rest))
        if name == "replay":
            from cortex.replay.cli import add_replay_arguments, run_replay

            return run_replay(_own_parser("replay", add_replay_arguments).parse_args(rest))
        from cortex.sim.cli import add_sim_arguments, run_sim

        return run_sim(_own_parser("sim", add_sim_arguments).parse_args(rest))
    parser = build_parser()
    args = parser.parse_args(args_list)
    command = args.command or "serve"
    demo = bool(getattr(args, "demo", False))
    loaded = _settings(args, demo=demo)
    if isinstance(loaded, int):
        return loaded
    settings, path = loaded
    if command == "check-config":
        return _check_config(settings, path)
    if command == "serve":
        return _serve(args, settings, path)
    if command == "attach":
        return _attach(args, settings)
    from cortex import admin_client

    return admin_client.run(command, args, settings)


def _serve(args: argparse.Namespace, settings: Settings, path: Path | None) -> int:
    from cortex.runtime import configure_logging, loop_factory, run, state_dir

    if not settings.nodes and not args.demo:
        print(f"cortex: {NO_NODES}", file=sys.stderr)
        return 2
    headless = args.no_tui or not sys.stdout.isatty()
    configure_logging(
        fmt=args.log_format, verbose=args.verbose, to_file=None if headless else state_dir() / "cortex.log"
    )
    try:
        factory = loop_factory(settings.gateway.event_loop)
    except ImportError:
        print('cortex: gateway.event_loop = "uvloop": uvloop is not installed (pip install uvloop)', file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(
                run(
                    settings,
                    headless=headless,
                    read_only=args.read_only,
                    demo=args.demo,
                    config_path=path.resolve() if path else None,
                    log_requests=headless and args.log_format == "json",
                )
            )
    except KeyboardInterrupt:
        return 130
    except ListenError as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        if exc.key == "gateway.listen":
            return _offer_attach(args, settings, interactive=not headless and sys.stdin.isatty())
        return 1


def _offer_attach(args: argparse.Namespace, settings: Settings, *, interactive: bool) -> int:
    """The address is taken: when a cortex gateway holds it, offer its console instead of just failing."""
    from cortex.admin_client import gateway_url, is_cortex

    url = gateway_url(settings, None)
    if not is_cortex(url):
        return 1
    if not interactive:
        print(
            f"cortex: a cortex gateway already runs at {url}; `cortex attach {url}` shows its console", file=sys.stderr
        )
        return 1
    try:
        answer = input(f"A cortex gateway already runs at {url}. Attach the console to it? [Y/n] ")
    except EOFError:
        answer = "n"
    if answer.strip().lower() not in ("", "y", "yes"):
        return 1
    args.url, args.token = url, None
    return _attach(args, settings)


def _attach(args: argparse.Namespace, settings: Settings) -> int:
    from cortex.admin_client import gateway_url
    from cortex.runtime import attach, configure_logging, state_dir

    url = (args.url or gateway_url(settings, None)).rstrip("/")
    # The config's token goes only to the config's own gateway, never to a URL typed on the command line.
    token = getattr(args, "token", None) or ("" if args.url and args.url != gateway_url(settings, None) else None)
    if token is None:
        token = settings.gateway.admin_token.get_secret_value()
    read_only = getattr(args, "read_only", None)
    if read_only is None:
        read_only = not token
    configure_logging(verbose=args.verbose, to_file=state_dir() / "cortex-attach.log")
    try:
        return asyncio.run(attach(url, token, settings, read_only=read_only))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
