"""tools/plot_curves.py: a PNG from synthetic run folders, and its one-line errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import plot_curves  # noqa: E402


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
