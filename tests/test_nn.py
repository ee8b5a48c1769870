"""The modules (xent.nn): each one's forward is its function with the options it stores (buffers for tensors, in its
repr), and a module refuses bad options when it is constructed, with its function's message. The modules of the
fused family are read from the registry (xent.losses.family.FAMILY)."""

import pytest
import torch

import xent
from tests import family_samples
from tests.conftest import assert_close
from tests.losses.formulas import C, problem
from xent.losses.family import FAMILY


def _counts_as_a_list(options):
    """The same options with the class counts given as a list, as a module also accepts them."""
    if "class_counts" not in options:
        return None
    return {**options, "class_counts": options["class_counts"].tolist()}


@pytest.mark.parametrize(("name", "index"), family_samples.cases())
def test_modules_equal_functionals(name, index):
    entry = FAMILY[name]
    logits, target = problem(dtype=torch.float32)
    sample = family_samples.sample(name, index, C)
    for options in filter(None, (sample, _counts_as_a_list(sample))):
        loss_fn = entry.module(**options)
        assert type(loss_fn).function is entry.function
        assert torch.equal(loss_fn(logits, target), entry.function(logits, target, **options))
        for key in ("class_counts", "alpha"):
            if isinstance(options.get(key), (torch.Tensor, list)):
                assert key in dict(loss_fn.named_buffers())


def test_other_modules_equal_functionals():
    student = torch.randn(4, 5)
    teacher = torch.randn(4, 5)
    assert torch.equal(
        xent.nn.DistillationLoss(temperature=2.0)(student, teacher),
        xent.distillation_loss(student, teacher, temperature=2.0),
    )
    binary, target = torch.randn(4, 3), torch.rand(4, 3)
    assert torch.equal(
        xent.nn.SigmoidFocalLoss(gamma=1.0)(binary, target), xent.sigmoid_focal_loss(binary, target, gamma=1.0)
    )
    assert torch.equal(
        xent.nn.GANDiscriminatorLoss(0.1)(binary, student),
        xent.gan_discriminator_loss(binary, student, label_smoothing=0.1),
    )
    assert torch.equal(xent.nn.GANGeneratorLoss()(binary), xent.gan_generator_loss(binary))
    mu, logvar = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.equal(
        xent.nn.VAELoss(beta=2.0)(binary, target, mu, logvar), xent.vae_loss(binary, target, mu, logvar, beta=2.0)
    )
    assert "temperature=2.0" in repr(xent.nn.DistillationLoss(temperature=2.0))


def test_cross_entropy_module_equals_functional_and_stores_its_options():
    weight = torch.rand(7) + 0.5
    module = xent.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=20.0, ignore_index=2)
    logits = (torch.randn(13, 7, dtype=torch.float64) * 3).float().requires_grad_()
    target = torch.randint(7, (13,))
    expected = xent.cross_entropy(
        logits, target, weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=20.0, ignore_index=2
    )
    assert torch.equal(module(logits, target), expected)
    assert "weight" in dict(module.named_buffers())
    assert module.to(torch.float64).weight.dtype == torch.float64
    assert "label_smoothing=0.1" in repr(module) and "softcap=20.0" in repr(module)


def test_binary_modules_equal_functionals():
    logits = (torch.randn((6, 5), dtype=torch.float64) * 4).float().requires_grad_()
    target = torch.rand((6, 5), dtype=torch.float32)
    target[0] = target[0].round()  # hard labels too
    pos_weight, weight = torch.rand(5) * 2, torch.rand(5)
    module = xent.nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight, label_smoothing=0.1, reduction="sum")
    expected = xent.binary_cross_entropy_with_logits(
        logits, target, weight=weight, pos_weight=pos_weight, label_smoothing=0.1, reduction="sum"
    )
    assert torch.equal(module(logits, target), expected)
    probs = torch.sigmoid(logits.detach())
    assert torch.equal(
        xent.nn.BCELoss(weight=weight)(probs, target), xent.binary_cross_entropy(probs, target, weight=weight)
    )
    assert set(dict(module.named_buffers())) == {"weight", "pos_weight"}


def test_linear_cross_entropy_module_equals_functional():
    n, d, v = 23, 6, 13
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64).float()
    w = (torch.randn(v, d, generator=generator, dtype=torch.float64) * 0.7).float()
    b = torch.randn(v, generator=generator, dtype=torch.float64).float()
    target = torch.randint(v, (n,), generator=generator)
    target[::4] = -100
    module = xent.nn.LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, chunk_size=5)
    expected = xent.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1, z_loss=1e-3, chunk_size=5)
    assert torch.equal(module(x, w, target, b), expected)
    assert "z_loss=0.001" in repr(module)


def test_linear_loss_module():
    tensors = family_samples.head_problem(torch.float64)
    del tensors["token_weight"]
    criterion = xent.nn.LinearLoss(xent.focal_loss, gamma=1.5, weight=tensors.pop("weight"), chunk_size=3)
    assert "focal_loss" in repr(criterion) and "gamma=1.5" in repr(criterion)
    assert "weight" in dict(criterion.named_buffers())
    expected = xent.linear_loss("focal_loss", **tensors, gamma=1.5, weight=criterion.options["weight"])
    assert_close(criterion(tensors["input"], tensors["linear_weight"], tensors["target"], tensors["linear_bias"]),
                 expected)  # fmt: skip
    with pytest.raises(ValueError, match="gamma must be in"):
        xent.nn.LinearLoss("focal_loss", gamma=-1.0)


# --- options refused at construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "kwargs", "match"),
    [
        (xent.nn.CrossEntropyLoss, {"reduction": "avg"}, "reduction must be one of"),
        (xent.nn.CrossEntropyLoss, {"z_loss": -1.0}, "z_loss must be in"),
        (xent.nn.BCEWithLogitsLoss, {"label_smoothing": 3.0}, "label_smoothing must be in"),
        (xent.nn.BCELoss, {"reduction": None}, "reduction must be one of"),
        # every described loss: its own options, with the function's message, before the first call
        (xent.nn.FocalLoss, {"gamma": -1.0}, r"gamma must be in \[0, inf\], got -1"),
        (xent.nn.FocalLoss, {"reduction": "avg"}, "reduction must be one of"),
        (xent.nn.Poly1CrossEntropyLoss, {"epsilon": -2.0}, "epsilon must be in"),
        (xent.nn.GeneralizedCrossEntropyLoss, {"q": 2.0}, "q must be in"),
        (xent.nn.SymmetricCrossEntropyLoss, {"log_zero": 1.0}, "log_zero must be in"),
        (xent.nn.LogitAdjustedCrossEntropyLoss, {"class_counts": [3, 0, 1]}, "class_counts must be positive"),
        (xent.nn.BalancedSoftmaxCrossEntropyLoss, {"class_counts": [3, 1], "label_smoothing": 2.0}, "label_smoothing"),
        (xent.nn.LDAMLoss, {"class_counts": [3, 1], "scale": 0.0}, "scale must be in"),
        (xent.nn.LinearCrossEntropyLoss, {"label_smoothing": 2.0}, "label_smoothing must be in"),
        (xent.nn.LinearCrossEntropyLoss, {"reduction": "avg"}, "reduction must be one of"),
        (xent.nn.WeightedSum, {"terms": {"a": (1.0, 3)}}, r"terms\['a'\] must be a pair \(weight, loss\)"),
    ],
)
def test_modules_reject_bad_options_at_construction(module, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        module(**kwargs)


@pytest.mark.parametrize(
    ("construct", "message"),
    [
        (lambda: xent.nn.SigmoidFocalLoss(gamma=-1.0), r"gamma must be in \[0, inf\], got -1"),
        (lambda: xent.nn.SigmoidFocalLoss(alpha=2.0), r"alpha must be in \[0, 1\], got 2"),
        (lambda: xent.nn.DistillationLoss(temperature=0.0), r"temperature must be in \(0, inf\), got 0"),
        (lambda: xent.nn.DistillationLoss(reduction="avg"), r"reduction must be one of 'none', 'batchmean'"),
        (lambda: xent.nn.GANDiscriminatorLoss(reduction="none"), r"reduction must be one of 'mean', 'sum'"),
        (lambda: xent.nn.GANDiscriminatorLoss(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
        (lambda: xent.nn.GANGeneratorLoss(reduction="avg"), r"reduction must be one of"),
        (lambda: xent.nn.VAELoss(beta=-1.0), r"beta must be in \[0, inf\], got -1"),
        (lambda: xent.nn.LogitAdjustedCrossEntropyLoss(torch.tensor(3.0)), r"class_counts must have shape \(C,\)"),
        (lambda: xent.nn.WeightedSum([("ce", (1.0, xent.cross_entropy))]), r"terms must be a mapping"),
    ],
)
def test_every_module_checks_its_options_at_construction(construct, message):
    with pytest.raises((ValueError, TypeError), match=message):
        construct()
