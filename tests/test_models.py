"""cvnets: parameter counts, shapes, unfold/fold, layer removal, fusion, init, config checks,
BatchNorm folding, memory formats, the CPU fast paths, summary tool."""
from __future__ import annotations

import copy
import functools
import itertools
import math
import os
import subprocess
import sys
from typing import Any, Dict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvnets import MODELS, build_model, check_config
from cvnets.fuse import count_batchnorms, fold_batchnorm
from cvnets.layers import ConvNormAct, Dropout, MultiHeadAttention, SiLU, make_divisible
from cvnets.mobilevit import VARIANTS, MobileViTBlock
from helpers import REPO, randomize_batchnorm
from options.config import ConfigError, from_dict, load_config
from options.schema import ModelConfig
from tools.model_summary import main as summary_main


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
    "mobilevit_tiny_residual": mobilevit("tiny", fusion="residual"),  # Table 3 "remove 3,4, use residual"
    **{f"resnet{depth}": resnet(depth) for depth in (18, 34, 50)},
    "resnet18_imagenet": resnet(18, "imagenet"),
    "resnet18_cifar": resnet(18, "cifar"),
}

# (variant, classes) -> parameters: what the paper's code (the authors' ml-cvnets fork) builds;
# the 200-class counts are README's "Models" table, the tiny one the paper's "817k" (Table 3).
PARAM_COUNTS = {
    ("mobilevit_xx_small", 200): 1_015_224,
    ("mobilevit_x_small", 200): 2_009_848,
    ("mobilevit_small", 200): 5_065_832,
    ("mobilevit_tiny", 200): 817_128,
    ("mobilevit_tiny_residual", 200): 817_128,  # the residual fusion's layer norm has no weights
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
    cfg = load_config(["--common.config-file", os.path.join(REPO, "config", config)])
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


# --------------------------------------------------------------------------- fusion
def _block(fusion: str, always_resize: bool = False) -> MobileViTBlock:
    return MobileViTBlock(8, 12, 24, 1, num_heads=2, dropout=0.0, attn_dropout=0.0, ffn_dropout=0.0,
                          fusion=fusion, always_resize=always_resize)


def test_residual_fusion_is_a_parameter_free_layer_norm_of_input_plus_output() -> None:
    torch.manual_seed(0)
    residual, plain = _block("residual"), _block("none")
    # No weights of its own: the residual block has exactly the "no fusing" block's parameters.
    assert residual.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(residual.state_dict())
    randomize_batchnorm(residual).eval()
    randomize_batchnorm(plain).eval()
    x = torch.randn(3, 8, 6, 10)
    with torch.no_grad():
        out, y = residual(x), plain(x)
    # The authors' line: F.layer_norm(x + y, (C, H, W)), no affine weights.
    expected = (x + y - (x + y).mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(
        (x + y).var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, F.layer_norm(y, y.shape[1:]), atol=1e-2)  # the input is really added


@pytest.mark.parametrize("fusion", ["concat_conv", "none", "residual"])
def test_always_resize_gives_identical_logits(fusion: str, monkeypatch) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(mobilevit("xx_small", fusion=fusion), 10)).eval()
    resizing = copy.deepcopy(model)
    for block in (m for m in resizing.modules() if isinstance(m, MobileViTBlock)):
        block.always_resize = True
    calls = []
    interpolate = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(1) or interpolate(*a, **k))
    x = torch.rand(2, 3, 64, 64)  # 8x8, 4x4 and 2x2 maps: whole patches everywhere
    with torch.no_grad():
        expected = model(x)
        assert calls == []  # no resize needed ...
        got = resizing(x)
    assert len(calls) == 2 * 3  # ... but with the flag every block resizes there and back
    assert torch.equal(got, expected)  # bilinear resizing to a map's own size copies it


# --------------------------------------------------------------------------- config checks
# Transformer widths d of layer3, layer4, layer5 (the paper's variant table).
WIDTHS = {"xx_small": (64, 80, 96), "x_small": (96, 120, 144), "small": (144, 192, 240)}


@pytest.mark.parametrize("mode", sorted(WIDTHS))
@pytest.mark.parametrize("removed", REMOVALS, ids=lambda r: "remove_" + ("".join(map(str, r)) or "none"))
def test_check_config_accepts_exactly_the_heads_that_divide_every_kept_width(mode: str, removed) -> None:
    kept = [d for layer, d in zip((3, 4, 5), WIDTHS[mode]) if layer not in removed]
    for heads in range(1, 25):
        cfg = mobilevit(mode, num_heads=heads, remove_layers=list(removed))
        if all(d % heads == 0 for d in kept):
            check_config(cfg)
        else:
            with pytest.raises(ValueError, match=f"^model.mobilevit.num_heads: {heads} does not divide"):
                check_config(cfg)


@pytest.mark.parametrize("cfg, message", [
    (mobilevit("x_small", num_heads=7),
     "model.mobilevit.num_heads: 7 does not divide the transformer width 96 of layer3 (x_small); "
     "choose a divisor of 96, 120 and 144"),
    (mobilevit("tiny", num_heads=7),  # only layer5 is kept
     "model.mobilevit.num_heads: 7 does not divide the transformer width 144 of layer5 (tiny); "
     "choose a divisor of 144"),
    (mobilevit("xx_small", num_heads=3, remove_layers=[3]),
     "model.mobilevit.num_heads: 3 does not divide the transformer width 80 of layer4 (xx_small); "
     "choose a divisor of 80 and 96"),
])
def test_check_config_names_the_width_and_the_choices(cfg: ModelConfig, message: str) -> None:
    with pytest.raises(ValueError) as err:
        check_config(cfg)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:  # the builder refuses with the same line
        build_model(cfg, 10)
    assert str(err.value) == message


# The model's numeric ranges are in test_options.py's table of bad values; here, the choices.
@pytest.mark.parametrize("model, message", [
    ({"mobilevit": {"fusion": "add"}}, "model.mobilevit.fusion: 'add' is not one of concat_conv, none, residual"),
    ({"mobilevit": {"mode": "large"}}, "model.mobilevit.mode: 'large' is not one of xx_small, x_small, small, tiny"),
    ({"name": "resnet", "resnet": {"depth": 101}}, "model.resnet.depth: 101 is not one of 18, 34, 50"),
    ({"name": "resnet", "resnet": {"stem": "deep"}}, "model.resnet.stem: 'deep' is not one of cvnets, imagenet, cifar"),
    ({"name": "mobilevitt"}, "model.name: 'mobilevitt' is not one of mobilevit, resnet"),
])
def test_the_schema_refuses_what_no_model_can_build(model: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"model": model})
    assert str(err.value).startswith(message)


def test_check_config_builds_nothing(monkeypatch) -> None:
    monkeypatch.setattr(nn.Module, "__init__", lambda *a, **k: pytest.fail("check_config built a module"))
    for cfg in VARIANT_CFGS.values():
        check_config(cfg)


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
    # trunc_normal_(std=0.02) with its default absolute bounds (-2, 2), as in the paper's code:
    # nothing is cut, so the measured std is 0.0200 (a cut at +-2 std, as before, gave 0.0176).
    weights = torch.cat([m.weight.flatten() for m in _linears(model)])
    assert weights.numel() > 1_000_000
    assert weights.std().item() == pytest.approx(0.02, rel=0.01)
    assert weights.abs().max() > 4 * 0.02  # untruncated: a million draws reach past 4 std
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


# --------------------------------------------------------------------------- BatchNorm folding
@pytest.mark.parametrize("name", ["mobilevit_xx_small", "mobilevit_tiny_residual", "resnet18", "resnet18_imagenet"])
def test_fold_batchnorm_matches_the_unfolded_eval_model(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(VARIANT_CFGS[name], 10)).train()
    folded, pairs = fold_batchnorm(model)
    # Every BatchNorm follows a conv (the residual fusion's layer norm has no weights) and is folded
    # into it, in a copy: the original keeps its BatchNorms and its training mode.
    assert pairs == count_batchnorms(model) > 0 and count_batchnorms(folded) == 0
    assert model.training and not folded.training
    x = torch.rand(2, 3, 66, 66)  # 66 px exercises MobileViT's resize to whole patches
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_in_channels_last() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(mobilevit("tiny"), 10)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        folded, _ = fold_batchnorm(model.to(memory_format=torch.channels_last))
        got = folded(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", [SiLU, nn.ReLU, None])
def test_conv_norm_act_is_a_plain_sequential(act) -> None:
    layer = randomize_batchnorm(ConvNormAct(8, 16, 3, act=act)).eval()
    assert type(layer).forward is nn.Sequential.forward and list(layer.state_dict()) == [
        "conv.weight", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        expected = layer.norm(layer.conv(x))
        if act is not None:
            expected = act()(expected.clone())
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
        folded, pairs = fold_batchnorm(layer)
        assert pairs == 1
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
        layer.conv.weight.mul_(2)  # a fold is a snapshot: refolding picks up new weights
        torch.testing.assert_close(fold_batchnorm(layer)[0](x), layer(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- CPU fast paths
def test_silu_overwrites_its_input_only_without_autograd() -> None:
    x = torch.randn(4, 5)
    expected = F.silu(x)
    with torch.no_grad():
        out = SiLU()(x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(x, expected)  # in place in inference
    x = torch.randn(4, 5, requires_grad=True)
    before = x.detach().clone()
    out = SiLU()(x * 1.0)
    out.sum().backward()  # the backward needs SiLU's input: training must keep it
    torch.testing.assert_close(x.grad, torch.sigmoid(before) * (1 + before * (1 - torch.sigmoid(before))))


def test_cpu_matmul_attention_matches_sdpa() -> None:
    torch.manual_seed(0)
    attention = MultiHeadAttention(24, 4).eval()
    x = torch.randn(6, 16, 24, requires_grad=True)  # 16 tokens: the matmul path on the CPU
    got = attention(x)
    q, k, v = attention.qkv(x).reshape(6, 16, 3, 4, 6).permute(2, 0, 3, 1, 4)
    expected = attention.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(6, 16, 24))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (grad_got,) = torch.autograd.grad(got.sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-4, atol=1e-5)


def test_cpu_dropout_keeps_the_distribution() -> None:
    torch.manual_seed(0)
    x = torch.ones(200_000)
    out = Dropout(0.1).train()(x)
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert abs((out == 0).float().mean().item() - 0.1) < 0.003
    assert torch.equal(Dropout(0.1).eval()(x), x) and torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


# --------------------------------------------------------------------------- tools/model_summary.py
def _params_lines(text: str):
    return [line for line in text.splitlines() if line.startswith("params:")]


def test_model_summary_tiny(capsys) -> None:
    assert summary_main(["--common.config-file", os.path.join(REPO, "config", "mobilevit_tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert _params_lines(out) == ["params: 817,128"]
    assert "layer5 MobileViT block: feature 8x8 -> P=4 x N=16, d=144" in out
    assert out.count("MobileViT block") == 1
    assert "flops:" in out


@pytest.mark.slow  # a process of its own
def test_model_summary_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.model_summary", "--common.config-file",
         os.path.join(REPO, "config", "mobilevit_tiny.yaml")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert _params_lines(result.stdout) == ["params: 817,128"]


def test_model_summary_resnet_imagenet_stem(capsys) -> None:
    config = os.path.join(REPO, "config", "resnet18.yaml")
    assert summary_main(["--common.config-file", config, "--model.resnet.stem", "imagenet"]) == 0
    out = capsys.readouterr().out
    assert _params_lines(out) == ["params: 11,279,112"]
    assert "layer4      512x2x2" in out


def test_model_summary_bad_flag_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        summary_main(["--model.resnet.stm", "imagenet"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
