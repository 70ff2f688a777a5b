"""tools/sweep.py: grid parsing and labels, up-front checks, and real sweeps on the fake tree.

The end-to-end tests train a 2x2 grid (MobileViT-Tiny at 32 px, 2 batches of 4 per epoch, 3
epochs) once one point after another, then compare every other way of running the same grid
with it, row by row except timings: the local launcher with --parallel 2 while one of its
trainers gets SIGTERM mid-run, and submitit's local executor while one job gets the time-limit
signal (SIGUSR1) and is requeued.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import pytest

from engine import experiments
from engine.run_folder import read_lock_holder, read_metrics, read_summary
from helpers import REPO, child_env, read_rows, write_run
from options.config import load_config
from tools import sweep
from utils.files import TEST_FAULT_ENV

GRID = ["optim.weight_decay=0.01,0.001", "model.mobilevit.remove_layers=[3,4],[4,5]"]
LABELS = ["weight_decay=0.01,remove_layers=3-4", "weight_decay=0.01,remove_layers=4-5",
          "weight_decay=0.001,remove_layers=3-4", "weight_decay=0.001,remove_layers=4-5"]
BASE = """\
common: {seed: 0, device: cpu, log_every_batches: 1, max_batches_per_epoch: 2}
dataset: {workers: 0, train_batch_size: 4, val_batch_size: 8}
image_augmentation:
  train: [{name: center_crop, size: 32}]
  val: [{name: center_crop, size: 32}]
sampler: {crop_size: 32}
model: {name: mobilevit, mobilevit: {mode: tiny}}
scheduler: {name: cosine, max_epochs: 3, warmup_iterations: 1}
"""
ENV = child_env()


def sweep_args(base, fake_root, results, name, *extra) -> List[str]:
    return ["--common.config-file", str(base), "--dataset.root", str(fake_root), "--grid", *GRID,
            "--results", str(results), "--name", name, *extra]


def start_sweep(args: List[str], out: Path, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tools.sweep", *args], cwd=REPO, env=env or ENV,
                            stdout=out.open("w"), stderr=subprocess.STDOUT)


def proc_status(pid: int) -> Dict[str, str]:
    """/proc/<pid>/status as a mapping ({} once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def wait_until(condition, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, fake_root):
    """The reference: the 2x2 grid, one point after another."""
    work = tmp_path_factory.mktemp("sweeps")
    base = work / "base.yaml"
    base.write_text(BASE)
    args = sweep_args(base, fake_root, work, "seq", "--csv", str(work / "seq.csv"))
    done = subprocess.run([sys.executable, "-m", "tools.sweep", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    return SimpleNamespace(work=work, base=base, args=args, done=done, folder=work / "seq")


# ----------------------------------------------------------------------------- grid, labels
def test_values_split_at_commas_outside_brackets():
    assert sweep.split_values("1e-3,2e-3") == ["1e-3", "2e-3"]
    assert sweep.split_values("[3,4],[4, 5]") == ["[3,4]", "[4, 5]"]
    assert sweep.split_values("[{name: a, p: [1, 2]}],[]") == ["[{name: a, p: [1, 2]}]", "[]"]
    with pytest.raises(sweep.SweepError, match="unbalanced"):
        sweep.split_values("[3,4")


def test_grid_points_and_labels():
    axes = sweep.parse_grid(["optim.weight-decay=0.01,0.001", "model.mobilevit.remove_layers=[3,4],[4,5]"])
    assert [a.key for a in axes] == ["optim.weight_decay", "model.mobilevit.remove_layers"]
    points = sweep.expand(axes)
    assert [p.label for p in points] == LABELS  # the first key varies slowest
    assert points[1].flags() == ["--optim.weight_decay", "0.01", "--model.mobilevit.remove_layers", "[4,5]"]


def test_labels_are_short_unique_and_safe_file_names():
    names = sweep.short_names(["scheduler.cosine.max_lr", "scheduler.div_by_ten.max_lr", "optim.weight_decay"])
    assert names == {"scheduler.cosine.max_lr": "cosine.max_lr", "scheduler.div_by_ten.max_lr": "div_by_ten.max_lr",
                     "optim.weight_decay": "weight_decay"}
    assert sweep.value_label("a/b c", 0) == "a_b_c"
    assert sweep.value_label("[]", 0) == "empty"
    assert sweep.value_label("[{name: cutout, holes: 4}]", 2) == "v3"  # structured values go by position
    (point,) = sweep.expand([sweep.Axis("common.seed", ("1" * 300,))])
    assert len(point.label) <= sweep.MAX_LABEL and "/" not in point.label
    with pytest.raises(sweep.SweepError, match="same run label"):
        sweep.expand([sweep.Axis("dataset.root", ("a/b", "a_b"))])


def test_grid_file_nested_or_dotted(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("optim: {weight_decay: [0.01, 0.001]}\nmodel.mobilevit.remove_layers: [[3, 4], [4, 5]]\n")
    axes = sweep.read_grid_file(str(path))
    assert axes == [sweep.Axis("optim.weight_decay", ("0.01", "0.001")),
                    sweep.Axis("model.mobilevit.remove_layers", ("[3, 4]", "[4, 5]"))]
    assert [p.label for p in sweep.expand(axes)] == LABELS
    path.write_text("optim: {weight_decay: 0.01}\n")
    with pytest.raises(sweep.SweepError, match="needs a non-empty list"):
        sweep.read_grid_file(str(path))


def test_grid_file_is_read_as_strictly_as_a_config(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text("optim:\n  weight_decay: [0.01]\n  weight-decay: [0.1]\n")
    base = tmp_path / "base.yaml"
    base.write_text(BASE)
    assert sweep.main(["--common.config-file", str(base), "--grid-file", str(path), "--dry-run",
                       "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}:3: duplicate key 'weight-decay' (first at line 2); keep one"]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("grid, message", [
    (["optim.weight_decay"], "write KEY=VALUE1,VALUE2"),
    (["optim.weight_decay=0.01,,0.1"], "empty value"),
    (["weight_decay=0.1"], "is not a config key"),
    (["optim.weight_decay=0.1", "optim.weight-decay=0.2"], "swept twice"),
])
def test_malformed_grids_are_refused(grid, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.expand(sweep.parse_grid(grid))


# ----------------------------------------------------------------------------- checks before anything starts
def test_bad_points_are_refused_one_line_each_and_nothing_starts(tmp_path, fake_root, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(BASE)
    results = tmp_path / "results"
    code = sweep.main(["--common.config-file", str(base), "--dataset.root", str(fake_root), "--results", str(results),
                       "--grid", "optim.weight_decay=0.01,-1", "model.mobilevit.remove_layers=[3,4],[4,7]"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4  # three bad points, then the summary
    bad = {line.split(":")[1].strip().split()[-1] for line in err[:3]}
    assert bad == {"weight_decay=0.01,remove_layers=4-7", "weight_decay=-1,remove_layers=3-4",
                   "weight_decay=-1,remove_layers=4-7"}
    assert "model.mobilevit.remove_layers" in err[0] and "7" in err[0]
    assert "nothing was started" in err[3]
    assert not results.exists()


@pytest.mark.parametrize("extra, message", [
    (["--grid", "optim.weight_decay=0.01,1e-2"], "resolves to the same config as point weight_decay=0.01"),
    (["--grid", "optim.weight_decay=0.1", "--optim.weight-decay", "0.2"], "both swept (--grid) and set by"),
    (["--grid", "common.run_label=a,b"], "cannot be swept"),
    (["--grid", "optim.weight_decay=0.1", "--common.results-loc", "x"], "set by the sweep"),
    (["--grid", "optim.wieght_decay=0.1"], "unknown option --optim.wieght_decay"),
])
def test_sweep_definition_errors(tmp_path, capsys, extra, message):
    base = tmp_path / "base.yaml"
    base.write_text(BASE)
    assert sweep.main(["--common.config-file", str(base), "--results", str(tmp_path / "r"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_misspelt_slurm_option_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--common.config-file", "x.yaml", "--grid", "optim.weight_decay=0.1", "--slurm.partitoin", "gpu"])
    assert exit_info.value.code == 2
    assert "did you mean --slurm.partition?" in capsys.readouterr().err


def test_dry_run_writes_configs_that_reproduce_each_point(tmp_path, fake_root, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(BASE)
    args = sweep_args(base, fake_root, tmp_path, "dry", "--scheduler.max-epochs", "5", "--dry-run")
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "dry"
    assert out.count("python main_train.py --common.config-file") == 4
    assert not any((folder / label).exists() for label in LABELS)  # nothing trained
    path = folder / "configs" / f"{LABELS[3]}.yaml"
    cfg = load_config(["--common.config-file", str(path)])
    assert (cfg.optim.weight_decay, cfg.model.mobilevit.remove_layers, cfg.scheduler.max_epochs) == (0.001, (4, 5), 5)
    assert (cfg.common.results_loc, cfg.common.run_label, cfg.common.resume) == (str(folder), LABELS[3], "auto")
    assert cfg.dataset.root == str(fake_root)
    defined = json.loads((folder / "sweep.json").read_text())
    assert [p["label"] for p in defined["points"]] == LABELS
    # The same folder refuses another grid.
    other = ["--common.config-file", str(base), "--results", str(tmp_path), "--name", "dry", "--dry-run",
             "--grid", "optim.weight_decay=0.5"]
    assert sweep.main(other) == 2
    assert "holds another sweep" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the table from run folders
def fake_run(folder: Path, label: str, val_top1s, finished: bool, params=1000) -> None:
    rows = [{"epoch": e, "train_top1": 10.0 * e, "val_top1": v, "val_top5": v + 20, "epoch_seconds": 1.0}
            for e, v in enumerate(val_top1s, start=1)]
    write_run(folder / label, rows, {"state": "finished" if finished else "interrupted", "finished": finished,
                                     "epochs_done": len(rows), "max_epochs": 4, "params": params,
                                     "stopped_by": None if finished else "SIGTERM"})


def test_collect_prints_the_table_and_writes_csv(tmp_path, fake_root, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(BASE)
    assert sweep.main(sweep_args(base, fake_root, tmp_path, "t", "--dry-run")) == 0
    folder = tmp_path / "t"
    fake_run(folder, LABELS[0], [40.0, 55.5, 55.5, 50.0], finished=True, params=817_128)
    fake_run(folder, LABELS[1], [30.0], finished=False)
    capsys.readouterr()
    out_csv = tmp_path / "t.csv"
    assert sweep.main(["--collect", str(folder), "--csv", str(out_csv)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["weight_decay", "remove_layers", "status", "best", "epoch", "val", "top-1", "val",
                                "top-5", "train", "top-1", "params"]
    assert lines[2].split() == ["0.01", "[3,4]", "finished", "2", "55.50", "75.50", "20.00", "817,128"]
    assert lines[3].split() == ["0.01", "[4,5]", "interrupted", "1/4", "1", "30.00", "50.00", "10.00", "1,000"]
    assert lines[5].split()[:3] == ["0.001", "[4,5]", "pending"]
    text = out_csv.read_text().splitlines()
    assert text[0] == "label,optim.weight_decay,model.mobilevit.remove_layers,status,best_epoch,val_top1,val_top5," \
                      "train_top1,params"
    assert text[1] == f'"{LABELS[0]}",0.01,"[3,4]",finished,2,55.5,75.5,20.0,817128'
    assert text[4] == f'"{LABELS[3]}",0.001,"[4,5]",pending,,,,,'
    assert not list(tmp_path.glob(".t.csv.*"))  # written through a temporary file, none left


def test_collect_needs_a_sweep_folder(tmp_path, capsys):
    assert sweep.main(["--collect", str(tmp_path)]) == 2
    assert "is not a sweep folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real sweeps
@pytest.mark.slow
def test_sequential_sweep_trains_every_point_and_tabulates(sequential):
    assert sequential.done.returncode == 0, sequential.done.stdout[-3000:] + sequential.done.stderr[-3000:]
    for label in LABELS:
        summary = read_summary(str(sequential.folder / label))
        assert summary["state"] == "finished" and summary["epochs_done"] == 3
        assert len(read_metrics(str(sequential.folder / label))) == 3
    lines = sequential.done.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("weight_decay  remove_layers"))
    table = lines[start:start + 6]
    assert [line.split()[:3] for line in table[2:]] == [
        ["0.01", "[3,4]", "finished"], ["0.01", "[4,5]", "finished"],
        ["0.001", "[3,4]", "finished"], ["0.001", "[4,5]", "finished"]]
    params = {line.split()[-1] for line in table[2:]}
    assert len(params) == 2  # removing layers 4,5 instead of 3,4 builds another model
    assert (sequential.work / "seq.csv").read_text().count("\n") == 5


@pytest.mark.slow
def test_second_run_skips_finished_points(sequential, capsys):
    assert sweep.main(sequential.args) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.endswith("finished, skipped")] == [
        f"{label}: finished, skipped" for label in LABELS]
    assert "training" not in out
    for label in LABELS:  # one trainer start each, from the first run
        log = sequential.folder / "_launch" / "logs" / f"{label}.log"
        assert log.read_text().count("=== ") == 1


@pytest.mark.slow
def test_parallel_sweep_resumes_a_run_stopped_by_sigterm_to_the_same_metrics(sequential, fake_root, tmp_path):
    # The trainer of one point sends itself SIGTERM while it writes its first checkpoint_last.pt
    # (the engine's test-only fault hook), so the stop lands mid-run every time: it finishes that
    # save, exits 143, and the launcher resumes it. The once-file keeps the resumed trainer from
    # stopping again.
    stopped = LABELS[1]
    once = tmp_path / "sigterm-once"
    once.touch()
    env = {**ENV, TEST_FAULT_ENV: f"SIGTERM:*/par/{stopped}/checkpoint_last.pt:1:{once}"}
    out = tmp_path / "out.txt"
    proc = start_sweep(sweep_args(sequential.base, fake_root, tmp_path, "par", "--parallel", "2"), out, env)
    try:
        code = proc.wait(timeout=600)
    finally:
        proc.kill()
    text = out.read_text()
    assert code == 0, text[-4000:]
    assert f"{stopped}: stopped by SIGTERM, state saved; resuming (restart 1 of 3)" in text, text[-4000:]
    assert not once.exists()
    assert experiments.read_record(experiments.RunSpec(str(tmp_path / "par" / stopped), ())).get("restarts") == 1
    log = (tmp_path / "par" / "_launch" / "logs" / f"{stopped}.log").read_text()
    assert log.count("=== ") == 2  # the first trainer and the resumed one
    for label in LABELS:
        assert read_rows(tmp_path / "par" / label) == read_rows(sequential.folder / label), label


@pytest.mark.slow
def test_submitit_local_executor_runs_the_grid_and_requeues_a_preempted_job(sequential, fake_root, tmp_path):
    # The trainer of one point stops itself (SIGSTOP, the engine's test-only fault hook) just before
    # its first checkpoint_last.pt lands, so the time-limit signal reaches its job mid-run every time.
    pytest.importorskip("submitit")
    preempted = LABELS[0]
    once = tmp_path / "sigstop-once"
    once.touch()
    env = {**ENV, TEST_FAULT_ENV: f"SIGSTOP:*/sub/{preempted}/checkpoint_last.pt:1:{once}"}
    out = tmp_path / "out.txt"
    args = sweep_args(sequential.base, fake_root, tmp_path, "sub", "--launcher", "slurm", "--slurm.executor", "local",
                      "--slurm.time", "30", "--wait")
    proc = start_sweep(args, out, env)
    try:
        run = tmp_path / "sub" / preempted
        trainer = wait_until(lambda: not once.exists() and (read_lock_holder(str(run)) or {}).get("pid"),
                             "the trainer reached its first save")
        wait_until(lambda: proc_status(trainer).get("State", "").startswith("T"), "the trainer stopped itself")
        job = int(proc_status(trainer)["PPid"])  # the submitit job that runs the trainer
        os.kill(job, signal.SIGUSR1)  # what SLURM sends before the time limit (--signal=USR1@...)
        usr1 = 1 << (signal.SIGUSR1 - 1)
        wait_until(lambda: int(proc_status(trainer).get("SigPnd", "0"), 16) & usr1 or
                   int(proc_status(trainer).get("ShdPnd", "0"), 16) & usr1, "the job passed the signal on")
        os.kill(trainer, signal.SIGCONT)  # the save completes, then the trainer stops (138) for the requeue
        code = proc.wait(timeout=600)
    finally:
        proc.kill()
    text = out.read_text()
    assert code == 0, text[-4000:]
    folder = tmp_path / "sub"
    records = {label: experiments.read_record(experiments.RunSpec(str(folder / label), ())) for label in LABELS}
    assert len({r["job_id"] for r in records.values()}) == 4  # one job (process) per point
    assert records[preempted]["requeues"] == 1 and not once.exists()
    logs = "".join(p.read_text() for p in (folder / "_launch" / "submitit").glob("*_log.*"))
    assert "Requeued job" in logs
    for label in LABELS:
        assert read_rows(folder / label) == read_rows(sequential.folder / label), label
    status = subprocess.run([sys.executable, "-m", "tools.sweep", "--status", str(folder)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=60).stdout
    (line,) = [line for line in status.splitlines() if line.startswith(preempted + " ")]
    assert "finished 3/3 (requeued 1x)" in line
    assert status.strip().splitlines()[-1] == "4 finished"


def test_print_config_prints_every_point_and_writes_nothing(tmp_path, fake_root, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(BASE)
    assert sweep.main(sweep_args(base, fake_root, tmp_path, "pc", "--print-config")) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("# point ")] == [f"# point {label}" for label in LABELS]
    assert not (tmp_path / "pc").exists()
