"""Every ``*ForCausalLM`` of the installed transformers through xent.hf: patched exactly, or refused with a TypeError.

For each model class of transformers' causal-LM auto mapping, a tiny random config is built from the class's own
config with its sizes shrunk. The class is then

- ``exact``: the patched model's loss and every parameter's gradient equal the unpatched model's, with no logits;
- ``refused``: :func:`xent.hf.patch` or the patched forward raised TypeError (the message is reported);
- ``not built``: the tiny config, the model or its *unpatched* training step could not be made (nothing to compare);
- ``WRONG``: anything else — a different loss or gradient, or another error from the patched model. Exit status 1.

Run: ``python -m tests.integrations.hf_sweep [--verbose] [NAME ...]`` (CI runs it; it takes a few minutes).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections import Counter

import torch

VOCAB = 97
# Sizes of the tiny configs, by every name configs use for them.
TINY = {
    ("hidden_size", "n_embd", "d_model", "dim", "model_dim", "embed_dim"): 32,
    (
        "intermediate_size",
        "ffn_dim",
        "n_inner",
        "d_ff",
        "ffn_hidden_size",
        "mlp_dim",
        "decoder_ffn_dim",
        "encoder_ffn_dim",
    ): 64,
    ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers"): 2,
    ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads", "encoder_attention_heads"): 4,
    ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"): 2,
    ("head_dim", "kv_channels", "attention_head_size"): 8,
    ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"): 64,
    ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"): 4,
    ("num_experts_per_tok", "moe_topk", "top_k"): 2,
    ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"): 32,
    ("vocab_size",): VOCAB,
}
MAX_PARAMETERS = 10_000_000  # a config whose sizes go by names not in TINY stays big: not built
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_config(config_class: type) -> object:
    """``config_class`` with every size it names shrunk (see :data:`TINY`)."""
    defaults = config_class().to_dict()
    settings = {}
    for names, value in TINY.items():
        for name in names:
            if name in defaults and isinstance(defaults[name], int) and not isinstance(defaults[name], bool):
                settings[name] = value
    for name, value in SPECIAL_TOKENS.items():
        if name in defaults:
            settings[name] = value
    return config_class(**settings)


def training_step(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[object, torch.Tensor]:
    outputs = model(input_ids=ids, labels=labels)
    outputs.loss.backward()
    return outputs, outputs.loss.detach()


def check(model_class: type, config_class: type) -> tuple[str, str]:
    """(outcome, detail) for one class — see the module docstring."""
    import xent.hf

    try:
        config = tiny_config(config_class)
        with torch.device("meta"):
            size = sum(parameter.numel() for parameter in model_class(config).parameters())
        if size > MAX_PARAMETERS:
            return "not built", f"the tiny config still has {size:,} parameters"
        torch.manual_seed(0)
        reference = model_class(config).float().eval()
        patched = copy.deepcopy(reference)
        vocab = reference.get_output_embeddings().out_features if reference.get_output_embeddings() else VOCAB
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, min(vocab, VOCAB), (2, 12), generator=generator)
        labels = ids.masked_fill(torch.arange(12) < 3, -100)
        _, expected = training_step(reference, ids, labels)
    except Exception as error:
        return "not built", f"{type(error).__name__}: {str(error).splitlines()[0][:150] if str(error) else ''}"
    try:
        xent.hf.patch(patched, chunk_size=5)
        outputs, loss = training_step(patched, ids, labels)
    except TypeError as error:
        return "refused", str(error).splitlines()[0][:200]
    except Exception as error:
        return "WRONG", f"the patched model raised {type(error).__name__}: {error}"
    if outputs.logits is not None:
        return "WRONG", "the patched training step returned logits"
    if not torch.allclose(loss, expected, rtol=1e-4, atol=1e-6):
        return "WRONG", f"loss {float(loss)} instead of {float(expected)}"
    expected_grads = dict(reference.named_parameters())
    for name, parameter in patched.named_parameters():
        want = expected_grads[name].grad
        if (parameter.grad is None) != (want is None) or (
            want is not None and not torch.allclose(parameter.grad, want, rtol=1e-3, atol=1e-5)
        ):
            return "WRONG", f"gradient of {name} differs"
    return "exact", f"loss {float(loss):.4f}"


def causal_lm_classes(names: list[str]) -> list[tuple[str, type, type]]:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    classes = []
    for model_type, class_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        if names and model_type not in names and class_name not in names:
            continue
        try:
            classes.append((class_name, getattr(transformers, class_name), CONFIG_MAPPING[model_type]))
        except (AttributeError, ImportError, KeyError) as error:
            classes.append((class_name, None, error))
    return classes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="model types or class names (default: all)")
    parser.add_argument("--verbose", action="store_true", help="one line per class, not only the unusual ones")
    arguments = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    counts, start = Counter(), time.perf_counter()
    for class_name, model_class, config_class in causal_lm_classes(arguments.names):
        if model_class is None:
            outcome, detail = "not built", f"not importable: {config_class}"
        else:
            outcome, detail = check(model_class, config_class)
        counts[outcome] += 1
        if arguments.verbose or outcome in ("WRONG", "refused"):
            print(f"{outcome:9} {class_name}: {detail}", flush=True)
    total = sum(counts.values())
    print(
        f"transformers {transformers.__version__}: {total} causal-LM classes — {counts['exact']} patched exactly, "
        f"{counts['refused']} refused with TypeError, {counts['not built']} not built from a tiny config, "
        f"{counts['WRONG']} wrong ({time.perf_counter() - start:.0f} s)"
    )
    return 1 if counts["WRONG"] else 0


if __name__ == "__main__":
    sys.exit(main())
