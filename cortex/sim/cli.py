"""``cortex sim``: one simulated mistral.rs node as its own process.

Benchmarks and the demo run the simulator out of process, so that its CPU does not share an event loop
with the gateway being measured. The process behaves like ``mistralrs from-config``: it loads every
(initially loaded) model first, ``load_s`` each, one after another, and binds the port only then, so a
client sees "connection refused" rather than a not-ready state. Readiness is one stderr line,
``sim NAME listening on http://HOST:PORT``, which scripts can wait for. The parser is exposed in two pieces
(``add_sim_arguments`` / ``run_sim``) so that the top-level ``cortex`` CLI can mount it as a subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from contextlib import suppress

from cortex.sim.models import SimModel
from cortex.sim.node import SimNode

logger = logging.getLogger("cortex.sim")

DEFAULT_MODEL = ("sim-model", 4096)
"""The model served when no ``--model`` is given."""

DEFAULT_MB = 4096
"""Weight size of a model named only by ``--unloaded ID``."""


def _model_spec(text: str) -> tuple[str, int]:
    """Parse ``ID=MB``."""
    model_id, sep, mb = text.rpartition("=")
    if not sep or not model_id:
        raise argparse.ArgumentTypeError(f"expected ID=MB, got {text!r}")
    try:
        return model_id, int(mb)
    except ValueError:
        raise argparse.ArgumentTypeError(f"MB must be an integer in {text!r}") from None


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags to ``parser``.

    Args:
        parser: The parser (or subcommand parser) to extend.
    """
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=1234, help="port to bind (default: %(default)s)")
    parser.add_argument("--name", default="sim", help="node name for logs and the device name")
    parser.add_argument("--vram-mb", type=int, default=24576, help="device memory, MiB (default: %(default)s)")
    parser.add_argument("--base-vram-mb", type=int, default=300, help="memory used with no model, MiB")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        type=_model_spec,
        metavar="ID=MB",
        help="a served model and its weight size in MiB (repeatable; default: sim-model=4096)",
    )
    parser.add_argument(
        "--unloaded",
        action="append",
        default=[],
        metavar="ID",
        help=f"a model that starts unloaded (repeatable; ID=MB or ID alone declares it, {DEFAULT_MB} MiB)",
    )
    parser.add_argument("--load-s", type=float, default=0.5, help="seconds per model load (default: %(default)s)")
    parser.add_argument(
        "--tok-s",
        type=float,
        default=50.0,
        help="tokens per second, <= 0 for no delay (default: %(default)s)",
    )
    parser.add_argument("--keepalive-s", type=float, default=10.0, help="SSE keep-alive interval in seconds")
    parser.add_argument("--max-seq-len", type=int, default=32768, help="context length in tokens")
    parser.add_argument("--unload-free-s", type=float, default=0.0, help="seconds before unloaded memory is free")
    parser.add_argument("--reload-bug", action="store_true", help="copy mistral.rs's reload-on-loaded bug")
    parser.add_argument(
        "--tool-style", choices=("mistralrs", "openai"), default="mistralrs", help="tool-call streaming"
    )
    parser.add_argument("--record-requests", action="store_true", help="keep every request in memory")


def build_node(args: argparse.Namespace) -> SimNode:
    """The node described by parsed ``args`` (not started).

    An ``--unloaded`` id that no ``--model`` declares is added (``ID=MB``, or :data:`DEFAULT_MB`).

    Raises:
        ValueError: A model id is declared twice.
    """
    specs: list[tuple[str, int]] = list(args.models or ([] if args.unloaded else [DEFAULT_MODEL]))
    unloaded: set[str] = set()
    for item in args.unloaded:
        model_id, mb = _model_spec(item) if "=" in item else (item, DEFAULT_MB)
        if model_id not in {mid for mid, _ in specs}:
            specs.append((model_id, mb))
        unloaded.add(model_id)
    node = SimNode(
        [SimModel(mid, mb, loaded=mid not in unloaded) for mid, mb in specs],
        name=args.name,
        host=args.host,
        port=args.port,
        vram_mb=args.vram_mb,
        base_vram_mb=args.base_vram_mb,
        load_s=args.load_s,
        tok_s=args.tok_s,
        keepalive_s=args.keepalive_s,
        reload_bug=args.reload_bug,
        unload_free_s=args.unload_free_s,
        max_seq_len=args.max_seq_len,
        tool_style=args.tool_style,
    )
    node.record_requests = args.record_requests
    return node


async def serve(node: SimNode, boot_models: Sequence[str]) -> int:
    """Load ``boot_models`` (``load_s`` each), bind, and serve until SIGINT or SIGTERM.

    Returns:
        0 on a signal, 1 when the port cannot be bound.
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    for model_id in boot_models:
        logger.info("sim %s: loading %s", node.name, model_id)
        with suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), node.load_s)
        if stopping.is_set():
            return 0
    try:
        await node.start()
    except OSError as exc:
        logger.error("sim %s: cannot bind %s:%s: %s", node.name, node.host, node.port, exc)
        return 1
    host = f"[{node.host}]" if ":" in node.host else node.host
    sys.stderr.write(f"sim {node.name} listening on http://{host}:{node.port}\n")
    sys.stderr.flush()
    try:
        await stopping.wait()
    finally:
        await node.stop()
    return 0


def run_sim(args: argparse.Namespace) -> int:
    """Run one simulated node until SIGINT/SIGTERM (blocking).

    Args:
        args: Parsed from a parser extended by :func:`add_sim_arguments`.

    Returns:
        The exit status: 0 after a signal, 1 if the port is taken, 2 for bad arguments.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        node = build_node(args)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        logger.error("%s", exc)
        return 2
    boot = node.models.loaded_ids()
    return asyncio.run(serve(node, boot))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cortex.sim``."""
    parser = argparse.ArgumentParser(prog="python -m cortex.sim", description="A simulated mistral.rs node.")
    add_sim_arguments(parser)
    return run_sim(parser.parse_args(argv))
