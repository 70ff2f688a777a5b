"""config/beyond/: the ladder's tables file (ladder.json) names every YAML there and loads as
tools/paper_tables.py loads tables, each step differs from the one before by exactly the keys it
declares, and the distill step reads the teacher row's run after it finished."""
import json
import os
from pathlib import Path

import pytest

from options.config import load_config, to_dict
from tools import paper_tables

BEYOND = Path(__file__).resolve().parents[1] / "config" / "beyond"
LADDER = json.loads((BEYOND / "ladder.json").read_text())
STEPS = {step["config"]: step for step in LADDER["steps"]}
RESULTS = os.path.join("results", "beyond")


def resolved(name):
    return load_config(["--common.config-file", str(BEYOND / name)])


def flat(data, prefix=""):
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def differing_keys(a, b):
    x, y = flat(to_dict(a)), flat(to_dict(b))
    return sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k) and k != "common.config_file")


def test_the_ladder_is_a_tables_file_whose_rows_are_the_folders_yamls():
    rows, titles, _, _ = paper_tables.load_tables(str(BEYOND / "ladder.json"))
    assert {r.table for r in rows} == {5} and "Beyond the paper" in titles[5]
    assert sorted(r.config for r in rows) == sorted(p.name for p in BEYOND.glob("*.yaml")) == sorted(STEPS)
    paper_rows = paper_tables.load_tables(paper_tables.TABLES_FILE)[0]
    assert not {r.key for r in rows} & {r.key for r in paper_rows}  # no clash with the paper's rows
    assert set(rows) <= set(paper_tables.ROWS)  # and the tool lists, trains and tabulates them
    stages = [key for stage in LADDER["stages"] for key in stage]
    assert sorted(stages) == sorted(r.key for r in rows)


@pytest.mark.parametrize("step", [s for s in LADDER["steps"] if s["from"]], ids=lambda s: s["config"])
def test_each_step_changes_exactly_what_it_declares(step):
    assert differing_keys(resolved(step["from"]), resolved(step["config"])) == sorted(step["changes"])


def test_the_first_step_is_the_papers_tiny_for_300_epochs():
    tiny = load_config(["--common.config-file", str(BEYOND.parent / "mobilevit_tiny.yaml")])
    long = resolved("tiny_long.yaml")
    assert differing_keys(tiny, long) == ["common.results_loc", "scheduler.max_epochs"]
    assert long.scheduler.max_epochs == 300


def test_the_distill_step_reads_the_teacher_rows_run_after_it_finished():
    rows = {r.key: r for r in paper_tables.load_tables(str(BEYOND / "ladder.json"))[0]}
    for row in rows.values():  # every run lands in results/beyond/<config stem>, as --results results/beyond
        assert resolved(row.config).common.results_loc == RESULTS
    distill = next(r for r in rows.values() if resolved(r.config).loss.name == "distillation")
    teacher = rows["T"]
    expected = os.path.join(RESULTS, os.path.splitext(teacher.config)[0], "checkpoint_best.pt")
    assert resolved(distill.config).loss.distillation.teacher == expected
    stage_of = {key: i for i, stage in enumerate(LADDER["stages"]) for key in stage}
    assert stage_of[distill.key] > stage_of[teacher.key]
    t = resolved(teacher.config)
    assert (t.model.name, t.model.resnet.depth, t.model.resnet.stem) == ("resnet", 18, "cifar")
    assert t.image_augmentation.mixup.cutmix_alpha > 0
