"""On a machine with an NVIDIA GPU: does the real agent see an 8 GiB allocation come and go?

The unit tests fake NVML; this script is the check against the real thing. It starts a stub gateway on
127.0.0.1 that records reports, runs the real agent (``python -m cortex.agent``, interval 0.5 s, its
mistralrs pointing at a closed port), takes a baseline, allocates 8 GiB on ``cuda:0`` with torch, waits
for reports that show the rise, frees the memory, waits for the fall, and prints baseline/peak/after in
MiB. It sums every GPU the agent reports, so the CUDA-vs-NVML device numbering does not matter.

Needs torch with CUDA and nvidia-ml-py. Exit 0 when both the rise and the fall are within the tolerance
(default 8 GiB ± 5 %), 1 otherwise, including "no CUDA". Bounded to 90 s; it stops everything it starts.

    python bench/gpu_agent_check.py [--gib 8] [--tolerance 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
TOKEN = "gpu-check-token"
NODE = "gpu-check"
INTERVAL_S = 0.5
DEADLINE_S = 90.0


class Reports:
    """The stub gateway: records every report and answers with no commands."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.refused = 0
        app = web.Application()
        app.router.add_post("/admin/agents/{node}/report", self._report)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self.url = ""

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _report(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.refused += 1
            return web.json_response({"error": {"message": "wrong token"}}, status=401)
        self.items.append(await request.json())
        return web.json_response({"commands": []})

    def after(self, t: float) -> list[dict[str, Any]]:
        """Reports the agent built after wall-clock time ``t``."""
        return [r for r in self.items if float(r["time"]) > t]


def used_mb(report: dict[str, Any]) -> int:
    return sum(int(g["used_mb"]) for g in report["gpus"])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_for(what: str, check: Callable[[], bool], seconds: float, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if proc.returncode is not None:
            raise RuntimeError(f"the agent exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(0.1)


async def measure(torch: Any, gib: float, gateway: Reports, proc: asyncio.subprocess.Process) -> dict[str, Any]:
    """Baseline, allocate, peak, free, after; every figure from the agent's reports."""
    await wait_for("the agent's first report", lambda: len(gateway.items) >= 1, 30, proc)
    first = gateway.items[0]
    if not first["nvml"] or not first["gpus"]:
        raise RuntimeError(f"the agent reports no GPU figures (nvml={first['nvml']}): {first['gpu_error']}")
    print(f"agent sees {len(first['gpus'])} GPU(s): " + ", ".join(f"{g['index']}: {g['name']}" for g in first["gpus"]))
    ready = time.time()
    await wait_for("two baseline reports", lambda: len(gateway.after(ready)) >= 2, 10, proc)
    baseline = used_mb(gateway.after(ready)[-1])

    nbytes = int(gib * 1024**3)

    def allocate() -> Any:
        block = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        return block

    block = await asyncio.to_thread(allocate)
    allocated = time.time()
    expected = gib * 1024
    try:
        await wait_for(
            "reports showing the rise",
            lambda: any(used_mb(r) - baseline >= expected / 2 for r in gateway.after(allocated)),
            15,
            proc,
        )
        seen = len(gateway.after(allocated))
        await wait_for("one more report", lambda: len(gateway.after(allocated)) > seen, 5, proc)
        peak = max(used_mb(r) for r in gateway.after(allocated))
    finally:
        del block

        def free() -> None:
            torch.cuda.empty_cache()
            torch.cuda.synchronize()

        await asyncio.to_thread(free)
    freed = time.time()
    await wait_for(
        "reports showing the fall",
        lambda: any(peak - used_mb(r) >= expected / 2 for r in gateway.after(freed)),
        15,
        proc,
    )
    seen = len(gateway.after(freed))
    await wait_for("one more report", lambda: len(gateway.after(freed)) > seen, 5, proc)
    after = used_mb(gateway.after(freed)[-1])
    return {"baseline_mb": baseline, "peak_mb": peak, "after_mb": after, "expected_mb": expected}


async def run(torch: Any, gib: float, tolerance: float) -> int:
    gateway = Reports()
    await gateway.start()
    log = tempfile.NamedTemporaryFile(prefix="cortex-agent-", suffix=".log", delete=False)  # noqa: SIM115
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_AGENT_")}
    env["CORTEX_AGENT_TOKEN"] = TOKEN
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cortex.agent",
        *("--node", NODE, "--gateway", gateway.url, "--mistralrs", f"http://127.0.0.1:{closed_port()}"),
        *("--restart-cmd", "true", "--interval", str(INTERVAL_S), "--max-backoff", "1"),
        stdout=log,
        stderr=log,
        env=env,
        cwd=REPO,
    )
    try:
        async with asyncio.timeout(DEADLINE_S - 5):
            figures = await measure(torch, gib, gateway, proc)
    except (RuntimeError, TimeoutError) as exc:
        print(f"FAIL: {exc or 'out of time'}")
        if gateway.refused:
            print(f"the stub gateway refused {gateway.refused} reports")
        log.flush()
        log.seek(0)
        print("agent log tail:\n" + log.read().decode("utf-8", errors="replace")[-2000:])
        return 1
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await gateway.stop()
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)

    expected = figures["expected_mb"]
    rise = figures["peak_mb"] - figures["baseline_mb"]
    fall = figures["peak_mb"] - figures["after_mb"]
    rise_ok = abs(rise - expected) <= tolerance * expected
    fall_ok = abs(fall - expected) <= tolerance * expected
    print(f"baseline {figures['baseline_mb']} MiB, peak {figures['peak_mb']} MiB, after {figures['after_mb']} MiB")
    print(f"rise {rise:+d} MiB, fall {-fall:+d} MiB; expected {expected:g} MiB ± {tolerance:.0%}")
    print(f"rise within tolerance: {rise_ok}; fall within tolerance: {fall_ok}")
    print("RESULT " + json.dumps({**figures, "rise_mb": rise, "fall_mb": fall, "ok": rise_ok and fall_ok}))
    return 0 if rise_ok and fall_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gib", type=float, default=8.0, help="GiB to allocate on cuda:0 (default 8)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative tolerance (default 0.05)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("no CUDA: torch is not installed")
        return 1
    if not torch.cuda.is_available():
        print("no CUDA: torch.cuda.is_available() is False")
        return 1
    torch.zeros(1, device="cuda")  # create the CUDA context before the baseline: it is not part of the delta
    torch.cuda.synchronize()
    return asyncio.run(run(torch, args.gib, args.tolerance))


if __name__ == "__main__":
    raise SystemExit(main())
