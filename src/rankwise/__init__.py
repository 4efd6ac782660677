"""rankwise: low-rank training of transformers.

Two algebras — gradient space (``rankwise.optim``) and weight space (``rankwise.adapters``) — with published methods
as short configurations of them, plus a training loop, benchmark and planner that compare methods at equal memory.
"""

__version__ = "0.1.0"

import logging  # noqa: E402

# torchao 0.18's wheel carries C extensions built for another Python and says so at every import (transformers and
# peft import it whenever it is installed); its pure-PyTorch NF4 / int8 tensors, all rankwise uses, are unaffected.
logging.getLogger("torchao").setLevel(logging.ERROR)

from .errors import RankwiseError  # noqa: E402
from .plan import plan  # noqa: E402

__all__ = ["RankwiseError", "__version__", "plan"]
