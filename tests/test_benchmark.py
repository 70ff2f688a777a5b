"""tools/benchmark.py `model` and `epoch`: argument handling and tiny runs (no timing assertions).
The model fast paths these benchmarks measure are tested in test_models.py."""
import argparse
import json
import os
import sys

import pytest
import torch

import tools.benchmark as benchmark
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
    assert args.caches == ["none", "memory"] and args.repeats == 1 and args.max_batches is None


@pytest.mark.parametrize("argv, message", [
    (("model", "--batch-size", "0"), "must be >= 1"),
    (("model", "--dtype", "fp8"), "invalid choice: 'fp8'"),
    (("model", "--memory-format", "nhwc"), "invalid choice: 'nhwc'"),
    (("model", "--modes", "train,test"), "choose from train, eval"),
    (("epoch", "--dataset-root", "x", "--caches", "none,ram"), "choose from none, memory, disk, device"),
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


def test_tiny_epoch_run_compares_data_variants_and_says_where_device_runs(capsys, fake_root):
    status, out, _ = run(capsys, "epoch", "--dataset-root", fake_root, "--config", TINY, "--caches", "none,device",
                         "--max-batches", "1", "--device", "cpu", "--workers", "0",
                         "--dataset.train-batch-size", "4", "--sampler.crop-size", "32",
                         "--image-augmentation.val", "[{name: resize, size: 36}, {name: center_crop}]")
    assert status == 0
    assert "note: on the CPU the 'device' variant runs the batch augmentation in the training process" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "vs jpeg" in line)
    rows = lines[header + 2:header + 4]
    assert [line.split()[0] for line in rows] == ["none", "device"]
    assert float(rows[0].split()[-1]) == 1.0  # the JPEG row is the reference


def test_peak_memory_is_a_size_or_unknown():
    peak = benchmark.peak_memory_mib(lambda: torch.ones(1 << 20).sum(), torch.device("cpu"))
    assert peak is None or peak >= 0


def test_print_config_shows_the_resolved_config_with_its_overrides(capsys):
    status, out, _ = run(capsys, "model", "--config", os.path.join(REPO, "config", "resnet18.yaml"),
                         "--model.resnet.depth", "34", "--print-config")
    assert status == 0 and "depth: 34" in out and "images/s" not in out  # printed, nothing timed
