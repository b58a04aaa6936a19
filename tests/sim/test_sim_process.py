"""The process form: ``python -m cortex.sim`` loads, binds, announces itself, serves and stops on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import time

import aiohttp
import pytest

from cortex.sim.cli import add_sim_arguments, build_node

READY = re.compile(r"sim (\S+) listening on (http://\S+)")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    return parser.parse_args(argv)


def test_flags_build_the_described_node() -> None:
    args = parse(
        "--model", "a/x=1000", "--model", "b=2000", "--unloaded", "b", "--unloaded", "c=300",
        "--vram-mb", "8000", "--load-s", "0.3", "--tok-s", "0", "--reload-bug", "--tool-style", "openai",
        "--name", "n1", "--port", "0",
    )  # fmt: skip
    node = build_node(args)
    assert node.models.listing() == [("a/x", "loaded"), ("b", "unloaded"), ("c", "unloaded")]
    assert (node.vram_mb, node.load_s, node.tok_s, node.reload_bug) == (8000, 0.3, 0.0, True)
    assert (node.tool_style, node.name, node.port, node.record_requests) == ("openai", "n1", 0, False)


def test_defaults_and_bad_specs() -> None:
    node = build_node(parse())
    assert (node.host, node.port, node.models.loaded_ids()) == ("127.0.0.1", 1234, ["sim-model"])
    node = build_node(parse("--model", "a=10", "--unloaded", "ghost"))
    assert node.models.listing() == [("a", "loaded"), ("ghost", "unloaded")]
    with pytest.raises(ValueError, match="duplicate"):
        build_node(parse("--model", "a=10", "--model", "a=20"))
    with pytest.raises(SystemExit):
        parse("--model", "no-size")


async def test_process_loads_then_binds_serves_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cortex.sim", "--port", "0", "--name", "p1", "--model", "m1=100",
        "--model", "m2=100", "--load-s", "0.1", "--tok-s", "0",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        lines: list[tuple[float, str]] = []
        match = None
        while match is None:
            line = await asyncio.wait_for(proc.stderr.readline(), 10)
            assert line, "the process exited before binding"
            lines.append((time.monotonic(), line.decode()))
            match = READY.search(lines[-1][1])
        loads = [(at, text) for at, text in lines if "loading" in text]
        assert [text.split()[-1] for _, text in loads] == ["m1", "m2"]  # sequential, in order
        assert lines[-1][0] - loads[0][0] >= 0.18  # two 0.1 s loads before the port was bound
        assert match.group(1) == "p1"
        url = match.group(2)
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/health") as resp:
                assert (resp.status, await resp.text()) == (200, "OK")
            async with http.get(url + "/v1/models") as resp:
                ids = [entry["id"] for entry in (await resp.json())["data"]]
            assert ids == ["default", "m1", "m2"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
