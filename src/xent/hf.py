"""Hugging Face causal LMs on xent's fused losses (the ``hf`` extra): ``xent.hf.patch(model)``, and
``xent.hf.distillation_loss(student, teacher, input_ids)``.

See :mod:`xent.integrations.hf` and :mod:`xent.integrations.distill` for how they work.
"""

from xent.integrations.distill import distillation_loss
from xent.integrations.hf import HeadOutput, is_patched, patch, unpatch

__all__ = ["HeadOutput", "distillation_loss", "is_patched", "patch", "unpatch"]
