"""Hugging Face causal LMs on xent's fused losses (the ``hf`` extra): ``xent.hf.patch(model)``.

See :mod:`xent.integrations.hf` for how it works.
"""

from xent.integrations.hf import HeadOutput, is_patched, patch, unpatch

__all__ = ["HeadOutput", "is_patched", "patch", "unpatch"]
