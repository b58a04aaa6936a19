"""``python -m cortex.agent``: the agent without the rest of the ``cortex`` command line.

Useful on a GPU node where only the agent is wanted; ``cortex agent`` runs the same code.
"""

from __future__ import annotations

import argparse

from cortex.agent.cli import add_agent_arguments, run_agent


def main(argv: list[str] | None = None) -> int:
    """Parse the agent's flags and run it until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m cortex.agent",
        description="The cortex node agent: reports GPU memory and mistralrs state to the gateway.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    add_agent_arguments(parser)
    return run_agent(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
