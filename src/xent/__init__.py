"""xent: the cross-entropy family for PyTorch.

Exact losses (values and gradients equal PyTorch's where PyTorch has the loss), memory-lean kernels behind the same
functions, a trainer and a bench.
"""

from xent import nn
from xent._config import set_value_checks, value_checks
from xent.losses import *  # noqa: F403  (the losses are the public surface)
from xent.losses import __all__ as _losses

__version__ = "0.1.0"

__all__ = ["__version__", "nn", "set_value_checks", "value_checks", *_losses]
