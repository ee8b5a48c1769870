"""The loss functions: pure math, one module per family."""

from xent.losses.calibration import fit_temperature
from xent.losses.combine import weighted_sum
from xent.losses.distill import LinearDistillation, distillation_loss, linear_distillation, linear_distillation_loss
from xent.losses.focal import focal_loss, poly1_cross_entropy, sigmoid_focal_loss
from xent.losses.generative import gan_discriminator_loss, gan_generator_loss, vae_loss
from xent.losses.imbalance import (
    balanced_softmax_cross_entropy,
    class_balanced_weights,
    deferred_reweighting,
    ldam_loss,
    ldam_margins,
    logit_adjust,
    logit_adjusted_cross_entropy,
)
from xent.losses.linear import linear_cross_entropy, linear_loss
from xent.losses.linear_policy import SequenceLogProbs, linear_policy_loss, linear_sequence_log_probs
from xent.losses.logprobs import TokenOutputs, linear_log_probs, linear_token_outputs
from xent.losses.policy import PolicyLoss, policy_loss, rollout_importance_ratio
from xent.losses.preference import KTOLoss, PreferenceLoss, kto_loss, preference_loss, wpo_weights
from xent.losses.robust import generalized_cross_entropy, symmetric_cross_entropy
from xent.losses.sigmoid import binary_cross_entropy, binary_cross_entropy_with_logits
from xent.losses.softmax import cross_entropy

__all__ = [
    "KTOLoss",
    "LinearDistillation",
    "PolicyLoss",
    "PreferenceLoss",
    "SequenceLogProbs",
    "TokenOutputs",
    "balanced_softmax_cross_entropy",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "class_balanced_weights",
    "cross_entropy",
    "deferred_reweighting",
    "distillation_loss",
    "fit_temperature",
    "focal_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "generalized_cross_entropy",
    "kto_loss",
    "ldam_loss",
    "ldam_margins",
    "linear_cross_entropy",
    "linear_distillation",
    "linear_distillation_loss",
    "linear_log_probs",
    "linear_loss",
    "linear_policy_loss",
    "linear_sequence_log_probs",
    "linear_token_outputs",
    "logit_adjust",
    "logit_adjusted_cross_entropy",
    "policy_loss",
    "poly1_cross_entropy",
    "preference_loss",
    "rollout_importance_ratio",
    "sigmoid_focal_loss",
    "symmetric_cross_entropy",
    "vae_loss",
    "weighted_sum",
    "wpo_weights",
]
