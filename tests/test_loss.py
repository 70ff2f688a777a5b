"""Cross entropy: label smoothing in train mode only, hard and soft targets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loss_fn import LOSSES, build_loss
from options.registry import RegistryError
from options.schema import LossConfig


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(0))


def test_smoothing_in_train_mode_only(logits):
    loss = build_loss(LossConfig(label_smoothing=0.1))
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    log_p = logits.log_softmax(dim=1)
    plain = -log_p.gather(1, target[:, None]).mean()
    smoothed = 0.9 * plain + 0.1 * -log_p.mean()  # (1 - eps) * CE + eps * CE against uniform

    loss.train()
    assert loss(logits, target) == pytest.approx(smoothed.item(), rel=1e-6)
    assert loss(logits, target) == pytest.approx(F.cross_entropy(logits, target, label_smoothing=0.1).item())
    loss.eval()
    assert loss(logits, target) == pytest.approx(plain.item(), rel=1e-6)
    assert loss(logits, target) == pytest.approx(F.cross_entropy(logits, target).item())


def test_soft_targets(logits):
    loss = build_loss(LossConfig(label_smoothing=0.2))
    probs = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)).softmax(dim=1)  # e.g. mixup
    loss.eval()
    expected = -(probs * logits.log_softmax(dim=1)).sum(dim=1).mean()
    assert loss(logits, probs) == pytest.approx(expected.item(), rel=1e-6)
    loss.train()
    smoothed = 0.8 * probs + 0.2 / 5
    expected = -(smoothed * logits.log_softmax(dim=1)).sum(dim=1).mean()
    assert loss(logits, probs) == pytest.approx(expected.item(), rel=1e-6)


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(RegistryError) as info:
        build_loss(LossConfig(name="cross_entropi"))
    message = str(info.value)
    assert all(name in message for name in LOSSES.names())
    assert "did you mean 'cross_entropy'" in message

