"""GPU kernels in Triton, behind the same functions; importable only where the ``triton`` package is installed
(``pip install xent[triton]``). On a CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``), slowly,
which is how the test suite checks them without a GPU."""

import functools
import importlib.util


@functools.cache
def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None
