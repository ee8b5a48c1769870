"""Vocab-parallel distillation on real processes (gloo, two ranks, unequal shards): every rank's loss and shard
gradients equal the divergence of the full logits — written below in float64, independently of xent — and the slices
of its gradients; a top-k teacher's ids fall on either shard, with padding; ignored rows are never read; bad
arguments raise on every rank."""

from __future__ import annotations

import itertools
import math
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import xent
from tests.distributed.spawn import run_ranks
from tests.distributed.test_vocab_parallel import AGREEMENT, Communication
from xent.distributed import (
    vocab_parallel_distillation_loss,
    vocab_parallel_linear_distillation,
    vocab_parallel_linear_distillation_loss,
)

SIZES = [9, 14]  # V = 23
VOCAB = sum(SIZES)
K = 4
SHAPE = (2, 5)  # 10 rows
ROWS = 10


# --- the reference, on the full logits ---------------------------------------------------------------------------


def _divergence(a, b, divergence, beta):
    """Σ over the last dimension of the divergence between log-probabilities ``a`` (student) and ``b`` (teacher)."""
    p, q = a.exp(), b.exp()

    def kl(log_x, x, log_y):  # Σ x (log x − log y), 0 where x = 0 (and no 0 · NaN in the gradient there)
        zero = torch.zeros_like(x)
        return (x * (torch.where(x > 0, log_x, zero) - torch.where(x > 0, log_y, zero))).sum(-1)

    if divergence == "forward_kl":
        return kl(b, q, a)
    if divergence == "reverse_kl":
        return kl(a, p, b)
    log_m = torch.log(beta * q + (1 - beta) * p)
    return beta * kl(b, q, log_m) + (1 - beta) * kl(a, p, log_m)


def _reference_rows(student, teacher, top_k, divergence, beta, temperature, tail):
    """``T² D`` per row of ``student (M, V)`` against ``teacher (M, V)`` or ``top_k = (ids, log_probs)``."""
    log_p = torch.log_softmax(student / temperature, dim=-1)
    if teacher is not None:
        return temperature**2 * _divergence(log_p, torch.log_softmax(teacher / temperature, dim=-1), divergence, beta)
    ids, log_probs = top_k
    valid = log_probs > -math.inf
    safe_ids = torch.where(valid, ids, 0)
    support = (F.one_hot(safe_ids, student.shape[-1]) * valid.unsqueeze(-1)).sum(1) > 0
    a_support = log_p.gather(1, safe_ids).masked_fill(~valid, -math.inf)
    a_tail = torch.logsumexp(log_p.masked_fill(support, -math.inf), dim=-1, keepdim=True)
    if tail == "renormalize":
        b_support = torch.log_softmax(log_probs / temperature, dim=-1)
        if divergence == "reverse_kl":  # over the support, the student renormalised there
            a_support = a_support - torch.logsumexp(a_support, dim=-1, keepdim=True)
            return temperature**2 * _divergence(a_support, b_support, divergence, beta)
        b = torch.cat([b_support, torch.full_like(a_tail, -math.inf)], dim=-1)
    else:
        rest = (1 - log_probs.exp().sum(-1, keepdim=True)).clamp(min=torch.finfo(log_probs.dtype).tiny)
        b = torch.log_softmax(torch.cat([log_probs, rest.log()], dim=-1) / temperature, dim=-1)
    return temperature**2 * _divergence(torch.cat([a_support, a_tail], dim=-1), b, divergence, beta)


def _reference(student, teacher, top_k, options):
    """The loss of the full logits ``(M, V)``: the rows kept, reduced as xent.distillation_loss reduces them."""
    options = dict(options)
    target, hard_weight = options.pop("target", None), options.pop("hard_weight", 1.0)
    reduction, num_items = options.pop("reduction", "batchmean"), options.pop("num_items_in_batch", None)
    beta = options.pop("beta", None) or 0.5
    args = (options.pop("divergence", "forward_kl"), beta, options.pop("temperature", 1.0))
    tail = options.pop("top_k_tail", "renormalize")
    kept = torch.ones(student.shape[0], dtype=torch.bool) if target is None else target.reshape(-1) != -100
    rows = _reference_rows(student[kept], None if teacher is None else teacher[kept],
                           None if top_k is None else (top_k[0][kept], top_k[1][kept]), *args, tail)  # fmt: skip
    if target is not None:
        rows = rows + hard_weight * F.cross_entropy(student[kept], target.reshape(-1)[kept], reduction="none")
    if reduction == "none":
        return torch.zeros(student.shape[0], dtype=rows.dtype).index_put((kept.nonzero()[:, 0],), rows)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (num_items if num_items is not None else max(int(kept.sum()), 1))


# --- the problems ------------------------------------------------------------------------------------------------


def _top_k(generator, rows=ROWS):
    """Ids from the whole vocabulary, so that a row's support falls on either shard or on both: row 0's all on rank
    0's classes, row 1's all on rank 1's; padding (-inf) in rows 2 and 3; log-probabilities summing below 1."""
    ids = torch.stack([torch.randperm(VOCAB, generator=generator)[:K] for _ in range(rows)])
    ids[0], ids[1] = torch.tensor([0, 8, 3, 5]), torch.tensor([9, 22, 15, 10])
    log_probs = torch.log_softmax(torch.randn(rows, K, generator=generator, dtype=torch.float64), -1) - 0.3
    log_probs[2, 3] = log_probs[3, 1] = -math.inf
    ids[2, 3] = 1000  # a padding entry's id is never read
    return ids, log_probs


def _problem(seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(VOCAB, SHAPE, generator=generator)
    target.view(-1)[[4, 7]] = -100
    ids, log_probs = _top_k(generator)
    return {
        "student": (torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64) * 2).to(dtype),
        "teacher": (torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64) * 2).to(dtype),
        "ids": ids,
        "log_probs": log_probs,
        "target": target,
        "grad": torch.randn(ROWS, generator=generator, dtype=torch.float64),
    }


def _mine(tensor, rank, dim=-1):
    return tensor.split(SIZES, dim=dim)[rank]


def _close(actual, expected, what, tolerance=(1e-9, 1e-11)):
    rtol, atol = tolerance
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# a teacher kind: (dense?, top_k_tail)
TEACHERS = {"dense": (True, "renormalize"), "renormalize": (False, "renormalize"), "bucket": (False, "bucket")}
GRID = list(itertools.product(["forward_kl", "reverse_kl", "jsd"], TEACHERS, [1.0, 2.5]))
# each case with one reduction and one way of giving the target, cycled: every one meets every divergence and teacher
REDUCTIONS = ["batchmean", "none", "sum", "mean", "batchmean", "none"]
TARGETS = ["none", "hard", "mask only"]


def _options(case, teacher_kind, divergence, temperature, t):
    dense, tail = TEACHERS[teacher_kind]
    options = {"divergence": divergence, "temperature": temperature, "reduction": REDUCTIONS[case % 6]}
    if divergence == "jsd":
        options["beta"] = [None, 0.3][case % 2]
    if not dense:
        options["top_k_tail"] = tail
    targets = TARGETS[case % 3]
    if targets != "none":
        options.update(target=t["target"], hard_weight=0.7 if targets == "hard" else 0.0)
        t["ids"][7] = torch.tensor([-5, 99, 3, 3])  # an ignored row's teacher entries are not read, nor checked
        t["log_probs"][7] = torch.tensor([0.5, math.nan, 1.0, 2.0])
    return dense, options


def _check_logits(rank):
    for case, (divergence, teacher_kind, temperature) in enumerate(GRID):
        t = _problem(case)
        dense, options = _options(case, teacher_kind, divergence, temperature, t)
        full = t["student"].clone().requires_grad_()
        top_k = None if dense else (t["ids"], t["log_probs"])
        expected = _reference(full, t["teacher"] if dense else None, top_k, options)
        shard = _mine(t["student"], rank).reshape(*SHAPE, -1).clone().requires_grad_()
        teacher = _mine(t["teacher"], rank).reshape(*SHAPE, -1) if dense else None
        top_k_args = {} if dense else {"teacher_indices": t["ids"].view(*SHAPE, K),
                                       "teacher_log_probs": t["log_probs"].view(*SHAPE, K)}  # fmt: skip
        loss = vocab_parallel_distillation_loss(shard, teacher, **top_k_args, **options)
        what = f"rank {rank} case {case}: {divergence} {teacher_kind} T={temperature} {options['reduction']}"
        if options["reduction"] == "none":
            assert loss.shape == SHAPE, what
            loss = loss.reshape(-1)
        _close(loss, expected, what)
        flat_options = {**options, "target": options["target"].view(-1)} if "target" in options else options
        top_k_rows = {} if dense else {"teacher_indices": t["ids"], "teacher_log_probs": t["log_probs"]}
        single = xent.distillation_loss(t["student"], t["teacher"] if dense else None, **top_k_rows, **flat_options)
        _close(loss, single, what + " against xent.distillation_loss")
        scale = t["grad"] if options["reduction"] == "none" else torch.ones((), dtype=torch.float64)
        (expected * scale).sum().backward()
        (loss * scale).sum().backward()
        _close(shard.grad.reshape(ROWS, -1), _mine(full.grad, rank), what + " gradient")


def _check_linear(rank):
    """Both heads split over the vocabulary, biases, each model's scale and cap, chunks of 3 tokens, the entropy."""
    generator = torch.Generator().manual_seed(50)
    cases = [("forward_kl", "dense"), ("jsd", "bucket"), ("reverse_kl", "renormalize"), ("reverse_kl", "dense")]
    for case, (divergence, teacher_kind) in enumerate(cases):
        t = _problem(100 + case)
        dense, options = _options(case, teacher_kind, divergence, [1.0, 2.0][case % 2], t)
        transforms = [{}, {"logit_scale": 0.5, "softcap": 3.0, "teacher_logit_scale": 2.0, "teacher_softcap": 4.0}]
        transform = transforms[case % 2]
        hidden, teacher_hidden = (torch.randn(*SHAPE, d, generator=generator, dtype=torch.float64) for d in (6, 5))
        heads = {name: torch.randn(*shape, generator=generator, dtype=torch.float64) for name, shape in
                 {"W": (VOCAB, 6), "b": (VOCAB,), "W_t": (VOCAB, 5), "b_t": (VOCAB,)}.items()}  # fmt: skip
        x, w, b = (tensor.clone().requires_grad_() for tensor in (hidden, heads["W"], heads["b"]))

        def logits(x, w, b, scale, cap):
            out = F.linear(x, w, b)
            return scale * (out if cap is None else cap * torch.tanh(out / cap))

        student = logits(x, w, b, transform.get("logit_scale", 1.0), transform.get("softcap")).reshape(ROWS, -1)
        teacher = logits(teacher_hidden, heads["W_t"], heads["b_t"], transform.get("teacher_logit_scale", 1.0),
                         transform.get("teacher_softcap")).reshape(ROWS, -1)  # fmt: skip
        top_k = None if dense else (t["ids"], t["log_probs"])
        expected = _reference(student, teacher if dense else None, top_k, options)
        expected_entropy = -(torch.softmax(student / options["temperature"], -1) *
                             torch.log_softmax(student / options["temperature"], -1)).sum(-1)  # fmt: skip
        mine = [tensor.clone().requires_grad_() for tensor in
                (hidden, _mine(heads["W"], rank, dim=0), _mine(heads["b"], rank))]  # fmt: skip
        teacher_args = {"teacher_input": teacher_hidden, "teacher_linear_weight_shard": _mine(heads["W_t"], rank, 0),
                        "teacher_linear_bias_shard": _mine(heads["b_t"], rank)}  # fmt: skip
        if not dense:
            teacher_args = {"teacher_indices": t["ids"].view(*SHAPE, K),
                            "teacher_log_probs": t["log_probs"].view(*SHAPE, K)}  # fmt: skip
        loss, entropy = vocab_parallel_linear_distillation(
            mine[0], mine[1], linear_bias_shard=mine[2], **teacher_args, **transform, **options, chunk_size=3
        )  # fmt: skip
        what = f"linear rank {rank} case {case}: {divergence} {teacher_kind} {options['reduction']} {transform}"
        loss = loss.reshape(-1) if options["reduction"] == "none" else loss
        _close(loss, expected, what)
        kept = torch.ones(ROWS, dtype=torch.bool) if "target" not in options else t["target"].view(-1) != -100
        _close(entropy.reshape(-1), torch.where(kept, expected_entropy, 0.0), what + " entropy")
        if dense:
            teacher_args = {"teacher_input": teacher_hidden, "teacher_linear_weight": heads["W_t"],
                            "teacher_linear_bias": heads["b_t"]}  # fmt: skip
        single, single_entropy = xent.linear_distillation(
            hidden, heads["W"], linear_bias=heads["b"], **teacher_args, **transform, **options
        )
        _close(loss, single.reshape(-1) if options["reduction"] == "none" else single, what + " against xent's")
        _close(entropy, single_entropy, what + " entropy against xent's")
        scale = t["grad"] if options["reduction"] == "none" else torch.ones((), dtype=torch.float64)
        (expected * scale).sum().backward()
        (loss * scale).sum().backward()
        _close(mine[0].grad, x.grad, f"{what} d(input)")
        _close(mine[1].grad, _mine(w.grad, rank, dim=0), f"{what} d(weight)")
        _close(mine[2].grad, _mine(b.grad, rank), f"{what} d(bias)")


def _check_special(rank):
    """num_items_in_batch; float32 logits; NaN in ignored rows; every row ignored; a DTensor student."""
    t = _problem(200)
    options = {"target": t["target"].view(-1), "num_items_in_batch": 13, "divergence": "jsd", "temperature": 2.0}
    full = t["student"].clone().requires_grad_()
    expected = _reference(full, t["teacher"], None, options)
    shard = _mine(t["student"], rank).clone().requires_grad_()
    loss = vocab_parallel_distillation_loss(shard, _mine(t["teacher"], rank), **options)
    _close(loss, expected, "num_items_in_batch")
    expected.backward()
    loss.backward()
    _close(shard.grad, _mine(full.grad, rank), "num_items_in_batch gradient")

    loss = vocab_parallel_distillation_loss(_mine(t["student"], rank).float(), _mine(t["teacher"], rank).float(),
                                            divergence="reverse_kl", target=t["target"].view(-1))  # fmt: skip
    assert loss.dtype == torch.float32
    _close(loss, _reference(t["student"], t["teacher"], None, {"divergence": "reverse_kl", "target": t["target"]}),
           "float32", tolerance=(1e-5, 1e-6))  # fmt: skip

    poisoned, teacher = t["student"].clone(), t["teacher"].clone()
    ignored = t["target"].view(-1) == -100
    poisoned[ignored], teacher[ignored] = math.nan, math.inf
    for top_k in (False, True):
        shard = _mine(poisoned, rank).clone().requires_grad_()
        args = {"teacher_indices": t["ids"], "teacher_log_probs": t["log_probs"]} if top_k else {}
        loss = vocab_parallel_distillation_loss(shard, None if top_k else _mine(teacher, rank), **args,
                                                target=t["target"].view(-1), reduction="none")  # fmt: skip
        (loss * t["grad"]).sum().backward()
        assert torch.isfinite(loss).all() and (loss[ignored] == 0).all(), "poisoned ignored rows"
        assert torch.isfinite(shard.grad).all() and (shard.grad[ignored] == 0).all(), "poisoned ignored rows"

    generator = torch.Generator().manual_seed(201)  # a support of the whole vocabulary: no tail on any rank
    ids = torch.stack([torch.randperm(VOCAB, generator=generator) for _ in range(ROWS)])
    log_probs = torch.log_softmax(torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64), -1)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        full = t["student"].clone().requires_grad_()
        expected = _reference(full, None, (ids, log_probs), {"divergence": divergence, "temperature": 2.0})
        shard = _mine(t["student"], rank).clone().requires_grad_()
        loss = vocab_parallel_distillation_loss(shard, teacher_indices=ids, teacher_log_probs=log_probs,
                                                divergence=divergence, temperature=2.0)  # fmt: skip
        _close(loss, expected, f"k = V {divergence}")
        expected.backward()
        loss.backward()
        _close(shard.grad, _mine(full.grad, rank), f"k = V {divergence} gradient")

    shard = _mine(t["student"], rank).clone().requires_grad_()
    loss = vocab_parallel_distillation_loss(shard, _mine(t["teacher"], rank), target=torch.full((ROWS,), -100))
    loss.backward()
    assert float(loss) == 0.0 and (shard.grad == 0).all(), "every row ignored: 0, no gradient, no NaN"

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    student, teacher = (distribute_tensor(t[name].clone(), mesh, [Shard(-1)]) for name in ("student", "teacher"))
    loss = vocab_parallel_distillation_loss(student, teacher, divergence="jsd")
    _close(loss, _reference(t["student"], t["teacher"], None, {"divergence": "jsd"}), "DTensor")


def _check_communication(rank):
    """O(rows) per rank (O(rows · k) with a top-k teacher), whatever the vocabulary: the agreement's vector once, then
    per row the two maxima, the two sums of exponentials, and the sums of the terms and of the slopes (dense) or the
    k support logits (top-k); 3 more with a target, 1 with the entropy; backward sends nothing but d(input)."""
    t = _problem(400)
    shard, teacher = _mine(t["student"], rank).clone().requires_grad_(), _mine(t["teacher"], rank)
    with Communication() as sent:
        vocab_parallel_distillation_loss(shard, teacher, divergence="jsd").backward()
    assert sent.elements == AGREEMENT + 6 * ROWS
    with Communication() as sent:
        vocab_parallel_distillation_loss(shard, teacher, target=t["target"].view(-1)).backward()
    assert sent.elements == AGREEMENT + 9 * ROWS
    with Communication() as sent:
        vocab_parallel_distillation_loss(shard, teacher_indices=t["ids"], teacher_log_probs=t["log_probs"]).backward()
    assert sent.elements == AGREEMENT + (4 + K) * ROWS
    generator = torch.Generator().manual_seed(401)
    hidden, teacher_hidden = (torch.randn(ROWS, d, generator=generator, dtype=torch.float64) for d in (6, 3))
    heads = [torch.randn(VOCAB, d, generator=generator, dtype=torch.float64) for d in (6, 3)]
    head = _mine(heads[0], rank, dim=0).clone().requires_grad_()
    with Communication() as sent:
        loss, _ = vocab_parallel_linear_distillation(hidden.requires_grad_(), head, teacher_hidden,
                                                     _mine(heads[1], rank, dim=0), chunk_size=3)  # fmt: skip
        loss.backward()
    assert sent.elements == AGREEMENT + 7 * ROWS + ROWS * 6  # statistics chunk by chunk, then d(input) (N × D) once


def _check_errors(rank):
    t = _problem(300)
    student, teacher = _mine(t["student"], rank), _mine(t["teacher"], rank)
    ids, log_probs = t["ids"][:3], t["log_probs"][:3]

    def raises(pattern, student=student[:3], teacher=None, error=ValueError, **options):
        with pytest.raises(error, match=pattern):
            vocab_parallel_distillation_loss(student, teacher, **options)

    raises("requires grad", teacher=teacher[:3].clone().requires_grad_())
    raises("requires grad", teacher_indices=ids, teacher_log_probs=log_probs.clone().requires_grad_())
    raises("either as teacher_logits_shard or as teacher_indices", teacher=teacher[:3], teacher_indices=ids,
           teacher_log_probs=log_probs)  # fmt: skip
    raises("no teacher")
    raises("beta is read by divergence='jsd' only", teacher=teacher[:3], beta=0.5)
    raises(r"beta must be in \(0, 1\)", teacher=teacher[:3], divergence="jsd", beta=1.0)
    raises("num_items_in_batch", teacher=teacher[:3], reduction="sum", num_items_in_batch=4)
    raises("top_k_tail must be one of", teacher=teacher[:3], top_k_tail="drop")
    bad = ids.clone()
    bad[0, 1] = VOCAB  # out of range of the whole vocabulary (in range of rank 1's shard size): every rank raises
    raises(r"teacher_indices holds class id 23, outside \[0, 23\)", teacher_indices=bad, teacher_log_probs=log_probs)
    bad = ids.clone()
    bad[1, 2] = bad[1, 0]
    raises("repeats class id", teacher_indices=bad, teacher_log_probs=log_probs)
    raises("teacher_indices must have shape", teacher_indices=ids[:2], teacher_log_probs=log_probs[:2])
    raises("summing to", teacher_indices=ids, teacher_log_probs=log_probs + 0.5, top_k_tail="bucket")
    # a teacher that differs between ranks (the top-k is replicated): named, on every rank
    raises("teacher_indices differs between ranks", teacher_indices=ids.roll(rank, dims=1), teacher_log_probs=log_probs)
    raises(r"^rank 1: teacher_logits_shard has shape", teacher=teacher[:3, : 5 if rank else None])
    hidden = torch.randn(3, 6, dtype=torch.float64)
    head = torch.randn(SIZES[rank], 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="teacher_linear_weight_shard requires grad"):
        vocab_parallel_linear_distillation_loss(hidden, head, hidden, head.clone().requires_grad_())
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        shard = student[:3].clone().requires_grad_()
        loss = vocab_parallel_distillation_loss(shard, teacher[:3])
        torch.autograd.grad(loss, shard, create_graph=True)
    # after the errors, the group still works: no rank was left waiting in a collective
    expected = _reference(t["student"], t["teacher"], None, {})
    _close(vocab_parallel_distillation_loss(student, teacher), expected, "after the errors")


def _worker(rank, world, store_path, failures):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        _check_logits(rank)
        _check_linear(rank)
        _check_special(rank)
        _check_communication(rank)
        _check_errors(rank)
        dist.barrier()  # no rank leaves while another is still in a collective (gloo aborts the latter otherwise)
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_the_full_divergence_and_its_slice_of_the_gradients(tmp_path):
    run_ranks(_worker, (2, str(tmp_path / "store")), 2)
