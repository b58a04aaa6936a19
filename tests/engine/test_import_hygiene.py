"""The core imports without the UI, and import-linter's contracts hold (house style §2.2, rule 1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HEADLESS = [
    "cortex.engine",
    "cortex.engine.engine",
    "cortex.proxy.app",
    "cortex.config",
    "cortex.sim",
    "cortex.agent",
    "cortex.runtime",
    "cortex.admin_client",
    "cortex.cli",
]

PROBE = """
import importlib, json, sys

def ui():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("textual", "rich") or m.startswith("cortex.tui"))

for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(ui()))
importlib.import_module("rich.text")  # proves the probe sees a UI library when one is there
print(json.dumps(ui()))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_headless_modules_import_without_textual_or_rich() -> None:
    """One interpreter imports every headless module; none of them may pull in textual, rich or cortex.tui."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *HEADLESS], capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    headless, with_tui = (json.loads(line) for line in proc.stdout.splitlines())
    assert headless == [], f"the headless modules pull in the UI: {headless}"
    assert "rich" in with_tui


def test_import_linter_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run(
        [exe, "--no-cache", "--no-logo"], capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" in proc.stdout
    assert "0 broken" in proc.stdout
