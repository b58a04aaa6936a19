"""Runs ``cortex`` CLI commands in one interpreter: a JSON argv list per stdin line, a JSON result per line.

The CLI tests start the real ``python -m cortex`` for a few commands; the rest of a scripted session goes
through this driver so each command does not pay the interpreter's and cortex's start-up again. Every
command still runs :func:`cortex.cli.main` in a process of its own, apart from the gateway's.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

from cortex.cli import main


def run() -> None:
    reply_to = sys.stdout
    for line in sys.stdin:
        argv = json.loads(line)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
        reply_to.write(json.dumps({"rc": rc, "out": out.getvalue(), "err": err.getvalue()}) + "\n")
        reply_to.flush()


if __name__ == "__main__":
    run()
