"""tools/plot_curves.py: a PNG from synthetic run folders and sweeps, and its one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, write_run
from tools import plot_curves, sweep


def make_run(folder: Path, epochs: int, ema: bool = False) -> Path:
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "lr": 0.1 / e, "train_loss": 5 / e, "train_top1": 10.0 * e, "val_loss": 4 / e,
               "val_top1": 9.0 * e, "val_top5": 20.0 * e, "images_per_second": 1000.0}
        if ema:
            row.update(ema_val_loss=4 / e, ema_val_top1=9.5 * e, ema_val_top5=21.0 * e)
        rows.append(row)
    return write_run(folder, rows)


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


@pytest.mark.slow  # two processes importing torch and matplotlib
@pytest.mark.parametrize("command", [["-m", "tools.plot_curves"], ["tools/plot_curves.py"]])
def test_runs_as_a_module_and_as_a_file(tmp_path, command):
    run = make_run(tmp_path / "run", 2)
    out = tmp_path / "x.png"
    done = subprocess.run([sys.executable, *command, str(run), "-o", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.exists()


def test_many_runs_make_a_readable_figure(tmp_path):
    """24 runs (results/paper): every run its own style, the legend beside the panels (not over
    the curves), whole epochs on the x axis, plain numbers on the log LR axis, EMA dashed."""
    import warnings

    import matplotlib.pyplot as plt

    for r in range(24):
        rows = [{"epoch": e, "lr": 0.002 * (0.9 ** e) if r % 2 else 0.4 * (0.9 ** e), "train_top1": 50 + r + e,
                 "val_top1": 45 + r + e, "train_loss": 2 - e / 10, "val_loss": 2.2 - e / 10,
                 **({"ema_val_top1": 46 + r + e, "ema_val_loss": 2.1 - e / 10} if r % 2 else {})} for e in (1, 2, 3)]
        write_run(tmp_path / "paper" / f"run_{r:02d}", rows)
    runs = plot_curves.load_runs([str(tmp_path / "paper")])
    styles = {(s["color"], s["marker"]) for s in map(plot_curves.run_style, range(24))}
    assert len(styles) == 24
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied"
        fig = plot_curves.figure(runs)
        fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent()
    assert len(legend.get_texts()) == 24 and "(best 71.0 @3, EMA 72.0 @3)" in legend.get_texts()[23].get_text()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent())
        assert all(t == int(t) for t in ax.get_xticks())
    lr_axis = fig.axes[2]
    assert lr_axis.get_yscale() == "log"
    assert {t.get_text() for t in lr_axis.get_yticklabels() if t.get_text()} >= {"0.001", "0.01", "0.1"}
    ema = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert len(ema) == 12  # the 12 runs with EMA
    plt.close(fig)
