"""tools/paper_tables.py: the table registry, its configs and tables built from synthetic run folders."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest

from engine import experiments
from helpers import write_run
from options.config import load_config
from tools import paper_tables as pt

ROOT = Path(__file__).resolve().parents[1]  # the repository

# Parameters at 200 classes (README, "Reproducing the paper"; the paper's 817k for MobileViT-Tiny,
# section 3.1, and its Table 2 counts for ResNet). The other Table 3 models follow the MobileViT
# layout with the head's 1x1 conv sized from the last remaining layer, as in the paper's fork
# (min(4 * C, 960)). "Use residual" adds a parameter-free layer norm: no parameters over MobileViT-Tiny.
EXPECTED_PARAMS = {
    "table1_mobilevit_small.yaml": 5_065_832,
    "table1_mobilevit_x_small.yaml": 2_009_848,
    "table1_mobilevit_xx_small.yaml": 1_015_224,
    "table2_resnet50.yaml": 23_910_856,
    "table2_resnet34.yaml": 21_380_296,
    "table2_resnet18.yaml": 11_272_136,
    "table3_no_vbs.yaml": 2_009_848,
    "table3_remove_5.yaml": 1_145_224,
    "table3_remove_4_5.yaml": 423_928,
    "table3_remove_4_5_wd_0.001.yaml": 423_928,
    "table3_remove_3_4.yaml": 983_208,
    "table3_remove_3_4_no_fusion.yaml": 817_128,
    "table3_remove_3_4_residual.yaml": 817_128,
    "table3_remove_3_4_no_fusion_cutout.yaml": 817_128,
    "table4_resnet18_no_vbs.yaml": 11_272_136,
    "table4_resnet18_no_vbs_augment_tiny.yaml": 11_272_136,
    "table4_resnet18_no_vbs_div_by_ten.yaml": 11_272_136,
    "table4_resnet18_no_vbs_div_by_ten_augment_tiny.yaml": 11_272_136,
    "table4_resnet50_no_vbs.yaml": 23_910_856,
    "table4_resnet50_no_vbs_augment_tiny.yaml": 23_910_856,
    "table4_resnet50_no_vbs_wd_4e-5.yaml": 23_910_856,
    "table4_resnet50_no_vbs_div_by_ten.yaml": 23_910_856,
    "table4_resnet50_no_vbs_div_by_ten_augment_tiny.yaml": 23_910_856,
    "table4_resnet18_cyclic.yaml": 11_272_136,
    # The ladder beyond the paper (config/beyond/): MobileViT-Tiny, and the distillation teacher, a
    # CIFAR-stem ResNet-18: the common CIFAR ResNet-18's 11,173,962 at 10 classes + 190 * (512 + 1).
    "tiny_long.yaml": 817_128,
    "tiny_long_cutmix.yaml": 817_128,
    "tiny_long_cutmix_randaugment.yaml": 817_128,
    "tiny_long_cutmix_randaugment_distill.yaml": 817_128,
    "teacher_resnet18_cifar.yaml": 11_173_962 + 190 * 513,
}
CONFIGS = sorted({pt.config_path(row) for row in pt.ROWS})

Epoch = Tuple[float, float, float]  # train_top1, val_top1, val_top5


def make_run(results: Path, label: str, epochs: Sequence[Epoch], finished: bool = False,
             params: Optional[int] = 1234, max_epochs: int = 10) -> Path:
    """A run folder as the engine writes it: metrics.jsonl plus summary.json."""
    lines = [
        {"epoch": i, "lr": 0.1, "train_loss": 1.0, "train_top1": t, "val_loss": 1.0,
         "val_top1": v1, "val_top5": v5, "images_per_second": 100.0,
         "ema_val_loss": 1.0, "ema_val_top1": 99.0, "ema_val_top5": 99.0}
        for i, (t, v1, v5) in enumerate(epochs, start=1)
    ]
    summary = {"finished": finished, "epochs_done": len(epochs), "max_epochs": max_epochs}
    if params is not None:
        summary["params"] = params
    return write_run(results / label, lines, summary)


def row(key: str) -> pt.Row:
    return pt.select_rows(keys=[key])[0]


def table_line(text: str, key: str) -> List[str]:
    """The cells of the markdown line for row `key` (first match)."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == key:
            return cells
    raise AssertionError(f"no line for row {key} in:\n{text}")


# ----------------------------------------------------------------------------- registry
def test_registry_has_every_paper_row_and_the_cyclic_extra():
    counts = {t: sum(r.table == t for r in pt.ROWS) for t in pt.TITLES}
    assert counts == {1: 3, 2: 3, 3: 8, 4: 12, 5: 5}  # 5: the ladder beyond the paper
    assert len({r.key for r in pt.ROWS}) == len(pt.ROWS) == 31
    assert [r.key for r in pt.ROWS if r.table == 4] == list("ABCDEFGHIJKL")
    cyclic = row("L")
    assert (cyclic.train_top1, cyclic.val_top1, cyclic.val_top5) == (None, None, None)  # no paper figures
    assert load_config(["--common.config-file", pt.config_path(cyclic)]).scheduler.name == "cyclic"


# config/paper/authors_runs.json says which run of the authors
# each row reproduces: "log:..." a logged run, "cfg:..." a config (or one plus the row's change),
# rows_without_reference: none. The extra cyclic row reproduces the logged cyclic run.
AUTHORS_RUNS = ROOT / "config" / "paper" / "authors_runs.json"


def test_verified_says_what_each_row_was_checked_against():
    spec = json.loads(AUTHORS_RUNS.read_text())
    expected = {Path(path).name: {"log": "log", "cfg": "config"}[run.split(":")[0]]
                for path, run in spec["rows"].items()}
    expected.update({Path(path).name: "paper" for path in spec["rows_without_reference"]})
    expected["table4_resnet18_cyclic.yaml"] = "log"  # log:resnet_tiny_correct_class_depth18_cyclic
    assert {r.config: r.verified for r in pt.ROWS if r.table <= 4} == expected
    assert {r.verified for r in pt.ROWS if r.table > 4} == {"none"}
    assert pt.Row(5, "5.1", "an ablation of your own", "table3_no_vbs.yaml").verified == "none"


def test_table4_baselines_share_the_table2_runs():
    assert row("A").config == row("2.3").config
    assert row("F").config == row("2.1").config


@pytest.mark.parametrize("config", CONFIGS)
def test_row_config_loads(config):
    assert os.path.isfile(config)
    cfg = load_config(["--common.config-file", config])
    assert cfg.common.config_file == config


# Table 4's baselines A and F and the extra cyclic row L (the authors' run kept it) use the sampler.
@pytest.mark.parametrize("key", [r.key for r in pt.ROWS if r.table in (3, 4) and r.key not in ("A", "F", "L")])
def test_experiments_turn_off_the_variable_batch_sampler(key):
    cfg = load_config(["--common.config-file", pt.config_path(row(key))])
    assert (cfg.sampler.name, cfg.sampler.crop_size, cfg.dataset.train_batch_size) == ("batch_sampler", 64, 128)


def test_recipe_changes_reach_the_resolved_configs():
    def load(key):
        return load_config(["--common.config-file", pt.config_path(row(key))])

    tiny, from_file = load("3.6"), load_config(["--common.config-file", str(ROOT / "config" / "mobilevit_tiny.yaml")])
    assert tiny.model == from_file.model and tiny.model.mobilevit.mode == "tiny"
    assert load("3.5").model.mobilevit.fusion == "concat_conv"
    assert load("3.4").optim.weight_decay == 0.001
    assert load("3.7").model.mobilevit.fusion == "residual"
    assert load("3.8").image_augmentation.train[1]["name"] == "cutout"
    assert load("I").optim.weight_decay == 4e-5
    k = load("K")
    assert k.scheduler.name == "div_by_ten" and k.scheduler.div_by_ten.milestones == (40, 80, 120)
    crop, mixed = k.image_augmentation.train
    assert crop["name"] == "random_resized_crop" and mixed["name"] == "random_order" and len(mixed["transforms"]) == 6
    assert k.optim.sgd.nesterov is True
    assert load("B").scheduler.name == "cosine" and load("B").model.resnet.depth == 18


@pytest.mark.parametrize("config", CONFIGS)
def test_row_model_has_expected_parameter_count(config):
    pytest.importorskip("torch")
    name = os.path.basename(config)
    assert name in EXPECTED_PARAMS, f"add the parameter count of {name} to EXPECTED_PARAMS"
    assert experiments.count_params(config) == EXPECTED_PARAMS[name]


def test_select_rows_by_table_key_or_stem():
    assert [r.key for r in pt.select_rows([2])] == ["2.1", "2.2", "2.3"]
    assert [r.key for r in pt.select_rows([4], ["a", "K"])] == ["A", "K"]
    assert [r.key for r in pt.select_rows(keys=["table3_remove_5"])] == ["3.2"]
    with pytest.raises(ValueError, match="unknown row"):
        pt.select_rows([4], ["3.1"])


# ----------------------------------------------------------------------------- --list
def test_list_shows_every_row_and_what_verified_it(capsys):
    assert pt.main(["--list"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(lines) == 31
    assert "config/paper/table3_remove_3_4_no_fusion.yaml" in out and "817k" in out
    assert table_line(out, "B3")[3] == "config/beyond/tiny_long_cutmix_randaugment_distill.yaml"
    assert table_line(out, "G")[4:9] == ["authors' log", "58.51", "60.19", "81.93", "23.9M"]
    assert table_line(out, "1.1")[4] == "authors' config"
    assert table_line(out, "3.2")[4] == "paper text only"


# ----------------------------------------------------------------------------- collecting
def test_rows_without_runs_are_pending(tmp_path):
    rows = pt.select_rows([1])
    text = pt.render_results(rows, {r: pt.collect(r, str(tmp_path)) for r in rows})
    cells = table_line(text, "1.2")
    assert cells[2:] == ["pending", "–", "– / 55.97", "– / 53.42", "– / 78.51", "– / 2.3M"]


def test_best_epoch_is_the_highest_val_top1(tmp_path):
    make_run(tmp_path, "table3_no_vbs", [(40, 50, 70), (55, 58.5, 80), (60, 58.5, 81), (61, 57, 79)],
             finished=True, params=2_009_848)
    result = pt.collect(row("3.1"), str(tmp_path))
    assert result == experiments.Result("finished", 2, 58.5, 80.0, 55.0, 2_009_848)  # ties go to the earlier epoch
    # (nothing in the folder says which dataset it trained on)
    cells = table_line(pt.render_results([row("3.1")], {row("3.1"): result}), "3.1")
    assert cells[2:] == ["finished", "2", "55.00 / 58.69", "58.50 / 57.29", "80.00 / 80.49", "2,009,848 / –"]


def test_unfinished_run_is_interrupted_with_its_progress(tmp_path):
    make_run(tmp_path, "table2_resnet18", [(10, 12, 30), (20, 22, 45)], max_epochs=150)
    assert pt.collect(row("A"), str(tmp_path)).status == "interrupted 2/150"


def test_torn_last_metrics_line_is_ignored(tmp_path):
    run = make_run(tmp_path, "table2_resnet18", [(10, 12, 30)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "val_to')
    assert pt.collect(row("2.3"), str(tmp_path)).best_epoch == 1


def test_params_fall_back_to_the_runs_config(tmp_path, monkeypatch):
    run = make_run(tmp_path, "table2_resnet34", [(10, 12, 30)], params=None)
    (run / "config.yaml").write_text("model: {name: resnet, resnet: {depth: 34}}\n")
    seen = []
    monkeypatch.setattr(experiments, "count_params", lambda path, classes: seen.append((path, classes)) or 777)
    result = pt.collect(row("2.2"), str(tmp_path))
    assert (result.params, result.num_classes, result.generated_data) == (777, 200, False)
    assert seen == [(str(run / "config.yaml"), 200)]


def test_notes_give_the_classes_each_run_trained_on(tmp_path):
    # A smoke run on the generated sample data: its note must not claim TinyImageNet's 200 classes.
    fake = make_run(tmp_path, "table3_remove_3_4_no_fusion", [(50, 40, 80)], params=None)
    (fake / "config.yaml").write_text("dataset: {fake: {enable: true, classes: 10}}\n"
                                      "model: {mobilevit: {mode: tiny}}\n")
    real = make_run(tmp_path, "table3_no_vbs", [(50, 40, 80)], params=2_009_848)
    (real / "summary.json").write_text(json.dumps({"finished": True, "params": 2_009_848, "num_classes": 200}))
    (real / "config.yaml").write_text("model: {mobilevit: {mode: x_small}}\n")
    rows = pt.select_rows([3])
    text = pt.render_results(rows, {r: pt.collect(r, str(tmp_path)) for r in rows})
    assert table_line(text, "3.6")[-1] == "743,978 / 817k"  # 817,128 - 190 x (384 + 1): a 10-class head
    assert ("Measured parameter counts: the model each run built (rows 3.1: 200 classes (TinyImageNet); "
            "rows 3.6: 10 classes of generated sample data).") in text
    assert "1000-class" not in text  # the Table 1 note stays under Table 1


def test_collect_prints_tables_and_writes_csv(tmp_path, capsys):
    results = tmp_path / "results"
    make_run(results, "table2_resnet50", [(50, 52, 77), (54, 55.5, 80.1)], finished=True, params=23_910_856)
    out_csv = tmp_path / "tables.csv"
    assert pt.main(["--collect", str(results), "--table", "2", "4", "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    assert "### Table 2. ResNet baselines" in text and "### Table 4. ResNet experiments" in text
    assert "### Table 1" not in text and "not the EMA" in text
    assert "1000-class" not in text
    assert table_line(text, "F")[2:5] == ["finished", "2", "54.00 / 54.61"]  # shares the Table 2 run
    with open(out_csv, newline="") as f:
        lines = {line["row"]: line for line in csv.DictReader(f)}
    assert len(lines) == 15 and list(lines["2.1"]) == pt.CSV_FIELDS
    resnet50 = lines["2.1"]
    assert (resnet50["val_top1"], resnet50["params"], resnet50["paper_val_top1"]) == ("55.5", "23910856", "55.7")
    assert (lines["B"]["status"], lines["B"]["val_top1"], lines["B"]["paper_val_top1"]) == ("pending", "", "56.74")


def test_collect_missing_folder_fails(tmp_path, capsys):
    assert pt.main(["--collect", str(tmp_path / "nope")]) == 2
    assert "results folder not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --run
class FakeLauncher:
    """Stands in for launchers.LocalLauncher: 'trains' each run by writing a finished run folder."""

    def __init__(self, results):
        self.results, self.calls, self.runs = results, [], []

    def launch(self, specs) -> int:
        for spec in specs:
            argv = list(spec.args)
            self.calls.append(argv)
            self.runs.append(spec)
            make_run(self.results, argv[argv.index("--common.run-label") + 1], [(1, 2, 3)], finished=True)
        return 0


def test_run_trains_each_config_once_then_tabulates(tmp_path, capsys):
    results = tmp_path / "results"
    make_run(results, "table2_resnet34", [(50, 52, 76)], finished=True)
    launcher = FakeLauncher(results)
    argv = ["--run", "--table", "2", "4", "--rows", "2.1", "2.2", "2.3", "A", "--results", str(results),
            "--scheduler.max-epochs", "1"]
    assert pt.main(argv, launcher=launcher) == 0
    calls = launcher.calls
    assert [r.title for r in launcher.runs] == ["[2.1] table2_resnet50", "[2.3] table2_resnet18"]  # A shares 2.3's run
    assert launcher.runs[0].run_dir == str(results / "table2_resnet50")
    first = calls[0]
    assert first == ["--common.config-file", pt.config_path(row("2.1")), "--common.results-loc", str(results),
                     "--common.run-label", "table2_resnet50", "--common.resume", "auto",
                     "--stats.wandb.group", "results", "--stats.mlflow.experiment", "results",
                     "--scheduler.max-epochs", "1"]
    out = capsys.readouterr().out
    assert "table2_resnet34: finished, skipped" in out
    assert table_line(out, "A")[2] == "finished"


def test_run_checks_every_run_before_starting_any(tmp_path, capsys):
    launcher = FakeLauncher(tmp_path)
    argv = ["--run", "--table", "2", "--results", str(tmp_path), "--optim.weight-decay", "-1"]
    assert pt.main(argv, launcher=launcher) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all("optim.weight_decay" in line for line in err[:3])
    assert launcher.calls == []


def test_status_lists_each_run_of_the_tables(tmp_path, capsys):
    write_run(tmp_path / "table2_resnet50", [], {"state": "finished", "finished": True, "epochs_done": 150,
                                                 "max_epochs": 150})
    assert pt.main(["--status", str(tmp_path), "--table", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2].split()[:4] == ["[2.1]", "table2_resnet50", "finished", "150/150"]
    assert lines[3].split() == ["[2.2]", "table2_resnet34", "pending"]
    assert lines[-1] == "1 finished, 2 pending"


def test_run_resumes_an_unfinished_run(tmp_path):
    make_run(tmp_path, "table3_remove_5", [(1, 2, 3)])
    launcher = FakeLauncher(tmp_path)
    experiments.launch(pt.run_specs([row("3.2")], str(tmp_path), []), launcher, log=lambda _: None)
    assert len(launcher.calls) == 1 and launcher.calls[0][launcher.calls[0].index("--common.resume") + 1] == "auto"


def test_overrides_need_run(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pt.main(["--list", "--optim.weight-decay", "0.1"])
    assert exit_info.value.code == 2
    assert "only apply with --run" in capsys.readouterr().err


def test_unknown_row_is_an_error(capsys):
    assert pt.main(["--list", "--rows", "Z"]) == 2
    assert "unknown row(s) z" in capsys.readouterr().err


def test_added_row_without_paper_figures_renders(tmp_path, monkeypatch):
    extra = pt.Row(5, "5.1", "MobileViT-Tiny, weight decay 0.001", "table3_remove_3_4_no_fusion.yaml")
    monkeypatch.setattr(pt, "ROWS", pt.ROWS + [extra])
    rows = pt.select_rows([5])
    text = pt.render_results(rows, {r: pt.collect(r, str(tmp_path)) for r in rows})
    assert "### Table 5" in text
    assert table_line(text, "5.1")[2:] == ["pending", "–", "– / –", "– / –", "– / –", "– / –"]


def test_unknown_table_is_an_error(capsys):
    assert [r.key for r in pt.select_rows([5], ["T", "b3"])] == ["T", "B3"]
    assert pt.main(["--list", "--table", "7"]) == 2
    assert "no rows in table(s) 7" in capsys.readouterr().err


def test_print_config_prints_each_selected_run_with_the_overrides(capsys):
    assert pt.main(["--print-config", "--rows", "3.6", "K", "--optim.weight-decay", "0.001"]) == 0
    out = capsys.readouterr().out
    assert out.count("# [") == 2 and "# [3.6] table3_remove_3_4_no_fusion" in out
    assert out.count("weight_decay: 0.001") == 2


# ----------------------------------------------------------------------------- the tables file
def test_a_table_is_added_by_adding_data(tmp_path):
    data = json.loads(Path(pt.TABLES_FILE).read_text())
    data["tables"].append({"table": 5, "title": "Table 5. Beyond the paper", "notes": ["A ladder of our own."],
                           "rows": [{"key": "5.1", "experiment": "MobileViT-Tiny, 300 epochs",
                                     "config": "table3_remove_3_4_no_fusion.yaml"}]})
    path = tmp_path / "tables.json"
    path.write_text(json.dumps(data))
    rows, titles, notes, footnotes = pt.load_tables(str(path))
    paper_rows, _, _, paper_footnotes = pt.load_tables(pt.TABLES_FILE)
    assert rows[:-1] == paper_rows and (titles[5], notes[5], footnotes) == ("Table 5. Beyond the paper",
                                                                            ("A ladder of our own.",), paper_footnotes)
    assert rows[-1] == pt.Row(5, "5.1", "MobileViT-Tiny, 300 epochs", "table3_remove_3_4_no_fusion.yaml")


@pytest.mark.parametrize("text, message", [
    ('{"tables": [], "tables": []}', "duplicate key 'tables'"),
    ('{"tables": [{"table": 1, "title": "T", "rows": [{"key": "1.1", "experiment": "x", "config": "c.yaml", '
     '"paper": {"top1": 1}}]}]}', "paper figures are train_top1, val_top1, val_top5, params"),
    ('{"tables": [{"table": 1, "title": "T", "rows": [{"key": "1.1", "experiment": "x", "config": "c.yaml", '
     '"verified": "maybe"}]}]}', "verified is one of log, config, paper, none"),
    ('{"tables": [{"table": 1, "title": "T", "rows": [{"key": "1.1", "experiment": "x", "config": "c.yaml"}, '
     '{"key": "1.1", "experiment": "y", "config": "d.yaml"}]}]}', "row keys are used twice: ['1.1']"),
    ('{"tables": [{"table": 1, "rows": []}]}', "not a tables file"),
])
def test_a_bad_tables_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "tables.json"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        pt.load_tables(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)
