"""xent.trl: a patched TRL DistillationTrainer gives TRL's own loss, entropy metric and every student gradient.

The reference is the same trainer unpatched — TRL 1.16's ``_compute_loss`` on its ``ChunkedDivergenceFunction`` —
run on the same fixed batch (generation bypassed: the batch is what ``_compute_loss`` takes after it).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DistillationConfig
from trl.trainer.distillation_trainer import DistillationTrainer

import xent.hf
import xent.trl
from tests.integrations.tiny_models import VOCAB, tiny_model

# (student, teacher): the teacher of another width, and of another family; the second pair with Gemma 2's soft cap
# on the student and Cohere's logit scale on the teacher, the third with Granite's division of the logits.
PAIRS = {
    "llama<-qwen2": (("llama", {}), ("qwen2", {"hidden_size": 32, "intermediate_size": 48})),
    "gemma2<-cohere": (("gemma2", {}), ("cohere", {"hidden_size": 24, "intermediate_size": 48})),
    "granite<-llama": (("granite", {}), ("llama", {"hidden_size": 32, "intermediate_size": 48})),
}
HEAD_GAIN = 12.0  # sharpens the tiny random models' near-uniform distributions, so the divergences are not ~0


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the tiny models' vocabulary (``t3`` … ``t96``), built here: nothing downloaded."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


def sharpened(name: str, seed: int, **overrides) -> torch.nn.Module:
    model = tiny_model(name, seed=seed, **overrides)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_GAIN)
    return model


def trainer(
    tmp_path, pair="llama<-qwen2", *, beta=0.5, temperature=2.0, student=None, teacher=None, peft_config=None, **config
):
    (student_name, student_options), (teacher_name, teacher_options) = PAIRS[pair]
    args = DistillationConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        bf16=False,
        beta=beta,
        temperature=temperature,
        max_completion_length=6,
        per_device_train_batch_size=2,
        **config,
    )
    return DistillationTrainer(
        model=student if student is not None else sharpened(student_name, 0, **student_options),
        teacher_model=teacher if teacher is not None else sharpened(teacher_name, 1, **teacher_options),
        args=args,
        processing_class=tokenizer(),
        peft_config=peft_config,
    )


def inputs(tool_mask: bool = False) -> dict[str, torch.Tensor]:
    """A batch as ``_compute_loss`` takes it: left-padded prompts, completions padded on the right."""
    generator = torch.Generator().manual_seed(0)
    batch = {
        "prompt_ids": torch.randint(3, VOCAB, (3, 5), generator=generator),
        "prompt_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]),
        "completion_ids": torch.randint(3, VOCAB, (3, 6), generator=generator),
        "completion_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]),
        "num_items_in_batch": torch.tensor(17.0),  # the accumulated batch's tokens: more than this batch's 13
    }
    if tool_mask:
        batch["tool_mask"] = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return batch


def step(trainer, batch, train: bool = True) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """``compute_loss`` and its backward: (loss, the entropy metric logged, each student parameter's gradient)."""
    model = trainer.model
    model.train(train)
    model.zero_grad(set_to_none=True)
    mode = "train" if train else "eval"
    trainer._metrics[mode].clear()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    gradients = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    return loss.detach(), trainer._metrics[mode]["entropy"][-1], gradients


def assert_same_step(got, expected) -> None:
    loss, entropy, gradients = got
    expected_loss, expected_entropy, expected_gradients = expected
    assert expected_loss > 1e-3  # a divergence worth comparing
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-7)
    assert entropy == pytest.approx(expected_entropy, rel=1e-5)
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in gradients.items():
        scale = expected_gradients[name].abs().max().item()
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5, 0.2])
def test_patched_step_equals_trl(tmp_path, pair, beta):
    """Loss, entropy metric and every student gradient equal TRL's own (float32 rounding), for TRL's forward KL
    (beta 0), reverse KL (1) and JSDs, at a temperature other than 1; the scale and cap read from the forwards."""
    distiller = trainer(tmp_path, pair, beta=beta, temperature=2.0)
    batch = inputs()
    expected = step(distiller, batch)
    xent.trl.patch(distiller, chunk_size=5)
    assert_same_step(step(distiller, batch), expected)


@pytest.mark.parametrize("train", [True, False], ids=["sum/num_items_in_batch", "mean"])
def test_reductions_and_tool_mask_equal_trl(tmp_path, train):
    """Training divides the sum by TRL's num_items_in_batch; evaluation takes the mean over the kept tokens; the
    tool mask leaves tokens out as TRL does."""
    distiller = trainer(tmp_path, beta=0.5, temperature=0.7)
    batch = inputs(tool_mask=True)
    expected = step(distiller, batch, train)
    xent.trl.patch(distiller)
    assert_same_step(step(distiller, batch, train), expected)


def test_head_with_a_bias_and_a_student_patched_by_xent_hf(tmp_path):
    """A student head with a bias; a student that xent.hf.patch fuses for its own training loss is read alike."""
    student = sharpened("llama", 0)
    head = torch.nn.Linear(16, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(student.lm_head.weight)
        head.bias.normal_(0.0, 2.0)
    student.lm_head = head
    distiller = trainer(tmp_path, beta=0.0, student=student)
    batch = inputs()
    expected = step(distiller, batch)
    xent.hf.patch(distiller.model)
    xent.trl.patch(distiller)
    assert_same_step(step(distiller, batch), expected)
    assert "bias" in " ".join(expected[2])


def test_peft_student(tmp_path):
    """A LoRA student (adapters in the backbone, as TRL allows): its base model runs, the adapters get TRL's
    gradients."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    distiller = trainer(tmp_path, beta=0.5, peft_config=config)
    batch = inputs()
    expected = step(distiller, batch)
    assert any("lora_A" in name for name in expected[2])
    xent.trl.patch(distiller)
    assert_same_step(step(distiller, batch), expected)


def test_unpatch_restores_trl_loss(tmp_path):
    distiller = trainer(tmp_path, beta=1.0)
    batch = inputs()
    expected = step(distiller, batch)
    assert xent.trl.unpatch(xent.trl.patch(distiller)) is distiller
    assert not xent.trl.is_patched(distiller) and "_compute_loss" not in vars(distiller)
    assert distiller._compute_loss.__func__ is DistillationTrainer._compute_loss
    got = step(distiller, batch)
    assert torch.equal(got[0], expected[0])
    assert all(torch.equal(got[2][name], gradient) for name, gradient in expected[2].items())


def test_training_steps_run_patched(tmp_path):
    """The whole loop: on-policy generation by the tiny student, then patched steps; TRL logs loss and entropy."""
    datasets = pytest.importorskip("datasets")
    prompts = datasets.Dataset.from_dict({"prompt": ["t3 t4 t5", "t9 t8", "t10 t11 t12 t13", "t20"]})
    distiller = trainer(tmp_path, max_steps=2, logging_steps=1, save_strategy="no")
    distiller.train_dataset = prompts
    xent.trl.patch(distiller)
    distiller.train()
    logged = [entry for entry in distiller.state.log_history if "loss" in entry]
    assert len(logged) == 2
    assert all(torch.isfinite(torch.tensor([entry["loss"], entry["entropy"]])).all() for entry in logged)


@pytest.mark.parametrize(
    ("beta", "expected"),
    [(0.0, ("forward_kl", None)), (1.0, ("reverse_kl", None)), (0.5, ("jsd", 0.5)), (0.1, ("jsd", 0.1))],
)
def test_divergence_from_beta(beta, expected):
    assert xent.trl.divergence_from_beta(beta) == expected


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_divergence_from_beta_refuses_beta_outside_0_1(beta):
    with pytest.raises(ValueError, match="beta must"):
        xent.trl.divergence_from_beta(beta)


class _OwnLoss(DistillationTrainer):
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        raise NotImplementedError


class _ShiftedLogits(LlamaForCausalLM):
    """A model that adds something to its logits: no scale or soft cap."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.logits = outputs.logits + 1.0
        return outputs


class _OwnHead(torch.nn.Linear):
    def forward(self, input):
        return super().forward(input) * 2


def test_refusals_at_patch(tmp_path):
    with pytest.raises(TypeError, match=r"takes a TRL GRPOTrainer, .* or DistillationTrainer, got Linear"):
        xent.trl.patch(torch.nn.Linear(2, 2))
    distiller = trainer(tmp_path)
    with pytest.raises(ValueError, match=r"not patched by xent\.trl"):
        xent.trl.unpatch(distiller)
    xent.trl.patch(distiller)
    with pytest.raises(ValueError, match=r"already patched by xent\.trl"):
        xent.trl.patch(distiller)
    with pytest.raises(ValueError, match="chunk_size"):
        xent.trl.patch(trainer(tmp_path), chunk_size=0)
    with pytest.raises(ValueError, match="impl"):
        xent.trl.patch(trainer(tmp_path), impl="fast")

    own = trainer(tmp_path)
    own.__class__ = _OwnLoss
    with pytest.raises(TypeError, match=r"_OwnLoss replaces DistillationTrainer._compute_loss"):
        xent.trl.patch(own)

    no_teacher = trainer(tmp_path)
    no_teacher.teacher_model = None
    with pytest.raises(ValueError, match="no local teacher model"):
        xent.trl.patch(no_teacher)

    teacher = tiny_model("qwen2", seed=1)
    teacher.lm_head = _OwnHead(16, VOCAB, bias=False)
    with pytest.raises(TypeError, match=r"the teacher Qwen2ForCausalLM has output embeddings of type .*_OwnHead"):
        xent.trl.patch(trainer(tmp_path, teacher=teacher))


def test_refusals_at_step(tmp_path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4
    )
    distiller = xent.trl.patch(trainer(tmp_path, teacher=_ShiftedLogits(config).eval()))
    with pytest.raises(TypeError, match=r"_ShiftedLogits applies an addition to its logits .*xent\.trl\.unpatch"):
        distiller.compute_loss(distiller.model, inputs())

    distiller = xent.trl.patch(trainer(tmp_path))
    distiller.beta = 1.5  # DistillationConfig checks its beta; the trainer's attribute is read at each step
    with pytest.raises(ValueError, match=r"TRL's beta must be in \[0, 1\]"):
        distiller.compute_loss(distiller.model, inputs())
