"""xent.trl on TRL's fused-LM-head trainers: a patched GRPO, RLOO, DPO, KTO or SFT trainer gives TRL's own loss, the
metrics TRL logs and every trainable parameter's gradient.

The reference is the same trainer unpatched: TRL 1.16 gives each of these trainers a fused LM head
(``trl.trainer.utils.add_fused_lm_head``, an instance ``forward`` on the policy and on the reference model) and
``xent.trl.patch`` replaces that forward with xent's. Each test runs one step of ``compute_loss`` and its backward on
a fixed batch, unpatched then patched, on the same trainer object. GRPO and RLOO take the batch their
``_generate_and_score_completions`` returns, built here with fixed completions and advantages (no generation); their
old and reference log-probabilities come from the trainer's own ``_get_per_token_logps_and_entropies``, as TRL computes
them, in each state. DPO, KTO and SFT take a batch of their own data collator over a tiny in-test dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import datasets
from trl import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)

import xent.trl
from tests.integrations.test_trl import _OwnHead, _ShiftedLogits, sharpened, tokenizer
from tests.integrations.tiny_models import VOCAB


@dataclass
class Step:
    """One ``compute_loss`` and backward: the loss, the metrics TRL logged, each trainable parameter's gradient."""

    loss: torch.Tensor
    metrics: dict[str, list[float]]
    gradients: dict[str, torch.Tensor]


def step(trainer, batch: dict, *, train: bool = True, **compute_loss_kwargs) -> Step:
    model = trainer.model
    model.train(train)
    model.zero_grad(set_to_none=True)
    mode = "train" if train else "eval"
    trainer._metrics[mode].clear()
    trainer._total_train_tokens = 0  # the running count behind DPO's, KTO's and SFT's num_tokens metric
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(batch), **compute_loss_kwargs)  # SFT writes into the dict it is given
    loss.backward()
    gradients = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    metrics = {name: list(values) for name, values in trainer._metrics[mode].items()}
    return Step(loss.detach(), metrics, gradients)


def assert_same_step(got: Step, expected: Step) -> None:
    assert expected.loss.abs() > 1e-3  # a loss worth comparing
    assert any(gradient.abs().max() > 0 for gradient in expected.gradients.values())
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-7)
    assert got.metrics.keys() == expected.metrics.keys()
    for name, values in got.metrics.items():
        assert values == pytest.approx(expected.metrics[name], rel=1e-5, abs=1e-6), name
    assert got.gradients.keys() == expected.gradients.keys()
    for name, gradient in got.gradients.items():
        scale = expected.gradients[name].abs().max().item()
        torch.testing.assert_close(gradient, expected.gradients[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def compare_patched_with_trl(
    trainer, batch: Callable[[], dict], *, chunk_size: int | None = None, **step_kwargs
) -> Step:
    """Run a step of the trainer, patch it, and assert that the same step patched equals it; returns TRL's step.

    ``batch()`` is called in each state: GRPO's and RLOO's batches hold log-probabilities of the fused forwards
    (the policy's old ones, the reference model's), which must agree too.
    """
    expected_batch = batch()
    expected = step(trainer, expected_batch, **step_kwargs)
    assert xent.trl.patch(trainer, chunk_size=chunk_size) is trainer and xent.trl.is_patched(trainer)
    got_batch = batch()
    assert got_batch.keys() == expected_batch.keys()
    for key, value in got_batch.items():
        torch.testing.assert_close(value, expected_batch[key], rtol=1e-5, atol=1e-5, msg=key)
    assert_same_step(step(trainer, got_batch, **step_kwargs), expected)
    return expected


def common(tmp_path) -> dict:
    return {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True, "bf16": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(name)``: the directory of a saved tiny model of the family ``name`` (another seed than the
    policies'), from which GRPO and RLOO load their reference model (the policy's ``name_or_path``)."""
    saved = {}

    def path(name: str) -> str:
        if name not in saved:
            saved[name] = tmp_path_factory.mktemp(name)
            sharpened(name, seed=1).save_pretrained(saved[name])
        return str(saved[name])

    return path


def policy(name: str, reference: str | None = None) -> torch.nn.Module:
    model = sharpened(name, seed=0)
    if reference is not None:
        model.config._name_or_path = reference  # where TRL's GRPO and RLOO load the reference model from
    return model


# --------------------------------------------------------------------------------------------------- GRPO and RLOO

PROMPT_IDS = torch.tensor([[0, 0, 5, 9], [0, 7, 3, 11], [4, 8, 6, 13], [0, 0, 21, 17]])  # left-padded
COMPLETION_IDS = torch.tensor([[31, 40, 2, 0], [52, 60, 71, 2], [80, 14, 25, 36], [47, 2, 0, 0]])
COMPLETION_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
ADVANTAGES = torch.tensor([1.2, -0.7, 0.4, -1.5])  # not zero-mean: the on-policy GRPO loss is then not ~0
# Added to the policy's log-probabilities to make the old ones (an earlier policy's), so that the importance ratios
# are not 1 and some are clipped.
OLD_POLICY_OFFSET = 0.4 * torch.randn(COMPLETION_IDS.shape, generator=torch.Generator().manual_seed(1))


def completions() -> dict[str, torch.Tensor]:
    return {
        "prompt_ids": PROMPT_IDS,
        "prompt_mask": (PROMPT_IDS != 0).long(),
        "completion_ids": COMPLETION_IDS,
        "completion_mask": COMPLETION_MASK,
    }


def per_token_logps(trainer, model: torch.nn.Module) -> torch.Tensor:
    """The completions' per-token log-probabilities under ``model`` (the policy or the reference model), as
    ``_generate_and_score_completions`` computes them: the trainer's own method, no gradient."""
    batch = completions()
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, batch["completion_ids"].size(1)
        )
    return logps


def grpo_rollout(trainer, *, off_policy: bool = True) -> dict:
    """The batch GRPO's ``_generate_and_score_completions`` returns, generation bypassed: fixed completions and
    advantages; old log-probabilities when ``off_policy`` (else TRL takes the policy's, detached), the reference
    model's when ``beta > 0``."""
    batch = {**completions(), "advantages": ADVANTAGES, "num_items_in_batch": torch.tensor(23.0)}  # > these 13
    if off_policy:
        batch["old_per_token_logps"] = (per_token_logps(trainer, trainer.model) + OLD_POLICY_OFFSET) * COMPLETION_MASK
    if trainer.beta != 0.0:
        batch["ref_per_token_logps"] = per_token_logps(trainer, trainer.ref_model)
    return batch


def rloo_rollout(trainer) -> dict:
    """The batch RLOO's ``_generate_and_score_completions`` returns, generation bypassed: the sequences' old
    log-probabilities (offset as GRPO's), the advantages less beta times the sequences' KL to the reference model
    (RLOO's KL penalty in the rewards)."""
    logps = per_token_logps(trainer, trainer.model)
    kl = ((logps - per_token_logps(trainer, trainer.ref_model)) * COMPLETION_MASK).sum(-1)
    old_logps = ((logps + OLD_POLICY_OFFSET) * COMPLETION_MASK).sum(-1)
    return {**completions(), "old_logps": old_logps, "advantages": ADVANTAGES - trainer.beta * kl}


def rl_trainer(tmp_path, trainer_class, config_class, model: torch.nn.Module, **config):
    args = config_class(
        **common(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=COMPLETION_IDS.size(1),
        temperature=0.7,  # the sampling temperature, which the fused heads divide the logits by
        **config,
    )
    trainer = trainer_class(
        model=model,
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["t3 t4"] * 4}),
        processing_class=tokenizer(),
    )
    trainer.current_gradient_accumulation_steps = 2  # as the training loop sets it
    return trainer


GRPO_LOSSES = {
    "grpo": {"loss_type": "grpo"},
    "dapo": {"loss_type": "dapo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "bnpo": {"loss_type": "bnpo"},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.1},
    "sapo": {"loss_type": "sapo"},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    "entropy-bonus": {"loss_type": "dapo", "entropy_coef": 0.05, "top_entropy_quantile": 0.5},
}


@pytest.mark.parametrize("case", list(GRPO_LOSSES))
def test_grpo_losses(tmp_path, case):
    """Each loss type, GSPO's sequence-level ratios, the entropy bonus on the top-entropy tokens, at a temperature
    other than 1 and with ratios some of which are clipped: loss, entropy and clip-ratio metrics, gradients."""
    trainer = rl_trainer(tmp_path, GRPOTrainer, GRPOConfig, policy("llama"), **GRPO_LOSSES[case])
    expected = compare_patched_with_trl(trainer, lambda: grpo_rollout(trainer))
    clipped = expected.metrics.get("clip_ratio/region_mean", expected.metrics.get("cispo_clip_ratio"))
    if clipped is not None:
        assert 0.0 < clipped[0] < 1.0


def test_grpo_on_policy(tmp_path):
    """No old log-probabilities: TRL takes the policy's, detached (ratios 1, the gradient the policy gradient's)."""
    trainer = rl_trainer(tmp_path, GRPOTrainer, GRPOConfig, policy("llama"), loss_type="grpo")
    compare_patched_with_trl(trainer, lambda: grpo_rollout(trainer, off_policy=False))


def test_grpo_evaluation(tmp_path):
    """Evaluation mode: no accumulation, the generation batch's token count unscaled."""
    trainer = rl_trainer(tmp_path, GRPOTrainer, GRPOConfig, policy("llama"), loss_type="dapo")
    compare_patched_with_trl(trainer, lambda: grpo_rollout(trainer), train=False)


@pytest.mark.parametrize("name", ["llama", "gemma2", "cohere", "granite", "mixtral"])
def test_grpo_kl_to_reference_model(tmp_path, checkpoint, name):
    """beta > 0: the reference model's log-probabilities (its own fused forward) and the KL metric; Gemma 2's soft
    cap, Cohere's and Granite's logit scales, Mixtral's router auxiliary loss."""
    model = policy(name, reference=checkpoint(name))
    trainer = rl_trainer(tmp_path, GRPOTrainer, GRPOConfig, model, loss_type="grpo", beta=0.1)
    assert trainer.ref_model is not None
    expected = compare_patched_with_trl(trainer, lambda: grpo_rollout(trainer), chunk_size=5)  # several chunks
    assert expected.metrics["kl"][0] > 1e-3
    if name == "mixtral":
        assert expected.metrics["aux_loss"][0] > 0


def test_rloo(tmp_path, checkpoint):
    """RLOO's sequence-level ratios, its KL penalty in the rewards from the reference model's log-probabilities."""
    model = policy("qwen2", reference=checkpoint("qwen2"))
    trainer = rl_trainer(tmp_path, RLOOTrainer, RLOOConfig, model, beta=0.05)
    expected = compare_patched_with_trl(trainer, lambda: rloo_rollout(trainer))
    assert 0.0 < expected.metrics["clip_ratio/region_mean"][0] < 1.0


# ----------------------------------------------------------------------------------------------- DPO, KTO and SFT


def greedy(model: torch.nn.Module, prompt: str, length: int = 3) -> str:
    """A completion of the model's own top-1 tokens (special tokens left out), so that mean_token_accuracy, the
    fraction of completion tokens that are the most likely, is neither 0 nor 1 over a batch mixing it with others."""
    ids = tokenizer()(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(length):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1, 3:].argmax()) + 3)
    return "".join(f" t{token}" for token in ids[-length:])


def collated(trainer) -> dict:
    """The trainer's data collator over its (tokenized) training set, as one batch."""
    return trainer.data_collator([trainer.train_dataset[index] for index in range(len(trainer.train_dataset))])


def dpo_trainer(tmp_path, name: str, *, ref_model=None, peft_config=None, **config) -> DPOTrainer:
    model = policy(name)
    preferences = {
        "prompt": ["t3 t4 t5", "t9 t8"],
        "chosen": [greedy(model, "t3 t4 t5"), " t20 t21"],
        "rejected": [" t30 t31", " t40 t41 t42 t43"],
    }
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=DPOConfig(**common(tmp_path), per_device_train_batch_size=2, beta=0.5, **config),
        train_dataset=datasets.Dataset.from_dict(preferences),
        processing_class=tokenizer(),
        peft_config=peft_config,
    )


DPO_CASES = {
    "sigmoid": ("llama", {"loss_type": ["sigmoid"]}),
    "ipo": ("granite", {"loss_type": ["ipo"]}),
    "sigmoid+sft": ("cohere", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
    "wpo": ("gemma2", {"loss_type": ["sigmoid"], "use_weighting": True}),
}


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo(tmp_path, case):
    """DPO's losses against a reference model (its own fused forward), WPO's weights (log_sum_sq_probs); the metrics
    logits/chosen (mean_logits), mean_token_accuracy (is_top1), entropy, rewards and log-probabilities."""
    name, config = DPO_CASES[case]
    trainer = dpo_trainer(tmp_path, name, ref_model=sharpened(name, seed=1), **config)
    expected = compare_patched_with_trl(trainer, lambda: collated(trainer), chunk_size=5)  # several chunks
    assert 0.0 < expected.metrics["mean_token_accuracy"][0] < 1.0


def test_dpo_peft_reference_is_the_base_model(tmp_path):
    """A LoRA policy without a reference model: the reference is the policy with its adapters disabled; the fused
    forward is its base model's."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = dpo_trainer(tmp_path, "llama", peft_config=config, loss_type=["sigmoid"])
    assert trainer.ref_model is None
    expected = compare_patched_with_trl(trainer, lambda: collated(trainer))
    assert expected.gradients and all("lora_" in name for name in expected.gradients)


def test_kto(tmp_path):
    """KTO with its KL estimate (mismatched completions, through both models' fused forwards)."""
    data = {
        "prompt": ["t3 t4 t5", "t9 t8", "t6 t7", "t15 t16 t17"],
        "completion": [" t10 t11 t12", " t20 t21", " t30 t31 t32 t33", " t40"],
        "label": [True, False, True, False],
    }
    trainer = KTOTrainer(
        model=policy("llama"),
        ref_model=sharpened("llama", seed=3),  # one whose KL estimate is positive on these (TRL clamps it at 0)
        args=KTOConfig(**common(tmp_path), per_device_train_batch_size=4, beta=0.5),
        train_dataset=datasets.Dataset.from_dict(data),
        processing_class=tokenizer(),
    )
    expected = compare_patched_with_trl(trainer, lambda: collated(trainer))
    assert expected.metrics["kl"][0] > 0


def sft_trainer(tmp_path, name: str = "llama", *, model=None, **config) -> SFTTrainer:
    model = policy(name) if model is None else model
    data = {
        "prompt": ["t3 t4 t5", "t9 t8", "t6 t7 t50"],
        "completion": [" t10 t11 t12", greedy(model, "t9 t8"), " t30 t31 t32"],
    }
    return SFTTrainer(
        model=model,
        args=SFTConfig(**common(tmp_path), per_device_train_batch_size=3, **config),
        train_dataset=datasets.Dataset.from_dict(data),
        processing_class=tokenizer(),
    )


@pytest.mark.parametrize(
    ("name", "config", "num_items_in_batch"),
    [
        ("llama", {}, None),
        ("gemma2", {}, torch.tensor(19)),
        ("llama", {"loss_type": "dft"}, torch.tensor(19)),
        ("mixtral", {}, torch.tensor(19)),
    ],
    ids=["nll-mean", "nll-num_items_in_batch-gemma2", "dft", "mixtral-aux_loss"],
)
def test_sft(tmp_path, name, config, num_items_in_batch):
    """SFT on the completions only: the NLL (its mean, or its sum over num_items_in_batch), DFT's weighted NLL,
    Mixtral's router auxiliary loss; the metrics entropy and mean_token_accuracy (is_top1)."""
    trainer = sft_trainer(tmp_path, name, **config)
    trainer.current_gradient_accumulation_steps = 2  # as the training loop sets it
    assert (collated(trainer)["labels"] == -100).any()  # the prompts are not learned
    expected = compare_patched_with_trl(trainer, lambda: collated(trainer), num_items_in_batch=num_items_in_batch)
    assert 0.0 < expected.metrics["mean_token_accuracy"][0] < 1.0
    if name == "mixtral":
        assert expected.metrics["aux_loss"][0] > 0


# ------------------------------------------------------------------------------------------- the forward itself


@pytest.mark.parametrize("name", ["llama", "gemma2", "cohere", "granite", "mixtral"])
def test_fused_forward_outputs(tmp_path, name):
    """The policy's forward as TRL's trainers and their parallel paths call it: every field of FusedCausalLMOutput
    that TRL's returns (DPO with WPO asks for all of them), its loss over num_items_in_batch (plus Mixtral's router
    auxiliary loss), labels to shift or pre-shifted shift_labels (context and sequence parallelism); without
    fused_lm_head=True, the model's own forward (generation)."""
    config = {"loss_type": ["sigmoid"], "use_weighting": True}
    trainer = dpo_trainer(tmp_path, name, ref_model=sharpened(name, seed=1), **config)
    model = trainer.model
    batch = collated(trainer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    calls = {
        "labels": {"labels": labels},
        "num_items_in_batch": {"labels": labels, "num_items_in_batch": torch.tensor(31)},
        "shift_labels": {"shift_labels": torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)},
    }

    def forwards() -> dict:
        with torch.no_grad():
            fused = {call: model(**inputs, **kwargs, fused_lm_head=True) for call, kwargs in calls.items()}
            return {**fused, "logits": model(**inputs).logits}

    expected = forwards()
    xent.trl.patch(trainer)
    got = forwards()
    torch.testing.assert_close(got.pop("logits"), expected.pop("logits"), rtol=0, atol=0)
    for call, output in expected.items():
        fields = {field: value for field, value in output.items() if value is not None}
        assert fields.keys() >= {"loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"}
        assert ("aux_loss" in fields) == (name == "mixtral")
        for field, value in fields.items():
            torch.testing.assert_close(got[call][field], value, rtol=1e-5, atol=1e-5, msg=f"{call}: {field}")


# ------------------------------------------------------------------------------------------ unpatch and refusals


def instance_forwards(trainer) -> list:
    """The functions of the instance forwards TRL gave the policy (its base model under PEFT) and the reference
    model: its fused LM head."""
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    models = [model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    forwards = [vars(model)["forward"] for model in models]
    return [getattr(forward, "__func__", forward) for forward in forwards]


def test_unpatch_restores_trl_forwards(tmp_path):
    trainer = dpo_trainer(tmp_path, "llama", ref_model=sharpened("llama", seed=1), loss_type=["sigmoid"])
    trl_forwards = instance_forwards(trainer)
    batch = collated(trainer)
    expected = step(trainer, batch)

    xent.trl.patch(trainer)
    assert all(patched is not trl for patched, trl in zip(instance_forwards(trainer), trl_forwards, strict=True))
    assert xent.trl.unpatch(trainer) is trainer and not xent.trl.is_patched(trainer)
    assert all(restored is trl for restored, trl in zip(instance_forwards(trainer), trl_forwards, strict=True))

    got = step(trainer, batch)
    assert torch.equal(got.loss, expected.loss)
    assert got.metrics == expected.metrics
    assert all(torch.equal(got.gradients[name], gradient) for name, gradient in expected.gradients.items())


def test_refusals(tmp_path):
    with pytest.raises(TypeError, match="object"):
        xent.trl.patch(object())
    trainer = sft_trainer(tmp_path)
    with pytest.raises(ValueError, match="not patched"):
        xent.trl.unpatch(trainer)
    xent.trl.patch(trainer)
    with pytest.raises(ValueError, match="already patched"):
        xent.trl.patch(trainer)
    with pytest.raises(ValueError, match=r"impl='chunked' selects the distillation kernel"):
        xent.trl.patch(sft_trainer(tmp_path), impl="chunked")

    unbuilt = sft_trainer(tmp_path)
    del vars(unbuilt.model)["forward"]  # as if TRL had not given it its fused head
    with pytest.raises(TypeError, match=r"LlamaForCausalLM of this SFTTrainer has no fused LM head of TRL's"):
        xent.trl.patch(unbuilt)

    own_head = sft_trainer(tmp_path)
    own_head.model.lm_head = _OwnHead(16, VOCAB, bias=False)
    with pytest.raises(TypeError, match=r"LlamaForCausalLM has output embeddings of type .*_OwnHead"):
        xent.trl.patch(own_head)


def test_refusals_at_step(tmp_path):
    """A forward that does something to its logits besides scales and tanh soft caps is refused by name when a
    step runs, never computed wrong."""
    model = policy("llama")
    model.__class__ = _ShiftedLogits  # a LlamaForCausalLM whose forward adds 1 to its logits
    trainer = sft_trainer(tmp_path, model=model)
    batch = collated(trainer)
    xent.trl.patch(trainer)
    with pytest.raises(TypeError, match=r"_ShiftedLogits applies an addition to its logits"):
        step(trainer, batch)
