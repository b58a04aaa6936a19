"""cortex: one endpoint and one console for a fleet of mistral.rs nodes.

The package root imports nothing, so that ``import cortex`` is free for headless callers.
"""

__version__ = "0.1.0"
