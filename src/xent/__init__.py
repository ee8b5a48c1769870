"""xent: the cross-entropy family for PyTorch.

Exact losses (values and gradients equal PyTorch's where PyTorch has the loss), memory-lean kernels behind the same
functions, a trainer and a bench.
"""

from xent import nn
from xent._config import set_value_checks, value_checks
from xent.kernels.buffers import cached_bytes, empty_cache, set_buffer_cache
from xent.losses import *  # noqa: F403  (the losses are the public surface)
from xent.losses import __all__ as _losses

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "cached_bytes",
    "empty_cache",
    "nn",
    "set_buffer_cache",
    "set_value_checks",
    "value_checks",
    *_losses,
]
