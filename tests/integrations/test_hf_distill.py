"""xent.hf.distillation_loss: equal, in value and in every student gradient, to the divergence of both models'
materialised logits (the models run unpatched, their logits as they return them), written here in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")

import transformers

import xent.hf
from tests.integrations.tiny_models import VOCAB, tiny_model
from xent.integrations.distill import read_logits

BATCH, LENGTH = 3, 10
HEAD_GAIN = 12.0  # sharpens the tiny random models' near-uniform distributions, so the divergences are not ~0


def sharpened(name: str, seed: int, **overrides) -> torch.nn.Module:
    model = tiny_model(name, seed=seed, **overrides)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_GAIN)
    return model


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    attention_mask[2, -2:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[1, :4] = -100  # a prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def reference_loss(
    student_logits,
    teacher_logits,
    kept,
    labels=None,
    *,
    divergence="forward_kl",
    beta=None,
    temperature=1.0,
    hard_weight=1.0,
    num_items_in_batch=None,
):
    """The textbook formula in float64 on materialised logits: T² · D(q, p) per kept position (+ hard-label CE),
    the mean over kept positions (or the sum / num_items_in_batch). Returns (loss, student entropy per position)."""
    log_p = torch.log_softmax(student_logits.double() / temperature, dim=-1)
    log_q = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        per_position = (q * (log_q - log_p)).sum(-1)
    elif divergence == "reverse_kl":
        per_position = (p * (log_p - log_q)).sum(-1)
    else:
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
        per_position = beta * (q * (log_q - log_m)).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)
    per_position = temperature**2 * per_position
    if labels is not None and hard_weight:
        hard = torch.nn.functional.cross_entropy(
            student_logits.double().transpose(1, 2), labels.clamp(min=0), reduction="none"
        )
        per_position = per_position + hard_weight * hard
    total = torch.where(kept, per_position, 0.0).sum()
    count = kept.sum() if num_items_in_batch is None else num_items_in_batch
    entropy = -(p * log_p).sum(-1)
    return total / count, entropy


def student_gradients(model):
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def assert_close_gradients(got, expected):
    assert got.keys() == expected.keys()
    for name, gradient in got.items():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(gradient.double(), expected[name].double(), rtol=1e-4, atol=2e-5 * scale, msg=name)


CASES = {
    # name: (student, teacher, loss options, uses labels)
    "llama<-qwen2 forward_kl, no labels": (
        ("llama", {}),
        ("qwen2", {"hidden_size": 32, "intermediate_size": 48}),
        {"temperature": 2.0},
        False,
    ),
    "gemma2<-cohere jsd, labels": (
        ("gemma2", {}),
        ("cohere", {"hidden_size": 24, "intermediate_size": 48}),
        {"divergence": "jsd", "beta": 0.3, "temperature": 0.7, "hard_weight": 0.5},
        True,
    ),
    "granite<-llama reverse_kl, num_items_in_batch": (
        ("granite", {}),
        ("llama", {"hidden_size": 32, "intermediate_size": 48}),
        {"divergence": "reverse_kl", "temperature": 1.5, "hard_weight": 0.0, "num_items_in_batch": 40},
        True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("patched", [False, True], ids=["plain", "student patched by xent.hf"])
def test_equals_divergence_of_materialised_logits(case, patched):
    (student_name, student_options), (teacher_name, teacher_options), options, with_labels = CASES[case]
    student = sharpened(student_name, 0, **student_options)
    teacher = sharpened(teacher_name, 1, **teacher_options)
    inputs = batch()
    labels = inputs["labels"] if with_labels else None

    # the reference: both models unpatched, their logits as they return them
    reference_student = copy.deepcopy(student)
    student_logits = reference_student(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    if with_labels:
        kept = labels[:, 1:] != -100
    else:
        kept = (inputs["attention_mask"][:, :-1] != 0) & (inputs["attention_mask"][:, 1:] != 0)
    reference_options = {k: v for k, v in options.items() if k in ("divergence", "beta", "temperature")}
    expected, _ = reference_loss(
        student_logits,
        teacher_logits,
        kept,
        None if labels is None else labels[:, 1:],
        hard_weight=options.get("hard_weight", 1.0),
        num_items_in_batch=options.get("num_items_in_batch"),
        **reference_options,
    )
    expected.backward()

    if patched:
        xent.hf.patch(student)
    loss = xent.hf.distillation_loss(
        student,
        teacher,
        inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        labels=labels,
        chunk_size=7,
        **options,
    )
    loss.backward()
    assert expected > 1e-2
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-7)
    assert_close_gradients(student_gradients(student), student_gradients(reference_student))
    assert all(parameter.grad is None for parameter in teacher.parameters())


def test_lora_student_head():
    """A LoRA adapter on the student's head is read as xent.hf.patch reads it (the update fused, A and B trained)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    student = peft.get_peft_model(sharpened("llama", 0), config)
    teacher = sharpened("qwen2", 1, hidden_size=32, intermediate_size=48)
    inputs = batch()
    reference_student = copy.deepcopy(student)
    logits = reference_student(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    kept = inputs["labels"][:, 1:] != -100
    expected, _ = reference_loss(logits, teacher_logits, kept, inputs["labels"][:, 1:], temperature=2.0)
    expected.backward()
    loss = xent.hf.distillation_loss(student, teacher, temperature=2.0, **inputs)
    loss.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-7)
    gradients = student_gradients(student)
    assert any("lm_head.lora_B" in name for name in gradients)
    assert_close_gradients(gradients, student_gradients(reference_student))


def test_read_logits_reads_the_scale_and_cap_from_the_forward():
    """xent's order is the scale after the cap: Gemma 2's cap c → softcap c; Cohere's scale s → logit_scale s;
    Granite's division by s → logit_scale 1/s; and the head's forward is back to itself afterwards."""
    inputs = {"input_ids": torch.randint(3, VOCAB, (1, 4))}
    gemma = tiny_model("gemma2")
    assert (read_logits(gemma, **inputs).logit_scale, read_logits(gemma, **inputs).softcap) == (1.0, 3.0)
    assert "forward" not in vars(gemma.get_output_embeddings())
    cohere = read_logits(tiny_model("cohere"), **inputs)
    assert (cohere.logit_scale, cohere.softcap) == (0.5, None)
    granite = read_logits(tiny_model("granite"), **inputs)
    assert (granite.logit_scale, granite.softcap) == (0.25, None)


class _ShiftedLogits(transformers.LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.logits = outputs.logits + 1.0
        return outputs


def test_refusals():
    student, teacher = tiny_model("llama"), tiny_model("qwen2", seed=1)
    inputs = batch()
    ids = inputs["input_ids"]
    for option in ("softcap", "teacher_logit_scale", "linear_bias"):
        with pytest.raises(TypeError, match=f"{option} is read from the models' forwards"):
            xent.hf.distillation_loss(student, teacher, ids, **{option: 1.0})
    with pytest.raises(TypeError, match="target is the labels shifted by one: pass labels="):
        xent.hf.distillation_loss(student, teacher, ids, target=ids)
    with pytest.raises(TypeError, match="teacher_indices is an option of a top-k teacher"):
        xent.hf.distillation_loss(student, teacher, ids, teacher_indices=ids)
    with pytest.raises(ValueError, match="hard_weight weighs the hard-label term, which needs labels"):
        xent.hf.distillation_loss(student, teacher, ids, hard_weight=0.5)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 9\) but input_ids has shape \(3, 10\)"):
        xent.hf.distillation_loss(student, teacher, ids, attention_mask=inputs["attention_mask"][:, 1:])
    with pytest.raises(TypeError, match=r"labels of shape \(3, 10\) must hold token ids"):
        xent.hf.distillation_loss(student, teacher, ids, labels=ids.float())
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\) token ids"):
        xent.hf.distillation_loss(student, teacher, ids[0])
    with pytest.raises(ValueError, match=r"the student \(LlamaForCausalLM\) has 97 outputs but the teacher"):
        xent.hf.distillation_loss(student, tiny_model("qwen2", vocab_size=VOCAB + 3), ids)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(TypeError, match=r"_ShiftedLogits applies an addition to its logits"):
        xent.hf.distillation_loss(student, _ShiftedLogits(config), ids)
    with pytest.raises(TypeError, match="read_logits runs the forward without labels"):
        read_logits(student, input_ids=ids, labels=ids)
    with pytest.raises(ValueError, match="divergence"):
        xent.hf.distillation_loss(student, teacher, ids, divergence="kl")
