"""rankwise: low-rank training of transformers.

Two algebras — gradient space (``rankwise.optim``) and weight space (``rankwise.adapters``) — with published methods
as short configurations of them, plus a training loop, benchmark and planner that compare methods at equal memory.
"""

__version__ = "0.1.0"

from .errors import RankwiseError  # noqa: E402
from .plan import plan  # noqa: E402

__all__ = ["RankwiseError", "__version__", "plan"]
