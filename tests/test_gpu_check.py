"""tools/gpu_check.py: the whole check with --quick on the CPU (every section with real values),
the budget's skipping, the tree merging, and the command line."""
import contextlib
import io
import json
import math
import os

import pytest
import torch

import tools.gpu_check as gpu_check
from data.fake import make_fake_tinyimagenet
from data.tinyimagenet import TinyImageNet


def run_main(*argv):
    """main(argv) in this process -> (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = gpu_check.main(list(argv))
    return status, out.getvalue()


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("gpu_check"))


@pytest.fixture(scope="module")
def quick(out_dir):
    """One quick CPU run shared by the tests: (status, stdout, JSON payload, torch threads before)."""
    path = os.path.join(out_dir, "quick.json")
    threads = torch.get_num_threads()
    status, out = run_main("--device", "cpu", "--quick", "--json", path, "--out-dir", out_dir)
    with open(path) as f:
        payload = json.load(f)
    return status, out, payload, threads


def rows(payload, section):
    return payload["sections"][section]


def test_quick_run_passes_and_prints_one_table_of_every_section(quick):
    status, out, payload, threads = quick
    assert status == 0 and payload["failed"] == []
    assert "every check that ran passed" in out
    header = next(line for line in out.splitlines() if line.split()[:2] == ["section", "item"])
    table = out[out.index(header):]
    for section in ("correctness", "resume", "placement", "throughput", "end_to_end", "estimate"):
        assert f"{section} " in table, section
    assert torch.get_num_threads() == threads  # --quick's single thread is restored


def test_correctness_rows_are_finite_falling_and_match_the_cpu(quick):
    _, _, payload, _ = quick
    checks = rows(payload, "correctness")
    settings = {(r["dtype"], r["channels_last"], r["compile"]) for r in checks}
    assert {("fp32", True, False), ("fp32", False, False), ("bf16", True, False), ("bf16", False, False)} <= settings
    assert any(r["compile"] for r in checks)  # the compiled path ran too (dynamo's eager backend here)
    for r in checks:
        assert r["status"] == "ok" and r["finite"] and r["falling"]
        assert all(math.isfinite(v) for v in r["losses"]) and r["losses"][-1] < gpu_check.FALL_RATIO * r["losses"][0]
        assert 0 <= r["eval_error"] <= gpu_check.TOLERANCES[r["dtype"]]
        assert r["eval_error_plain"] is not None and r["eval_error_folded"] is not None


def test_resume_is_bit_exact(quick):
    _, _, payload, _ = quick
    (row,) = rows(payload, "resume")
    assert row["bit_exact"] is True and row["control_exact"] is True and row["status"] == "ok"
    assert row["tensors"] > 100 and row["differing"] == []


def test_resume_check_catches_a_checkpoint_that_forgets_the_rng(tmp_path, monkeypatch, one_thread):
    from engine import checkpoint
    from engine.build import setup_process

    process = setup_process(gpu_check.model_config(gpu_check.TINY, {"common.device": "cpu"}))
    budget = gpu_check.Budget(600.0, gpu_check.FIRST_GUESS_S["cpu"], list(gpu_check.SECTION_SHARES))
    tree = gpu_check.TreeBuilder(str(tmp_path / "unused"), 1, 1, 1, 1)
    ctx = gpu_check.Context(gpu_check.QUICK, torch.device("cpu"), process, budget, gpu_check.Report(None, {}),
                            str(tmp_path), 1, tree, str(tmp_path))
    monkeypatch.setattr(checkpoint, "set_rng_state", lambda state: None)  # dropout then draws other masks
    row = gpu_check.resume_check(ctx, gpu_check.TINY)
    assert row["status"] == "FAIL" and not row["bit_exact"] and row["control_exact"]
    assert any(name.startswith("model.") for name in row["differing"])


def test_device_placement_gives_the_workers_batches(quick):
    _, _, payload, _ = quick
    (row,) = rows(payload, "placement")
    assert row["equal"] is True and row["batches"] == 2 * gpu_check.QUICK.placement_batches
    assert set(row["max_diff"]) == {"device+cache memory", "device+cache none"}
    assert all(0 <= d <= gpu_check.PLACEMENT_TOLERANCE for d in row["max_diff"].values())


def test_throughput_of_both_models_at_both_batch_sizes(quick):
    _, _, payload, _ = quick
    measured = {(r["model"], r["batch"]): r for r in rows(payload, "throughput")}
    assert set(measured) == {(m, b) for m in ("mobilevit_tiny", "resnet50") for b in gpu_check.QUICK.batches}
    for r in measured.values():
        assert r["train_images_per_s"] > 0 and r["eval_images_per_s"] > 0


def test_end_to_end_epochs_of_both_placements(quick):
    _, _, payload, _ = quick
    epochs = {r["placement"]: r for r in rows(payload, "end_to_end") if r["status"] != "skipped"}
    assert set(epochs) == {"workers", "device"}
    for r in epochs.values():
        assert r["images_per_s"] > 0 and r["ratio_to_model_only"] > 0
        last = r["epochs"][-1]
        assert last["train_images"] == gpu_check.QUICK.e2e_max_batches * gpu_check.QUICK.batches[0]
        assert math.isfinite(last["val_loss"])


def test_minute_estimates_for_both_runs(quick):
    _, out, payload, _ = quick
    estimates = {r["model"]: r for r in rows(payload, "estimate")}
    assert estimates["mobilevit_tiny"]["measured_directly"] and estimates["mobilevit_tiny"]["epochs"] == 200
    assert estimates["resnet50"]["epochs"] == 150 and estimates["resnet50"]["pixel_factor"] > 1  # its larger crops
    for r in estimates.values():
        assert r["minutes"] > 0 and math.isfinite(r["minutes"]) and r["scaled"] is True
        assert r["how"] in out  # the table's notes say how each was computed


def test_a_spent_budget_skips_every_item_and_still_reports(quick, out_dir, monkeypatch):
    monkeypatch.setattr(gpu_check, "OVERRUN_GRACE_S", 600.0)  # the watchdog must not end pytest
    path = os.path.join(out_dir, "skipped.json")
    status, out = run_main("--device", "cpu", "--quick", "--time-budget", "0.5", "--json", path,
                           "--out-dir", out_dir)  # the tree of the quick run is reused, not rewritten
    with open(path) as f:
        payload = json.load(f)
    assert status == 0 and "reusing" in out
    statuses = [r["status"] for section in payload["sections"].values() for r in section]
    assert statuses and set(statuses) == {"skipped"}
    assert "deadline" in rows(payload, "correctness")[0]["measured"]


def test_budget_shares_its_time_among_the_chosen_sections():
    guesses = {"a": 2.0}
    budget = gpu_check.Budget(100.0, guesses, ["correctness", "placement"])
    shares = gpu_check.SECTION_SHARES
    usable = 100.0 - gpu_check.RESERVE_S
    first = usable * shares["correctness"] / (shares["correctness"] + shares["placement"])
    assert budget.deadlines["correctness"] - budget.start == pytest.approx(first)
    assert budget.deadlines["placement"] - budget.start == pytest.approx(usable)
    assert set(budget.deadlines) == {"correctness", "placement"}
    assert budget.expected("a", size=10) == 20.0
    budget.record("a", 30.0, size=10)  # the first measurement replaces the guess ...
    budget.record("a", 10.0, size=10)  # ... later ones only raise it
    assert budget.expected("a", size=5) == 15.0 and guesses == {"a": 2.0}


def test_watchdog_reports_the_item_in_progress_and_exits_1(monkeypatch):
    monkeypatch.setattr(gpu_check, "OVERRUN_GRACE_S", 0.0)
    report = gpu_check.Report(None, {})
    report.running = ("compile", "mobilevit_tiny", "bf16 channels_last compiled")
    finished, exits = [], []
    dog = gpu_check.Watchdog(gpu_check.Budget(0.01, {}, ["compile"]), report, lambda: finished.append(True),
                             exit=exits.append).start()
    dog._thread.join(timeout=30)
    (row,) = report.rows
    assert exits == [1] and finished == [True] and row["status"] == "error" and "cut off" in row["measured"]
    assert row["item"] == "mobilevit_tiny"


def test_a_stopped_watchdog_does_nothing():
    report = gpu_check.Report(None, {})
    exits = []
    dog = gpu_check.Watchdog(gpu_check.Budget(3600.0, {}, ["compile"]), report, lambda: None, exit=exits.append).start()
    dog.stop()
    dog._thread.join(timeout=30)
    assert not dog._thread.is_alive() and exits == [] and report.rows == []


def test_merged_shards_make_one_readable_tree(tmp_path):
    # The same seed twice: every wnid collides, so the second shard's classes are renamed.
    shards = [make_fake_tinyimagenet(str(tmp_path / f"s{i}"), classes=2, train_per_class=3, val_per_class=2,
                                     test_per_class=0, seed=0) for i in range(2)]
    root = str(tmp_path / "tree")
    gpu_check.merge_shards(shards, root)
    train, val = TinyImageNet(root, "train"), TinyImageNet(root, "val")
    assert train.num_classes == 4 and len(train) == 12 and len(val) == 8
    assert sorted(set(val.labels.tolist())) == [0, 1, 2, 3]


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--help"])
    assert e.value.code == 0 and "--time-budget" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--time-budget", "0"], "must be > 0"),
    (["--train-images", "many"], "is not a number"),
    (["--quick", "--train-images", "5"], "at least one image per class"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--only", "correctness,speed"], "choose from correctness, resume"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
