"""tools/benchmark.py `model` and `epoch`: argument handling and tiny runs (no timing assertions),
plus the model fast paths those benchmarks measure (eval-time BatchNorm folding, CPU attention,
CPU dropout), which must compute what the plain layers compute."""
import argparse
import json
import os
import sys

import pytest
import torch
from torch import nn

import tools.benchmark as benchmark
from cvnets.layers import ConvNormAct, Dropout, MultiHeadAttention
from options.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XX_SMALL = os.path.join(REPO, "config", "mobilevit_xx_small.yaml")
TINY = os.path.join(REPO, "config", "mobilevit_tiny.yaml")


def parse(*argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for add in benchmark.SUBCOMMANDS:
        add(sub)
    return parser.parse_args(argv)


def run(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    try:
        benchmark.main(list(argv))
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


# ----------------------------------------------------------------------------- arguments
def test_model_defaults():
    args = parse("model")
    assert (args.batch_size, args.device, args.dtype, args.memory_format) == (128, "auto", "fp32", None)
    assert (args.warmup, args.repeats, args.steps, args.modes) == (2, 5, 3, ["train", "eval"])
    assert not args.compile and not args.compare_timm and args.image_size is None


def test_epoch_defaults():
    args = parse("epoch", "--dataset-root", "x")
    assert args.caches == ["none", "memory"] and args.repeats == 1 and args.max_iterations is None


@pytest.mark.parametrize("argv, message", [
    (("model", "--batch-size", "0"), "must be >= 1"),
    (("model", "--dtype", "fp8"), "invalid choice: 'fp8'"),
    (("model", "--memory-format", "nhwc"), "invalid choice: 'nhwc'"),
    (("model", "--modes", "train,test"), "choose from train, eval"),
    (("epoch", "--dataset-root", "x", "--caches", "none,ram"), "choose from none, memory, disk, gpu"),
    (("data", "--dataset-root", "x", "--model.name", "resnet"), "unrecognized arguments: --model.name"),
])
def test_bad_arguments_exit_2_with_the_reason(capsys, argv, message):
    status, _, err = run(capsys, *argv)
    assert status == 2 and message in err


def test_bad_config_override_is_one_line_error(capsys):
    status, _, err = run(capsys, "model", "--config", XX_SMALL, "--model.mobilevit.dropuot", "0")
    assert status == 2 and err.startswith("error: ") and "did you mean" in err and err.count("\n") == 1


def test_fp16_on_the_cpu_is_refused(capsys):
    status, _, err = run(capsys, "model", "--device", "cpu", "--dtype", "fp16")
    assert status == 2 and "fp16 needs CUDA" in err


# ----------------------------------------------------------------------------- runs
def test_tiny_model_run_prints_a_table(capsys, tmp_path):
    out_json = tmp_path / "model.json"
    status, out, _ = run(capsys, "model", "--config", XX_SMALL, "--batch-size", "2", "--steps", "1", "--repeats", "1",
                         "--warmup", "0", "--image-size", "32", "--device", "cpu", "--json", str(out_json),
                         "--model.mobilevit.dropout", "0")
    assert status == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "mode"])
    rows = [line.split() for line in lines[header + 2:header + 4]]
    assert [r[:2] for r in rows] == [["ours", "train"], ["ours", "eval"]]
    assert all(float(r[2].replace(",", "")) > 0 for r in rows)
    saved = json.loads(out_json.read_text())
    assert saved["command"] == "model" and saved["rows"][0]["params"] == 1_015_224


def test_compare_timm_without_timm_names_the_bench_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    status, _, err = run(capsys, "model", "--config", XX_SMALL, "--compare-timm")
    assert status == 2 and "bench extra" in err and "pip install" in err


@pytest.mark.parametrize("flags, reason", [
    (("--common.config-file", TINY), "MobileViT-Tiny"),
    (("--model.mobilevit.remove-layers", "5"), "MobileViT-Tiny"),
    (("--model.name", "resnet"), "--model.resnet.stem imagenet"),
])
def test_models_without_a_timm_twin_say_why(flags, reason):
    name, model, note = benchmark.timm_twin(load_config(list(flags)).model, 200, 0)
    assert name is None and model is None and reason in note


@pytest.mark.parametrize("flags, twin", [((), "mobilevit_xs"), (("--model.mobilevit.mode", "xx_small"), "mobilevit_xxs"),
                                         (("--model.name", "resnet", "--model.resnet.stem", "imagenet"), "resnet18")])
def test_timm_twin_is_identical_and_gets_our_dropouts(flags, twin):
    pytest.importorskip("timm")
    import cvnets

    cfg = load_config(list(flags)).model
    ours = sum(p.numel() for p in cvnets.build_model(cfg, 200).parameters())
    name, model, note = benchmark.timm_twin(cfg, 200, ours)
    assert name == twin and model is not None, note
    assert model.drop_rate == cfg.classifier_dropout
    blocks = [m for m in model.modules() if hasattr(m, "attn") and hasattr(m, "mlp")]
    assert len(blocks) == (9 if cfg.name == "mobilevit" else 0)  # 2 + 4 + 3 transformer blocks
    for block in blocks:
        assert (block.attn.proj_drop.p, block.mlp.drop1.p, block.mlp.drop2.p) == (0.1, 0.0, 0.1)


def test_tiny_epoch_run_compares_caches(capsys, fake_root):
    status, out, _ = run(capsys, "epoch", "--dataset-root", fake_root, "--config", TINY, "--caches", "none,gpu",
                         "--max-iterations", "1", "--device", "cpu", "--workers", "0",
                         "--dataset.train-batch-size", "4", "--sampler.crop-size", "32",
                         "--image-augmentation.val", "[{name: resize, size: 36}, {name: center_crop}]")
    assert status == 0
    table = out[out.index("dataset.cache"):].splitlines()
    assert [line.split()[0] for line in table[2:]] == ["none", "gpu"]
    assert float(table[2].split()[-1]) == 1.0  # the JPEG row is the reference


def test_peak_memory_is_a_size_or_unknown():
    peak = benchmark.peak_memory_mib(lambda: torch.ones(1 << 20).sum(), torch.device("cpu"))
    assert peak is None or peak >= 0


# ----------------------------------------------------------------------------- fast paths
def reference_conv_norm_act(layer: ConvNormAct, x: torch.Tensor) -> torch.Tensor:
    return nn.Sequential.forward(layer, x)  # conv -> BatchNorm (running stats) -> activation


@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU, None])
def test_eval_batchnorm_folding_matches_the_plain_layers(act):
    torch.manual_seed(0)
    layer = ConvNormAct(8, 16, 3, act=act)
    with torch.no_grad():
        layer.norm.running_mean.uniform_(-1, 1), layer.norm.running_var.uniform_(0.5, 2)
        layer.norm.weight.uniform_(0.5, 2), layer.norm.bias.uniform_(-1, 1)
    layer.eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_conv_norm_act(layer, x), rtol=1e-5, atol=1e-5)
        layer.conv.weight.mul_(2)  # an in-place update (optimizer step, EMA) invalidates the cached fold
        layer.norm.running_var.add_(1)
        torch.testing.assert_close(layer(x), reference_conv_norm_act(layer, x), rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()  # with autograd the fold is differentiable: BatchNorm's affine gets gradients
    assert layer.norm.weight.grad is not None and layer.conv.weight.grad is not None


def test_folding_leaves_training_mode_alone():
    layer = ConvNormAct(4, 4, 1).train()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(layer(x), reference_conv_norm_act(layer, x))


def test_cpu_matmul_attention_matches_sdpa():
    torch.manual_seed(0)
    attention = MultiHeadAttention(24, 4).eval()
    x = torch.randn(6, 16, 24, requires_grad=True)  # 16 tokens: the matmul path on the CPU
    got = attention(x)
    q, k, v = attention.qkv(x).reshape(6, 16, 3, 4, 6).permute(2, 0, 3, 1, 4)
    expected = attention.out_proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(6, 16, 24))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (grad_got,) = torch.autograd.grad(got.sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-4, atol=1e-5)


def test_cpu_dropout_keeps_the_distribution():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    out = Dropout(0.1).train()(x)
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert abs((out == 0).float().mean().item() - 0.1) < 0.003
    assert torch.equal(Dropout(0.1).eval()(x), x) and torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
