"""cvnets: parameter counts, shapes, unfold/fold, layer removal, init, memory formats, summary tool."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import subprocess
import sys
from typing import Any, Dict

import pytest
import torch
from torch import nn

from cvnets import MODELS, build_model
from cvnets.layers import make_divisible
from cvnets.mobilevit import VARIANTS, MobileViTBlock
from options.config import ConfigError, from_dict, load_config
from options.registry import RegistryError
from options.schema import ModelConfig

torch.set_num_threads(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = os.path.join(ROOT, "tools", "model_summary.py")


def model_cfg(**model: Any) -> ModelConfig:
    return from_dict({"model": model}).model


def mobilevit(mode: str, **knobs: Any) -> ModelConfig:
    return model_cfg(name="mobilevit", mobilevit={"mode": mode, **knobs})


def resnet(depth: int, stem: str = "cvnets") -> ModelConfig:
    return model_cfg(name="resnet", resnet={"depth": depth, "stem": stem})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def eval_model(name: str) -> nn.Module:
    """One eval-mode model per variant, shared by the shape tests."""
    torch.manual_seed(0)
    return build_model(VARIANT_CFGS[name], 200).eval()


VARIANT_CFGS: Dict[str, ModelConfig] = {
    **{f"mobilevit_{mode}": mobilevit(mode) for mode in VARIANTS},
    **{f"resnet{depth}": resnet(depth) for depth in (18, 34, 50)},
    "resnet18_imagenet": resnet(18, "imagenet"),
    "resnet18_cifar": resnet(18, "cifar"),
}

# (variant, classes) -> parameters, from PAPER.md
PARAM_COUNTS = {
    ("mobilevit_xx_small", 200): 1_015_224,
    ("mobilevit_x_small", 200): 2_009_848,
    ("mobilevit_small", 200): 5_065_832,
    ("mobilevit_tiny", 200): 817_128,
    ("resnet18", 200): 11_272_136,
    ("resnet34", 200): 21_380_296,
    ("resnet50", 200): 23_910_856,
    ("resnet18_imagenet", 200): 11_279_112,
    ("mobilevit_xx_small", 1000): 1_272_024,
    ("mobilevit_x_small", 1000): 2_317_848,
    ("mobilevit_small", 1000): 5_578_632,
    ("resnet18", 1000): 11_682_536,
    ("resnet34", 1000): 21_790_696,
    ("resnet50", 1000): 25_550_056,
}


# --------------------------------------------------------------------------- parameter counts
def test_every_registered_model_is_covered() -> None:
    assert {cfg.name for cfg in VARIANT_CFGS.values()} == set(MODELS.names())


@pytest.mark.parametrize("name,classes", sorted(PARAM_COUNTS))
def test_parameter_count(name: str, classes: int) -> None:
    assert n_params(build_model(VARIANT_CFGS[name], classes)) == PARAM_COUNTS[(name, classes)]


CONFIG_COUNTS = {
    "mobilevit_xx_small.yaml": 1_015_224,
    "mobilevit_x_small.yaml": 2_009_848,
    "mobilevit_small.yaml": 5_065_832,
    "mobilevit_tiny.yaml": 817_128,
    "resnet18.yaml": 11_272_136,
    "resnet34.yaml": 21_380_296,
    "resnet50.yaml": 23_910_856,
}


@pytest.mark.parametrize("config", sorted(CONFIG_COUNTS))
def test_config_files_build_the_paper_models(config: str) -> None:
    cfg = load_config(["--common.config-file", os.path.join(ROOT, "config", config)])
    assert n_params(build_model(cfg.model, 200)) == CONFIG_COUNTS[config]


def test_tiny_is_x_small_with_overridable_defaults() -> None:
    # Explicit keys beat the named variant's: tiny with nothing removed and concat fusion is x_small.
    restored = build_model(mobilevit("tiny", remove_layers=[], fusion="concat_conv"), 200)
    assert n_params(restored) == PARAM_COUNTS[("mobilevit_x_small", 200)]


def test_config_num_classes_wins() -> None:
    model = build_model(model_cfg(name="resnet", num_classes=10), 200)
    assert model.classifier[-1].out_features == 10


def test_make_divisible() -> None:
    assert [make_divisible(v, 8) for v in (3, 16, 20, 27, 64 * 4, 95)] == [8, 16, 24, 32, 256, 96]


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("size", [58, 60, 64, 66, 72, 84, 96])
@pytest.mark.parametrize("name", sorted(VARIANT_CFGS))
def test_output_shape(name: str, size: int) -> None:
    model = eval_model(name)
    with torch.no_grad():
        for batch in (1, 2):
            out = model(torch.randn(batch, 3, size, size))
            assert out.shape == (batch, 200)
            assert torch.isfinite(out).all()


@torch.no_grad()
def test_stage_shapes_at_64px() -> None:
    outputs = eval_model("mobilevit_tiny").stage_outputs(torch.zeros(1, 3, 64, 64))
    shapes = {name: tuple(out.shape[1:]) for name, out in outputs.items()}
    assert shapes == {
        "stem": (16, 32, 32),
        "layer1": (32, 32, 32),
        "layer2": (48, 16, 16),
        "layer5": (96, 8, 8),  # layers 3 and 4 removed: the MobileViT block sees 8x8
        "head": (384, 8, 8),
        "classifier": (200,),
    }
    # The CIFAR stem keeps the resolution: an 8x8 final map at 64 px instead of 2x2.
    final = eval_model("resnet18_cifar").stage_outputs(torch.zeros(1, 3, 64, 64))["layer4"]
    assert final.shape[-2:] == (8, 8)


# --------------------------------------------------------------------------- unfold / fold
@pytest.mark.parametrize("channels_last", [False, True])
def test_unfold_fold_are_inverse(channels_last: bool) -> None:
    x = torch.randn(2, 6, 8, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tokens = MobileViTBlock.unfold(x)
    assert tokens.shape == (2 * 4, 4 * 6, 6)  # [B*P, N, d]
    # Token (b, ph, pw) row, patch (i, j) column holds pixel (2i + ph, 2j + pw).
    b, ph, pw, i, j = 1, 1, 0, 3, 5
    assert torch.equal(tokens[b * 4 + ph * 2 + pw, i * 6 + j], x[b, :, 2 * i + ph, 2 * j + pw])
    folded = MobileViTBlock.fold(tokens, 8, 12, channels_last)
    assert torch.equal(folded, x)
    assert folded.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_token_grid() -> None:
    assert MobileViTBlock.token_grid(8, 8) == (4, 16, 8, 8)
    assert MobileViTBlock.token_grid(9, 5) == (4, 15, 10, 6)  # odd sizes round up to whole patches


# --------------------------------------------------------------------------- layer removal x fusion
REMOVALS = [subset for r in range(4) for subset in itertools.combinations((3, 4, 5), r)]


@pytest.mark.parametrize("fusion", ["concat_conv", "none", "residual"])
@pytest.mark.parametrize("removed", REMOVALS, ids=lambda r: "remove_" + ("".join(map(str, r)) or "none"))
def test_removal_and_fusion_train(removed, fusion: str) -> None:
    torch.manual_seed(0)
    model = build_model(mobilevit("xx_small", remove_layers=list(removed), fusion=fusion), 10).train()
    kept = [f"layer{i}" for i in range(1, 6) if i not in removed]
    assert list(model.stages) == ["stem", *kept, "head"]
    # The head widens the last kept layer 4x (at most 960 channels).
    last = {1: 16, 2: 24, 3: 48, 4: 64, 5: 80}[max(i for i in range(1, 6) if i not in removed)]
    assert model.num_features == min(4 * last, 960)

    model(torch.randn(2, 3, 64, 64)).logsumexp(dim=1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bad_removal_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="remove_layers: 2"):
        build_model(mobilevit("x_small", remove_layers=[2, 3]), 10)


# --------------------------------------------------------------------------- init
def _big_convs(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() >= 10_000]


def _linears(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_default_init_is_applied() -> None:
    torch.manual_seed(0)
    model = build_model(mobilevit("x_small"), 200)
    convs = _big_convs(model)
    assert convs
    for conv in convs:  # kaiming normal, fan_out: std = sqrt(2 / (C_out * k * k / groups))
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    weights = torch.cat([m.weight.flatten() for m in _linears(model)])
    assert weights.abs().max() <= 2 * 0.02  # truncated at 2 std
    assert weights.std().item() == pytest.approx(0.02 * 0.8796, rel=0.03)  # std of N(0, 1) cut at +-2
    assert all((m.bias == 0).all() for m in _linears(model))
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)


def test_resnet_default_linear_init() -> None:
    fc = _linears(build_model(resnet(18), 200))[-1]
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert (fc.bias == 0).all()


def test_changing_init_config_changes_weights() -> None:
    torch.manual_seed(0)
    base = {"name": "mobilevit", "mobilevit": {"mode": "xx_small"}}
    model = build_model(
        model_cfg(**base, init={"conv": "xavier_uniform", "linear": "normal", "linear_std": 0.05}), 200
    )
    for conv in _big_convs(model):
        fan_in = conv.weight[0].numel()
        fan_out = conv.out_channels * conv.weight[0, 0].numel()
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert conv.weight.abs().max() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    weights = torch.cat([m.weight.flatten() for m in _linears(model)])
    assert weights.std().item() == pytest.approx(0.05, rel=0.03)
    assert weights.abs().max() > 2 * 0.05  # untruncated


# --------------------------------------------------------------------------- memory format, determinism
@pytest.mark.parametrize("name", ["mobilevit_x_small", "mobilevit_tiny", "resnet18"])
def test_channels_last_matches_default_format(name: str) -> None:
    model = eval_model(name)
    x = torch.randn(2, 3, 66, 66)  # 66 px exercises the resize to whole patches
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        try:
            got = model(x.contiguous(memory_format=torch.channels_last))
        finally:
            model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_channels_last_trains() -> None:
    model = build_model(mobilevit("tiny"), 10).to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 60, 60).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_eval_is_deterministic() -> None:
    model = build_model(mobilevit("x_small", dropout=0.5, attn_dropout=0.5, ffn_dropout=0.5), 200).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()  # the dropouts are really wired in: training outputs differ
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


# --------------------------------------------------------------------------- registry
def test_unknown_model_lists_known_names() -> None:
    cfg = dataclasses.replace(model_cfg(), name="mobilevitt")
    with pytest.raises(RegistryError) as err:
        build_model(cfg, 10)
    message = str(err.value)
    assert all(name in message for name in MODELS.names()) and "did you mean 'mobilevit'" in message


# --------------------------------------------------------------------------- tools/model_summary.py
def _params_lines(text: str):
    return [line for line in text.splitlines() if line.startswith("params:")]


def test_model_summary_script_tiny() -> None:
    result = subprocess.run(
        [sys.executable, SUMMARY, "--common.config-file", os.path.join(ROOT, "config", "mobilevit_tiny.yaml")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert _params_lines(result.stdout) == ["params: 817,128"]
    assert "layer5 MobileViT block: feature 8x8 -> P=4 x N=16, d=144" in result.stdout
    assert result.stdout.count("MobileViT block") == 1
    assert "flops:" in result.stdout


def _summary_main():
    sys.path.insert(0, ROOT)
    try:
        from tools.model_summary import main
    finally:
        sys.path.remove(ROOT)
    return main


def test_model_summary_resnet_imagenet_stem(capsys) -> None:
    config = os.path.join(ROOT, "config", "resnet18.yaml")
    assert _summary_main()(["--common.config-file", config, "--model.resnet.stem", "imagenet"]) == 0
    out = capsys.readouterr().out
    assert _params_lines(out) == ["params: 11,279,112"]
    assert "layer4      512x2x2" in out


def test_model_summary_bad_flag_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _summary_main()(["--model.resnet.stm", "imagenet"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
