"""Preference losses (xent.losses.preference) against float64 references written here from the papers and TRL 1.16's
formulas, against TRL's own code (DPOTrainer._compute_loss, CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss and
KTOTrainer._compute_loss run on minimal stand-ins for the trainer and the model), their gradients and errors."""

import collections
import math
import types

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close
from xent.losses.preference import DPO_LOSS_TYPES, kto_loss, preference_loss, wpo_weights

B = 6
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
SMOOTHING = {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.05, "simpo": 0.1}


def pairs(batch=B, dtype=torch.float64):
    """Summed log-probabilities of chosen and rejected completions, their reference's and their token counts; the
    policy's require grad."""
    lengths_w = torch.randint(0, 9, (batch,))
    lengths_l = torch.randint(1, 9, (batch,))
    policy_w = (-torch.rand(batch, dtype=torch.float64) * 3 - 0.05) * lengths_w.clamp(min=1) / 4
    policy_l = (-torch.rand(batch, dtype=torch.float64) * 3 - 0.05) * lengths_l / 4
    reference_w = policy_w + torch.randn(batch, dtype=torch.float64) * 0.7
    reference_l = policy_l + torch.randn(batch, dtype=torch.float64) * 0.7
    return (
        policy_w.to(dtype).requires_grad_(),
        policy_l.to(dtype).requires_grad_(),
        reference_w.to(dtype),
        reference_l.to(dtype),
        lengths_w,
        lengths_l,
    )


# ---- the float64 reference: each formula written plainly from its paper (and TRL's code where it chose) ----


def neg_log_sigmoid(x):
    return torch.log1p(torch.exp(-x))


def sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def f_prime(h, divergence, alpha):
    """f'(t) of the f-divergence at t = π/π_ref = exp(h) (Wang et al., Beyond Reverse KL, Table 1)."""
    t = torch.exp(h)
    if divergence == "forward_kl":
        return 1 - 1 / t
    if divergence == "js_divergence":
        return torch.log(2 * t / (1 + t))
    if divergence == "alpha_divergence":
        return (t ** (alpha - 1) - 1) / (alpha - 1)
    return torch.log(t)


def reference_pair_loss(
    kind, c, r, rc, rr, lw, ll, *, beta, eps=0.0, fdiv="reverse_kl", alpha=0.5, tau=0.05, gamma=0.5
):
    """Per-pair loss of one loss type in float64."""
    c, r = c.double(), r.double()
    rc = torch.zeros_like(c) if rc is None else rc.double()
    rr = torch.zeros_like(r) if rr is None else rr.double()
    hw, hl = c - rc, r - rr
    sw, sl = f_prime(hw, fdiv, alpha), f_prime(hl, fdiv, alpha)
    nw, nl = lw.double().clamp(min=1), ll.double().clamp(min=1)
    d = beta * (sw - sl)

    def smoothed(x):  # cDPO: the label flipped with probability ε
        return (1 - eps) * neg_log_sigmoid(x) + eps * neg_log_sigmoid(-x)

    if kind == "sigmoid":
        return smoothed(d)
    if kind == "hinge":
        return torch.clamp(1 - d, min=0)
    if kind == "ipo":
        return (sw / nw - sl / nl - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        q = sigmoid(d)
        return q * torch.log(q / (1 - eps)) + (1 - q) * torch.log((1 - q) / eps)
    if kind == "nca_pair":
        return neg_log_sigmoid(beta * hw) + 0.5 * neg_log_sigmoid(-beta * hw) + 0.5 * neg_log_sigmoid(-beta * hl)
    if kind == "robust":
        return ((1 - eps) * neg_log_sigmoid(d) - eps * neg_log_sigmoid(-d)) / (1 - 2 * eps)
    if kind == "bco_pair":
        return neg_log_sigmoid(beta * hw) + neg_log_sigmoid(-beta * hl)
    if kind == "sppo_hard":
        return (hw - 1 / (2 * beta)) ** 2 + (hl + 1 / (2 * beta)) ** 2
    if kind == "aot":
        return smoothed(beta * (torch.sort(c - r).values - torch.sort(rc - rr).values))
    if kind == "aot_unpaired":
        return smoothed(beta * (torch.sort(hw).values - torch.sort(hl).values))
    if kind == "apo_zero":
        return (1 - sigmoid(beta * hw)) + sigmoid(beta * hl)
    if kind == "apo_down":
        return sigmoid(beta * hw) + (1 - sigmoid(beta * (hw - hl)))
    if kind == "discopop":
        m = sigmoid(d / tau)
        return neg_log_sigmoid(d) * (1 - m) + torch.exp(-d) * m
    if kind == "sft":
        return (-c.sum() / lw.double().sum()).expand(c.shape)
    if kind == "sigmoid_norm":
        return neg_log_sigmoid(beta * (sw / nw - sl / nl))
    if kind == "simpo":
        return smoothed(beta * (c / nw - r / nl) - gamma)
    if kind == "orpo":
        pw, pl = torch.exp(c / nw), torch.exp(r / nl)
        return -beta * torch.log(sigmoid(torch.log(pw / (1 - pw)) - torch.log(pl / (1 - pl))))
    raise AssertionError(kind)


def check_against_reference(ours, expected, leaves):
    """The loss, the per-pair loss and the gradient of the loss w.r.t. ``leaves``, against the reference's."""
    assert_close(ours.per_pair_loss, expected.detach())
    reference_loss = expected.mean() if expected.numel() else expected.sum()
    assert_close(ours.loss, reference_loss.detach())
    got = torch.autograd.grad(ours.loss, leaves, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(reference_loss, leaves, allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


def dpo_cases():
    for kind in DPO_LOSS_TYPES:
        for fdiv in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
            if fdiv == "reverse_kl" or kind in F_DIVERGENCE_LOSS_TYPES:
                yield kind, fdiv


@pytest.mark.parametrize("with_reference", [True, False])
@pytest.mark.parametrize(("kind", "fdiv"), list(dpo_cases()))
def test_dpo_loss_types_match_their_formulas(kind, fdiv, with_reference):
    c, r, rc, rr, lw, ll = pairs()
    if not with_reference:
        rc = rr = None
    eps = SMOOTHING.get(kind, 0.0)
    options = dict(beta=0.3, label_smoothing=eps, chosen_lengths=lw, rejected_lengths=ll, f_divergence_type=fdiv)
    options.update(f_alpha_divergence_coef=0.4, discopop_tau=0.5)
    ours = preference_loss(c, r, ref_chosen_log_probs=rc, ref_rejected_log_probs=rr, loss_type=kind, **options)
    expected = reference_pair_loss(kind, c, r, rc, rr, lw, ll, beta=0.3, eps=eps, fdiv=fdiv, alpha=0.4, tau=0.5)
    check_against_reference(ours, expected, (c, r))
    zero = torch.zeros(B, dtype=torch.float64)
    rewards_w = 0.3 * (c - (zero if rc is None else rc)).detach()
    rewards_l = 0.3 * (r - (zero if rr is None else rr)).detach()
    assert_close(ours.chosen_rewards, rewards_w)
    assert_close(ours.rejected_rewards, rewards_l)
    assert_close(ours.reward_margins, rewards_w - rewards_l)
    assert_close(ours.reward_accuracies, (rewards_w > rewards_l).double())
    assert ours.nll_loss is None and ours.log_odds is None


@pytest.mark.parametrize("eps", [0.0, 0.15])
@pytest.mark.parametrize("nll_weight", [0.0, 1.0])
def test_simpo_matches_its_formula(eps, nll_weight):
    c, r, _, _, lw, ll = pairs()
    ours = preference_loss(
        c, r, loss_type="simpo", beta=2.0, simpo_gamma=0.8, label_smoothing=eps, chosen_lengths=lw,
        rejected_lengths=ll, nll_weight=nll_weight,
    )  # fmt: skip
    expected = reference_pair_loss("simpo", c, r, None, None, lw, ll, beta=2.0, eps=eps, gamma=0.8)
    nll = -c.sum() / lw.sum()
    assert_close(ours.per_pair_loss, expected.detach())
    total = expected.mean() + nll_weight * nll
    assert_close(ours.loss, total.detach())
    for got, want in zip(torch.autograd.grad(ours.loss, (c, r)), torch.autograd.grad(total, (c, r)), strict=True):
        assert_close(got, want)
    assert_close(ours.chosen_rewards, 2.0 * (c / lw.clamp(min=1)).detach())
    assert (ours.nll_loss is None) == (nll_weight == 0)


def test_orpo_matches_its_formula():
    c, r, _, _, lw, ll = pairs()
    ours = preference_loss(c, r, loss_type="orpo", beta=0.25, chosen_lengths=lw, rejected_lengths=ll)
    expected = reference_pair_loss("orpo", c, r, None, None, lw, ll, beta=0.25)
    total = expected.mean() - c.sum() / lw.sum()  # ORPO's NLL weighs 1
    assert_close(ours.loss, total.detach())
    assert_close(ours.per_pair_loss, expected.detach())
    for got, want in zip(torch.autograd.grad(ours.loss, (c, r)), torch.autograd.grad(total, (c, r)), strict=True):
        assert_close(got, want)
    mean_w, mean_l = c.detach() / lw.clamp(min=1), r.detach() / ll
    odds = torch.log(torch.exp(mean_w) / -torch.expm1(mean_w)) - torch.log(torch.exp(mean_l) / -torch.expm1(mean_l))
    assert_close(ours.log_odds, odds)
    assert_close(ours.chosen_rewards, 0.25 * mean_w)


def test_the_nll_term_is_cross_entropy_over_the_chosen_tokens():
    """CPO's NLL (CPOTrainer: nn.CrossEntropyLoss over the chosen completions' tokens) from summed log-probs."""
    logits = torch.randn(4, 7, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(11, (4, 7))
    labels[:, :3] = -100
    labels[2, 5:] = -100
    kept = labels != -100
    token_log_probs = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    chosen = (token_log_probs * kept).sum(1)
    rejected = chosen.detach() - 1.0
    ours = preference_loss(chosen, rejected, nll_weight=0.7, chosen_lengths=kept.sum(1))
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
    assert_close(ours.nll_loss, expected)
    assert_close(ours.loss, (-F.logsigmoid(0.1 * (chosen - rejected)).mean() + 0.7 * expected))
    nll_grad = torch.autograd.grad(ours.nll_loss, logits)[0]
    assert_close(nll_grad, torch.autograd.grad(expected, logits)[0])


def test_combined_loss_types_and_pair_weights():
    c, r, rc, rr, lw, ll = pairs()
    weights = torch.rand(B, dtype=torch.float64)
    ours = preference_loss(
        c, r, ref_chosen_log_probs=rc, ref_rejected_log_probs=rr, loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0], chosen_lengths=lw, weights=weights,
    )  # fmt: skip
    parts = [reference_pair_loss(k, c, r, rc, rr, lw, ll, beta=0.1) for k in ("sigmoid", "bco_pair", "sft")]
    expected = (0.8 * parts[0] + 0.2 * parts[1] + 1.0 * parts[2]) * weights
    check_against_reference(ours, expected, (c, r))
    single = preference_loss(c, r, ref_chosen_log_probs=rc, ref_rejected_log_probs=rr, loss_weights=[3.0])
    assert_close(single.per_pair_loss, 3 * reference_pair_loss("sigmoid", c, r, rc, rr, lw, ll, beta=0.1).detach())


def test_wpo_weights_match_the_paper():
    tokens = -torch.rand(3, 5, dtype=torch.float64) * 2
    squares = -torch.rand(3, 5, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    expected = torch.stack(
        [((tokens[i] - squares[i])[mask[i].bool()]).mean().exp() if mask[i].any() else torch.tensor(1.0).double()
         for i in range(3)]
    )  # fmt: skip
    assert_close(wpo_weights(tokens, squares, mask), expected)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_shift", [0.5, -3.0])  # a positive KL estimate, and a negative one clamped at 0
def test_kto_matches_its_formula(loss_type, kl_shift):
    policy = (-torch.rand(7, dtype=torch.float64) * 4).requires_grad_()
    reference = policy.detach() + torch.randn(7, dtype=torch.float64)
    labels = torch.tensor([True, False, True, True, False, False, True])
    kl = {}
    if loss_type == "kto":
        kl_policy = -torch.rand(5, dtype=torch.float64) * 4
        kl = dict(kl_log_probs=kl_policy, ref_kl_log_probs=kl_policy - kl_shift + 0.1 * torch.randn(5).double())
    ours = kto_loss(
        policy, reference, labels, loss_type=loss_type, beta=0.2, desirable_weight=1.5, undesirable_weight=0.5, **kl
    )
    h = policy - reference
    z = max((kl["kl_log_probs"] - kl["ref_kl_log_probs"]).mean().item(), 0.0) if kl else 0.0
    if loss_type == "kto":
        expected = torch.where(labels, 1.5 * (1 - sigmoid(0.2 * (h - z))), 0.5 * (1 - sigmoid(0.2 * (z - h))))
    else:
        expected = torch.where(labels, 1.5 * (1 - sigmoid(0.2 * h)), 0.5 * sigmoid(0.2 * h))
    assert_close(ours.per_example_loss, expected.detach())
    assert_close(ours.loss, expected.mean().detach())
    assert_close(torch.autograd.grad(ours.loss, policy)[0], torch.autograd.grad(expected.mean(), policy)[0])
    assert_close(ours.kl, torch.tensor(z, dtype=torch.float64))
    rewards = 0.2 * h.detach()
    assert_close(ours.rewards, rewards)
    assert_close(ours.reward_margin, rewards[labels].mean() - rewards[~labels].mean())


def test_empty_batches_give_zero_without_nan():
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    lengths = torch.zeros(0, dtype=torch.long)
    for kind in (*DPO_LOSS_TYPES, "simpo", "orpo"):
        reference = {} if kind in ("simpo", "orpo") else dict(ref_chosen_log_probs=empty, ref_rejected_log_probs=empty)
        out = preference_loss(
            empty, empty, loss_type=kind, label_smoothing=SMOOTHING.get(kind, 0.0), chosen_lengths=lengths,
            rejected_lengths=lengths, nll_weight=1.0, **reference,
        )  # fmt: skip
        assert out.loss.item() == 0 and out.per_pair_loss.shape == (0,), kind
        (grad,) = torch.autograd.grad(out.loss, empty)
        assert grad.shape == (0,)
    out = kto_loss(empty, empty.detach(), torch.zeros(0, dtype=torch.bool), kl_log_probs=empty, ref_kl_log_probs=empty)
    assert out.loss.item() == 0 and out.kl.item() == 0 and out.reward_margin.item() == 0


def test_empty_completions_and_certain_ones_stay_finite():
    c = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-1.0, 0.0, -3.0], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([0, 2, 3])
    for kind in ("orpo", "simpo", "ipo", "sigmoid_norm"):
        out = preference_loss(c, r, loss_type=kind, chosen_lengths=lengths, rejected_lengths=lengths, nll_weight=1.0)
        grads = torch.autograd.grad(out.loss, (c, r))
        assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads), kind


def test_half_precision_is_computed_in_float32_and_returned_in_its_dtype():
    c, r, rc, rr, lw, ll = pairs()
    half = preference_loss(
        c.detach().bfloat16(), r.detach().bfloat16(), loss_type="ipo", chosen_lengths=lw, rejected_lengths=ll,
        ref_chosen_log_probs=rc.bfloat16(), ref_rejected_log_probs=rr.bfloat16(),
    )  # fmt: skip
    expected = reference_pair_loss("ipo", c.bfloat16(), r.bfloat16(), rc.bfloat16(), rr.bfloat16(), lw, ll, beta=0.1)
    torch.testing.assert_close(half.loss.double(), expected.mean().detach(), rtol=8e-3, atol=0)  # bfloat16's ulp
    assert half.loss.dtype == half.chosen_rewards.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kto_loss(c.detach().bfloat16(), rc.bfloat16(), lw > 3, loss_type="apo_zero_unpaired")
    assert out.loss.dtype == torch.float32


def test_gradcheck():
    c, r, rc, rr, lw, ll = pairs(batch=4)
    c, r = c.detach().requires_grad_(), r.detach().requires_grad_()

    def loss(chosen, rejected):
        return preference_loss(
            chosen, rejected, ref_chosen_log_probs=rc, ref_rejected_log_probs=rr, loss_type=["ipo", "discopop"],
            chosen_lengths=lw, rejected_lengths=ll, f_divergence_type="js_divergence", nll_weight=0.5,
        ).loss  # fmt: skip

    assert torch.autograd.gradcheck(loss, (c, r))
    assert torch.autograd.gradcheck(
        lambda x: preference_loss(x, r, loss_type="orpo", chosen_lengths=lw, rejected_lengths=ll).loss, (c,)
    )
    labels = torch.tensor([True, False, False, True])
    assert torch.autograd.gradcheck(
        lambda x: kto_loss(x, rc, labels, kl_log_probs=rc - 1, ref_kl_log_probs=rc - 1.5).loss, (c,)
    )


# ---- errors ----


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(loss_type="dpo"), ValueError, r"loss_type must be one of .*got 'dpo'"),
        (dict(loss_type=[]), ValueError, "non-empty sequence"),
        (dict(loss_type=["sigmoid", "orpo"]), ValueError, "not combined"),
        (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError, "loss_weights must hold one number"),
        (dict(beta=0.0), ValueError, r"beta must be in \(0, inf\), got 0"),
        (dict(beta="0.1"), TypeError, "beta must be a number"),
        (dict(loss_type="robust", label_smoothing=0.5), ValueError, r"\[0, 0.5\) for loss_type 'robust', got 0.5"),
        (dict(loss_type="exo_pair"), ValueError, r"\(0, 1\) for loss_type 'exo_pair', got 0.*1e-3"),
        (dict(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing is defined by"),
        (dict(loss_type="sigmoid", label_smoothing=0.7), ValueError, r"\[0, 0.5\] for loss_type 'sigmoid'"),
        (dict(f_divergence_type="kl"), ValueError, "f_divergence_type must be one of"),
        (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), ValueError, "no f-divergence generalization"),
        (dict(loss_type="discopop", discopop_tau=0), ValueError, r"discopop_tau must be in \(0, inf\)"),
        (dict(loss_type="ipo"), ValueError, r"chosen_lengths is missing.*'ipo'"),
        (dict(loss_type="sft", rejected_lengths=None), ValueError, "chosen_lengths is missing"),
        (dict(nll_weight=1.0), ValueError, r"chosen_lengths is missing.*NLL"),
        (dict(nll_weight=-1.0), ValueError, r"nll_weight must be in \[0, inf\]"),
        (dict(nll_loss=torch.tensor(1.0)), ValueError, "nll_loss is read only with nll_weight > 0"),
        (dict(nll_weight=1.0, nll_loss=torch.ones(2)), ValueError, r"nll_loss has shape \(2,\); expected a scalar"),
        (dict(loss_type="simpo", ref=True), ValueError, "'simpo' is reference-free"),
        (dict(ref_chosen_log_probs=torch.zeros(4)), ValueError, "ref_rejected_log_probs is missing"),
        (dict(ref=True, ref_chosen_log_probs=torch.zeros(5)), ValueError, r"ref_chosen_log_probs has shape \(5,\)"),
        (dict(rejected_log_probs=torch.zeros(4, 1)), ValueError, r"rejected_log_probs has shape \(4, 1\); expected"),
        (dict(chosen_log_probs=torch.zeros(4, 2)), ValueError, r"chosen_log_probs has shape \(4, 2\); expected \(B,\)"),
        (dict(chosen_log_probs=torch.zeros(4, dtype=torch.long)), TypeError, "chosen_log_probs must be a floating"),
        (dict(chosen_log_probs=[0.0] * 4), TypeError, "chosen_log_probs must be a torch.Tensor"),
        (dict(loss_type="ipo", chosen_lengths=torch.ones(3)), ValueError, r"chosen_lengths has shape \(3,\)"),
        (dict(loss_type="ipo", chosen_lengths=torch.ones(4).bool()), TypeError, "chosen_lengths must hold token"),
        (dict(loss_type="ipo", chosen_lengths=-torch.ones(4)), ValueError, "chosen_lengths must be non-negative"),
        (dict(weights=torch.ones(3)), ValueError, r"weights has shape \(3,\)"),
        (dict(weights=-torch.ones(4)), ValueError, "weights must be non-negative"),
        (dict(loss_type="aot", ref=True, weights=torch.ones(4)), ValueError, "sort the pairs apart"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    tensors = dict(chosen_log_probs=-torch.rand(4), rejected_log_probs=-torch.rand(4))
    if kwargs.pop("ref", False):
        tensors.update(ref_chosen_log_probs=-torch.rand(4), ref_rejected_log_probs=-torch.rand(4))
    tensors["rejected_lengths"] = torch.ones(4)
    tensors.update(kwargs)
    if tensors["rejected_lengths"] is None:
        del tensors["rejected_lengths"]
    chosen, rejected = tensors.pop("chosen_log_probs"), tensors.pop("rejected_log_probs")
    with pytest.raises(error, match=match):
        preference_loss(chosen, rejected, **tensors)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(loss_type="bco"), ValueError, "loss_type must be one of 'kto', 'apo_zero_unpaired'"),
        (dict(kl_log_probs=None), ValueError, "needs kl_log_probs and ref_kl_log_probs.*kl_log_probs is missing"),
        (dict(loss_type="apo_zero_unpaired"), ValueError, "no KL term"),
        (dict(labels=torch.tensor([0.0, 1.0, 1.0])), TypeError, "labels must be bool"),
        (dict(labels=torch.tensor([0, 2, 1])), ValueError, "labels must be 0 or 1.*found 2"),
        (dict(labels=torch.tensor([True, False])), ValueError, r"labels has shape \(2,\); expected \(3,\)"),
        (dict(ref_log_probs=torch.zeros(2)), ValueError, r"ref_log_probs has shape \(2,\)"),
        (dict(ref_kl_log_probs=torch.zeros(3)), ValueError, r"ref_kl_log_probs has shape \(3,\); expected \(2,\)"),
        (dict(desirable_weight=-1.0), ValueError, r"desirable_weight must be in \[0, inf\]"),
        (dict(beta=-0.1), ValueError, "beta must be in"),
    ],
)
def test_kto_bad_arguments_are_named(kwargs, error, match):
    arguments = dict(
        log_probs=-torch.rand(3), ref_log_probs=-torch.rand(3), labels=torch.tensor([True, False, True]),
        kl_log_probs=-torch.rand(2), ref_kl_log_probs=-torch.rand(2),
    )  # fmt: skip
    arguments.update(kwargs)  # "apo_zero_unpaired" is given the KL tensors: refused
    with pytest.raises(error, match=match):
        kto_loss(arguments.pop("log_probs"), arguments.pop("ref_log_probs"), arguments.pop("labels"), **arguments)


def test_wpo_weights_bad_shapes():
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\) but log_probs has shape \(2, 3\)"):
        wpo_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"log_probs has shape \(3,\); expected \(B, T\)"):
        wpo_weights(torch.zeros(3), torch.zeros(3), torch.ones(3))


# ---- against TRL 1.16's own code, on stand-ins for the trainer and the model ----


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, tensor):
        return tensor

    def gather(self, tensor):
        return tensor


def _trainer(**attributes):
    """What TRL's loss methods read of ``self``: one process, train mode, reference log-probs precomputed."""
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=True, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )  # fmt: skip
    for name, value in attributes.items():
        setattr(trainer, name, value)
    return trainer


def _token_problem(batch, width, dtype):
    """Per-token log-probabilities ``(batch, width - 1)`` of completions right of their prompts (0 elsewhere, as the
    fused head gives at label -100), the completion mask ``(batch, width)`` and TRL's ``log_sum_sq_probs``."""
    mask = torch.zeros(batch, width, dtype=torch.long)
    lengths = torch.randint(1, width - 1, (batch,))
    lengths[0] = 0
    for row, length in enumerate(lengths.tolist()):
        mask[row, width - length :] = 1
    tokens = (-torch.rand(batch, width - 1, dtype=torch.float64) * 1.5 * mask[:, 1:]).to(dtype).requires_grad_()
    squares = (-torch.rand(batch, width - 1, dtype=torch.float64)).to(dtype)
    return tokens, mask, squares


def _fused_model(log_probs, log_sum_sq_probs, by_input=None):
    """A model called as TRL's patched models are (``fused_lm_head=True``), answering fixed per-token values."""

    def model(**kwargs):
        assert kwargs["fused_lm_head"]
        values = log_probs if by_input is None or kwargs["input_ids"] is not by_input[0] else by_input[1]
        shape = values.shape
        return types.SimpleNamespace(
            log_probs=values, entropy=torch.rand(shape), mean_logits=torch.rand(shape),
            is_top1=torch.zeros(shape, dtype=torch.bool), log_sum_sq_probs=log_sum_sq_probs,
        )  # fmt: skip

    return model


@pytest.fixture(scope="module")
def trl_dpo():
    return pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer


def trl_dpo_cases():
    for kind in DPO_LOSS_TYPES:
        yield [kind], "reverse_kl", False
    for fdiv in ("forward_kl", "js_divergence", "alpha_divergence"):
        for kind in ("sigmoid", "ipo", "robust", "discopop", "exo_pair"):
            yield [kind], fdiv, False
    yield ["sigmoid", "bco_pair", "sft"], "reverse_kl", False  # MPO
    yield ["sigmoid"], "reverse_kl", True  # WPO
    # not "hinge" with WPO: TRL's in-place `per_sequence_loss *= weights` on relu's output breaks its backward
    yield ["ipo", "discopop"], "js_divergence", True


@pytest.mark.parametrize(("kinds", "fdiv", "wpo"), list(trl_dpo_cases()))
def test_dpo_matches_trl_dpo_trainer(trl_dpo, kinds, fdiv, wpo):
    # TRL's α-divergence has float16/bfloat16/float32 clamp bounds only: compare it in float32
    dtype = torch.float32 if fdiv == "alpha_divergence" else torch.float64
    tokens, mask, squares = _token_problem(2 * B, 9, dtype)
    ref = (torch.randn(2 * B, dtype=torch.float64) - 2.0).to(dtype)
    inputs = dict(
        input_ids=torch.randint(7, (2 * B, 9)), attention_mask=torch.ones(2 * B, 9, dtype=torch.long),
        completion_mask=mask, ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:],
    )  # fmt: skip
    eps = 0.0 if "sigmoid" in kinds else next((SMOOTHING[k] for k in kinds if k in SMOOTHING), 0.0)
    weights = [0.8, 0.2, 1.0][: len(kinds)] if len(kinds) > 1 else [1.0]
    trainer = _trainer(
        ld_alpha=None, f_divergence_type=fdiv, f_alpha_divergence_coef=0.3, loss_types=kinds, loss_weights=weights,
        beta=0.5, label_smoothing=eps, args=types.SimpleNamespace(discopop_tau=0.2), use_weighting=wpo,
    )  # fmt: skip
    theirs = trl_dpo._compute_loss(trainer, _fused_model(tokens, squares), inputs, False)
    (their_grad,) = torch.autograd.grad(theirs, tokens)

    logps = tokens.sum(1)  # the fused head's log-probs are 0 outside the completion
    lengths = mask.sum(1)
    pair_weights = None
    if wpo:
        per_sequence = wpo_weights(tokens, squares, mask[:, 1:])
        pair_weights = per_sequence[:B] * per_sequence[B:]
    ours = preference_loss(
        logps[:B], logps[B:], ref_chosen_log_probs=ref[:B], ref_rejected_log_probs=ref[B:], loss_type=kinds,
        loss_weights=weights, beta=0.5, label_smoothing=eps, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        f_divergence_type=fdiv, f_alpha_divergence_coef=0.3, discopop_tau=0.2, weights=pair_weights,
    )  # fmt: skip
    (our_grad,) = torch.autograd.grad(ours.loss, tokens)
    # TRL's exo_pair takes log ε of a float32 tensor whatever the inputs' dtype: compare it to float32's precision
    tolerance = torch.float32 if "exo_pair" in kinds else None
    assert_close(ours.loss, theirs.detach(), tolerance)
    # the fused head's log-probs outside the completion are constants (0): their gradient means nothing ("sft"
    # indexes the completion's tokens, the rest sum every position)
    completion = mask[:, 1:]
    assert_close(our_grad * completion, their_grad * completion, tolerance)
    metrics = trainer._metrics["train"]
    for name, ours_metric in [
        ("rewards/chosen", ours.chosen_rewards),
        ("rewards/rejected", ours.rejected_rewards),
        ("rewards/margins", ours.reward_margins),
        ("rewards/accuracies", ours.reward_accuracies),
    ]:
        assert math.isclose(metrics[name][-1], ours_metric.mean().item(), rel_tol=1e-5, abs_tol=1e-6), name


# CPOTrainer ignores label_smoothing for "hinge" and "ipo"; xent refuses it there
@pytest.mark.parametrize(
    ("kind", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0), ("simpo", 0.0), ("simpo", 0.1)]
)
def test_cpo_and_simpo_match_trl_cpo_loss(kind, eps):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer").CPOTrainer
    c, r, _, _, lw, ll = pairs()
    lw = lw.clamp(min=1)  # CPOTrainer's average divides by the count unclamped
    averaged = kind in ("ipo", "simpo")  # CPOTrainer averages the log-probs for these (get_batch_logps)
    their_c, their_r = (c / lw, r / ll) if averaged else (c, r)
    trainer = types.SimpleNamespace(
        alpha=0.0, loss_type=kind, beta=0.7, simpo_gamma=0.3, label_smoothing=eps, accelerator=_Accelerator()
    )
    losses, their_w, their_l = cpo.cpo_loss(trainer, their_c, their_r)
    theirs = losses.mean() + 1.0 * (-c.sum() / lw.sum())  # cpo_alpha = 1: CPOTrainer's NLL is the token mean
    ours = preference_loss(
        c, r, loss_type=kind, beta=0.7, simpo_gamma=0.3, label_smoothing=eps, chosen_lengths=lw, rejected_lengths=ll,
        nll_weight=1.0,
    )  # fmt: skip
    assert_close(ours.loss, theirs.detach())
    for got, want in zip(torch.autograd.grad(ours.loss, (c, r)), torch.autograd.grad(theirs, (c, r)), strict=True):
        assert_close(got, want)
    if kind != "ipo":  # CPOTrainer's IPO logs β × the mean; xent's "ipo" logs β × the summed log-ratio, as DPOTrainer
        assert_close(ours.chosen_rewards, their_w)
        assert_close(ours.rejected_rewards, their_l)


def test_orpo_matches_trl_odds_ratio_loss():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer").ORPOTrainer
    c, r, _, _, lw, ll = pairs()
    lw = lw.clamp(min=1)
    nll = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)  # ORPOTrainer's covers the prompt: given
    trainer = types.SimpleNamespace(beta=0.3, accelerator=_Accelerator())
    losses, their_w, their_l, ratio, log_odds = orpo.odds_ratio_loss(trainer, c / lw, r / ll)
    theirs = nll - losses.mean()
    ours = preference_loss(c, r, loss_type="orpo", beta=0.3, chosen_lengths=lw, rejected_lengths=ll, nll_loss=nll)
    # ORPOTrainer computes the odds ratio in float32 whatever the inputs' dtype: compare to float32's precision
    assert_close(ours.loss, theirs.detach(), torch.float32)
    for got, want in zip(
        torch.autograd.grad(ours.loss, (c, r, nll)), torch.autograd.grad(theirs, (c, r, nll)), strict=True
    ):
        assert_close(got, want.double(), torch.float32)
    assert_close(ours.chosen_rewards, their_w.double(), torch.float32)
    assert_close(ours.rejected_rewards, their_l.double(), torch.float32)
    assert_close(ours.log_odds.mean(), log_odds.double(), torch.float32)
    assert_close(F.logsigmoid(ours.log_odds).mean(), ratio.double(), torch.float32)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("labels", [[1, 0, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1]])
def test_kto_matches_trl_kto_trainer(loss_type, labels):
    kto = pytest.importorskip("trl.trainer.kto_trainer").KTOTrainer
    examples = len(labels)
    tokens, mask, _ = _token_problem(examples, 8, torch.float64)
    kl_tokens, kl_mask, _ = _token_problem(examples, 6, torch.float64)
    kl_tokens = kl_tokens.detach() - 0.3 * kl_mask[:, 1:]  # a KL estimate above 0
    ref, ref_kl = -torch.rand(examples, dtype=torch.float64) * 3, -torch.rand(examples, dtype=torch.float64) * 3
    input_ids, kl_input_ids = torch.randint(7, (examples, 8)), torch.randint(7, (examples, 6))
    batch = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), completion_mask=mask, label=torch.tensor(
        labels).bool(), KL_input_ids=kl_input_ids, KL_attention_mask=torch.ones_like(kl_input_ids),
        KL_completion_mask=kl_mask, ref_logps=ref, ref_KL_logps=ref_kl,
    )  # fmt: skip
    trainer = _trainer(
        calculate_KL=loss_type == "kto", loss_type=loss_type, beta=0.4, desirable_weight=1.3, undesirable_weight=0.6
    )
    trainer._compute_kl_logps = lambda model, batch: kto._compute_kl_logps(trainer, model, batch)
    model = _fused_model(tokens, None, by_input=(kl_input_ids, kl_tokens))
    theirs = kto._compute_loss(trainer, model, batch, False)
    (their_grad,) = torch.autograd.grad(theirs, tokens)
    kl = dict(kl_log_probs=kl_tokens.sum(1), ref_kl_log_probs=ref_kl) if loss_type == "kto" else {}
    ours = kto_loss(
        tokens.sum(1), ref, batch["label"], loss_type=loss_type, beta=0.4, desirable_weight=1.3,
        undesirable_weight=0.6, **kl,
    )  # fmt: skip
    (our_grad,) = torch.autograd.grad(ours.loss, tokens)
    assert_close(ours.loss, theirs.detach())
    assert_close(our_grad, their_grad)
    metrics = trainer._metrics["train"]
    assert math.isclose(metrics["kl"][-1], ours.kl.item(), abs_tol=1e-9)
    desirable = batch["label"]
    assert math.isclose(metrics["rewards/chosen"][-1], ours.rewards[desirable].mean().item(), rel_tol=1e-9)
    if "rewards/margins" in metrics:
        assert math.isclose(metrics["rewards/margins"][-1], ours.reward_margin.item(), rel_tol=1e-9)
    else:
        assert ours.reward_margin.item() == 0
