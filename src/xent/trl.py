"""TRL 1.16's trainers on xent's kernels (the ``trl`` extra): ``xent.trl.patch(trainer)`` — GRPO, RLOO, DPO, KTO and
SFT on xent's fused head, distillation on its fused divergences.

See :mod:`xent.integrations.trl` for how it works. Importing this module does not import TRL; :func:`patch` does.
"""

from xent.integrations.trl import divergence_from_beta, is_patched, patch, unpatch

__all__ = ["divergence_from_beta", "is_patched", "patch", "unpatch"]
