"""``python -m rankwise.bench JOB.json --parent PID``: the per-run worker process that ``rankwise bench`` starts.

It dies with its parent: on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` is armed before any work, and a worker whose
parent is already gone (it died while the worker was starting) exits at once; so a killed bench never leaves a
worker writing into the folder that its rerun reuses.
"""

import sys

from .lifeline import die_with_parent
from .worker import main

if len(sys.argv) >= 4 and sys.argv[2] == "--parent":
    die_with_parent(int(sys.argv[3]))
sys.exit(main(sys.argv[1:2]))
