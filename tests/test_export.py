"""Deployment: BatchNorm folding, TorchScript/ONNX export with parity, the sidecar, errors, latency."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Sequence

import pytest
import torch
from torch import nn

import engine.export
from cvnets import build_model
from cvnets.export import (MissingExtraError, ParityCase, ParityError, check_parity, load_runner, make_any_size,
                           require_onnx)
from cvnets.fuse import fold_batchnorm
from cvnets.mobilevit import MobileViTBlock
from data.tinyimagenet import read_classes
from engine import checkpoint as ckpt
from engine.commands import export
from helpers import randomize_batchnorm
from options.config import ConfigError, load_config, to_dict
from tools import benchmark

# xx_small without layers 3 and 4: one MobileViT block, at stride 32, where 64 px gives 2x2
# maps holding a single patch (which torch.export must not specialise on) and 96 px gives 3x3
# maps (the patch resize) -- small but complete.
SMALL_MOBILEVIT = ["--model.mobilevit.mode", "xx_small", "--model.mobilevit.remove-layers", "3,4"]


def write_checkpoint(path: Path, argv: Sequence[str], wnids: List[str]) -> nn.Module:
    """A checkpoint in the format the trainer writes, from build_model and the config dict."""
    cfg = load_config(list(argv))
    model = randomize_batchnorm(build_model(cfg.model, len(wnids))).eval()
    ckpt.save({"kind": ckpt.WEIGHTS, "model": model.state_dict(), "config": to_dict(cfg), "num_classes": len(wnids),
               "wnids": list(wnids), "params": sum(p.numel() for p in model.parameters()),
               "is_ema": False, "epoch": 3}, str(path))
    return model


def run_export(argv: Sequence[str], output: Path) -> Dict[str, Any]:
    """Export through the front door (exit status 0) and return the sidecar written beside `output`."""
    assert export(list(argv)) == 0
    assert output.is_file()
    return json.loads(Path(f"{output}.json").read_text())


def fake_wnids(count: int = 4) -> List[str]:
    return [f"n{i:08d}" for i in range(count)]


# ----------------------------------------------------------------------------- BatchNorm folding
# (whole models: test_models.py)
def test_folding_handles_groups_and_an_existing_bias():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
    model = randomize_batchnorm(nn.Sequential(conv, nn.BatchNorm2d(8))).eval()
    folded, pairs = fold_batchnorm(model)
    assert pairs == 1 and isinstance(folded[1], nn.Identity)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


def test_folding_copies_a_training_model_and_keeps_sync_batchnorm_foldable():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU())).train()
    folded, pairs = fold_batchnorm(model)
    assert pairs == 1 and not folded.training and model.training  # the original keeps its mode
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        got = folded(x)
        torch.testing.assert_close(got, model.eval()(x), rtol=1e-5, atol=1e-6)
        model[0].weight.add_(1.0)  # later updates of the original do not reach the copy
        assert torch.equal(folded(x), got)


@pytest.mark.parametrize("fusion", ["concat_conv", "residual"])
def test_any_size_blocks_match_the_original_at_every_size(fusion):
    cfg = load_config(SMALL_MOBILEVIT + ["--model.mobilevit.fusion", fusion])
    model = randomize_batchnorm(build_model(cfg.model, 10)).eval()
    wrapped, _ = fold_batchnorm(model)
    assert make_any_size(wrapped) == 1
    blocks = [m for m in wrapped.modules() if isinstance(m, MobileViTBlock)]
    assert [b.always_resize for b in blocks] == [True]
    assert not any(m.always_resize for m in model.modules() if isinstance(m, MobileViTBlock))
    with torch.no_grad():
        for size in (64, 66, 96):  # 2x2, odd (resized), 3x3 (resized) maps in the block
            images = torch.rand(2, 3, size, size)
            torch.testing.assert_close(wrapped(images), model(images), rtol=1e-5, atol=1e-5)


# (export.batch_size, export.tolerance's range, dynamic_shape: test_options.py's table of bad values)
@pytest.mark.parametrize("flags, message", [
    (["--export.format", "tflite"], "export.format: 'tflite' is not one of torchscript, onnx"),
    (["--export.tolerance", "nan"], "export.tolerance: 'nan' is not a finite number"),
    (["--export.format", "onnx", "--export.opset", "17"], "export.opset: 17 is older than 18"),
])
def test_bad_export_settings_are_config_errors_naming_the_key(flags, message):
    with pytest.raises(ConfigError) as err:
        load_config(flags)
    assert str(err.value).startswith(message)


def test_missing_onnx_package_is_a_missing_extra_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"onnxruntime not installed \(needed to run ONNX models\)"):
        require_onnx(export=False, run=True)
    assert not issubclass(MissingExtraError, ValueError)  # its own kind: the entry point maps it


# ----------------------------------------------------------------------------- TorchScript + sidecar
def test_torchscript_export_parity_and_sidecar(fake_root, tmp_path, capsys):
    wnids = read_classes(fake_root).wnids
    checkpoint = tmp_path / "checkpoint_best.pt"
    model = write_checkpoint(checkpoint, SMALL_MOBILEVIT + [
        "--dataset.root", fake_root,
        "--image-augmentation.mean", "0.5,0.4,0.3", "--image-augmentation.std", "0.2,0.25,0.3"], wnids)

    artifact = tmp_path / "checkpoint_best.torchscript.pt"  # beside the checkpoint by default
    sidecar = run_export(["--model.checkpoint", str(checkpoint), "--export.dynamic-batch", "true"], artifact)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert sidecar["format"] == "torchscript" and sidecar["source"]["weights"] == "model"
    assert sidecar["input"]["shape"] == ["batch", 3, 64, 64] and sidecar["input"]["channel_order"] == "RGB"
    prep = sidecar["preprocessing"]
    assert prep["pixel_range"] == [0.0, 1.0] and prep["mean"] == [0.5, 0.4, 0.3] and prep["std"] == [0.2, 0.25, 0.3]
    assert prep["val_transforms"] == [{"name": "resize", "size": 72}, {"name": "center_crop", "size": 64}]
    names = read_classes(fake_root).names
    assert sidecar["classes"] == [{"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(zip(wnids, names))]
    assert sidecar["model"]["params"] == sum(p.numel() for p in model.parameters())
    assert sidecar["model"]["batchnorm_folded"] > 0
    assert sidecar["versions"]["torch"] == torch.__version__.split("+")[0]
    cases = {c["name"]: c for c in sidecar["parity"]["cases"]}
    assert {"random", "smooth", "dataset", "random, other batch"} <= set(cases)
    for case in cases.values():
        assert case["max_abs_diff"] < 1e-4 and case["top1_agree"] == case["count"]
    assert "top-1 agreement 8/8 (100.0%)" in capsys.readouterr().out

    # The artifact on its own: normalised inputs in, the checkpoint model's logits out.
    images = (torch.rand(3, 3, 64, 64) - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.25
    with torch.no_grad():
        torch.testing.assert_close(load_runner(str(artifact), "torchscript")(images), model(images),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("val,crop_size,side", [
    ("[{name: resize}, {name: center_crop}]", 64, 64),  # the paper's: resize 72, crop 64
    ("[{name: resize, size: 88}, {name: center_crop, size: 80}]", 64, 80),
    ("[{name: resize, size: 96}]", 64, 96),  # no crop: the model sees the resized image
    ("[{name: resize}]", 32, 40),  # the crop size + 8
    ("[{name: center_crop}, {name: resize, size: 48}]", 32, 48),  # the last size-setting step decides
    ("[]", 32, 64),  # the stored images as they are
])
def test_the_export_size_is_what_the_val_pipeline_makes(val, crop_size, side):
    cfg = load_config(["--image-augmentation.val", val, "--sampler.crop-size", str(crop_size)])
    assert engine.export.input_size(cfg) == side


def test_names_fall_back_to_wnids_without_a_dataset(tmp_path):
    checkpoint = tmp_path / "ck.pt"
    write_checkpoint(checkpoint, SMALL_MOBILEVIT + ["--dataset.root", str(tmp_path / "absent")], fake_wnids())
    output = tmp_path / "out" / "model.pt"
    info = run_export(["--model.checkpoint", str(checkpoint), "--export.output", str(output),
                       "--export.verify", "false"], output)
    assert info["parity"] is None
    assert info["class_names_source"] == "none (wnids only)"
    assert [c["name"] for c in info["classes"]] == [None] * 4
    assert [c["wnid"] for c in info["classes"]] == fake_wnids()


# ----------------------------------------------------------------------------- ONNX
@pytest.fixture
def onnx_checkpoint(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    checkpoint = tmp_path / "ck.pt"
    model = write_checkpoint(checkpoint, SMALL_MOBILEVIT + ["--dataset.root", str(tmp_path / "absent")],
                             fake_wnids())
    return checkpoint, model


@pytest.mark.slow  # torch.export and ONNX Runtime: seconds per export
def test_onnx_static_export_runs_in_onnxruntime_at_64(onnx_checkpoint, tmp_path):
    checkpoint, model = onnx_checkpoint
    output = tmp_path / "static.onnx"
    info = run_export(["--model.checkpoint", str(checkpoint), "--export.format", "onnx",
                       "--export.output", str(output), "--export.verify", "false"], output)
    assert info["input"]["shape"] == [1, 3, 64, 64]
    run = load_runner(str(output), "onnx")
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(run(images), model(images), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="[Ii]nvalid|dimension"):  # the graph fixes the size
        run(torch.rand(1, 3, 96, 96))


@pytest.mark.slow  # torch.export and ONNX Runtime: seconds per export
def test_onnx_dynamic_shape_runs_in_onnxruntime_at_96(onnx_checkpoint, tmp_path):
    checkpoint, model = onnx_checkpoint
    output = tmp_path / "dynamic.onnx"
    info = run_export(["--model.checkpoint", str(checkpoint), "--export.format", "onnx",
                       "--export.output", str(output), "--export.dynamic-batch", "true",
                       "--export.dynamic-shape", "true"], output)
    assert info["input"]["shape"] == ["batch", 3, "height", "width"]
    assert {"smooth, larger", "smooth, odd"} <= {c["name"] for c in info["parity"]["cases"]}
    run = load_runner(str(output), "onnx")
    with torch.no_grad():
        for shape in ((1, 3, 64, 64), (2, 3, 96, 96), (3, 3, 66, 66)):
            images = torch.rand(shape)
            torch.testing.assert_close(run(images), model(images), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- errors
def test_missing_onnx_extra_names_the_install_command(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "ck.pt"
    write_checkpoint(checkpoint, SMALL_MOBILEVIT, fake_wnids())
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    assert export(["--model.checkpoint", str(checkpoint), "--export.format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxscript" in err and "pip install -e '.[export]'" in err


@pytest.mark.parametrize("argv, message", [
    (["--model.checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
    ([], "main_export needs --model.checkpoint"),
])
def test_bad_command_lines_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1


def test_dynamic_shape_needs_onnx(tmp_path, capsys):
    checkpoint = tmp_path / "ck.pt"
    write_checkpoint(checkpoint, SMALL_MOBILEVIT, fake_wnids())
    with pytest.raises(SystemExit) as exit_info:
        export(["--model.checkpoint", str(checkpoint), "--export.dynamic-shape", "true"])
    assert exit_info.value.code == 2 and "needs format: onnx" in capsys.readouterr().err


def test_an_export_output_that_is_a_folder_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / "ck.pt"
    write_checkpoint(checkpoint, SMALL_MOBILEVIT, fake_wnids())
    assert export(["--model.checkpoint", str(checkpoint), "--export.output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_parity_failure_exits_1_and_writes_nothing(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "ck.pt"
    write_checkpoint(checkpoint, SMALL_MOBILEVIT, fake_wnids())

    def broken_fold(model):  # a folding bug: one weight off
        folded, pairs = fold_batchnorm(model)
        with torch.no_grad():
            next(folded.parameters()).add_(0.5)
        return folded, pairs

    monkeypatch.setattr(engine.export, "fold_batchnorm", broken_fold)
    assert export(["--model.checkpoint", str(checkpoint)]) == 1
    assert "parity check failed" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # no artifact, no temp file, no sidecar


def test_a_nan_logit_of_the_artifact_fails_the_parity_check():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()

    def runner(images):  # an artifact that is right but for one NaN logit per batch
        logits = model(images)
        logits[0, 0] = float("nan")
        return logits

    case = ParityCase("random", torch.rand(4, 3, 4, 4), batch=2)
    with pytest.raises(ParityError, match="nan"):
        check_parity(model, runner, [case], tolerance=1e-3)


# ----------------------------------------------------------------------------- latency
def test_latency_gives_a_row_per_runtime_and_batch_size(tmp_path, capsys):
    config = tmp_path / "small.yaml"
    config.write_text("model:\n  mobilevit: {mode: xx_small, remove_layers: [3, 4]}\n")
    out = tmp_path / "latency.json"
    benchmark.main(["latency", "--common.config-file", str(config), "--batch-sizes", "1", "2",
                    "--threads", "1", "--repeats", "3", "--warmup", "1", "--runtimes", "eager,torchscript",
                    "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["runtime"], r["batch"], r["threads"]) for r in rows] == [
        ("small", "eager", 1, 1), ("small", "torchscript", 1, 1), ("small", "eager", 2, 1), ("small", "torchscript", 2, 1)]
    assert "median ms" in capsys.readouterr().out


class _Timed(nn.Module):
    """A model whose forward pass moves `clock`, the only clock the latency timer reads, by
    MS_PER_IMAGE per image: a call's duration is known exactly."""

    MS_PER_IMAGE = 4

    def __init__(self, clock: SimpleNamespace) -> None:
        super().__init__()
        self.clock = clock

    def forward(self, images):
        self.clock.now += self.MS_PER_IMAGE * len(images) / 1000
        return images.mean(dim=(2, 3))


def test_latency_times_one_call_of_the_model_in_milliseconds(tmp_path, monkeypatch):
    import cvnets
    from engine import timing

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(cvnets, "build_model", lambda cfg, classes: _Timed(clock))
    out = tmp_path / "latency.json"
    benchmark.main(["latency", "--batch-sizes", "1", "3", "--threads", "1", "--repeats", "5", "--warmup", "1",
                    "--runtimes", "eager", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for row in rows:
        call_ms = _Timed.MS_PER_IMAGE * row["batch"]
        assert (row["min_ms"], row["median_ms"]) == (pytest.approx(call_ms), pytest.approx(call_ms))
        assert row["images_per_s"] == pytest.approx(1000 * row["batch"] / call_ms)


def test_latency_skips_onnxruntime_with_a_note_when_it_is_missing(tmp_path, monkeypatch, capsys):
    config = tmp_path / "small.yaml"
    config.write_text("model:\n  mobilevit: {mode: xx_small, remove_layers: [3, 4]}\n")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    benchmark.main(["latency", "--common.config-file", str(config), "--repeats", "2", "--warmup", "1",
                    "--threads", "1", "--runtimes", "eager,onnxruntime"])
    captured = capsys.readouterr()
    assert "note: onnxruntime skipped" in captured.err and "pip install -e '.[export]'" in captured.err
    assert "eager" in captured.out and "onnxruntime" not in captured.out  # no row for it
