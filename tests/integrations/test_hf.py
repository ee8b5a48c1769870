"""xent.hf: a patched causal LM gives the unpatched model's loss and every parameter's gradient, without its logits.

The reference is always the same model unpatched (a deep copy), run on the same batch.
"""

from __future__ import annotations

import copy
import inspect
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

import transformers

import xent
import xent.hf
from tests.distributed.spawn import spawn_and_wait
from tests.integrations.tiny_models import MODELS, VOCAB, tiny_model

CHUNK = 8
BATCH, LENGTH = 2, 32  # N = 64 tokens, so N × V is larger than any other tensor of the tiny models


def batch(seed: int = 0, ignored: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
    labels = ids.clone()
    if ignored:
        labels[0, :5] = -100  # a prompt that is not trained on
        labels[1, -3:] = -100  # padding
    return ids, labels


def pair(name: str, **options) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(patched, unpatched) copies of one tiny model."""
    reference = tiny_model(name)
    return xent.hf.patch(copy.deepcopy(reference), chunk_size=CHUNK, **options), reference


def assert_same_gradients(patched: torch.nn.Module, reference: torch.nn.Module, rtol=1e-5, atol=1e-6) -> None:
    names = dict(reference.named_parameters())
    for name, parameter in patched.named_parameters():
        expected = names[name].grad
        assert (parameter.grad is None) == (expected is None), name
        if expected is not None:
            torch.testing.assert_close(parameter.grad, expected, rtol=rtol, atol=atol, msg=name)


class LargestLogits(TorchDispatchMode):
    """Records the largest tensor with V columns that any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == VOCAB:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_every_gradient_equal_unpatched_without_logits(name):
    patched, reference = pair(name)
    ids, labels = batch()
    expected = reference(input_ids=ids, labels=labels)
    expected.loss.backward()
    with LargestLogits() as probe:
        outputs = patched(input_ids=ids, labels=labels)
        outputs.loss.backward()
    assert outputs.logits is None
    torch.testing.assert_close(outputs.loss, expected.loss)
    assert_same_gradients(patched, reference)
    # One chunk of logits at a time (and the head's weight seen as (D, V)): never the N × V logits.
    hidden = reference.get_output_embeddings().in_features
    assert probe.largest <= max(CHUNK, hidden) * VOCAB < BATCH * LENGTH * VOCAB
    if name == "mixtral":  # the router's auxiliary loss is part of the loss, added by the model itself
        assert outputs.aux_loss is not None and float(outputs.aux_loss.detach()) > 0


def test_tied_embeddings_get_the_summed_gradient():
    patched, reference = pair("gpt2")
    assert patched.get_output_embeddings().weight is patched.get_input_embeddings().weight
    ids, labels = batch()
    reference(input_ids=ids, labels=labels).loss.backward()
    patched(input_ids=ids, labels=labels).loss.backward()
    torch.testing.assert_close(
        patched.get_input_embeddings().weight.grad, reference.get_input_embeddings().weight.grad, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
def test_scales_and_caps_come_from_what_the_model_does(name):
    """Gemma 2's final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling: changing them changes the
    patched loss exactly as it changes the unpatched one."""
    # the tiny models' logits are ~0.05: settings large enough to change the loss
    setting = {"gemma2": {"final_logit_softcapping": 0.02}, "cohere": {"logit_scale": 40.0}}.get(
        name, {"logits_scaling": 0.02}
    )
    reference = tiny_model(name, **setting)
    patched = xent.hf.patch(copy.deepcopy(reference))
    ids, labels = batch()
    torch.testing.assert_close(patched(input_ids=ids, labels=labels).loss, reference(input_ids=ids, labels=labels).loss)
    assert (
        abs(float(reference(input_ids=ids, labels=labels).loss) - float(tiny_model(name)(ids, labels=labels).loss))
        > 1e-3
    )


def test_num_items_in_batch_and_shift_labels_as_transformers():
    patched, reference = pair("qwen2")
    ids, labels = batch()
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    for kwargs in ({"num_items_in_batch": 100}, {"num_items_in_batch": torch.tensor(77)}, {"shift_labels": shifted}):
        patched.zero_grad(), reference.zero_grad()
        expected = reference(input_ids=ids, labels=labels, **kwargs).loss
        loss = patched(input_ids=ids, labels=labels, **kwargs).loss
        torch.testing.assert_close(loss, expected)
        loss.backward(), expected.backward()
        assert_same_gradients(patched, reference)
    # ignore_index passed to the forward reaches the loss as it does unpatched
    ignored = labels.masked_fill(labels == -100, 5)
    torch.testing.assert_close(
        patched(input_ids=ids, labels=ignored, ignore_index=5).loss,
        reference(input_ids=ids, labels=ignored, ignore_index=5).loss,
    )


@pytest.mark.parametrize(
    ("loss", "options"),
    [
        (None, {"z_loss": 1e-2, "label_smoothing": 0.1}),
        (xent.focal_loss, {"gamma": 2.0}),
        ("poly1_cross_entropy", {"epsilon": 1.0}),
        (xent.cross_entropy, {"weight": torch.rand(VOCAB) + 0.5}),
    ],
)
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_loss_options_and_family_losses(name, loss, options):
    """The patched loss equals xent's loss of the unpatched model's logits (capped where the model caps them)."""
    patched, reference = pair(name, loss=loss, **options)
    ids, labels = batch()
    logits = reference(input_ids=ids).logits
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    function = {None: xent.cross_entropy, "poly1_cross_entropy": xent.poly1_cross_entropy}.get(loss, loss)
    expected = function(logits.reshape(-1, VOCAB), target, **options)
    expected.backward()
    loss_value = patched(input_ids=ids, labels=labels).loss
    loss_value.backward()
    torch.testing.assert_close(loss_value, expected)
    assert_same_gradients(patched, reference)


def test_no_grad_returns_logits_unless_skip_logits():
    patched, reference = pair("llama")
    ids, labels = batch()
    expected = reference(input_ids=ids, labels=labels)
    with torch.no_grad():
        evaluated = patched(input_ids=ids, labels=labels)
        skipped = patched(input_ids=ids, labels=labels, skip_logits=True)
    torch.testing.assert_close(evaluated.logits, expected.logits)
    torch.testing.assert_close(evaluated.loss, expected.loss)
    assert skipped.logits is None
    torch.testing.assert_close(skipped.loss, expected.loss)
    forced = patched(input_ids=ids, labels=labels, skip_logits=False)  # gradients on, logits asked for
    torch.testing.assert_close(forced.logits, expected.logits)
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        patched(input_ids=ids, skip_logits=True)
    # return_dict=False: the same tuple, the logits' place holding None
    loss, logits, *_ = patched(input_ids=ids, labels=labels, return_dict=False)
    assert logits is None
    torch.testing.assert_close(loss, expected.loss)


def test_generation_and_logits_to_keep_as_unpatched():
    patched, reference = pair("mistral")
    ids, _ = batch()
    prompt = ids[:, :6]
    settings = {"max_new_tokens": 5, "do_sample": False, "attention_mask": torch.ones_like(prompt), "pad_token_id": 0}
    torch.testing.assert_close(patched.generate(prompt, **settings), reference.generate(prompt, **settings))
    torch.testing.assert_close(
        patched(input_ids=ids, logits_to_keep=1).logits, reference(input_ids=ids, logits_to_keep=1).logits
    )
    with pytest.raises(ValueError, match="kept 2 positions"):  # unpatched this is a shape error too
        patched(input_ids=ids, labels=ids, logits_to_keep=1)


def test_unpatch_restores_the_instance_exactly():
    model = tiny_model("phi3")
    before = dict(model.__dict__)
    head_before = dict(model.get_output_embeddings().__dict__)
    signature = inspect.signature(model.forward)
    xent.hf.patch(model)
    assert xent.hf.is_patched(model)
    assert inspect.signature(model.forward) == signature  # Trainer reads the columns it keeps from it
    xent.hf.unpatch(model)
    assert not xent.hf.is_patched(model)
    assert model.__dict__.keys() == before.keys()
    assert model.get_output_embeddings().__dict__.keys() == head_before.keys()
    assert model.loss_function is transformers.loss.loss_utils.LOSS_MAPPING["ForCausalLM"]
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits.shape == (BATCH, LENGTH, VOCAB)
    with pytest.raises(ValueError, match="is not patched"):
        xent.hf.unpatch(model)


def test_patch_keeps_an_existing_instance_forward_and_restores_it():
    model = tiny_model("llama")
    calls = []
    original = model.forward

    def wrapped(*args, **kwargs):  # as accelerate's mixed-precision wrapper does
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = wrapped
    xent.hf.patch(model)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert calls == [1]
    xent.hf.unpatch(model)
    assert model.forward is wrapped


def test_a_deep_copy_is_patched_on_its_own_and_a_patched_model_pickles(tmp_path):
    """An EMA or RL reference model is a deep copy: it must run itself, not the model it was copied from."""
    patched, reference = pair("qwen2")
    twin = copy.deepcopy(patched)
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(3.0)
        reference.get_output_embeddings().weight.mul_(3.0)
    ids, labels = batch()
    assert xent.hf.is_patched(twin)
    torch.testing.assert_close(twin(input_ids=ids, labels=labels).loss, reference(input_ids=ids, labels=labels).loss)
    assert twin(input_ids=ids, labels=labels).logits is None
    torch.save(twin, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(loaded(input_ids=ids, labels=labels).loss, reference(input_ids=ids, labels=labels).loss)


class AddsToLogits(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden) + 1.0
        return transformers.modeling_outputs.CausalLMOutput(
            loss=self.loss_function(logits, labels, VOCAB), logits=logits
        )


class ComputesItsOwnLoss(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = torch.nn.functional.linear(self.model(input_ids=input_ids).last_hidden_state, self.lm_head.weight)
        return transformers.modeling_outputs.CausalLMOutput(
            loss=self.loss_function(logits, labels, VOCAB), logits=logits
        )


def test_models_that_do_not_fit_are_refused_by_name():
    config = tiny_model("llama").config
    ids, labels = batch()
    with pytest.raises(TypeError, match=r"AddsToLogits applies an addition to its logits"):
        xent.hf.patch(AddsToLogits(config))(input_ids=ids, labels=labels)
    with pytest.raises(TypeError, match=r"ComputesItsOwnLoss\.forward passed logits it formed itself to its loss"):
        xent.hf.patch(ComputesItsOwnLoss(config))(input_ids=ids, labels=labels)
    with pytest.raises(TypeError, match="Hugging Face PreTrainedModel or a PEFT model of one, got Linear"):
        xent.hf.patch(torch.nn.Linear(2, 2))
    headless = transformers.LlamaModel(config)
    with pytest.raises(TypeError, match="LlamaModel has no output embeddings"):
        xent.hf.patch(headless)
    custom = tiny_model("llama")
    custom.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(TypeError, match="not transformers' causal-LM loss"):
        xent.hf.patch(custom)
    # DeepSpeed ZeRO-3 marks its parameters with a ds_id and their whole size: one still partitioned when read (here
    # as if it were: ds_numel larger than what it holds) is refused; one gathered (ds_numel = numel) is computed on
    partitioned = tiny_model("llama")
    partitioned.lm_head.weight.ds_id, partitioned.lm_head.weight.ds_numel = 7, 10**6
    with pytest.raises(TypeError, match=r"LlamaForCausalLM's head is partitioned by DeepSpeed ZeRO-3 .*1552 of its"):
        xent.hf.patch(partitioned)(input_ids=ids, labels=labels)
    partitioned.lm_head.weight.ds_numel = partitioned.lm_head.weight.numel()
    assert torch.isfinite(partitioned(input_ids=ids, labels=labels).loss)


@pytest.mark.parametrize("grad", [True, False], ids=["training step", "no_grad"])
def test_labels_of_another_shape_than_the_input_are_refused_with_both_shapes(grad):
    """(B, T, 1) labels were shifted along their last dimension: every label -100, loss 0 (NaN unpatched)."""
    patched, _ = pair("llama")
    ids, labels = batch()
    with torch.set_grad_enabled(grad):
        for bad in (labels[..., None], labels.reshape(-1), labels[:, :-1]):
            shown = re.escape(str(tuple(bad.shape)))
            with pytest.raises(ValueError, match=rf"labels has shape {shown} but input_ids has shape \(2, 32\)"):
                patched(input_ids=ids, labels=bad)
            with pytest.raises(ValueError, match=rf"shift_labels has shape {shown} but input_ids has shape"):
                patched(input_ids=ids, labels=labels, shift_labels=bad)
        embeds = patched.get_input_embeddings()(ids)
        with pytest.raises(
            ValueError, match=r"labels has shape \(2, 32, 1\) but inputs_embeds has shape \(2, 32, 16\)"
        ):
            patched(inputs_embeds=embeds, labels=labels[..., None])


def test_label_errors_name_labels_and_their_shape_not_the_flattened_target():
    patched, _ = pair("llama")
    ids, labels = batch()
    for bad in (labels.float(), labels > 5):
        with pytest.raises(
            TypeError, match=rf"labels of shape \(2, 32\) must hold token ids .* got {bad.dtype}"
        ) as error:
            patched(input_ids=ids, labels=bad)
        assert "target" not in str(error.value)
    with pytest.raises(ValueError, match=r"labels hold token id 97, outside \[0, 97\)") as error:
        patched(input_ids=ids, labels=labels.index_put((torch.tensor(1), torch.tensor(10)), torch.tensor(VOCAB)))
    assert "target" not in str(error.value)
    with pytest.raises(TypeError, match="labels must be a tensor"):
        patched(input_ids=ids, labels=labels.tolist())


def test_what_can_be_known_at_patch_time_is_refused_at_patch_time():
    marian = transformers.MarianForCausalLM(
        transformers.MarianConfig(
            vocab_size=VOCAB,
            d_model=16,
            decoder_layers=1,
            encoder_layers=1,
            decoder_attention_heads=2,
            encoder_attention_heads=2,
            decoder_ffn_dim=16,
            encoder_ffn_dim=16,
            pad_token_id=0,
            decoder_start_token_id=0,
        )
    )
    with pytest.raises(TypeError, match=r"MarianForCausalLM\.forward computes its loss itself"):
        xent.hf.patch(marian)
    assert not xent.hf.is_patched(marian)
    model = xent.hf.patch(tiny_model("llama"), z_loss=1e-3)
    with pytest.raises(ValueError, match=r"already patched by xent\.hf.*xent\.hf\.unpatch\(model\)"):
        xent.hf.patch(model, z_loss=1e-2)
    # a second model sharing the patched head would route its steps through the first one's patch
    twin = tiny_model("llama")
    twin.lm_head = model.lm_head
    with pytest.raises(ValueError, match="output embeddings are already patched"):
        xent.hf.patch(twin)
    xent.hf.unpatch(model)
    xent.hf.patch(model, z_loss=1e-2)  # patched again after unpatch


def test_bad_options_are_refused_at_patch_time():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="focal_loss has no option 'epsilon'"):
        xent.hf.patch(model, loss=xent.focal_loss, epsilon=1.0)
    with pytest.raises(ValueError, match="gamma"):
        xent.hf.patch(model, loss="focal_loss", gamma=-1.0)
    with pytest.raises(TypeError, match="ignore_index is the model's to set"):
        xent.hf.patch(model, ignore_index=0)
    with pytest.raises(TypeError, match="no fused linear form"):
        xent.hf.patch(model, loss=xent.binary_cross_entropy_with_logits)
    with pytest.raises(ValueError, match="chunk_size"):
        xent.hf.patch(model, chunk_size=0)
    assert not xent.hf.is_patched(model)
    gemma = xent.hf.patch(tiny_model("gemma2"), softcap=30.0)
    with pytest.raises(ValueError, match="would cap them twice"):
        gemma(*batch()[:1], labels=batch()[1])


def test_head_output_reads_scales_and_caps():
    head = torch.nn.Linear(4, 3, bias=False)
    start = xent.hf.HeadOutput("M", torch.zeros(2, 4), head)
    assert start.transform() == (1.0, None)
    assert (torch.tanh(start / 30.0) * 30.0).transform() == (1.0, 30.0)
    assert (2.0 * start.float() / 8.0).transform() == (0.25, None)
    scale, cap = (torch.tanh(start * 0.5) * 3.0).to(torch.float32).transform()
    assert (scale, cap) == (1.5, 3.0)  # 3·tanh(0.5 z) = 3·tanh(1.5 z / 3)
    for operation in (lambda x: x[..., :2], lambda x: torch.tanh(torch.tanh(x)), lambda x: x.softmax(-1)):
        with pytest.raises(TypeError, match="M applies"):
            operation(start).transform()


def test_trainer_with_gradient_accumulation_equals_unpatched(tmp_path):
    """Trainer passes num_items_in_batch (it reads the forward's signature) and the runs are the same."""

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            generator = torch.Generator().manual_seed(0)
            self.ids = torch.randint(3, VOCAB, (16, 12), generator=generator)
            self.lengths = torch.randint(3, 13, (16,), generator=generator)  # micro-batches of unequal token counts

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, index):
            return {
                "input_ids": self.ids[index],
                "labels": self.ids[index].masked_fill(torch.arange(12) >= self.lengths[index], -100),
            }

    def train(model):
        arguments = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=3,
            learning_rate=1e-2,
            optim="sgd",  # Adam would turn rounding-level differences of near-zero gradients into whole steps
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            logging_steps=1,
            seed=0,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=model, args=arguments, train_dataset=Tokens())
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    reference = tiny_model("llama")
    patched = xent.hf.patch(copy.deepcopy(reference))
    torch.testing.assert_close(train(patched), train(reference))
    for (name, parameter), expected in zip(patched.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(parameter, expected, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(("name", "backend"), [("llama", "inductor"), ("gemma2", "aot_eager")])
def test_torch_compile_of_the_patched_model(name, backend):
    """The patched model compiles as one graph — no break anywhere, the fused loss a custom operator inside it —
    and the compiled model (Inductor's code for one, AOTAutograd's graphs run eagerly for the other: seconds less)
    gives the unpatched model's loss and gradients."""
    torch._dynamo.reset()
    patched, reference = pair(name)
    ids, labels = batch()
    explained = torch._dynamo.explain(patched)(input_ids=ids, labels=labels)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    outputs = torch.compile(patched, fullgraph=True, backend=backend)(input_ids=ids, labels=labels)
    outputs.loss.backward()
    expected = reference(input_ids=ids, labels=labels).loss
    expected.backward()
    assert outputs.logits is None
    torch.testing.assert_close(outputs.loss, expected)
    assert_same_gradients(patched, reference)


def _ddp_worker(rank: int, world: int, store_path: str, results: str) -> None:
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.FileStore(store_path, world), rank=rank, world_size=world
    )
    model = xent.hf.patch(tiny_model("llama"), chunk_size=CHUNK)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ids, labels = batch(seed=rank)
    ddp(input_ids=ids, labels=labels).loss.backward()
    if rank == 0:
        torch.save({name: p.grad for name, p in model.named_parameters()}, results)
    # DDP's gradient all-reduces run Python callbacks on gloo's threads: let them finish before the group goes, or its
    # destruction can deadlock on the GIL; and DDP's reducer goes before the group does (freed when the worker
    # returned, after destroy_process_group, it hung one rank in 2 of 4 CI runs)
    torch.distributed.barrier()
    del ddp
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_averages_the_fused_gradients(tmp_path):
    world = 2
    results = str(tmp_path / "grads.pt")
    spawn_and_wait(_ddp_worker, (world, str(tmp_path / "store"), results), world)
    reference = tiny_model("llama")
    for rank in range(world):
        ids, labels = batch(seed=rank)
        (reference(input_ids=ids, labels=labels).loss / world).backward()
    grads = torch.load(results)
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_import_without_transformers_names_the_extra():
    script = "import sys\nsys.modules['transformers'] = None\ntry:\n import xent.hf\nexcept ImportError as e: print(e)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert 'pip install "xent[hf]"' in result.stdout


@pytest.mark.parametrize("precision", ["bfloat16 model", "autocast"])
def test_half_precision_gives_the_float32_loss_transformers_gives(precision):
    """transformers upcasts the logits and computes its loss in float32; so does the patched model, from a bf16 head
    (rounding of the head's products apart: ~1e-2 at bfloat16's 8 bits)."""
    patched, reference = pair("llama")
    ids, labels = batch()
    if precision == "bfloat16 model":
        patched, reference = patched.bfloat16(), reference.bfloat16()
        context = torch.autocast("cpu", enabled=False)
    else:
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    with context:
        loss = patched(input_ids=ids, labels=labels).loss
        expected = reference(input_ids=ids, labels=labels).loss
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    loss.backward(), expected.backward()
    head, reference_head = patched.get_output_embeddings().weight, reference.get_output_embeddings().weight
    assert head.grad.dtype == reference_head.grad.dtype
    torch.testing.assert_close(head.grad.float(), reference_head.grad.float(), rtol=0.05, atol=2e-3)
