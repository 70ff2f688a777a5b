"""engine/experiments.py: the one run state, results from run folders, checks and atomic tables."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from engine import experiments
from engine.experiments import Result, RunSpec
from helpers import write_run


def run_folder(tmp_path: Path, summary: Optional[Dict[str, Any]] = None, epochs: int = 0, name: str = "r") -> RunSpec:
    rows = [{"epoch": e, "train_top1": 10.0 * e, "val_top1": 5.0 * e, "val_top5": 20.0 + e}
            for e in range(1, epochs + 1)]
    return RunSpec(str(write_run(tmp_path / name, rows, summary)), ("--common.config-file", "/configs/r.yaml"))


# ----------------------------------------------------------------------------- the state of a run
def test_a_run_without_folder_or_record_is_pending(tmp_path):
    state = experiments.run_state(RunSpec(str(tmp_path / "nothing"), ()))
    assert (state.state, state.text, state.short, state.job) == ("pending", "pending", "pending", "")


@pytest.mark.parametrize("summary, epochs, text, short", [
    ({"state": "finished", "finished": True, "epochs_done": 3, "max_epochs": 3}, 3, "finished 3/3", "finished"),
    ({"state": "failed", "epochs_done": 9, "max_epochs": 200, "error": "non-finite loss at epoch 10"}, 9,
     "failed 9/200: non-finite loss at epoch 10", "failed 9/200"),
    ({"state": "interrupted", "epochs_done": 2, "max_epochs": 10, "stopped_by": "SIGTERM"}, 2,
     "interrupted 2/10 (SIGTERM)", "interrupted 2/10"),
    ({"state": "running", "epochs_done": 2, "max_epochs": 10}, 2, "interrupted 2/10", "interrupted 2/10"),  # killed
    (None, 1, "interrupted", "interrupted"),  # epochs but no summary: a run of an older version
])
def test_state_from_the_run_folder(tmp_path, summary, epochs, text, short):
    state = experiments.run_state(run_folder(tmp_path, summary, epochs))
    assert (state.text, state.short) == (text, short)


def test_state_from_the_launch_record(tmp_path):
    spec = run_folder(tmp_path, {"state": "interrupted", "epochs_done": 7, "max_epochs": 200, "stopped_by": "SIGUSR1"})
    experiments.update_record(spec, launcher="slurm", job_id="55_3", state="requeued", requeues=2)
    assert experiments.status_lines([spec])[2].split() == ["r", "preempted,", "requeued", "7/200", "(2x)", "slurm",
                                                           "55_3"]
    queued = RunSpec(str(tmp_path / "q"), ())
    experiments.update_record(queued, launcher="slurm", job_id="56_0", state="queued")
    assert experiments.run_state(queued).text == "queued"
    assert experiments.run_state(queued, {"56_0": "RUNNING"}).text == "starting"
    assert experiments.run_state(queued, {"56_0": "RUNNING"}).job == "slurm 56_0 (RUNNING)"
    died = RunSpec(str(tmp_path / "d"), ())  # its trainer failed before it wrote anything
    experiments.update_record(died, launcher="local", state="failed", error="exit status 2: error: bad root")
    assert experiments.run_state(died).text == "failed: exit status 2: error: bad root"
    lines = experiments.status_lines([spec, queued, died])
    assert lines[-1] == "1 requeued, 1 queued, 1 failed"


# ----------------------------------------------------------------------------- results
def test_collect_reports_the_best_epoch_and_counts_the_parameters_of_an_older_run(tmp_path, monkeypatch):
    # An older run folder: metrics but no params in its summary and no config.yaml; the parameters
    # come from the model of the config file the run was started with.
    spec = run_folder(tmp_path, {"state": "finished", "finished": True, "epochs_done": 3, "max_epochs": 3}, 3)
    seen = []
    monkeypatch.setattr(experiments, "count_params", lambda path, classes: seen.append((path, classes)) or 42)
    assert experiments.collect(spec) == Result("finished", 3, 15.0, 23.0, 30.0, 42)
    assert seen == [("/configs/r.yaml", 200)]
    assert Result("pending").cells() == ["pending", "–", "–", "–", "–", "–"]
    assert Result("pending").values() == ["pending", None, None, None, None, None]


def test_write_csv_leaves_the_old_file_when_a_row_fails(tmp_path):
    path = tmp_path / "table.csv"
    experiments.write_csv(str(path), ["a", "b"], [[1, None], ["x,y", 2.5]])
    assert path.read_bytes() == b'a,b\r\n1,\r\n"x,y",2.5\r\n'

    def rows():
        yield [3, 4]
        raise RuntimeError("collecting failed")

    with pytest.raises(RuntimeError):
        experiments.write_csv(str(path), ["a", "b"], rows())
    assert path.read_bytes() == b'a,b\r\n1,\r\n"x,y",2.5\r\n'
    assert os.listdir(tmp_path) == ["table.csv"]  # no temporary file left


# ----------------------------------------------------------------------------- checks before anything starts
def test_check_runs_resolves_every_run_and_names_each_bad_one(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {name: mobilevit, mobilevit: {mode: tiny}}\n")
    good = RunSpec(str(tmp_path / "good"), ("--common.config-file", str(base), "--optim.weight-decay", "0.01",
                                             *experiments.placement_args(str(tmp_path), "good")))
    bad = RunSpec(str(tmp_path / "bad"),
                  ("--common.config-file", str(base), "--model.mobilevit.remove-layers", "[4,7]"), "point bad")
    configs, errors = experiments.check_runs([good, bad])
    assert list(configs) == ["good"]
    cfg = configs["good"]
    assert (cfg.optim.weight_decay, cfg.common.results_loc, cfg.common.run_label, cfg.common.resume) == (
        0.01, str(tmp_path), "good", "auto")
    (error,) = errors
    assert error.startswith("point bad: model.mobilevit.remove_layers") and "7" in error
    assert good.config_file == str(base) and RunSpec("x", ()).config_file is None


def test_check_runs_refuses_a_tracker_whose_package_is_missing_as_main_train_does(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    run = RunSpec(str(tmp_path / "r"), ("--stats.mlflow.enable", "true"))
    configs, errors = experiments.check_runs([run])
    assert configs == {} and errors == ["r: stats.mlflow.enable: true needs the mlflow package: pip install -e '.[mlflow]'"]


def test_a_placed_run_is_filed_under_its_folder_in_the_trackers(tmp_path):
    from options.config import load_config

    cfg = load_config(experiments.placement_args(str(tmp_path / "sweeps" / "wd-sweep"), "weight_decay=0.01"))
    assert (cfg.common.results_loc, cfg.common.run_label) == (str(tmp_path / "sweeps" / "wd-sweep"), "weight_decay=0.01")
    assert cfg.stats.wandb.group == cfg.stats.mlflow.experiment == "wd-sweep"
