"""The console on the fixed fake fleet, for pytest-textual-snapshot (``snap_compare("snapshot_app.py")``)."""

from tests.tui.fakes import build_app

app = build_app()
