"""tools/benchmark.py and engine/timing.py: argument handling, tiny runs of every subcommand (no
timing assertions: what they count, not how fast), peak memory and the run estimate. The model
fast paths these benchmarks measure are tested in test_models.py, the GPU paths in test_cuda.py."""
import json
import os
import re
import sys

import pytest
import torch

import tools.benchmark as benchmark
from engine import timing
from helpers import REPO
from options.config import load_config

XX_SMALL = os.path.join(REPO, "config", "mobilevit_xx_small.yaml")
TINY = os.path.join(REPO, "config", "mobilevit_tiny.yaml")


def run(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    try:
        benchmark.main(list(argv))
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


# Small enough for a unit test: 32 px crops, batches of 8, no workers, 2 batches an epoch.
TINY_RUN = ("--common.config-file", TINY, "--dataset.workers", "0", "--dataset.train-batch-size", "8",
            "--sampler.crop-size", "32", "--image-augmentation.val", "[{name: resize, size: 36}, {name: center_crop}]",
            "--device", "cpu", "--max-batches", "2")


def table(out, first_header):
    """The rows of the printed table whose header starts with `first_header`, as {header: cell}."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_header])
    spans = [m.span() for m in re.finditer("-+", lines[start + 1])]  # the rule under the header
    rows = []
    for line in lines[start + 2:]:
        if len(line) != len(lines[start + 1]):  # every row is as wide as the rule
            break
        rows.append({lines[start][a:b].strip(): line[a:b].strip() for a, b in spans})
    return rows


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("argv, message", [
    (("model", "--batch-size", "0"), "must be >= 1"),
    (("model", "--dtype", "fp8"), "invalid choice: 'fp8'"),
    (("model", "--memory-format", "nhwc"), "invalid choice: 'nhwc'"),
    (("model", "--modes", "train,test"), "choose from train, eval"),
    (("epoch", "--caches", "none,ram"), "choose from none, memory, disk, device"),
    (("gpu", "--models", "resnet99.yaml"), "choose from mobilevit_xx_small.yaml"),
    (("latency", "--model.name", "resnet"), "unrecognized arguments: --model.name"),
    (("data", "--dataset.workrs", "2"), "did you mean"),
    (("data", "--dataset.root", "/nonexistent/tiny"), "/nonexistent/tiny"),
    (("gpu", "--dataset.root", "/nonexistent/tiny"), "--generate 100000"),
])
def test_bad_arguments_exit_2_with_the_reason(capsys, argv, message):
    status, _, err = run(capsys, *argv)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1


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
    rows = table(out, "model")
    assert [(r["model"], r["mode"], r["batch"]) for r in rows] == [("ours", "train", "2"), ("ours", "eval", "2")]
    saved = json.loads(out_json.read_text())
    assert saved["command"] == "model" and saved["rows"][0]["params"] == 1_015_224  # the authors' count
    assert [len(r["run_seconds"]) for r in saved["rows"]] == [1, 1]


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


def test_tiny_epoch_run_compares_data_variants_and_says_where_device_runs(capsys, fake_root, tmp_path):
    out_json = tmp_path / "epoch.json"
    status, out, _ = run(capsys, "epoch", "--dataset.root", fake_root, *TINY_RUN, "--caches", "none,device",
                         "--json", str(out_json))
    assert status == 0
    assert "note: on the CPU the 'device' variant runs the batch augmentation in the training process" in out
    rows = table(out, "data")
    assert [(r["data"], r["workers"], r["images/epoch"], r["vs jpeg"]) for r in rows][0] == ("none", "0", "16", "1.00")
    assert rows[1]["data"] == "device"
    saved = json.loads(out_json.read_text())["rows"]
    for row in saved:  # the Trainer's own records of a real epoch: 2 batches of 8, the whole val split
        (epoch,) = row["epochs"]
        assert epoch["train_images"] == 16 and epoch["val_images"] == 16 and epoch["epoch"] == 1


def test_data_takes_the_config_file_and_dataset_root_like_every_command(capsys, fake_root, tmp_path):
    status, out, _ = run(capsys, "data", "--common.config-file", TINY, "--dataset.root", fake_root,
                         "--dataset.workers", "0", "--dataset.train-batch-size", "8", "--caches", "none,memory",
                         "--batches", "3", "--repeats", "1", "--device", "cpu",
                         "--dataset.cache-dir", str(tmp_path / "cache"))
    assert status == 0
    rows = table(out, "data")
    assert [(r["data"], r["workers"], r["images"]) for r in rows] == [("none", "0", "24"), ("memory", "0", "24")]


def test_estimate_scales_a_real_epoch_to_the_whole_run(capsys, fake_root, tmp_path):
    out_json = tmp_path / "estimate.json"
    status, out, _ = run(capsys, "estimate", "--dataset.root", fake_root, *TINY_RUN, "--json", str(out_json))
    assert status == 0
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["config"] == "mobilevit_tiny" and row["epochs"] == 200  # config/mobilevit_tiny.yaml's run length
    assert row["measured_train_images"] == 16
    assert table(out, "config")[0]["minutes/run"] == f"{row['minutes']:,.1f}"


def test_benchmark_epochs_reach_no_experiment_tracker(capsys, fake_root, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlflow.db"
    status, _, _ = run(capsys, "estimate", "--dataset.root", fake_root, *TINY_RUN, "--stats.mlflow.enable", "true",
                       "--stats.mlflow.tracking-uri", f"sqlite:///{store}")
    assert status == 0 and not store.exists()


def test_run_epoch_seconds_scales_training_and_the_rest_separately():
    # 500 images/s over 100,000 images: 200 s; 3 s besides training for 20 validation images,
    # scaled to 10,000: 1,500 s
    metrics = {"images_per_second": 500.0, "train_seconds": 4.0, "epoch_seconds": 7.0, "val_images": 20}
    assert timing.run_epoch_seconds(metrics) == pytest.approx(1700.0)
    assert timing.run_epoch_seconds(metrics, train_images=1000, val_images=20) == pytest.approx(5.0)


def test_gpu_runs_every_section_and_writes_one_json(capsys, tmp_path):
    out_json = tmp_path / "gpu.json"
    status, out, _ = run(capsys, "gpu", "--device", "cpu", "--generate", "16", "--models", "mobilevit_xx_small.yaml",
                         "--epoch-config", "mobilevit_xx_small.yaml", "--estimate-configs", "--batch-sizes", "4",
                         "--caches", "memory", "--steps", "1", "--repeats", "1", "--warmup", "0", "--epochs", "1",
                         "--max-batches", "2", "--dataset.workers", "0", "--sampler.crop-size", "32",
                         "--image-augmentation.val", "[{name: resize, size: 36}, {name: center_crop}]",
                         "--json", str(out_json))
    assert status == 0 and "wrote a 16-image tree" in out
    saved = json.loads(out_json.read_text())
    assert [(r["model"], r["mode"], r["batch"]) for r in saved["model"]] == [
        ("mobilevit_xx_small", "train", 4), ("mobilevit_xx_small", "eval", 4)]
    (epoch,) = saved["epoch"]
    assert epoch["images"] == 2 * 4 and epoch["batch"] == 4  # --max-batches of the first --batch-sizes
    train = saved["model"][0]["images_per_s"]
    assert epoch["vs_model_only"] == pytest.approx(epoch["images_per_s"] / train)
    (estimate,) = saved["estimate"]
    assert estimate["config"] == "mobilevit_xx_small" and estimate["epochs"] == 200  # the MobileViT recipe's
    assert saved["system"]["cpus"] == os.cpu_count()


def test_cpu_peak_memory_is_the_growth_of_one_step():
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak resident memory is read from Linux's /proc")
    cpu = torch.device("cpu")
    big = timing.peak_memory_mib(lambda: (torch.ones(1 << 24) + 1).sum(), cpu)  # two 64 MiB tensors live
    small = timing.peak_memory_mib(lambda: torch.ones(1 << 10).sum(), cpu)
    assert 120 <= big <= 160 and small < 8


def test_print_config_shows_the_resolved_config_with_its_overrides(capsys):
    status, out, _ = run(capsys, "model", "--config", os.path.join(REPO, "config", "resnet18.yaml"),
                         "--model.resnet.depth", "34", "--print-config")
    assert status == 0 and "depth: 34" in out and "images/s" not in out  # printed, nothing timed


@pytest.mark.slow
def test_distill_trains_a_teacher_then_the_student_alone_and_distilled(capsys, tmp_path):
    out_json = tmp_path / "distill.json"
    status, out, _ = run(capsys, "distill", "--epochs", "1", "--teacher-epochs", "1", "--device", "cpu",
                         "--json", str(out_json))
    assert status == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["run"], r["epochs"]) for r in rows] == [("teacher", 1), ("student alone", 1), ("student distilled", 1)]
    alone, distilled = rows[1]["val_loss"], rows[2]["val_loss"]
    assert alone != distilled  # the teacher changed the student's training
    verdict = "below" if distilled < alone else "NOT below"
    assert f"val loss {verdict} the student alone's ({distilled:.3f} vs {alone:.3f})" in out
