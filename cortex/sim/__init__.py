"""A simulated mistral.rs node (``cortex sim``) for tests, the demo and benchmarks.

It reproduces the HTTP behaviour documented in ``docs/mistralrs-api.md`` (lifecycle quirks, SSE framing,
usage, errors, lazy loading, VRAM reporting) without weights or a GPU. Use :class:`SimNode` in-process, or
``python -m cortex.sim`` / :func:`cortex.sim.cli.run_sim` as a separate process.
"""

from cortex.sim.app import RecordedRequest
from cortex.sim.models import SimModel
from cortex.sim.node import SimNode

__all__ = ["RecordedRequest", "SimModel", "SimNode"]
