"""GPU kernels in Triton, behind the same functions; importable only where the ``triton`` package is installed
(``pip install xent[triton]``). On a CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``), slowly,
which is how the test suite checks them without a GPU."""
