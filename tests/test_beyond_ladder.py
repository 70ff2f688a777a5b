"""config/beyond/: the ladder's rows (ladder.json) name every YAML there, each step differs from the
one before by exactly the keys it declares, and the distill step reads the teacher row's run."""
import json
import os
from pathlib import Path

import pytest

from options.config import load_config, to_dict

BEYOND = Path(__file__).resolve().parents[1] / "config" / "beyond"
LADDER = json.loads((BEYOND / "ladder.json").read_text())
ROWS = {row["config"]: row for row in LADDER["rows"]}


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


def test_every_yaml_of_the_folder_is_a_row_and_every_row_a_yaml():
    assert sorted(p.name for p in BEYOND.glob("*.yaml")) == sorted(ROWS)
    assert len({row["key"] for row in LADDER["rows"]}) == len(ROWS)


@pytest.mark.parametrize("row", [r for r in LADDER["rows"] if r["from"]], ids=lambda r: r["key"])
def test_each_step_changes_exactly_what_it_declares(row):
    assert differing_keys(resolved(row["from"]), resolved(row["config"])) == sorted(row["changes"])


def test_the_first_step_is_the_papers_tiny_for_300_epochs():
    tiny = load_config(["--common.config-file", str(BEYOND.parent / "mobilevit_tiny.yaml")])
    long = resolved("tiny_long.yaml")
    assert differing_keys(tiny, long) == ["common.results_loc", "scheduler.max_epochs"]
    assert long.scheduler.max_epochs == 300


def test_the_distill_step_reads_the_teacher_rows_run_and_runs_after_it():
    teacher_row = next(r for r in LADDER["rows"] if r["key"] == "T")
    distill_row = next(r for r in LADDER["rows"] if resolved(r["config"]).loss.name == "distillation")
    for row in LADDER["rows"]:  # every run lands in <results>/<config stem>
        assert resolved(row["config"]).common.results_loc == LADDER["results"]
    stem = os.path.splitext(teacher_row["config"])[0]
    expected = os.path.join(LADDER["results"], stem, "checkpoint_best.pt")
    assert resolved(distill_row["config"]).loss.distillation.teacher == expected
    assert distill_row["stage"] > teacher_row["stage"]
    teacher = resolved(teacher_row["config"])
    assert (teacher.model.name, teacher.model.resnet.depth, teacher.model.resnet.stem) == ("resnet", 18, "cifar")
    assert teacher.image_augmentation.mixup.cutmix_alpha > 0
