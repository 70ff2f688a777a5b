"""tools/plot_curves.py: a PNG from synthetic run folders and sweeps, and its one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import launchers
from tools import plot_curves, sweep


def make_run(folder: Path, epochs: int, ema: bool = False) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "lr": 0.1 / e, "train_loss": 5 / e, "train_top1": 10.0 * e, "val_loss": 4 / e,
               "val_top1": 9.0 * e, "val_top5": 20.0 * e, "images_per_second": 1000.0}
        if ema:
            row.update(ema_val_loss=4 / e, ema_val_top1=9.5 * e, ema_val_top5=21.0 * e)
        rows.append(json.dumps(row))
    (folder / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_writes_png_for_two_runs(tmp_path, capsys):
    a = make_run(tmp_path / "mobilevit_tiny", 4, ema=True)
    b = make_run(tmp_path / "resnet50", 3)
    out = tmp_path / "curves.png"
    assert plot_curves.main([str(a), str(b), "-o", str(out), "--title", "best runs"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_unusable_run_folder_is_named(tmp_path, capsys, case):
    good = make_run(tmp_path / "good", 2)
    bad = tmp_path / "bad"
    if case == "empty":
        bad.mkdir()
    assert plot_curves.main([str(good), str(bad), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    run = make_run(tmp_path / "run", 2)
    assert plot_curves.main([str(run), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: plot_curves needs matplotlib: pip install -e '.[plots]'"]


def test_labels_must_match_runs(tmp_path):
    run = make_run(tmp_path / "run", 2)
    with pytest.raises(SystemExit) as exit_info:
        plot_curves.main([str(run), "-o", str(tmp_path / "x.png"), "--labels", "a", "b"])
    assert exit_info.value.code == 2


def test_a_sweep_folder_plots_one_line_per_point_named_by_its_values(tmp_path, capsys, monkeypatch):
    base = tmp_path / "base.yaml"
    base.write_text("model: {name: resnet}\n")
    assert sweep.main(["--common.config-file", str(base), "--results", str(tmp_path), "--name", "ab", "--dry-run",
                       "--grid", "optim.weight_decay=0.01,0.001", "model.resnet.depth=18,34"]) == 0
    folder = tmp_path / "ab"
    make_run(folder / "weight_decay=0.001,depth=18", 3)
    make_run(folder / "weight_decay=0.01,depth=34", 2)
    drawn = {}
    monkeypatch.setattr(plot_curves, "plot", lambda runs, out, labels, title: drawn.update(runs=runs))
    assert plot_curves.main([str(folder), "-o", str(tmp_path / "ab.png")]) == 0
    assert [label for label, _ in drawn["runs"].values()] == ["weight_decay=0.01, depth=34",
                                                              "weight_decay=0.001, depth=18"]  # grid order
    out = capsys.readouterr().out
    assert out.count("has no epochs yet; left out") == 2


def test_a_folder_of_runs_plots_each_run(tmp_path):
    make_run(tmp_path / "results" / "b_run", 2)
    make_run(tmp_path / "results" / "a_run", 2)
    (tmp_path / "results" / "_launch").mkdir()
    runs = plot_curves.load_runs([str(tmp_path / "results")])
    assert [label for label, _ in runs.values()] == ["a_run", "b_run"]
    out = tmp_path / "all.png"
    assert plot_curves.main([str(tmp_path / "results"), "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command", [["-m", "tools.plot_curves"], ["tools/plot_curves.py"]])
def test_runs_as_a_module_and_as_a_file(tmp_path, command):
    run = make_run(tmp_path / "run", 2)
    out = tmp_path / "x.png"
    done = subprocess.run([sys.executable, *command, str(run), "-o", str(out)], cwd=launchers.REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.exists()
