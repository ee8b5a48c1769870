"""TRL's ``DistillationTrainer`` on xent's fused divergences (the ``trl`` extra): ``xent.trl.patch(trainer)``.

See :mod:`xent.integrations.trl` for how it works. Importing this module does not import TRL; :func:`patch` does.
"""

from xent.integrations.trl import divergence_from_beta, is_patched, patch, unpatch

__all__ = ["divergence_from_beta", "is_patched", "patch", "unpatch"]
