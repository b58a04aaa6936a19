"""The per-node agent (``cortex agent``): a sidecar beside mistralrs on every GPU node.

It reads GPU memory through NVML, polls the local mistralrs, reports both to the gateway and runs the
restart command the gateway asks for (its own configured command, never one the gateway supplies).
The package root imports nothing, so the gateway can use :mod:`cortex.agent.protocol` (the wire format
both ends share) without loading the agent's runtime.
"""
