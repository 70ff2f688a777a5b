"""Optimizer construction: weight-decay groups, the membership check, per-optimizer settings."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from optim import OPTIMIZERS, build_optimizer, check_param_groups, create_optimizer
from options.registry import RegistryError
from options.schema import AdamConfig, OptimConfig, SGDConfig


class TinyNet(nn.Module):
    """Every kind of parameter: conv/linear weights, norm affines, a bias, a scalar, a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x)).mean(dim=(2, 3))  # [B, 8, H, W] -> [B, 8]
        return self.frozen(self.fc(self.norm(x))) * self.scale


@pytest.fixture
def model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list:
    names = {id(p): name for name, p in model.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in optimizer.param_groups]


TRAINABLE = {"conv.weight", "bn.weight", "bn.bias", "norm.weight", "norm.bias", "fc.weight", "fc.bias", "scale"}


def test_one_decayed_group_by_default(model):
    opt = create_optimizer(model, "sgd", weight_decay=1e-4, momentum=0.9, nesterov=False)
    assert group_names(model, opt) == [(TRAINABLE, 1e-4)]


def test_no_decay_on_1d_parameters(model):
    opt = build_optimizer(model, OptimConfig(name="sgd", weight_decay=1e-4, no_decay_bn_filter_bias=True))
    (decay, decay_wd), (no_decay, no_decay_wd) = group_names(model, opt)
    assert decay == {"conv.weight", "fc.weight"} and decay_wd == 1e-4
    assert no_decay == {"bn.weight", "bn.bias", "norm.weight", "norm.bias", "fc.bias", "scale"}
    assert no_decay_wd == 0.0
    # every trainable parameter in exactly one group, frozen ones in none
    assert decay | no_decay == TRAINABLE and not decay & no_decay


def test_check_param_groups_rejects_a_parameter_in_two_groups(model):
    groups = [{"params": list(model.conv.parameters())}, {"params": [p for p in model.parameters() if p.requires_grad]}]
    with pytest.raises(ValueError, match="in more than one group: conv.weight"):
        check_param_groups(model, groups)


def test_check_param_groups_rejects_a_missing_parameter(model):
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and p is not model.fc.bias]}]
    with pytest.raises(ValueError, match="in no group: fc.bias"):
        check_param_groups(model, groups)


def test_check_param_groups_rejects_frozen_parameters(model):
    groups = [{"params": list(model.parameters())}]
    with pytest.raises(ValueError, match="frozen or not in the model: frozen.weight, frozen.bias"):
        check_param_groups(model, groups)


def test_a_fully_frozen_model_is_an_error(model):
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_optimizer(model, "adamw", betas=(0.9, 0.999), eps=1e-8, amsgrad=False)


def test_sgd_settings(model):
    opt = build_optimizer(model, OptimConfig(name="sgd", weight_decay=1e-4, sgd=SGDConfig(momentum=0.8, nesterov=True)))
    assert type(opt) is torch.optim.SGD
    for settings in [opt.defaults, *opt.param_groups]:
        assert settings["momentum"] == 0.8 and settings["nesterov"] is True
    assert opt.defaults["weight_decay"] == 1e-4


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_family_reads_its_own_block(model, name, cls):
    own = AdamConfig(betas=(0.8, 0.99), eps=1e-6, amsgrad=True)
    other = AdamConfig(betas=(0.5, 0.5), eps=1e-3, amsgrad=False)
    blocks = {"adam": own, "adamw": other} if name == "adam" else {"adam": other, "adamw": own}
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.05, **blocks))
    assert type(opt) is cls
    for settings in [opt.defaults, *opt.param_groups]:
        assert settings["betas"] == (0.8, 0.99) and settings["eps"] == 1e-6 and settings["amsgrad"] is True
        assert settings["weight_decay"] == 0.05


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_takes_a_step(model, name):
    opt = build_optimizer(model, OptimConfig(name=name, no_decay_bn_filter_bias=True))
    for group in opt.param_groups:  # what the engine does with the scheduler's value
        group["lr"] = 0.01
    before = model.conv.weight.detach().clone()
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert not torch.equal(model.conv.weight, before)


def test_unknown_optimizer_lists_the_known_ones(model):
    with pytest.raises(RegistryError) as info:
        build_optimizer(model, OptimConfig(name="adamww"))
    message = str(info.value)
    assert all(name in message for name in OPTIMIZERS.names())
    assert "did you mean 'adamw'" in message

