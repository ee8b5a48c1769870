"""The heads xent.hf fuses (xent.integrations.heads), with PEFT: a LoRA head (base weight + low-rank update) runs
through the fused path exactly, whichever order the model is patched and wrapped in; what cannot be fused is refused
naming PEFT's wrapper and the fix.

The reference is the same PEFT model unpatched, run on the same batch from the same random state (LoRA's dropout).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import peft

import xent.hf
from tests.integrations.test_hf import BATCH, CHUNK, LENGTH, LargestLogits, batch
from tests.integrations.tiny_models import VOCAB, tiny_model

LORA_HEAD = {"target_modules": ["q_proj", "v_proj", "lm_head"]}
SAVED_HEAD = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
BIASED_LORA_HEAD = {"target_modules": ["lm_head"], "lora_bias": True}  # lora_B has a bias: s·(a Bᵀ + b_B)


def peft_model(model: torch.nn.Module, **settings) -> torch.nn.Module:
    # init_lora_weights=False: B is random, not zero, so that A's gradient and the update are not zero
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, init_lora_weights=False, **settings)
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def pair(order: str, **settings) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(patched, unpatched) float64 PEFT models in training mode (LoRA's dropout on), patched in ``order``."""
    base = tiny_model("llama").double().train()
    reference = peft_model(copy.deepcopy(base), **settings)
    if order == "patch then wrap":
        patched = peft_model(xent.hf.patch(copy.deepcopy(base), chunk_size=CHUNK), **settings)
    else:
        patched = copy.deepcopy(reference)
        xent.hf.patch(patched if order == "wrap then patch" else patched.get_base_model(), chunk_size=CHUNK)
    return patched, reference


@pytest.mark.parametrize("order", ["patch then wrap", "wrap then patch", "wrap then patch the base model"])
@pytest.mark.parametrize(
    "settings",
    [LORA_HEAD, SAVED_HEAD, BIASED_LORA_HEAD],
    ids=["lora on lm_head", "modules_to_save lm_head", "lora with bias on lm_head"],
)
def test_peft_head_gives_the_unpatched_loss_and_gradients(order, settings):
    patched, reference = pair(order, **settings)
    ids, labels = batch()
    torch.manual_seed(2)
    expected = reference(input_ids=ids, labels=labels).loss
    expected.backward()
    torch.manual_seed(2)
    with LargestLogits() as probe:
        outputs = patched(input_ids=ids, labels=labels)
        outputs.loss.backward()
    assert outputs.logits is None
    assert probe.largest < BATCH * LENGTH * VOCAB
    # transformers computes its loss from logits upcast with .float(): float32 even for this float64 model
    torch.testing.assert_close(outputs.loss.float(), expected, rtol=1e-6, atol=1e-6)
    trainable = {name: p for name, p in reference.named_parameters() if p.requires_grad}
    assert any("lm_head" in name for name in trainable)
    for name, parameter in patched.named_parameters():
        assert parameter.requires_grad == (name in trainable), name
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, trainable[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    assert xent.hf.is_patched(patched) and xent.hf.is_patched(patched.get_base_model())
    # one patched head forward, on the output embeddings as PEFT left them; none on PEFT's copies of the head
    patched_heads = [m for m in patched.modules() if type(m.__dict__.get("forward")).__name__ == "_HeadForward"]
    assert patched_heads == [patched.get_base_model().get_output_embeddings()]


def test_a_disabled_adapter_and_unpatch_follow_peft():
    patched, reference = pair("wrap then patch", **LORA_HEAD)
    ids, labels = batch()
    with patched.disable_adapter(), reference.disable_adapter(), torch.no_grad():
        expected = reference(input_ids=ids, labels=labels).loss
        disabled = patched(input_ids=ids, labels=labels, skip_logits=True).loss
        torch.testing.assert_close(disabled.float(), expected, rtol=1e-6, atol=1e-6)
    xent.hf.unpatch(patched)
    assert not xent.hf.is_patched(patched)
    torch.manual_seed(2)
    expected = reference(input_ids=ids, labels=labels)
    torch.manual_seed(2)
    torch.testing.assert_close(patched(input_ids=ids, labels=labels).logits, expected.logits)


def test_lora_variants_on_the_head_are_refused_naming_peft_and_the_fix():
    dora = peft_model(tiny_model("llama"), target_modules=["lm_head"], use_dora=True)
    with pytest.raises(TypeError, match=r"PEFT's lora\.Linear.*DoRA.*lm_head"):
        xent.hf.patch(dora)
    assert not xent.hf.is_patched(dora)
    ids, labels = batch()
    late = peft_model(xent.hf.patch(tiny_model("llama")), target_modules=["lm_head"], use_dora=True)
    with pytest.raises(TypeError, match=r"PEFT's lora\.Linear.*DoRA"):
        late(input_ids=ids, labels=labels)
