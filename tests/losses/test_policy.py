"""Policy-gradient losses (xent.losses.policy) against a float64 reference written here from TRL 1.16's formulas
(one sequence at a time, the mask applied by slicing), against TRL's own ``GRPOTrainer._compute_loss`` run on a
stand-in trainer, and their gradients, edge cases and errors."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import assert_close
from xent.losses.policy import POLICY_LOSS_TYPES, PolicyLoss, high_entropy_mask, policy_loss, rollout_importance_ratio

B, T = 6, 7
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
BY_TOKEN_COUNT = ("dapo", "cispo", "vespo")


def problem(token_advantages=False):
    """A batch with an empty sequence (row 2), a one-token sequence (row 4) and holes inside sequences; entropies
    exactly representable in float32 (TRL takes its quantile in float32)."""
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, 1] = 0
    mask[2] = 0
    mask[4, 1:] = 0
    log_probs = (-torch.rand(B, T, dtype=torch.float64) * 3).requires_grad_()
    old = (log_probs.detach() + 0.25 * torch.randn(B, T, dtype=torch.float64)).clamp(max=0)
    ref = (log_probs.detach() + 0.4 * torch.randn(B, T, dtype=torch.float64)).clamp(max=0)
    sampling = old + 0.3 * torch.randn(B, T, dtype=torch.float64)
    sampling[3, 2] = math.nan  # a token the engine did not score
    entropy = (torch.rand(B, T) * 4).double().requires_grad_()
    advantages = torch.randn(B, T, dtype=torch.float64) if token_advantages else torch.randn(B, dtype=torch.float64)
    if not token_advantages:
        advantages[5] = 0.0
    ratio_token = torch.exp(0.2 * torch.randn(B, T, dtype=torch.float64)).clamp(max=1.2)
    ratio_token = torch.where(mask.bool(), ratio_token, 1.0)  # as TRL makes it: exp(0) at padding
    ratio_sequence = torch.exp(0.3 * torch.randn(B, 1, dtype=torch.float64))
    return SimpleNamespace(
        log_probs=log_probs,
        old=old,
        ref=ref,
        sampling=sampling,
        entropy=entropy,
        advantages=advantages,
        mask=mask,
        ratio_token=ratio_token,
        ratio_sequence=ratio_sequence,
    )


# -- the reference: TRL 1.16's formulas, one sequence at a time --------------------------------------------------------


def quantile_threshold(values, q):
    """torch.quantile's linear interpolation, in float32 as TRL takes it."""
    ordered = sorted(float(v) for v in values.float())
    rank = float(torch.tensor(q, dtype=torch.float32) * (len(ordered) - 1))
    below, above = math.floor(rank), math.ceil(rank)
    return float(torch.lerp(torch.tensor(ordered[below]), torch.tensor(ordered[above]), torch.tensor(rank - below)))


def reference(p, o):
    """The loss, the per-token loss and the KL/clip metrics of TRL's ``_compute_loss`` for the options ``o``."""
    lp_all, mask = p.log_probs, p.mask.bool()
    old_all = o.get("old") if o.get("old") is not None else lp_all.detach()
    loss_type, level = o["loss_type"], o.get("level", "token")
    eps_lo = o.get("epsilon", 0.2)
    eps_hi = o.get("epsilon_high") if o.get("epsilon_high") is not None else eps_lo
    beta, delta, G = o.get("beta", 0.0), o.get("delta"), o.get("accumulation", 1)
    q = o.get("top_entropy_quantile", 1.0)
    threshold = None
    if q < 1.0:
        threshold = quantile_threshold(p.entropy.detach()[mask], 1 - q)
    per_token_rows, per_seq_losses, counts = [], [], []
    kl_sum, clip = 0.0, {"low": 0.0, "high": 0.0, "region": 0.0}
    for i in range(B):
        sel = mask[i]
        lp, old = lp_all[i][sel], old_all[i][sel]
        n = int(sel.sum())
        adv = p.advantages[i][sel] if p.advantages.dim() == 2 else p.advantages[i].expand(n)
        log_ratio = lp - old
        w = torch.exp(log_ratio if level == "token" else (log_ratio.sum() / max(n, 1)).expand(n))
        if loss_type == "cispo":
            ell = -torch.clamp(w, max=eps_hi).detach() * adv * lp
        elif loss_type in CLIPPED:
            w_capped = w if delta is None else torch.clamp(w, max=delta)
            clipped = torch.clamp(w, 1 - eps_lo, 1 + eps_hi)
            ell = -torch.minimum(w_capped * adv, clipped * adv)
            low, high = (w_capped < 1 - eps_lo) & (adv < 0), (w_capped > 1 + eps_hi) & (adv > 0)
            clip["low"] += float(low.sum())
            clip["high"] += float(high.sum())
            clip["region"] += float((low | high).sum())
        elif loss_type == "sapo":
            tau = torch.where(adv > 0, o.get("tau_pos", 1.0), o.get("tau_neg", 1.05)).double()
            ell = -torch.sigmoid(tau * (w - 1)) * 4 / tau * adv
        else:  # vespo: φ(W) = e^λ W^k e^{−λW}, W the sequence's ratio (times the rollout ratios), TRL's clamps
            log_w = torch.clamp(lp - old, -20, 20).sum().detach()
            if o.get("ratio") is not None:
                log_w = log_w + torch.clamp(torch.log(o["ratio"][i][sel]), math.log(1e-8), 20).sum()
            log_w = float(torch.clamp(log_w, math.log(1e-8), 20))
            nonneg = adv >= 0
            k = torch.where(nonneg, o.get("k_pos", 2.0), o.get("k_neg", 3.0)).double()
            lam = torch.where(nonneg, o.get("lambda_pos", 3.0), o.get("lambda_neg", 2.0)).double()
            phi = torch.exp(lam + k * log_w - lam * math.exp(log_w))
            ell = -phi * adv * lp
        if o.get("off_policy_mask_threshold") is not None:
            sampled = o.get("sampling", old_all)[i][sel]
            mean_kl = torch.nan_to_num(sampled - lp.detach(), nan=0.0).sum() / max(n, 1)
            ell = ell * ((adv >= 0) | (mean_kl <= o["off_policy_mask_threshold"])).double()
        if threshold is not None:
            ell = ell * (p.entropy.detach()[i][sel] >= threshold).double()
        if o.get("ratio") is not None and loss_type != "vespo":
            r = o["ratio"][i]
            ell = ell * (r[sel] if r.numel() == T else r.expand(n))
        if o.get("ref") is not None:
            d = o["ref"][i][sel] - lp
            kl = torch.exp(d) - d - 1
            if o.get("bias_kl", True):
                kl = kl * w
            kl_sum += float(kl.detach().sum())
            if beta:
                ell = ell + beta * kl
        row = torch.zeros(T, dtype=torch.float64).index_put((sel.nonzero()[:, 0],), ell)
        per_token_rows.append(row)
        per_seq_losses.append(ell)
        counts.append(n)
    total = sum(x.sum() for x in per_seq_losses)
    tokens = sum(counts)
    if loss_type in ("grpo", "sapo"):
        loss = sum(x.sum() / max(n, 1) for x, n in zip(per_seq_losses, counts, strict=True)) / B / G
    elif loss_type == "bnpo":
        loss = total / max(tokens, 1) / G
    elif loss_type == "dr_grpo":
        loss = total / (B * o["max_completion_length"]) / G
    elif loss_type == "luspo":
        loss = sum(x.sum() for x in per_seq_losses) / B / G
    else:
        loss = total / o.get("num_items_in_batch", tokens * G)
    if o.get("entropy_coef", 0.0):
        kept = mask if threshold is None else mask & (p.entropy.detach() >= threshold)
        loss = loss - o["entropy_coef"] * p.entropy[kept].sum() / max(int(kept.sum()), 1) / G
    metrics = {"kl": kl_sum / tokens if o.get("ref") is not None else None}
    if loss_type in CLIPPED and not (level == "sequence" and p.advantages.dim() == 1):
        metrics.update({f"clip_ratio_{k}": v / tokens for k, v in clip.items()})
    return loss, torch.stack(per_token_rows), metrics


# -- TRL's own code on a stand-in trainer ---------------------------------------------------------------------------


def trl_compute_loss(p, o):
    """``GRPOTrainer._compute_loss`` of TRL 1.16, bound to an object carrying the attributes it reads (one process,
    training mode): its loss, its gradients w.r.t. the log-probabilities and entropies, and its logged metrics."""
    trainer_module = pytest.importorskip("trl.trainer.grpo_trainer")
    grpo = trainer_module.GRPOTrainer

    class Accelerator:
        num_processes, sync_gradients = 1, True

        def pad_across_processes(self, tensor, dim=0, pad_index=0):
            return tensor

        def gather(self, tensor):
            return tensor

        gather_for_metrics = gather

        def reduce(self, tensor, reduction="sum"):
            return tensor

    class StandIn:
        _compute_loss = grpo._compute_loss
        get_high_entropy_mask = grpo.get_high_entropy_mask
        get_off_policy_mask = grpo.__dict__["get_off_policy_mask"]
        get_gamma_weights = grpo.__dict__["get_gamma_weights"]

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            return log_probs, entropy, None

    log_probs = p.log_probs.detach().clone().requires_grad_()
    entropy = p.entropy.detach().clone().requires_grad_()
    trainer = StandIn()
    G = o.get("accumulation", 1)
    coef = o.get("entropy_coef", 0.0)
    trainer.args = SimpleNamespace(
        use_bias_correction_kl=o.get("bias_kl", True),
        delta=o.get("delta"),
        sapo_temperature_pos=o.get("tau_pos", 1.0),
        sapo_temperature_neg=o.get("tau_neg", 1.05),
        vespo_k_pos=o.get("k_pos", 2.0),
        vespo_lambda_pos=o.get("lambda_pos", 3.0),
        vespo_k_neg=o.get("k_neg", 3.0),
        vespo_lambda_neg=o.get("lambda_neg", 2.0),
        steps_per_generation=o.get("steps_per_generation", G),
    )
    trainer.__dict__.update(
        loss_type=o["loss_type"],
        beta=o.get("beta", 0.0),
        epsilon_low=o.get("epsilon", 0.2),
        epsilon_high=o.get("epsilon_high") if o.get("epsilon_high") is not None else o.get("epsilon", 0.2),
        importance_sampling_level=o.get("level", "token"),
        top_entropy_quantile=o.get("top_entropy_quantile", 1.0),
        off_policy_mask_threshold=o.get("off_policy_mask_threshold"),
        max_completion_length=o.get("max_completion_length", 512),
        use_vllm=o.get("ratio") is not None,
        vllm_importance_sampling_correction=True,
        entropy_coef=coef,
        use_adaptive_entropy=False,
        _entropy_bonus_enabled=coef != 0.0,
        aux_loss_enabled=False,
        current_gradient_accumulation_steps=G,
        model=SimpleNamespace(training=True),
        accelerator=Accelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": p.mask,
        "advantages": p.advantages,
        "num_items_in_batch": torch.tensor(float(o.get("trl_num_items", p.mask.sum()))),
    }
    for key, name in (
        ("old", "old_per_token_logps"),
        ("ref", "ref_per_token_logps"),
        ("sampling", "sampling_per_token_logps"),
        ("ratio", "importance_sampling_ratio"),
    ):
        if o.get(key) is not None:
            inputs[name] = o[key]
    if o.get("beta", 0.0) and "ref_per_token_logps" not in inputs:
        inputs["ref_per_token_logps"] = p.ref
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), log_probs.grad, entropy.grad, metrics


# -- the grid -------------------------------------------------------------------------------------------------------

CONFIGS = {
    "on_policy": dict(),
    "asymmetric_clip_kl": dict(old="old", epsilon=0.15, epsilon_high=0.28, beta=0.04, ref="ref"),
    "kl_uncorrected": dict(old="old", beta=0.1, ref="ref", bias_kl=False),
    "kl_metric_only": dict(old="old", ref="ref"),
    "two_sided_delta": dict(old="old", delta=1.1, epsilon=0.1),
    "sequence_gspo": dict(old="old", level="sequence", epsilon=0.03, epsilon_high=0.04, beta=0.02, ref="ref"),
    "masks_and_bonus": dict(
        old="old", top_entropy_quantile=0.4, off_policy_mask_threshold=0.02, sampling="sampling", entropy_coef=0.01
    ),
    "rollout_token_ratio": dict(old="old", ratio="ratio_token"),
    "rollout_sequence_ratio": dict(old="old", ratio="ratio_sequence", level="sequence"),
    "token_advantages": dict(old="old", token_advantages=True, beta=0.05, ref="ref", top_entropy_quantile=0.0),
    "accumulation": dict(old="old", accumulation=4, entropy_coef=-0.02, sapo_taus=True),
}


def options_for(loss_type, name, p):
    o = dict(CONFIGS[name], loss_type=loss_type)
    for key in ("old", "ref", "sampling", "ratio"):
        if isinstance(o.get(key), str):
            o[key] = getattr(p, o[key])
    if loss_type == "cispo":
        o["epsilon_high"] = 1.1  # ScaleRL's ε_max is the cap itself; TRL's default (ε = 0.2) would cap every weight
    if loss_type == "dr_grpo":
        o["max_completion_length"] = 9
    if o.pop("sapo_taus", False):
        o.update(tau_pos=0.7, tau_neg=1.4, k_pos=1.5, lambda_pos=2.5, k_neg=2.5, lambda_neg=1.5)
    if loss_type in BY_TOKEN_COUNT and o.get("accumulation", 1) > 1:
        o["num_items_in_batch"] = 57.0  # the window's masked tokens on this process
        o["trl_num_items"] = 57.0
    return o


def ours(p, o):
    kwargs = dict(
        old_log_probs=o.get("old"),
        ref_log_probs=o.get("ref"),
        loss_type=o["loss_type"],
        beta=o.get("beta", 0.0),
        epsilon=o.get("epsilon", 0.2),
        epsilon_high=o.get("epsilon_high"),
        delta=o.get("delta"),
        importance_sampling_level=o.get("level", "token"),
        use_bias_correction_kl=o.get("bias_kl", True),
        sapo_temperature_pos=o.get("tau_pos", 1.0),
        sapo_temperature_neg=o.get("tau_neg", 1.05),
        vespo_k_pos=o.get("k_pos", 2.0),
        vespo_lambda_pos=o.get("lambda_pos", 3.0),
        vespo_k_neg=o.get("k_neg", 3.0),
        vespo_lambda_neg=o.get("lambda_neg", 2.0),
        top_entropy_quantile=o.get("top_entropy_quantile", 1.0),
        off_policy_mask_threshold=o.get("off_policy_mask_threshold"),
        sampling_log_probs=o.get("sampling"),
        importance_sampling_ratio=o.get("ratio"),
        entropy=p.entropy,
        entropy_coef=o.get("entropy_coef", 0.0),
        max_completion_length=o.get("max_completion_length"),
        num_items_in_batch=o.get("num_items_in_batch"),
        gradient_accumulation_steps=o.get("accumulation", 1),
    )
    return policy_loss(p.log_probs, p.advantages, p.mask, **kwargs)


def applicable(loss_type, name):
    if name == "two_sided_delta" and loss_type not in CLIPPED:
        return False
    return not (name == "rollout_sequence_ratio" and loss_type == "vespo")  # TRL refuses sequence modes for vespo


GRID = [(lt, name) for lt in POLICY_LOSS_TYPES for name in CONFIGS if applicable(lt, name)]


@pytest.mark.parametrize(("loss_type", "name"), GRID)
def test_matches_the_reference_and_trl(loss_type, name):
    p = problem(token_advantages=CONFIGS[name].get("token_advantages", False))
    o = options_for(loss_type, name, p)
    result = ours(p, o)
    assert isinstance(result, PolicyLoss)
    grads = torch.autograd.grad(result.loss, (p.log_probs, p.entropy), allow_unused=True)

    expected, expected_per_token, expected_metrics = reference(p, o)
    expected_grads = torch.autograd.grad(expected, (p.log_probs, p.entropy), allow_unused=True)
    assert_close(result.loss, expected.detach())
    assert_close(result.per_token_loss, expected_per_token.detach())
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close(
            torch.zeros_like(p.log_probs) if got is None else got,
            torch.zeros_like(p.log_probs) if want is None else want,
        )
    for key, value in expected_metrics.items():
        if value is not None:
            assert_close(getattr(result, key), torch.tensor(value, dtype=torch.float64))

    trl_loss, trl_grad, trl_entropy_grad, trl_metrics = trl_compute_loss(p, o)
    assert_close(result.loss, trl_loss)
    assert_close(grads[0], trl_grad)
    assert_close(torch.zeros_like(p.entropy) if grads[1] is None else grads[1],
                 torch.zeros_like(p.entropy) if trl_entropy_grad is None else trl_entropy_grad)  # fmt: skip
    names = {
        "kl": "kl",
        "entropy": "entropy",
        "clip_ratio/low_mean": "clip_ratio_low",
        "clip_ratio/high_mean": "clip_ratio_high",
        "clip_ratio/region_mean": "clip_ratio_region",
        "cispo_clip_ratio": "cispo_clip_ratio",
        "vespo/phi_seq_mean": "vespo_phi_mean",
        "policy_loss": "policy_loss",
    }
    for trl_name, value in trl_metrics.items():
        if trl_name in names:  # TRL counts the clipped tokens in float32
            dtype = torch.float32 if "clip" in trl_name else torch.float64
            assert_close(getattr(result, names[trl_name]), torch.tensor(value, dtype=torch.float64), dtype)
    for trl_name, field in names.items():
        if trl_name not in trl_metrics and trl_name != "policy_loss" and not (field == "kl" and "ref" in o):
            assert getattr(result, field) is None, field  # (TRL logs no KL with beta=0; this does, given the ref)


def test_grid_covers_every_loss_type_with_every_option():
    assert {lt for lt, _ in GRID} == set(POLICY_LOSS_TYPES)
    assert len(GRID) == len(POLICY_LOSS_TYPES) * len(CONFIGS) - (len(POLICY_LOSS_TYPES) - len(CLIPPED)) - 1


# -- PPO, identities, edge cases ------------------------------------------------------------------------------------


def test_ppo_clipped_objective_is_bnpo_with_token_advantages():
    """Schulman et al.'s clipped surrogate as TRL's PPOTrainer writes it: max of the two negated terms, masked mean."""
    p = problem(token_advantages=True)
    ratio = torch.exp(p.log_probs - p.old)
    surrogate = torch.maximum(-p.advantages * ratio, -p.advantages * ratio.clamp(0.8, 1.2))
    m = p.mask.double()
    expected = (surrogate * m).sum() / m.sum()
    got = policy_loss(p.log_probs, p.advantages, p.mask, old_log_probs=p.old, loss_type="bnpo").loss
    assert_close(got, expected)
    assert_close(*(torch.autograd.grad(x, p.log_probs)[0] for x in (got, expected)))


@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_mask_equals_slicing_and_padding_is_never_read(loss_type):
    p = problem()
    extra = {"max_completion_length": 9} if loss_type == "dr_grpo" else {}
    common = dict(old_log_probs=p.old, ref_log_probs=p.ref, beta=0.1, loss_type=loss_type, entropy=p.entropy,
                  entropy_coef=0.01, **extra)  # fmt: skip
    clean = policy_loss(p.log_probs, p.advantages, p.mask, **common)
    padding = p.mask == 0
    dirty_lp = torch.where(padding, torch.tensor(math.nan, dtype=torch.float64), p.log_probs)
    dirty = dict(
        common, old_log_probs=p.old.masked_fill(padding, -math.inf), ref_log_probs=p.ref.masked_fill(padding, math.nan)
    )
    dirty["entropy"] = torch.where(padding, torch.tensor(math.inf, dtype=torch.float64), p.entropy)
    got = policy_loss(dirty_lp, p.advantages, p.mask, **dirty)
    assert_close(got.loss, clean.loss)
    assert_close(got.per_token_loss, clean.per_token_loss)
    grads = torch.autograd.grad(got.loss, (p.log_probs, p.entropy))
    assert all(torch.isfinite(g).all() for g in grads)
    assert_close(grads[0], torch.autograd.grad(clean.loss, p.log_probs)[0])
    # the rows kept alone (slicing) give grpo's, bnpo's and dapo's loss when the batch is the same tokens
    if loss_type in ("bnpo", "dapo", "cispo"):
        rows = p.mask.sum(1) > 0
        sliced = dict(common, old_log_probs=p.old[rows], ref_log_probs=p.ref[rows], entropy=p.entropy[rows])
        kept = policy_loss(p.log_probs[rows], p.advantages[rows], p.mask[rows], **sliced)
        assert_close(kept.loss, clean.loss)


@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_an_all_padding_batch_gives_zero_without_nan(loss_type):
    extra = {"max_completion_length": 4} if loss_type == "dr_grpo" else {}
    for batch in (3, 0):
        log_probs = torch.zeros(batch, 4, dtype=torch.float64, requires_grad=True)
        entropy = torch.ones(batch, 4, dtype=torch.float64, requires_grad=True)
        mask = torch.zeros(batch, 4, dtype=torch.bool)
        result = policy_loss(log_probs, torch.ones(batch), mask, loss_type=loss_type, entropy=entropy,
                             entropy_coef=0.1, top_entropy_quantile=0.5, ref_log_probs=log_probs.detach() - 1,
                             beta=0.1, off_policy_mask_threshold=0.1, **extra)  # fmt: skip
        assert float(result.loss.detach()) == 0.0
        grads = torch.autograd.grad(result.loss, (log_probs, entropy), allow_unused=True)
        assert all(g is None or (g == 0).all() for g in grads)
        for field in ("policy_loss", "kl", "entropy", "clip_ratio_low", "cispo_clip_ratio", "vespo_phi_mean"):
            value = getattr(result, field)
            assert value is None or torch.isfinite(value).all(), field


@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_zero_advantages_give_zero_policy_gradient(loss_type):
    p = problem()
    extra = {"max_completion_length": 9} if loss_type == "dr_grpo" else {}
    result = policy_loss(p.log_probs, torch.zeros(B, dtype=torch.float64), p.mask, old_log_probs=p.old,
                         loss_type=loss_type, **extra)  # fmt: skip
    assert float(result.loss.detach()) == 0.0
    assert (torch.autograd.grad(result.loss, p.log_probs)[0] == 0).all()


def test_per_sequence_advantages_of_every_layout_agree():
    p = problem()
    a = policy_loss(p.log_probs, p.advantages, p.mask, old_log_probs=p.old).loss
    b = policy_loss(p.log_probs, p.advantages.unsqueeze(1), p.mask, old_log_probs=p.old).loss
    c = policy_loss(p.log_probs, p.advantages.unsqueeze(1).expand(B, T), p.mask, old_log_probs=p.old).loss
    assert_close(a, b)
    assert_close(a, c)


def test_on_policy_grpo_gradient_is_the_policy_gradient():
    """At w = 1 nothing is clipped: the gradient is −A / |o_i| / B per token (REINFORCE with the group baseline)."""
    p = problem()
    loss = policy_loss(p.log_probs, p.advantages, p.mask).loss
    grad = torch.autograd.grad(loss, p.log_probs)[0]
    lengths = p.mask.sum(1, keepdim=True).clamp(min=1)
    assert_close(grad, -p.advantages.unsqueeze(1) * p.mask / lengths / B)


def test_accumulation_window_of_dapo_is_the_token_mean_of_the_window():
    p = problem()
    halves = (slice(0, 3), slice(3, B))
    window = int(p.mask.sum())
    total = sum(
        policy_loss(p.log_probs[h], p.advantages[h], p.mask[h], old_log_probs=p.old[h], loss_type="dapo",
                    num_items_in_batch=torch.tensor(window), gradient_accumulation_steps=2).loss
        for h in halves
    )  # fmt: skip
    whole = policy_loss(p.log_probs, p.advantages, p.mask, old_log_probs=p.old, loss_type="dapo").loss
    assert_close(total, whole)
    bnpo = policy_loss(p.log_probs, p.advantages, p.mask, old_log_probs=p.old, loss_type="bnpo").loss
    assert_close(whole, bnpo)


def test_trl_num_items_with_more_generation_steps_than_accumulation():
    """TRL divides by num_items / processes × accumulation / steps_per_generation: pass that count."""
    p = problem()
    o = options_for("dapo", "on_policy", p)
    o.update(old=p.old, accumulation=2, steps_per_generation=4, trl_num_items=100.0, num_items_in_batch=50.0)
    trl_loss, trl_grad, _, _ = trl_compute_loss(p, o)
    result = ours(p, o)
    assert_close(result.loss, trl_loss)
    assert_close(torch.autograd.grad(result.loss, p.log_probs)[0], trl_grad)


def test_half_precision_is_accumulated_in_float32():
    p = problem()
    lp = p.log_probs.detach().to(torch.bfloat16).requires_grad_()
    result = policy_loss(lp, p.advantages.float(), p.mask, old_log_probs=p.old.float(), entropy=p.entropy.float())
    assert result.loss.dtype == torch.bfloat16 and result.per_token_loss.dtype == torch.bfloat16
    assert result.entropy is not None and result.entropy.dtype == torch.float32
    expected = policy_loss(lp.detach().double(), p.advantages, p.mask, old_log_probs=p.old).loss
    assert abs(float(result.loss.detach()) - float(expected)) < 1e-2
    result.loss.backward()
    assert lp.grad is not None and lp.grad.dtype == torch.bfloat16


# -- TRL's helpers, called directly ---------------------------------------------------------------------------------


@pytest.mark.parametrize("quantile", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_high_entropy_mask_is_trls(quantile):
    grpo = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    stand_in = SimpleNamespace(
        accelerator=SimpleNamespace(pad_across_processes=lambda t, dim, pad_index: t, gather=lambda t: t)
    )
    entropy = (torch.rand(B, T) * 3).double()
    entropy[1, :3] = entropy[0, 2]  # ties
    for mask in (problem().mask, torch.zeros(B, T, dtype=torch.long)):
        expected = grpo.get_high_entropy_mask(stand_in, entropy, mask, quantile)
        got = high_entropy_mask(entropy * mask, mask.bool(), quantile)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize(("clip_min", "clip_max"), [(None, 3.0), (0.5, 1.5), (0.9, None)])
def test_rollout_importance_ratio(mode, clip_min, clip_max):
    p = problem()
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        return
    got = rollout_importance_ratio(p.old, p.sampling, p.mask, mode=mode, clip_min=clip_min, clip_max=clip_max)
    diff = torch.nan_to_num((p.old - p.sampling) * p.mask, nan=0.0)  # TRL's _generate_and_score_completions
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        expected = ratio.clamp(min=clip_min, max=clip_max)
    else:
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        expected = torch.where((ratio < low) | (ratio > high), 0.0, ratio)
    assert_close(got, expected)


# -- errors ---------------------------------------------------------------------------------------------------------


def bad_calls():
    p = problem()
    lp, adv, mask = p.log_probs, p.advantages, p.mask
    return [
        (dict(log_probs=lp[0]), ValueError, r"log_probs must have shape \(B, T\).*\(7,\)"),
        (dict(log_probs=mask), TypeError, "log_probs must be a floating-point tensor"),
        (dict(mask=mask[:, :3]), ValueError, r"mask has shape \(6, 3\) but log_probs has shape \(6, 7\)"),
        (dict(mask=mask * 2), ValueError, "mask must hold 0 and 1 only, got 2"),
        (dict(mask=[1, 0]), TypeError, "mask must be a torch.Tensor, got list"),
        (dict(advantages=adv[:4]), ValueError, r"advantages has shape \(4,\); expected \(6,\) or \(6, 1\)"),
        (dict(advantages=None), TypeError, "advantages must be a torch.Tensor"),
        (dict(old_log_probs=lp.detach()[:, :2]), ValueError, r"old_log_probs has shape \(6, 2\)"),
        (dict(old_log_probs=lp), ValueError, r"old_log_probs requires grad.*\.detach\(\)"),
        (dict(advantages=adv.clone().requires_grad_()), ValueError, "advantages requires grad"),
        (dict(loss_type="ppo"), ValueError, "loss_type must be one of 'grpo'.*got 'ppo'"),
        (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level must be 'token' or 'sequence'"),
        (dict(beta=0.1), ValueError, "beta=0.1 weighs the KL.*pass ref_log_probs"),
        (dict(beta=-0.1, ref_log_probs=p.ref), ValueError, r"beta must be in \[0, inf\), got -0.1"),
        (dict(epsilon="0.2"), TypeError, "epsilon must be a number"),
        (dict(epsilon_high=-1.0), ValueError, "epsilon_high must be in"),
        (dict(delta=1.5, loss_type="sapo"), ValueError, "delta caps the ratio of the clipped loss types"),
        (dict(delta=0.0), ValueError, r"delta must be in \(0, inf\)"),
        (dict(top_entropy_quantile=0.2), ValueError, "top_entropy_quantile=0.2 reads each token's entropy"),
        (dict(top_entropy_quantile=1.5, entropy=p.entropy), ValueError, r"top_entropy_quantile must be in \[0, 1\]"),
        (dict(entropy_coef=0.1), ValueError, "entropy_coef=0.1 reads each token's entropy; pass entropy"),
        (dict(entropy_coef=math.inf, entropy=p.entropy), ValueError, "entropy_coef must be in"),
        (dict(off_policy_mask_threshold=-1.0), ValueError, "off_policy_mask_threshold must be in"),
        (dict(loss_type="dr_grpo"), ValueError, "dr_grpo.*pass max_completion_length"),
        (dict(loss_type="dr_grpo", max_completion_length=0), ValueError, "max_completion_length must be a positive"),
        (dict(max_completion_length=512), ValueError, "max_completion_length is dr_grpo's"),
        (dict(num_items_in_batch=10), ValueError, "num_items_in_batch is the token count that dapo"),
        (dict(loss_type="dapo", num_items_in_batch=-1), ValueError, "num_items_in_batch must be in"),
        (dict(loss_type="dapo", num_items_in_batch=torch.ones(2)), ValueError, r"one-element tensor, got shape \(2,\)"),
        (dict(gradient_accumulation_steps=0), ValueError, "gradient_accumulation_steps must be a positive int"),
        (dict(use_bias_correction_kl=1), TypeError, "use_bias_correction_kl must be a bool"),
        (dict(entropy=p.entropy[:, :2]), ValueError, r"entropy has shape \(6, 2\)"),
        (
            dict(loss_type="vespo", importance_sampling_ratio=p.ratio_sequence),
            ValueError,
            "importance_sampling_ratio has shape.*vespo",
        ),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_bad_arguments_are_refused_naming_them(index):
    kwargs, error, match = bad_calls()[index]
    p = problem()
    args = {"log_probs": p.log_probs, "advantages": p.advantages, "mask": p.mask}
    for key in list(kwargs):
        if key in args:
            args[key] = kwargs.pop(key)
    with pytest.raises(error, match=match):
        policy_loss(args["log_probs"], args["advantages"], args["mask"], **kwargs)


def test_rollout_importance_ratio_refuses_bad_options():
    p = problem()
    with pytest.raises(ValueError, match="mode must be one of"):
        rollout_importance_ratio(p.old, p.sampling, p.mask, mode="token")
    with pytest.raises(ValueError, match="clip_min must be less than clip_max"):
        rollout_importance_ratio(p.old, p.sampling, p.mask, clip_min=2.0, clip_max=1.0)
    with pytest.raises(ValueError, match="truncates the ratio: give clip_min or clip_max"):
        rollout_importance_ratio(p.old, p.sampling, p.mask, mode="token_truncate", clip_max=None)
    with pytest.raises(ValueError, match=r"sampling_log_probs has shape \(6, 2\)"):
        rollout_importance_ratio(p.old, p.sampling[:, :2], p.mask)
