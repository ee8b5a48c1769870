"""The divergences of the distillation losses (issue 27): xent.distillation_loss and xent.linear_distillation_loss
with divergence="forward_kl" | "reverse_kl" | "jsd", top-k teachers and their two tails, masking, the hard-label
term, num_items_in_batch and the student's entropy.

The references are written here from the formulas, in float64, with every distribution materialised over the whole
vocabulary (they do not use xent.core.divergence): p = softmax(z_s / T), q = softmax(z_t / T),

    forward_kl = Σ q (log q − log p),   reverse_kl = Σ p (log p − log q),
    jsd_β      = β Σ q (log q − log m) + (1 − β) Σ p (log p − log m),   m = β q + (1 − β) p,

times T², plus hard_weight · CE(z_s, y) when a target is given. A top-k teacher (ids S, log-probabilities ℓ) is
"renormalize": q̃ ∝ e^ℓ on S and 0 elsewhere (reverse KL over S, with the student renormalised on S), or "bucket":
both distributions over S ∪ {tail}, the teacher's tail being 1 − Σ e^ℓ (floored at the dtype's tiny), the
student's the sum of its probabilities outside S; the teacher softened as q ∝ q^(1/T) over its categories.

When TRL is installed, the values and the student's gradients are also compared with TRL's generalized_jsd_loss and
its chunked divergence kernel (TRL value = xent value / T²; TRL β = 0, 1 are forward_kl, reverse_kl).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import xent
from tests.conftest import assert_as_accurate_as_the_reference, assert_close, in_float64
from tests.test_gradient_rule import gradients

INF = math.inf
N, C, SPATIAL, K = 5, 7, 3, 4  # logits: (N, C) or (N, C, SPATIAL); top-k teachers of K classes
BATCH, D, D_T, V = (2, 3), 5, 4, 11  # linear heads: input (2, 3, D), student head (V, D), teacher head (V, D_T)
REDUCTIONS = ("none", "sum", "mean", "batchmean")
TEMPERATURES = (1.0, 2.5)
DIVERGENCES = [
    ("forward_kl", None),
    ("reverse_kl", None),
    ("jsd", 0.5),
    ("jsd", 1e-3),
    ("jsd", 1 - 1e-3),
]
TAILS = ("renormalize", "bucket")


def divergence_ids(value):
    return f"{value[0]}-{value[1]}" if isinstance(value, tuple) else None


# --- the float64 references -------------------------------------------------------------------------------------


def _term(log_x, log_y):
    """x (log x − log y) elementwise, 0 where x = 0 — differentiable there (no 0 · inf in the backward)."""
    present = log_x > -INF
    zero = torch.zeros_like(log_x)
    lx = torch.where(present, log_x, zero)
    ly = torch.where(present, log_y, zero)
    return torch.where(present, lx.exp() * (lx - ly), zero)


def divergence_reference(log_p, log_q, divergence, beta):
    """D(q, p) over the last dimension, from the student's log-probabilities log_p and the teacher's log_q."""
    if divergence == "forward_kl":
        return _term(log_q, log_p).sum(-1)
    if divergence == "reverse_kl":
        return _term(log_p, log_q).sum(-1)
    assert divergence == "jsd"
    m = beta * log_q.exp() + (1 - beta) * log_p.exp()
    positive = m > 0
    log_m = torch.where(positive, torch.log(torch.where(positive, m, torch.ones_like(m))), -INF)
    return (beta * _term(log_q, log_m) + (1 - beta) * _term(log_p, log_m)).sum(-1)


def _top_k_divergence(z, temperature, divergence, beta, indices, log_probs, tail, tiny):
    """Rows (R, C) of student logits against a top-k teacher (R, k), every distribution over the C classes."""
    classes = z.shape[-1]
    log_p = F.log_softmax(z / temperature, -1)
    valid = log_probs > -INF
    member = F.one_hot(indices.clamp(0, classes - 1), classes).to(z.dtype) * valid.unsqueeze(-1)  # (R, k, C)
    in_support = member.sum(-2) > 0
    support_log_probs = torch.where(valid, log_probs, torch.zeros_like(log_probs))
    # the teacher's log-probabilities spread over the vocabulary, -inf outside its support
    spread = torch.where(in_support, (member * support_log_probs.unsqueeze(-1)).sum(-2), -INF)
    if tail == "renormalize":
        log_q = F.log_softmax(spread / temperature, -1)  # softmax(ℓ) on S, softened: ∝ softmax(ℓ)^(1/T)
        if divergence == "reverse_kl":  # KL(p̃ ‖ q̃), p̃ the student renormalised on S
            log_p_on_support = F.log_softmax(torch.where(in_support, z / temperature, -INF), -1)
            return divergence_reference(log_p_on_support, log_q, divergence, beta)
        return divergence_reference(log_p, log_q, divergence, beta)
    assert tail == "bucket"
    p = log_p.exp()
    student_tail = (p * ~in_support).sum(-1)
    has_tail = (~in_support).any(-1)  # the support may cover the vocabulary: then there is no tail category
    teacher_tail = (1 - torch.where(valid, log_probs.exp(), torch.zeros_like(log_probs)).sum(-1)).clamp(min=tiny)
    teacher_tail_log = torch.where(has_tail, teacher_tail.log(), -INF)
    safe_student_tail = torch.where(student_tail > 0, student_tail, torch.ones_like(student_tail))
    student_tail_log = torch.where(student_tail > 0, safe_student_tail.log(), -INF)
    teacher = torch.cat([torch.where(valid, log_probs, -INF), teacher_tail_log.unsqueeze(-1)], -1)
    teacher = F.log_softmax(teacher / temperature, -1)
    student_support = torch.where(valid, p.gather(-1, indices.clamp(0, classes - 1)), torch.zeros_like(log_probs))
    safe = torch.where(student_support > 0, student_support, torch.ones_like(student_support))
    student = torch.cat([torch.where(valid, safe.log(), -INF), student_tail_log.unsqueeze(-1)], -1)
    return divergence_reference(student, teacher, divergence, beta)


def _rows(x):
    """(C) → (1, C); (N, C, d1, ..., dK) → (N·d1···dK, C): the class (or top-k) dimension last."""
    return x.unsqueeze(0) if x.dim() == 1 else x.movedim(1, -1).reshape(-1, x.shape[1])


def reference_distillation_loss(
    student_logits,
    teacher=None,
    *,
    divergence="forward_kl",
    beta=None,
    temperature=1.0,
    reduction="batchmean",
    teacher_is_probs=False,
    teacher_indices=None,
    teacher_log_probs=None,
    top_k_tail="renormalize",
    target=None,
    ignore_index=-100,
    hard_weight=1.0,
    num_items_in_batch=None,
    tiny=None,
):
    """The loss of the spec, in the dtype of ``student_logits``; ``tiny`` the floor of a bucket's teacher tail."""
    beta = 0.5 if beta is None else beta
    tiny = torch.finfo(student_logits.dtype).tiny if tiny is None else tiny
    z = _rows(student_logits)
    batch_shape = () if student_logits.dim() == 1 else (student_logits.shape[0], *student_logits.shape[2:])
    kept = torch.ones(z.shape[0], dtype=torch.bool) if target is None else target.reshape(-1) != ignore_index
    rows = kept.nonzero().squeeze(1)
    zk = z[rows]
    if teacher_indices is None:
        teacher_rows = _rows(teacher.to(z.dtype))[rows]
        teacher_logits = teacher_rows.log() if teacher_is_probs else teacher_rows
        log_p = F.log_softmax(zk / temperature, -1)
        log_q = F.log_softmax(teacher_logits / temperature, -1)
        soft_kept = divergence_reference(log_p, log_q, divergence, beta)
    else:
        indices = _rows(teacher_indices)[rows]
        log_probs = _rows(teacher_log_probs.to(z.dtype))[rows]
        soft_kept = _top_k_divergence(zk, temperature, divergence, beta, indices, log_probs, top_k_tail, tiny)
    soft = z.new_zeros(z.shape[0]).index_add(0, rows, temperature**2 * soft_kept)
    hard = z.new_zeros(z.shape[0])
    if target is not None:
        y = target.reshape(-1)[rows]
        hard = hard.index_add(0, rows, -F.log_softmax(zk, -1).gather(1, y.unsqueeze(1)).squeeze(1))
    per_position = soft + hard_weight * hard
    if num_items_in_batch is not None:
        return per_position.sum() / num_items_in_batch
    if reduction == "none":
        return per_position.reshape(batch_shape)
    if reduction == "sum":
        return per_position.sum()
    kept_count = len(rows)
    if kept_count == 0:
        return per_position.sum() * 0.0
    if reduction == "mean":
        return per_position.sum() / kept_count
    assert reduction == "batchmean"
    positions = math.prod(batch_shape[1:])
    return soft.sum() / kept_count * positions + hard_weight * hard.sum() / kept_count


def _head(input, weight, bias, scale, cap):
    x = F.linear(input, weight, bias)
    if cap is not None:
        x = cap * torch.tanh(x / cap)
    return scale * x


def reference_linear_distillation_loss(
    input,
    linear_weight,
    teacher_input=None,
    teacher_linear_weight=None,
    *,
    linear_bias=None,
    teacher_linear_bias=None,
    teacher_indices=None,
    teacher_log_probs=None,
    logit_scale=1.0,
    softcap=None,
    teacher_logit_scale=1.0,
    teacher_softcap=None,
    target=None,
    reduction="batchmean",
    **options,
):
    """z = logit_scale · softcap(x Wᵀ + b) for each model, the tokens as rows of the logits reference."""
    batch_shape, classes = input.shape[:-1], linear_weight.shape[0]
    z = _head(input, linear_weight, linear_bias, logit_scale, softcap).reshape(-1, classes)
    teacher = None
    if teacher_input is not None:
        with torch.no_grad():
            teacher = _head(teacher_input, teacher_linear_weight, teacher_linear_bias, teacher_logit_scale,
                            teacher_softcap).reshape(-1, classes)  # fmt: skip
    if teacher_indices is not None:
        teacher_indices = teacher_indices.reshape(-1, teacher_indices.shape[-1])
        teacher_log_probs = teacher_log_probs.reshape(-1, teacher_log_probs.shape[-1])
    loss = reference_distillation_loss(
        z,
        teacher,
        teacher_indices=teacher_indices,
        teacher_log_probs=teacher_log_probs,
        target=None if target is None else target.reshape(-1),
        reduction=reduction,
        **options,
    )
    return loss.reshape(batch_shape) if reduction == "none" else loss


# --- problems ---------------------------------------------------------------------------------------------------


def _randn(generator, *shape, scale=1.0):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def top_k_of(teacher_logits, k, generator, padding=True, class_dim=1):
    """A top-k teacher from full teacher logits: the k most likely ids (in a shuffled order) and their
    log-probabilities under the full teacher, with padding entries (-inf, garbage ids) at some positions."""
    log_q = F.log_softmax(teacher_logits.double(), class_dim)
    values, indices = log_q.topk(k, dim=class_dim)
    order = torch.randperm(k, generator=generator)
    values, indices = values.index_select(class_dim, order), indices.index_select(class_dim, order)
    if padding:
        flat_values, flat_indices = values.movedim(class_dim, -1), indices.movedim(class_dim, -1)  # views
        rows_values, rows_indices = flat_values.reshape(-1, k), flat_indices.reshape(-1, k)
        for row in range(0, rows_values.shape[0], 2):
            rows_values[row, -1] = -INF  # one padding entry: an out-of-range id, a repeated one, a negative one
            rows_indices[row, -1] = (teacher_logits.shape[class_dim] + 3, rows_indices[row, 0].item(), -1)[row % 3]
        if rows_values.shape[0] > 1:
            rows_values[1, -2:] = -INF  # two of them
            rows_indices[1, -2:] = rows_indices[1, 0]
        values = rows_values.reshape(flat_values.shape).movedim(-1, class_dim)
        indices = rows_indices.reshape(flat_indices.shape).movedim(-1, class_dim)
    return indices.contiguous(), values.contiguous()


def logits_problem(dtype, spatial=False, with_target=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape, batch = ((N, C, SPATIAL), (N, SPATIAL)) if spatial else ((N, C), (N,))
    tensors = {
        "student_logits": _randn(generator, *shape, scale=2.0).to(dtype),
        "teacher": _randn(generator, *shape, scale=2.5).to(dtype),
    }
    if with_target:
        target = torch.randint(C, batch, generator=generator)
        target.view(-1)[1::3] = -100
        tensors["target"] = target
    return tensors, generator


def linear_problem(dtype, with_target=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "input": _randn(generator, *BATCH, D).to(dtype),
        "linear_weight": _randn(generator, V, D, scale=0.8).to(dtype),
        "linear_bias": _randn(generator, V, scale=0.5).to(dtype),
        "teacher_input": _randn(generator, *BATCH, D_T).to(dtype),
        "teacher_linear_weight": _randn(generator, V, D_T, scale=1.2).to(dtype),
        "teacher_linear_bias": _randn(generator, V, scale=0.5).to(dtype),
    }
    if with_target:
        target = torch.randint(V, BATCH, generator=generator)
        target[0, 1] = -100
        target[1, ::2] = -100
        tensors["target"] = target
    return tensors, generator


def linear_top_k_problem(dtype, with_target=False, seed=0, k=K, padding=True):
    tensors, generator = linear_problem(dtype, with_target, seed)
    teacher_logits = F.linear(tensors.pop("teacher_input"), tensors.pop("teacher_linear_weight"),
                              tensors.pop("teacher_linear_bias")).double()  # fmt: skip
    indices, log_probs = top_k_of(teacher_logits, k, generator, padding=padding, class_dim=-1)
    tensors["teacher_indices"], tensors["teacher_log_probs"] = indices, log_probs.to(dtype)
    return tensors, generator


def _tiny(dtype):
    """The floor of a bucket's teacher tail: the smallest normal number of the dtype xent accumulates in."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny


def assert_matches(loss_fn, reference_fn, tensors, requires, dtype):
    """Value and gradients of ``loss_fn`` against ``reference_fn`` on the same tensors: float64 to 1e-9; float32
    as accurate as the reference run in float32 (within 2e-5 of the float64 truth, or 1.5 × the float32
    reference's error); bfloat16 within 5 % of the largest value."""
    actual = gradients(loss_fn, tensors, requires)
    if dtype == torch.float64:
        expected = gradients(reference_fn, tensors, requires)
        assert_close(actual[0], expected[0], torch.float64)
        for name in requires:
            assert_close(actual[1][name], expected[1][name], torch.float64)
        return
    exact = gradients(reference_fn, in_float64(tensors), requires)
    if dtype == torch.float32:
        assert_as_accurate_as_the_reference(actual, gradients(reference_fn, tensors, requires), exact, requires)
        return
    for got, truth in [(actual[0], exact[0])] + [(actual[1][name], exact[1][name]) for name in requires]:
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), truth, rtol=0.0, atol=0.05 * truth.abs().max().item() + 1e-3)


# --- logits: every divergence, reduction, temperature, dtype, shape ---------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("with_target", [False, True])
def test_distillation_loss_matches_the_formula(divergence, reduction, temperature, dtype, spatial, with_target):
    tensors, _ = logits_problem(dtype, spatial, with_target)
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": temperature,
               "reduction": reduction, "hard_weight": 0.3}  # fmt: skip
    assert_matches(
        lambda **t: xent.distillation_loss(**t, **options),
        lambda **t: reference_distillation_loss(**t, **options),
        tensors,
        ("student_logits",),
        dtype,
    )


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_a_single_distribution(divergence, reduction):
    """(C) logits: one position."""
    tensors, _ = logits_problem(torch.float64)
    tensors = {name: value[0] for name, value in tensors.items()}
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": 2.5, "reduction": reduction}
    assert_matches(
        lambda **t: xent.distillation_loss(**t, **options),
        lambda **t: reference_distillation_loss(**t, **options),
        tensors,
        ("student_logits",),
        torch.float64,
    )


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_teacher_probabilities_equal_its_logits(divergence, temperature):
    tensors, _ = logits_problem(torch.float64, spatial=True)
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": temperature}
    probabilities = torch.softmax(tensors["teacher"], 1)
    from_probabilities = xent.distillation_loss(tensors["student_logits"], probabilities, teacher_is_probs=True,
                                                **options)  # fmt: skip
    assert_close(from_probabilities, xent.distillation_loss(**tensors, **options))
    assert_close(from_probabilities, reference_distillation_loss(**{**tensors, "teacher": probabilities},
                                                                 teacher_is_probs=True, **options))  # fmt: skip


def test_jsd_defaults_to_beta_one_half():
    tensors, _ = logits_problem(torch.float64)
    assert_close(xent.distillation_loss(**tensors, divergence="jsd"),
                 xent.distillation_loss(**tensors, divergence="jsd", beta=0.5))  # fmt: skip
    assert_close(xent.distillation_loss(**tensors), xent.distillation_loss(**tensors, divergence="forward_kl"))


# --- identities -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_the_endpoints_of_jsd_are_not_the_kls_but_tend_to_them_over_beta(temperature):
    """The documented trap: TRL and Liger special-case β = 0 and 1 as the KLs, but the generalized JSD itself tends
    to 0 at both ends — jsd_β ≈ β KL(q ‖ p) as β → 0 and ≈ (1 − β) KL(p ‖ q) as β → 1 — so divergence="jsd" with a
    tiny β is almost no loss at all, while forward_kl is."""
    tensors, _ = logits_problem(torch.float64, spatial=True)
    options = {"temperature": temperature, "reduction": "sum"}
    forward = xent.distillation_loss(**tensors, divergence="forward_kl", **options)
    reverse = xent.distillation_loss(**tensors, divergence="reverse_kl", **options)
    assert forward > 1.0 and reverse > 1.0
    small = 1e-7
    near_zero = xent.distillation_loss(**tensors, divergence="jsd", beta=small, **options)
    near_one = xent.distillation_loss(**tensors, divergence="jsd", beta=1 - small, **options)
    assert 0 < near_zero < 1e-5 * forward and 0 < near_one < 1e-5 * reverse
    torch.testing.assert_close(near_zero / small, forward, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(near_one / small, reverse, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_swapping_student_and_teacher(beta):
    """KL(q ‖ p) with p, q swapped is KL(p ‖ q); jsd_β(q, p) swapped is jsd_(1−β)."""
    student, teacher = logits_problem(torch.float64)[0].values()
    kwargs = {"temperature": 2.5, "reduction": "none"}
    assert_close(xent.distillation_loss(student, teacher, divergence="forward_kl", **kwargs),
                 xent.distillation_loss(teacher, student, divergence="reverse_kl", **kwargs))  # fmt: skip
    assert_close(xent.distillation_loss(student, teacher, divergence="jsd", beta=beta, **kwargs),
                 xent.distillation_loss(teacher, student, divergence="jsd", beta=1 - beta, **kwargs))  # fmt: skip


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
def test_a_teacher_equal_to_the_student_costs_nothing(divergence):
    student = logits_problem(torch.float64)[0]["student_logits"].requires_grad_()
    loss = xent.distillation_loss(student, student.detach() + 3.0, divergence=divergence[0], beta=divergence[1],
                                  temperature=2.5, reduction="sum")  # fmt: skip
    assert abs(loss.item()) < 1e-12
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.abs().max() < 1e-12


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_the_hard_term_is_cross_entropy_over_the_kept_targets(divergence, reduction):
    tensors, _ = logits_problem(torch.float64, spatial=True, with_target=True)
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": 2.5, "reduction": reduction}
    soft = xent.distillation_loss(**tensors, hard_weight=0.0, **options)
    both = xent.distillation_loss(**tensors, hard_weight=0.7, **options)
    hard = F.cross_entropy(tensors["student_logits"], tensors["target"], ignore_index=-100)
    assert_close(both - soft, 0.7 * hard)


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("top_k", [False, True])
def test_ignored_positions_are_slicing(divergence, top_k):
    """Dropping the ignored positions ≡ slicing them out (with hard_weight=0 the target only masks); their teacher
    entries are neither read nor validated (garbage ids, positive log-probabilities)."""
    tensors, generator = logits_problem(torch.float64, with_target=True)
    kept = tensors["target"] != -100
    if top_k:
        indices, log_probs = top_k_of(tensors.pop("teacher"), K, generator)
        indices[~kept] = C + 5
        log_probs[~kept] = 1.0
        tensors.update(teacher_indices=indices, teacher_log_probs=log_probs, top_k_tail="bucket")
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": 2.5, "hard_weight": 0.0}
    student = tensors.pop("student_logits").requires_grad_()
    masked = xent.distillation_loss(student, **tensors, reduction="sum", **options)
    sliced_teacher = {key: value[kept] for key, value in tensors.items() if isinstance(value, torch.Tensor)}
    sliced_teacher.pop("target")
    other = {key: value for key, value in tensors.items() if not isinstance(value, torch.Tensor)}
    sliced = xent.distillation_loss(student[kept], **sliced_teacher, **other, reduction="sum", **options)
    assert_close(masked, sliced)
    grad_masked, grad_sliced = (torch.autograd.grad(value, student)[0] for value in (masked, sliced))
    assert_close(grad_masked, grad_sliced)
    assert (grad_masked[~kept] == 0).all()
    none = xent.distillation_loss(student, **tensors, reduction="none", **options)
    assert (none[~kept] == 0).all()


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("top_k", [False, True])
def test_every_position_ignored_gives_zero_without_nan(divergence, reduction, top_k):
    tensors, generator = logits_problem(torch.float64, spatial=True, with_target=True)
    tensors["target"].fill_(-100)
    if top_k:
        tensors["teacher_indices"], tensors["teacher_log_probs"] = top_k_of(tensors.pop("teacher"), K, generator)
    student = tensors.pop("student_logits").requires_grad_()
    loss = xent.distillation_loss(student, **tensors, divergence=divergence[0], beta=divergence[1],
                                  temperature=2.5, reduction=reduction)  # fmt: skip
    assert (loss == 0).all()
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert (grad == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("top_k", [False, True])
def test_num_items_in_batch_divides_the_sum(reduction, as_tensor, top_k):
    """loss = (Σ soft + hard terms) / num_items_in_batch: the gradient-accumulation convention of TRL/transformers."""
    tensors, generator = logits_problem(torch.float64, spatial=True, with_target=True)
    if top_k:
        tensors["teacher_indices"], tensors["teacher_log_probs"] = top_k_of(tensors.pop("teacher"), K, generator)
    options = {"divergence": "jsd", "beta": 0.3, "temperature": 2.5, "hard_weight": 0.4}
    items = torch.tensor(37) if as_tensor else 37
    loss = xent.distillation_loss(**tensors, reduction=reduction, num_items_in_batch=items, **options)
    assert_close(loss, xent.distillation_loss(**tensors, reduction="sum", **options) / 37)
    assert_close(loss, reference_distillation_loss(**tensors, num_items_in_batch=37, **options))


# --- top-k teachers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spatial", [False, True])
def test_top_k_teacher_matches_the_formula(divergence, tail, temperature, reduction, dtype, spatial):
    tensors, generator = logits_problem(dtype, spatial, with_target=True)
    indices, log_probs = top_k_of(tensors.pop("teacher"), K, generator)
    tensors.update(teacher_indices=indices, teacher_log_probs=log_probs.to(dtype))
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": temperature,
               "reduction": reduction, "top_k_tail": tail, "hard_weight": 0.3}  # fmt: skip
    assert_matches(
        lambda **t: xent.distillation_loss(**t, **options),
        lambda **t: reference_distillation_loss(**t, **options, tiny=_tiny(dtype)),
        tensors,
        ("student_logits",),
        dtype,
    )


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_a_top_k_teacher_of_the_whole_vocabulary_is_the_teacher(divergence, tail, temperature):
    """k = C: the renormalised teacher is the teacher, and a bucket's tail has no mass (and no student class): both
    give the divergence from the full teacher, finite."""
    tensors, generator = logits_problem(torch.float64, spatial=True)
    teacher = tensors.pop("teacher")
    indices, log_probs = top_k_of(teacher, C, generator, padding=False)
    student = tensors["student_logits"].requires_grad_()
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": temperature, "reduction": "none"}
    top_k = xent.distillation_loss(student, teacher_indices=indices, teacher_log_probs=log_probs, top_k_tail=tail,
                                   **options)  # fmt: skip
    full = xent.distillation_loss(student, teacher, **options)
    assert torch.isfinite(top_k).all()
    assert_close(top_k, full)
    grad_output = torch.randn_like(full)
    assert_close(*(torch.autograd.grad(value, student, grad_output)[0] for value in (top_k, full)))


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
def test_renormalize_ignores_the_teachers_normalisation(divergence):
    """The "renormalize" tail reads the top-k log-probabilities up to a constant per position."""
    tensors, generator = logits_problem(torch.float64)
    indices, log_probs = top_k_of(tensors.pop("teacher"), K, generator)
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": 2.5, "reduction": "none",
               "teacher_indices": indices, "top_k_tail": "renormalize"}  # fmt: skip
    shifted = log_probs + torch.linspace(-3, 0, N).unsqueeze(1)  # (log-probabilities > 0 are refused)
    assert_close(xent.distillation_loss(**tensors, teacher_log_probs=shifted, **options),
                 xent.distillation_loss(**tensors, teacher_log_probs=log_probs, **options))  # fmt: skip


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
def test_bucket_with_a_teacher_whose_top_k_holds_all_its_mass(divergence):
    """k < C and Σ e^ℓ = 1: the teacher's tail has no mass (up to rounding), floored at the dtype's tiny, which keeps
    the reverse KL finite (its value then depends on the floor: only its finiteness is tested). The forward KL and
    the JSD do not depend on a tail of ≤ 1e-16 at T = 1."""
    tensors, generator = logits_problem(torch.float64)
    indices, _ = top_k_of(tensors.pop("teacher"), K, generator, padding=False)
    log_probs = F.log_softmax(_randn(generator, N, K), 1)  # all the mass on the k ids
    tensors.update(teacher_indices=indices, teacher_log_probs=log_probs)
    options = {"divergence": divergence[0], "beta": divergence[1], "reduction": "none", "top_k_tail": "bucket"}
    if divergence[0] == "reverse_kl":
        loss, grads = gradients(lambda **t: xent.distillation_loss(**t, **options), tensors, ("student_logits",))
        assert torch.isfinite(loss).all() and torch.isfinite(grads["student_logits"]).all()
        return
    assert_matches(
        lambda **t: xent.distillation_loss(**t, **options),
        lambda **t: reference_distillation_loss(**t, **options, tiny=torch.finfo(torch.float64).tiny),
        tensors,
        ("student_logits",),
        torch.float64,
    )


# --- linear heads -----------------------------------------------------------------------------------------------

REQUIRES = ("input", "linear_weight", "linear_bias")
LINEAR_IMPLS = ("chunked", "reference")


def _linear(impl, with_entropy=False, **options):
    chunk = {"chunk_size": 2} if impl != "reference" else {}
    function = xent.linear_distillation if with_entropy else xent.linear_distillation_loss
    return lambda **t: function(**t, **options, impl=impl, **chunk)


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_target", [False, True])
def test_linear_distillation_matches_the_formula(impl, divergence, reduction, temperature, dtype, with_target):
    """A teacher head of another width than the student's, both with a bias; a target with ignored tokens and a
    hard-label term."""
    tensors, _ = linear_problem(dtype, with_target)
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": temperature,
               "reduction": reduction, "hard_weight": 0.3}  # fmt: skip
    assert_matches(
        _linear(impl, **options),
        lambda **t: reference_linear_distillation_loss(**t, **options),
        tensors,
        REQUIRES,
        dtype,
    )


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("requires", [("input",), ("linear_weight",), ("linear_bias",), REQUIRES])
@pytest.mark.parametrize("top_k", [None, "renormalize", "bucket"])
def test_linear_distillation_differentiates_what_requires_grad(impl, requires, top_k):
    if top_k is None:
        tensors, _ = linear_problem(torch.float64, with_target=True)
        options = {"divergence": "jsd", "beta": 0.3, "temperature": 2.5, "reduction": "mean"}
    else:
        tensors, _ = linear_top_k_problem(torch.float64, with_target=True)
        options = {"divergence": "reverse_kl", "temperature": 2.5, "reduction": "mean", "top_k_tail": top_k}
    assert_matches(_linear(impl, **options), lambda **t: reference_linear_distillation_loss(**t, **options),
                   tensors, requires, torch.float64)  # fmt: skip


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES[:3], ids=divergence_ids)
def test_linear_distillation_without_biases(impl, divergence):
    tensors, _ = linear_problem(torch.float64, with_target=True)
    del tensors["linear_bias"], tensors["teacher_linear_bias"]
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": 2.5, "reduction": "batchmean"}
    assert_matches(_linear(impl, **options), lambda **t: reference_linear_distillation_loss(**t, **options),
                   tensors, ("input", "linear_weight"), torch.float64)  # fmt: skip


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("top_k", [None, "bucket"])
def test_linear_distillation_without_grad_is_the_same_value(impl, top_k):
    tensors, _ = (linear_problem if top_k is None else linear_top_k_problem)(torch.float64, with_target=True)
    options = {"divergence": "jsd", "beta": 0.3, "temperature": 2.5, "reduction": "none"}
    if top_k is not None:
        options["top_k_tail"] = top_k
    expected = reference_linear_distillation_loss(**tensors, **options)
    with torch.no_grad():
        assert_close(_linear(impl, **options)(**tensors), expected)
    assert_close(_linear(impl, **options)(**tensors), expected)  # nothing requires grad, grad mode on


TRANSFORMS = [  # (logit_scale, softcap, teacher_logit_scale, teacher_softcap)
    (0.7, None, 1.0, None),
    (1.0, 2.5, 1.0, None),
    (1.0, None, 1.3, 3.0),
    (0.6, 2.0, 1.4, 4.0),
]


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logit_scale_and_softcap_of_each_model(impl, divergence, transform, dtype):
    """z = logit_scale · c tanh(x / c) for the student and the teacher, each its own; the hard term on z at T = 1."""
    tensors, _ = linear_problem(dtype, with_target=True)
    scale, cap, teacher_scale, teacher_cap = transform
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": 2.5, "reduction": "none",
               "hard_weight": 0.5, "logit_scale": scale, "softcap": cap, "teacher_logit_scale": teacher_scale,
               "teacher_softcap": teacher_cap}  # fmt: skip
    assert_matches(_linear(impl, **options), lambda **t: reference_linear_distillation_loss(**t, **options),
                   tensors, REQUIRES, dtype)  # fmt: skip


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_distillation_from_a_top_k_teacher(impl, divergence, tail, temperature, dtype):
    tensors, _ = linear_top_k_problem(dtype, with_target=True)
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": temperature, "reduction": "sum",
               "top_k_tail": tail, "hard_weight": 0.3, "logit_scale": 0.8, "softcap": 3.0}  # fmt: skip
    assert_matches(
        _linear(impl, **options),
        lambda **t: reference_linear_distillation_loss(**t, **options, tiny=_tiny(dtype)),
        tensors,
        REQUIRES,
        dtype,
    )


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("top_k", [None, "renormalize", "bucket"])
def test_linear_distillation_in_bfloat16(impl, divergence, top_k):
    """Loosely: the logits of bfloat16 heads are rounded to bfloat16 in a GEMM of that dtype."""
    if top_k is None:
        tensors, _ = linear_problem(torch.bfloat16, with_target=True)
        options = {}
    else:
        tensors, _ = linear_top_k_problem(torch.bfloat16, with_target=True)
        options = {"top_k_tail": top_k}
    options.update(divergence=divergence[0], beta=divergence[1], temperature=2.5, reduction="batchmean")
    tiny = _tiny(torch.bfloat16)
    assert_matches(_linear(impl, **options),
                   lambda **t: reference_linear_distillation_loss(**t, **options, tiny=tiny),
                   tensors, REQUIRES, torch.bfloat16)  # fmt: skip


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
@pytest.mark.parametrize("top_k", [False, True])
def test_linear_distillation_with_every_token_ignored(impl, reduction, top_k):
    tensors, _ = (linear_top_k_problem if top_k else linear_problem)(torch.float64, with_target=True)
    tensors["target"].fill_(-100)
    loss, grads = gradients(_linear(impl, divergence="jsd", reduction=reduction), tensors, REQUIRES)
    assert loss == 0
    for grad in grads.values():
        assert (grad == 0).all()


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_linear_num_items_in_batch(impl, reduction):
    tensors, _ = linear_problem(torch.float64, with_target=True)
    options = {"divergence": "reverse_kl", "temperature": 2.5, "hard_weight": 0.4, "reduction": reduction}
    assert_matches(
        _linear(impl, num_items_in_batch=torch.tensor(9), **options),
        lambda **t: reference_linear_distillation_loss(**t, num_items_in_batch=9, **options),
        tensors,
        REQUIRES,
        torch.float64,
    )


def reference_entropy(input, linear_weight, linear_bias=None, logit_scale=1.0, softcap=None, temperature=1.0,
                      target=None):  # fmt: skip
    """-Σ p log p of p = softmax(z / T) per token; 0 at ignored tokens (xent's documented convention, as TRL's)."""
    log_p = F.log_softmax(_head(input, linear_weight, linear_bias, logit_scale, softcap) / temperature, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return entropy if target is None else torch.where(target != -100, entropy, torch.zeros_like(entropy))


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES[:3], ids=divergence_ids)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("top_k", [None, "bucket"])
@pytest.mark.parametrize("with_target", [False, True])
def test_linear_distillation_gives_the_entropy_at_the_temperature(impl, divergence, temperature, top_k, with_target):
    """The entropy at temperature T of the transformed logits, per token, without a gradient; the loss unchanged."""
    if top_k is None:
        tensors, _ = linear_problem(torch.float64, with_target)
        options = {}
    else:
        tensors, _ = linear_top_k_problem(torch.float64, with_target)
        options = {"top_k_tail": top_k}
    options.update(divergence=divergence[0], beta=divergence[1], temperature=temperature, logit_scale=0.8,
                   softcap=3.0)  # fmt: skip
    leaves = {key: value.clone().requires_grad_(key in REQUIRES) for key, value in tensors.items()}
    expected = reference_entropy(*(tensors[key] for key in REQUIRES), 0.8, 3.0, temperature, tensors.get("target"))
    for reduction in ("none", "batchmean"):
        loss, entropy = _linear(impl, **options, reduction=reduction, with_entropy=True)(**leaves)
        assert_close(loss, _linear(impl, **options, reduction=reduction)(**leaves))
        assert entropy.shape == BATCH
        assert not entropy.requires_grad
        torch.testing.assert_close(entropy.double(), expected, rtol=1e-9, atol=1e-12)


# --- Triton (under the interpreter without a GPU) ---------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("top_k", [None, "renormalize", "bucket"])
def test_triton_linear_distillation(divergence, top_k):
    pytest.importorskip("triton")
    if top_k is None:
        tensors, _ = linear_problem(torch.float32, with_target=True)
        options = {"logit_scale": 0.6, "softcap": 2.0, "teacher_logit_scale": 1.4, "teacher_softcap": 4.0}
    else:
        tensors, _ = linear_top_k_problem(torch.float32, with_target=True)
        options = {"top_k_tail": top_k, "logit_scale": 0.8, "softcap": 3.0}
    options.update(divergence=divergence[0], beta=divergence[1], temperature=2.5, reduction="mean", hard_weight=0.3)
    assert_matches(
        _linear("triton", **options),
        lambda **t: reference_linear_distillation_loss(**t, **options, tiny=_tiny(torch.float32)),
        tensors,
        REQUIRES,
        torch.float32,
    )
    leaves = {key: value.clone() for key, value in tensors.items()}
    _, entropy = _linear("triton", **options, with_entropy=True)(**leaves)
    expected = reference_entropy(*(in_float64(tensors)[key] for key in REQUIRES), options["logit_scale"],
                                 options["softcap"], 2.5, tensors["target"])  # fmt: skip
    torch.testing.assert_close(entropy.double(), expected, rtol=2e-5, atol=2e-6)


# --- gradcheck of the fused path --------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES[:3], ids=divergence_ids)
@pytest.mark.parametrize("top_k", [None, "renormalize", "bucket"])
def test_gradcheck_of_the_chunked_path(divergence, top_k):
    generator = torch.Generator().manual_seed(3)
    x, w, b = _randn(generator, 3, 2), _randn(generator, 5, 2), _randn(generator, 5)
    target = torch.tensor([1, -100, 4])
    if top_k is None:
        teacher = {"teacher_input": _randn(generator, 3, 3), "teacher_linear_weight": _randn(generator, 5, 3)}
    else:
        indices, log_probs = top_k_of(_randn(generator, 3, 5), 3, generator, class_dim=-1)
        teacher = {"teacher_indices": indices, "teacher_log_probs": log_probs, "top_k_tail": top_k}

    def loss(x, w, b):
        return xent.linear_distillation_loss(x, w, linear_bias=b, **teacher, divergence=divergence[0],
                                             temperature=1.5, target=target, hard_weight=0.5, softcap=2.0,
                                             reduction="none", impl="chunked", chunk_size=2)  # fmt: skip

    assert torch.autograd.gradcheck(loss, tuple(t.requires_grad_() for t in (x, w, b)))


# --- errors -----------------------------------------------------------------------------------------------------

_S, _T = torch.randn(4, 5), torch.randn(4, 5)
_IDX, _LP = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]]), torch.log(torch.full((4, 2), 0.3))


def _top_k(indices=_IDX, log_probs=_LP, **kwargs):
    return lambda: xent.distillation_loss(_S, teacher_indices=indices, teacher_log_probs=log_probs, **kwargs)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: xent.distillation_loss(_S, _T, divergence="kl"), ValueError, r"divergence must be one of"),
        (lambda: xent.distillation_loss(_S, _T, divergence="jsd", beta=0.0), ValueError, r"beta must be in \(0, 1\)"),
        (lambda: xent.distillation_loss(_S, _T, divergence="jsd", beta=1.0), ValueError, r"beta must be in \(0, 1\)"),
        (lambda: xent.distillation_loss(_S, _T, divergence="jsd", beta=1.5), ValueError, r"beta must be in \(0, 1\)"),
        (lambda: xent.distillation_loss(_S, _T, divergence="jsd", beta=-0.1), ValueError, r"beta must be in"),
        (lambda: xent.distillation_loss(_S, _T, beta=0.5), ValueError, r"beta"),
        (lambda: xent.distillation_loss(_S, _T, divergence="reverse_kl", beta=0.0), ValueError, r"beta"),
        (
            lambda: xent.distillation_loss(_S, _T, reduction="sum", num_items_in_batch=3),
            ValueError,
            r"num_items_in_batch",
        ),
        (
            lambda: xent.distillation_loss(_S, _T, reduction="none", num_items_in_batch=3),
            ValueError,
            r"num_items_in_batch",
        ),
        (lambda: xent.distillation_loss(_S, _T.clone().requires_grad_()), ValueError, r"teacher requires grad"),
        (lambda: xent.distillation_loss(_S), (ValueError, TypeError), r"teacher"),
        (lambda: xent.distillation_loss(_S, _T, teacher_indices=_IDX, teacher_log_probs=_LP), ValueError, r"teacher"),
        (_top_k(top_k_tail="drop"), ValueError, r"top_k_tail must be one of"),
        (_top_k(log_probs=None), (ValueError, TypeError), r"teacher_log_probs"),
        (_top_k(log_probs=_LP.clone().requires_grad_()), ValueError, r"teacher_log_probs requires grad"),
        (_top_k(indices=_IDX.float()), TypeError, r"teacher_indices"),
        (_top_k(indices=_IDX[:3]), ValueError, r"teacher_indices"),
        (_top_k(log_probs=_LP[:, :1]), ValueError, r"teacher_log_probs"),
        (_top_k(indices=torch.tensor([[0, 1], [2, 5], [4, 0], [1, 2]])), ValueError, r"teacher_indices"),
        (_top_k(indices=torch.tensor([[0, 1], [2, 3], [-1, 0], [1, 2]])), ValueError, r"teacher_indices"),
        (_top_k(indices=torch.tensor([[0, 1], [2, 2], [4, 0], [1, 2]])), ValueError, r"teacher_indices"),
        (
            _top_k(log_probs=torch.tensor([[-1.0, 0.5]]).expand(4, 2), top_k_tail="bucket"),
            ValueError,
            r"teacher_log_probs",
        ),
        (_top_k(log_probs=torch.log(torch.full((4, 2), 0.6)), top_k_tail="bucket"), ValueError, r"teacher_log_probs"),
    ],
)
def test_bad_arguments_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_what_is_not_read_is_not_checked():
    """Padding entries' ids (-inf log-probability) and ignored positions' teacher entries are not validated; a
    teacher under torch.no_grad() may require grad."""
    indices = torch.tensor([[0, 9], [2, 2], [-3, 7], [1, 2]])
    log_probs = torch.tensor([[-1.0, -INF], [-0.5, -INF], [1.0, 1.0], [-1.0, -2.0]])
    target = torch.tensor([0, 1, -100, 2])
    for tail in TAILS:
        loss = xent.distillation_loss(_S, teacher_indices=indices, teacher_log_probs=log_probs, target=target,
                                      top_k_tail=tail)  # fmt: skip
        assert torch.isfinite(loss)
    with torch.no_grad():
        xent.distillation_loss(_S, _T.clone().requires_grad_())
        xent.distillation_loss(_S, teacher_indices=_IDX, teacher_log_probs=_LP.clone().requires_grad_())


_LIN = {"input": torch.randn(2, 3, 4), "linear_weight": torch.randn(6, 4)}
_LIN_T = {"teacher_input": torch.randn(2, 3, 5), "teacher_linear_weight": torch.randn(6, 5)}
_LIN_K = {"teacher_indices": torch.tensor([0, 3]).expand(2, 3, 2), "teacher_log_probs": torch.full((2, 3, 2), -1.0)}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({**_LIN_T, "divergence": "tvd"}, ValueError, r"divergence must be one of"),
        ({**_LIN_T, "beta": 0.5}, ValueError, r"beta"),
        ({**_LIN_T, "divergence": "jsd", "beta": 1.0}, ValueError, r"beta must be in \(0, 1\)"),
        ({**_LIN_T, "reduction": "sum", "num_items_in_batch": 4}, ValueError, r"num_items_in_batch"),
        ({**_LIN_T, "reduction": "none", "num_items_in_batch": 4}, ValueError, r"num_items_in_batch"),
        ({**_LIN_T, **_LIN_K}, ValueError, r"teacher"),
        ({}, (ValueError, TypeError), r"teacher"),
        ({"teacher_input": _LIN_T["teacher_input"]}, (ValueError, TypeError), r"teacher_linear_weight"),
        ({**_LIN_K, "top_k_tail": "rest"}, ValueError, r"top_k_tail must be one of"),
        ({**_LIN_K, "teacher_indices": torch.tensor([0, 3]).expand(2, 2, 2)}, ValueError, r"teacher_indices"),
        ({**_LIN_K, "teacher_indices": torch.tensor([0, 6]).expand(2, 3, 2)}, ValueError, r"teacher_indices"),
        ({**_LIN_K, "teacher_indices": torch.tensor([3, 3]).expand(2, 3, 2)}, ValueError, r"teacher_indices"),
        (
            {**_LIN_K, "teacher_log_probs": torch.full((2, 3, 2), -1.0, requires_grad=True)},
            ValueError,
            r"teacher_log_probs requires grad",
        ),
        (
            {**_LIN_T, "teacher_linear_weight": torch.randn(6, 5, requires_grad=True)},
            ValueError,
            r"teacher_linear_weight requires grad",
        ),
        ({**_LIN_T, "softcap": 0.0}, ValueError, r"softcap"),
        ({**_LIN_T, "teacher_softcap": -1.0}, ValueError, r"teacher_softcap"),
    ],
)
def test_linear_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        xent.linear_distillation_loss(**_LIN, **kwargs)


# --- TRL --------------------------------------------------------------------------------------------------------


def _trl_beta(divergence):
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence[0], divergence[1])


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("reduction", "num_items_in_batch"), [("batchmean", None), ("sum", None), ("batchmean", 7)])
@pytest.mark.parametrize("labels", [False, True])
def test_equals_trls_generalized_jsd_loss(divergence, temperature, reduction, num_items_in_batch, labels):
    """TRL's generalized_jsd_loss (GKDTrainer's; (B, S, V) logits, no T² factor): xent on the (B, V, S) layout when
    nothing is masked (batchmean = sum / B, as TRL), on the tokens as rows with the labels as a masking target."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    generator = torch.Generator().manual_seed(5)
    student = _randn(generator, 2, 3, V, scale=2.0).requires_grad_()
    teacher = _randn(generator, 2, 3, V, scale=2.5)
    target = torch.randint(V, (2, 3), generator=generator)
    target[0, 1] = target[1, 2] = -100
    theirs = gkd.GKDTrainer.generalized_jsd_loss(
        student,
        teacher,
        labels=target if labels else None,
        beta=_trl_beta(divergence),
        temperature=temperature,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )
    options = {"divergence": divergence[0], "beta": divergence[1], "temperature": temperature,
               "reduction": reduction, "num_items_in_batch": num_items_in_batch}  # fmt: skip
    if labels:
        ours = xent.distillation_loss(student.reshape(-1, V), teacher.reshape(-1, V), target=target.reshape(-1),
                                      hard_weight=0.0, **options)  # fmt: skip
    else:
        ours = xent.distillation_loss(student.transpose(1, 2), teacher.transpose(1, 2), **options)
    assert_close(ours / temperature**2, theirs)
    assert_close(*(torch.autograd.grad(value, student)[0] for value in (ours / temperature**2, theirs)))


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("transform", [(1.0, None, 1.0, None), (0.6, 2.0, 1.4, 4.0)], ids=str)
def test_equals_trls_chunked_divergence(impl, divergence, temperature, transform):
    """TRL's ChunkedDivergenceFunction (float32 on CPU): the per-token divergence is xent's reduction="none" / T²,
    the entropy xent.linear_distillation's; TRL's (scale s, softcap c) is cap_c(s x) = xent's (logit_scale s, softcap
    c / s)."""
    chunked = pytest.importorskip("trl.kernels.chunked_divergence")
    tensors, _ = linear_problem(torch.float32)
    flat = {key: value.reshape(-1, value.shape[-1]) if "input" in key else value for key, value in tensors.items()}
    scale, cap, teacher_scale, teacher_cap = transform

    def theirs(input, linear_weight, linear_bias, teacher_input, teacher_linear_weight, teacher_linear_bias):
        return chunked.ChunkedDivergenceFunction.apply(input, linear_weight, linear_bias, teacher_input,
                                                       teacher_linear_weight, teacher_linear_bias,
                                                       _trl_beta(divergence), temperature, scale, cap,
                                                       teacher_scale, teacher_cap)  # fmt: skip

    def ours(**t):
        return xent.linear_distillation(
            **t,
            divergence=divergence[0],
            beta=divergence[1],
            temperature=temperature,
            reduction="none",
            logit_scale=scale,
            softcap=None if cap is None else cap / scale,
            teacher_logit_scale=teacher_scale,
            teacher_softcap=None if teacher_cap is None else teacher_cap / teacher_scale,
            impl=impl,
        )

    their_divergence, their_entropy = gradients(lambda **t: theirs(**t)[0], flat, REQUIRES), theirs(**flat)[1]
    our_divergence = gradients(lambda **t: ours(**t)[0] / temperature**2, flat, REQUIRES)
    _, our_entropy = ours(**flat)

    def near(a, b):  # two float32 computations of an O(1) quantity
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5 * max(1.0, b.abs().max().item()))

    near(our_divergence[0], their_divergence[0])
    for key in REQUIRES:
        near(our_divergence[1][key], their_divergence[1][key])
    near(our_entropy, their_entropy)


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=divergence_ids)
@pytest.mark.parametrize("num_items_in_batch", [None, 9])
def test_equals_trls_distillation_trainer_loss(divergence, num_items_in_batch):
    """DistillationTrainer's _chunked_divergence_loss: the masked per-token divergence averaged over the completion
    tokens, or summed and divided by num_items_in_batch — xent's "mean" with the mask as an ignored target."""
    trainer = pytest.importorskip("trl.trainer.distillation_trainer")
    tensors, _ = linear_problem(torch.float32, with_target=True)
    mask = (tensors.pop("target") != -100).long()
    temperature = 2.5

    def theirs(input, linear_weight, linear_bias, teacher_input, teacher_linear_weight, teacher_linear_bias):
        return trainer._chunked_divergence_loss(input, teacher_input, linear_weight, teacher_linear_weight, mask,
                                                _trl_beta(divergence), num_items_in_batch=num_items_in_batch,
                                                student_lm_head_bias=linear_bias,
                                                teacher_lm_head_bias=teacher_linear_bias,
                                                temperature=temperature)[0]  # fmt: skip

    def ours(**t):
        target = torch.where(mask.bool(), 0, -100)
        loss = xent.linear_distillation_loss(**t, divergence=divergence[0], beta=divergence[1],
                                             temperature=temperature, reduction="mean", target=target,
                                             hard_weight=0.0, num_items_in_batch=num_items_in_batch)  # fmt: skip
        return loss / temperature**2

    expected, actual = gradients(theirs, tensors, REQUIRES), gradients(ours, tensors, REQUIRES)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-4, atol=1e-6)
    for key in REQUIRES:
        torch.testing.assert_close(actual[1][key], expected[1][key], rtol=1e-4, atol=1e-6)
