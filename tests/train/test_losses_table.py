"""The trainer's loss table: every ``--loss`` is one entry that the flags, the help text, the criterion and the
model's head all read; each criterion against its formula; probabilities from the logits the loss scores."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import xent
from xent.cli import main
from xent.losses.family import FAMILY
from xent.train.config import TrainConfig, resolve
from xent.train.data import DataBundle, Split
from xent.train.losses import LDAM_SCALE, LOSSES, TrainLoss
from xent.train.models import NormedLinear, build_model
from xent.train.objective import build_criterion

COUNTS = torch.tensor([40, 20, 10, 5], dtype=torch.float64)


def _bundle() -> DataBundle:
    y = torch.cat([torch.full((int(n),), c) for c, n in enumerate(COUNTS)])
    train = Split(torch.randn(len(y), 6), y)
    return DataBundle(train, train.subset(torch.arange(4)), train.subset(torch.arange(8)), list("abcd"), (6,))


def test_the_table_is_what_the_flags_and_the_help_read(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps after hyphens
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    for name, loss in LOSSES.items():
        assert set(loss.flags) <= set(fields), f"{name} reads a field TrainConfig does not have"
        assert f"{name}: {loss.summary}".replace("- ", "-") in help_text
        for flag in loss.flags:  # each flag's help names the losses that read it
            assert name in fields[flag].metadata["help"]
        resolve(TrainConfig(loss=name))  # a valid choice


FORMULAS = {  # the per-example loss of each entry from its paper's formula, on logits x (float64)
    "ce": lambda x, y, cfg: -x.log_softmax(1).gather(1, y[:, None])[:, 0],
    "mse": lambda x, y, cfg: (x.softmax(1) - F.one_hot(y, 4)).square().sum(1),
    "bce": lambda x, y, cfg: -(F.one_hot(y, 4) * F.logsigmoid(x) + (1 - F.one_hot(y, 4)) * F.logsigmoid(-x)).sum(1),
    "focal": lambda x, y, cfg: (
        -((1 - x.softmax(1).gather(1, y[:, None])[:, 0]) ** cfg.gamma) * x.log_softmax(1).gather(1, y[:, None])[:, 0]
    ),
    "la": lambda x, y, cfg: F.cross_entropy(x + cfg.tau * (COUNTS / COUNTS.sum()).log(), y, reduction="none"),
    "balanced-softmax": lambda x, y, cfg: F.cross_entropy(x + COUNTS.log(), y, reduction="none"),
    "gce": lambda x, y, cfg: (1 - x.softmax(1).gather(1, y[:, None])[:, 0] ** cfg.q) / cfg.q,
    "poly1": lambda x, y, cfg: (
        F.cross_entropy(x, y, reduction="none") + cfg.poly_epsilon * (1 - x.softmax(1).gather(1, y[:, None])[:, 0])
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_criterion_trains_and_matches_its_formula(name):
    config = resolve(TrainConfig(loss=name, epochs=10))
    criterion = build_criterion(config, _bundle())
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 3])
    mean, total = criterion(x, y, 0, "mean"), criterion(x, y, 0, "sum")
    (grad,) = torch.autograd.grad(mean, x)
    assert torch.isfinite(mean) and torch.isfinite(grad).all()
    if name in FORMULAS:
        expected = FORMULAS[name](x, y, config)
        torch.testing.assert_close(total, expected.sum())
        torch.testing.assert_close(mean, expected.mean())


def test_ldam_drw_logits_are_the_scaled_cosines_its_loss_scores():
    """The cosine head's outputs used to be the raw cosines in [-1, 1]: every softmax read from them (NLL, ECE,
    temperature scaling) was that of logits 30× too small. The head now outputs s · cos, and the criterion scores
    LDAM on the cosines with scale s — the same loss as before."""
    config = resolve(TrainConfig(loss="ldam-drw", epochs=10))
    model = build_model("mlp", (6,), 4, cosine_scale=LOSSES["ldam-drw"].cosine_scale)
    head = model[-1]
    assert isinstance(head, NormedLinear) and head.scale == LDAM_SCALE
    assert "scale" not in head.state_dict() and set(head.state_dict()) == {"weight"}  # old checkpoints load
    features = torch.randn(5, 6)
    body = torch.nn.Sequential(*list(model)[:-1])
    cosines = F.normalize(body(features), dim=1) @ F.normalize(head.weight, dim=1).t()
    logits = model(features)
    torch.testing.assert_close(logits, LDAM_SCALE * cosines)
    assert logits.abs().max() > 1  # not cosines
    y = torch.tensor([0, 1, 2, 3, 3])
    criterion = build_criterion(config, _bundle())
    expected = xent.ldam_loss(
        cosines, y, class_counts=COUNTS, scale=LDAM_SCALE, weight=xent.deferred_reweighting(COUNTS, 9, start_epoch=8)
    )
    torch.testing.assert_close(criterion(logits, y, 9, "mean"), expected)


def test_every_loss_of_the_fused_family_is_trained_by_an_entry():
    """The table names the loss of the fused family each entry trains with; a loss added to the registry fails here
    until ``xent train --loss`` offers it."""
    assert set(FAMILY) <= {loss.family for loss in LOSSES.values()}
    with pytest.raises(ValueError, match="family must name a loss"):
        TrainLoss("nothing", LOSSES["ce"].build, family="no_such_loss")


@pytest.mark.parametrize("name", [name for name, loss in LOSSES.items() if loss.family is not None])
def test_an_entry_trains_with_the_loss_of_the_family_it_names(name, monkeypatch):
    family = LOSSES[name].family
    function, calls = getattr(xent, family), []

    def spy(*args, **kwargs):
        calls.append(family)
        return function(*args, **kwargs)

    monkeypatch.setattr(xent, family, spy)
    criterion = build_criterion(resolve(TrainConfig(loss=name, epochs=10)), _bundle())
    criterion(torch.randn(7, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1, 3]), 0, "mean")
    assert calls == [family]
