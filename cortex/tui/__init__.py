"""The Textual console. Imports textual; the engine, the gateway and the config never import this package.

``from cortex.tui.app import CortexApp`` is the one entry point (the runtime awaits its ``run_async()``).
"""
