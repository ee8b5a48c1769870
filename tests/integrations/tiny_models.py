"""Tiny random Hugging Face causal LMs for the tests: built from configs, nothing downloaded."""

from __future__ import annotations

import torch

VOCAB = 97  # no other dimension of the tiny models equals it
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# name → (config class name, model class name, config overrides): the models tested in detail
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 4, "final_logit_softcapping": 3.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True, "router_aux_loss_coef": 0.1},
    ),
}


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 tiny random model of the family ``name`` (see :data:`MODELS`), in eval mode (no dropout)."""
    import transformers

    config_name, model_name, extra = MODELS[name]
    config_class = getattr(transformers, config_name)
    settings = {**COMMON, **extra, **overrides}
    if name == "gpt2":
        settings = {
            key: value
            for key, value in settings.items()
            if key not in COMMON or key in ("vocab_size", "bos_token_id", "eos_token_id")
        }
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config_class(**settings))
    return model.float().eval()
