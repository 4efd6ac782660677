"""``python -m rankwise.bench JOB.json``: the per-method worker process that ``rankwise bench`` starts."""

import sys

from .worker import main

sys.exit(main())
