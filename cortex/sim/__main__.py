"""``python -m cortex.sim``: run one simulated node (the same as ``cortex sim``)."""

from cortex.sim.cli import main

raise SystemExit(main())
