"""Every row of config/paper/ runs what the paper's authors ran, value by value.

The specification is config/paper/authors_runs.json: the settings of each logged or configured
run of the authors (footh/ml-cvnets), each with its source file and commit, and the map from our row files to those runs. Rows with
no surviving run are compared with the settings the paper's text gives for them. A mismatch
names the row, the key, both values and the source.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import pytest

from options.config import load_config, to_dict
from options.schema import Config

REPO = Path(__file__).resolve().parents[1]
AUTHORS_RUNS = REPO / "config" / "paper" / "authors_runs.json"
SPEC = json.loads(AUTHORS_RUNS.read_text())
RUNS: Dict[str, Dict[str, Any]] = SPEC["runs"]

# Rows the JSON's row map does not list: Table 4's extra cyclic row (the paper gives no figures).
EXTRA_ROWS = {"config/paper/table4_resnet18_cyclic.yaml": "log:resnet_tiny_correct_class_depth18_cyclic"}
ROWS: Dict[str, str] = {**SPEC["rows"], **EXTRA_ROWS}

# The paper's text ("Recipes: what the authors actually ran" in its notes), for the rows no run of the
# authors survives for (rows_without_reference): the MobileViT recipe (AdamW 0.9/0.999, weight
# decay 0.01 on all parameters, cosine per epoch 0.002 -> 0.0002 over 200 epochs, warmup from
# 0.0002, label smoothing 0.02, batch 128, EMA 0.0005, classifier dropout 0.1, transformer
# dropout 0.1, random resized crop + horizontal flip); "remove 5" and "remove 4,5" (+ wd): RRC
# scale (0.08, 1.0), ratio (3/4, 4/3), warmup 3000; Table 3: "All rows after the first also
# have variable batch off", i.e. "a fixed 64x64 batch of 128"; "remove 4,5, weight decay 0.001".
PAPER_TABLE3_RECIPE: Dict[str, Any] = {
    "model.family": "mobilevit", "model.mode": "x_small", "model.fusion": "concat_conv",
    "model.dropout": 0.1, "model.attn_dropout": 0.0, "model.ffn_dropout": 0.0, "model.num_heads": 4,
    "model.classifier_dropout": 0.1, "sampler.batch_size": 128, "sampler.crop_size": 64, "sampler.kind": "fixed",
    "loss.label_smoothing": 0.02, "optim.name": "adamw", "optim.weight_decay": 0.01,
    "optim.no_decay_bn_filter_bias": False, "optim.betas": [0.9, 0.999], "scheduler.name": "cosine",
    "scheduler.max_epochs": 200, "scheduler.warmup_iterations": 3000, "scheduler.warmup_init_lr": 0.0002,
    "scheduler.is_iteration_based": False, "scheduler.max_lr": 0.002, "scheduler.min_lr": 0.0002,
    "optim.lr": 0.002, "rrc.scale": [0.08, 1.0], "rrc.ratio": [0.75, 4 / 3],
    "transforms": ["random_resized_crop", "random_horizontal_flip"], "ema.enable": True, "ema.momentum": 0.0005,
}
PAPER_TEXT_ROWS: Dict[str, Dict[str, Any]] = {
    "config/paper/table3_remove_5.yaml": {**PAPER_TABLE3_RECIPE, "model.remove_layers": [5]},
    "config/paper/table3_remove_4_5.yaml": {**PAPER_TABLE3_RECIPE, "model.remove_layers": [4, 5]},
    "config/paper/table3_remove_4_5_wd_0.001.yaml": {
        **PAPER_TABLE3_RECIPE, "model.remove_layers": [4, 5], "optim.weight_decay": 0.001,
    },
}
PAPER_MD = "the paper's text: what the authors actually ran"

# The JSON's names for transforms that ours call differently (its conventions.transforms).
AUTHORS_TRANSFORM_NAME = {"random_flip": "random_flip_hv"}

# JSON keys with no value of their own on our side, and why.
NOT_COMPARED = {
    # The fork always used its variable batch sampler class; with one scale equal to the base
    # size it gives fixed batches, so what must match is sampler.kind (conventions.sampler.kind).
    "sampler.name",
}


def load(row: str) -> Config:
    return load_config(["--common.config-file", str(REPO / row)])


# ----------------------------------------------------------------------------- our side, canonical
def mobilevit_layout(cfg: Config) -> Tuple[str, List[int], str]:
    """(mode, removed layers, fusion) of the model a MobileViT config builds.

    PAPER.md: MobileViT-Tiny is "x_small, MobileViT layers 3 and 4 removed, no fusion"; the other
    modes keep every layer and fuse by concat + 3x3 conv; remove_layers / fusion override the mode's.
    """
    mv = cfg.model.mobilevit
    mode, removed, fusion = ("x_small", (3, 4), "none") if mv.mode == "tiny" else (mv.mode, (), "concat_conv")
    return mode, sorted(mv.remove_layers if mv.remove_layers is not None else removed), mv.fusion or fusion


def sampler_kind(cfg: Config) -> str:
    s = cfg.sampler
    single = s.vbs.max_n_scales == 1 and s.vbs.min_crop_size == s.vbs.max_crop_size == s.crop_size
    return "fixed" if s.name == "batch_sampler" or single else "variable"


def transform_names(entries) -> List[Any]:
    """The training pipeline as the JSON writes it: names, random_order as {random_order: [members]}."""
    out: List[Any] = []
    for entry in entries:
        if entry["name"] == "random_order":
            out.append({"random_order": transform_names(entry["transforms"])})
        else:
            out.append(AUTHORS_TRANSFORM_NAME.get(entry["name"], entry["name"]))
    return out


def crop_entry(cfg: Config) -> Mapping[str, Any]:
    (crop,) = [e for e in cfg.image_augmentation.train if e["name"] == "random_resized_crop"]
    return crop


def canonical(cfg: Config) -> Dict[str, Any]:
    """A resolved config under the JSON's field keys (its field_keys, mapped to our keys)."""
    m, o, s = cfg.model, cfg.optim, cfg.scheduler
    out: Dict[str, Any] = {"model.family": m.name, "model.classifier_dropout": m.classifier_dropout}
    if m.name == "mobilevit":
        out["model.mode"], out["model.remove_layers"], out["model.fusion"] = mobilevit_layout(cfg)
        for key in ("dropout", "attn_dropout", "ffn_dropout", "num_heads"):
            out[f"model.{key}"] = getattr(m.mobilevit, key)
    else:
        out["model.depth"] = m.resnet.depth
    out.update({"sampler.batch_size": cfg.dataset.train_batch_size, "sampler.crop_size": cfg.sampler.crop_size,
                "sampler.kind": sampler_kind(cfg)})
    out.update({f"sampler.vbs.{k}": getattr(cfg.sampler.vbs, k)
                for k in ("min_crop_size", "max_crop_size", "max_n_scales", "check_scale")})
    out["loss.label_smoothing"] = cfg.loss.label_smoothing
    out.update({"optim.name": o.name, "optim.weight_decay": o.weight_decay,
                "optim.no_decay_bn_filter_bias": o.no_decay_bn_filter_bias})
    if o.name == "sgd":
        out.update({"optim.momentum": o.sgd.momentum, "optim.nesterov": o.sgd.nesterov})
    else:
        out["optim.betas"] = list(getattr(o, o.name).betas)
    out.update({f"scheduler.{k}": getattr(s, k)
                for k in ("name", "max_epochs", "warmup_iterations", "warmup_init_lr", "is_iteration_based")})
    block = getattr(s, s.name)
    if s.name == "cyclic":
        out.update({f"scheduler.cyclic.{k}": v for k, v in to_dict(block).items()})
        out["scheduler.cyclic.steps"] = None  # no LR steps inside the cycles (the fork's were off)
    else:
        out.update({"scheduler.max_lr": block.max_lr, "scheduler.min_lr": block.min_lr, "optim.lr": block.max_lr})
    if s.name == "div_by_ten":
        out.update({"scheduler.milestones": list(block.milestones), "scheduler.factor": block.factor})
    crop = crop_entry(cfg)
    out.update({"rrc.scale": list(crop["scale"]), "rrc.ratio": list(crop["ratio"]),
                "transforms": transform_names(cfg.image_augmentation.train)})
    out.update({"ema.enable": cfg.ema.enable, "ema.momentum": cfg.ema.momentum})
    return out


# ----------------------------------------------------------------------------- comparison
def same(ours: Any, theirs: Any) -> bool:
    """The JSON's conventions: floats to a relative 1e-3, pipelines as sorted names."""
    if isinstance(theirs, bool) or isinstance(ours, bool) or theirs is None or isinstance(theirs, str):
        return ours == theirs
    if isinstance(theirs, (int, float)):
        return isinstance(ours, (int, float)) and math.isclose(ours, theirs, rel_tol=1e-3)
    if isinstance(theirs, list):
        return isinstance(ours, list) and len(ours) == len(theirs) and all(map(same, ours, theirs))
    return ours == theirs


def pipeline_key(names: List[Any]) -> List[str]:
    """A pipeline as a sorted list, random_order's members as a sorted set (conventions.transforms)."""
    return sorted(json.dumps({"random_order": sorted(set(n["random_order"]))}) if isinstance(n, dict) else n
                  for n in names)


def skipped(key: str, expected: Mapping[str, Any]) -> bool:
    if key in NOT_COMPARED:
        return True
    if key.startswith("sampler.vbs.") and expected.get("sampler.kind") == "fixed":
        return True  # the fork's one-scale settings just say "fixed"; sampler.kind checks that
    return key == "scheduler.cyclic.gamma" and expected.get("scheduler.cyclic.steps") is None  # acts at steps only


def mismatches(row: str, expected: Mapping[str, Any], source: str) -> List[str]:
    ours = canonical(load(row))
    problems = []
    for key, theirs in expected.items():
        if skipped(key, expected):
            continue
        if key not in ours:
            problems.append(f"{row}: {key} has no counterpart here (the authors': {theirs!r}; {source})")
            continue
        mine = ours[key]
        if key == "transforms":
            match = pipeline_key(mine) == pipeline_key(theirs)
        else:
            match = same(mine, theirs)
        if not match:
            problems.append(f"{row}: {key} is {mine!r} here, the authors' {theirs!r} ({source})")
    return problems


# ----------------------------------------------------------------------------- the tests
def test_every_run_of_the_authors_has_its_row_file():
    # (Files beyond these are ablations of your own: nothing of the authors' to compare them with.)
    files = {f"config/paper/{p.name}" for p in (REPO / "config" / "paper").glob("*.yaml")}
    assert set(ROWS) | set(SPEC["rows_without_reference"]) <= files
    assert set(SPEC["rows_without_reference"]) == set(PAPER_TEXT_ROWS)


@pytest.mark.parametrize("row", sorted(ROWS), ids=lambda r: Path(r).stem)
def test_row_runs_what_the_authors_ran(row):
    run_key = ROWS[row]
    run = RUNS[run_key]
    assert mismatches(row, run["hparams"], f"{run_key}: {run['source']}") == []


@pytest.mark.parametrize("row", sorted(PAPER_TEXT_ROWS), ids=lambda r: Path(r).stem)
def test_row_without_a_run_follows_the_papers_text(row):
    assert mismatches(row, PAPER_TEXT_ROWS[row], PAPER_MD) == []


def test_a_changed_value_is_reported_with_row_key_values_and_source():
    # The comparison itself must be able to fail: the ResNet label smoothing the project used to have.
    row = "config/paper/table2_resnet18.yaml"
    expected = {**RUNS[ROWS[row]]["hparams"], "loss.label_smoothing": 0.1}
    (problem,) = mismatches(row, expected, "the source")
    assert problem == f"{row}: loss.label_smoothing is 0.02 here, the authors' 0.1 (the source)"


def provenance(run_key: str) -> Tuple[str, str, str]:
    """(source file, commit, run label) of a run; a derived run names the run it derives from."""
    run = RUNS[run_key]
    if run["kind"] == "derived":
        return provenance(run["source"].split()[0])
    path, rest = run["source"].split("@", 1)
    return path, rest[:8], run["run_label"]


@pytest.mark.parametrize("row", sorted(ROWS), ids=lambda r: Path(r).stem)
def test_row_file_says_which_run_it_reproduces(row):
    text = (REPO / row).read_text()
    comments = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    path, commit, label = provenance(ROWS[row])
    for needed in (path, commit, f'"{label}"', "Deliberate difference"):
        assert needed in comments, f"{row}: its header comment does not mention {needed}"


@pytest.mark.parametrize("row", sorted(PAPER_TEXT_ROWS), ids=lambda r: Path(r).stem)
def test_row_without_a_run_says_so(row):
    assert "none survives" in (REPO / row).read_text()


# ----------------------------------------------------------------------------- beyond the JSON's fields
ALL_ROWS = sorted({*ROWS, *PAPER_TEXT_ROWS})


@pytest.mark.parametrize("row", ALL_ROWS, ids=lambda r: Path(r).stem)
def test_paper_rows_use_the_forks_ema_resize_and_batch_rule(row):
    cfg = load(row)
    assert cfg.ema.warmup is False  # the authors' EMA had no warmup
    assert crop_entry(cfg)["antialias"] is False  # OpenCV's resize does not antialias
    assert crop_entry(cfg) is cfg.image_augmentation.train[0]  # the fork always crops first
    if sampler_kind(cfg) == "variable":
        assert cfg.sampler.vbs.batch_rule == "at_least_base"  # the fork's max(B0, ...) batches


# The paper's notes, "Augment tiny": after the crop, in random order.
AUGMENT_TINY_MEMBERS = [
    {"name": "random_gamma", "gamma": [0.5, 1.5], "p": 0.5},
    {"name": "random_translate", "translate": 0.2, "diagonal": True, "p": 1.0},
    {"name": "random_gauss_noise", "std": [0.03, 0.1], "p": 0.5},
    {"name": "photometric_distort", "style": "cvnets", "additive_brightness": True, "brightness": [-0.2, 0.2],
     "contrast": [0.5, 1.5], "saturation": [0.5, 1.5], "hue": [-0.05, 0.05], "p": 0.5},
    {"name": "cutout", "holes": 4, "height": 4, "width": 4, "p": 0.5},
    {"name": "random_flip"},
]
AUGMENT_TINY_ROWS = [f"config/paper/table4_{stem}.yaml" for stem in (
    "resnet18_no_vbs_augment_tiny", "resnet18_no_vbs_div_by_ten_augment_tiny",
    "resnet50_no_vbs_augment_tiny", "resnet50_no_vbs_div_by_ten_augment_tiny")]


@pytest.mark.parametrize("row", AUGMENT_TINY_ROWS, ids=lambda r: Path(r).stem)
def test_augment_tiny_settings(row):
    crop, mixed = to_dict(load(row).image_augmentation)["train"]
    assert crop == {"name": "random_resized_crop", "scale": [0.08, 1.0], "ratio": [0.75, pytest.approx(4 / 3)],
                    "interpolation": "bilinear", "antialias": False}
    assert mixed["name"] == "random_order" and set(mixed) == {"name", "transforms"}
    assert sorted(mixed["transforms"], key=json.dumps) == sorted(AUGMENT_TINY_MEMBERS, key=json.dumps)


def test_table3_cutout_is_exactly_four_4x4_holes():
    crop, cutout, flip = load("config/paper/table3_remove_3_4_no_fusion_cutout.yaml").image_augmentation.train
    assert (crop["name"], flip["name"]) == ("random_resized_crop", "random_horizontal_flip")  # the fork's order
    assert dict(cutout) == {"name": "cutout", "holes": 4, "height": 4, "width": 4, "p": 0.5}


def without_file(cfg: Config) -> Dict[str, Any]:
    data = to_dict(cfg)
    data["common"].pop("config_file")
    return data


def test_mobilevit_tiny_is_the_papers_final_row():
    # config/mobilevit_tiny.yaml is the user's main job: exactly Table 3's "remove 3,4, no fusing".
    final_row = load("config/paper/table3_remove_3_4_no_fusion.yaml")
    assert without_file(load("config/mobilevit_tiny.yaml")) == without_file(final_row)


def test_quickstart_keeps_its_short_run_and_a_warm_ema():
    quick, tiny = load("config/quickstart.yaml"), load("config/mobilevit_tiny.yaml")
    assert quick.model == tiny.model and quick.image_augmentation == tiny.image_augmentation
    assert quick.ema.warmup is True and quick.ema.momentum == 0.05
    assert (quick.scheduler.max_epochs, quick.common.log_every_batches, quick.dataset.fake.enable) == (6, 10, True)


def test_baseline_configs_are_the_table_rows():
    # config/<model>.yaml is the recipe a user starts from; the Table 1 and 2 rows add nothing to it.
    for model, row in [("mobilevit_small", "table1_mobilevit_small"), ("mobilevit_x_small", "table1_mobilevit_x_small"),
                       ("mobilevit_xx_small", "table1_mobilevit_xx_small"), ("resnet18", "table2_resnet18"),
                       ("resnet34", "table2_resnet34"), ("resnet50", "table2_resnet50")]:
        assert without_file(load(f"config/{model}.yaml")) == without_file(load(f"config/paper/{row}.yaml")), model


def test_header_comment_commits_are_the_forks():
    commits = {c.split("@")[1].strip()[:8] for c in SPEC["commits"].values()}
    for path in (REPO / "config" / "paper").glob("*.yaml"):
        for commit in re.findall(r"@ ([0-9a-f]{8})\b", path.read_text()):
            assert commit in commits, f"{path.name} cites commit {commit}, not one of {sorted(commits)}"


# PAPER.md, "Variable batch sampler": the fork's sizes and batches for the paper's two VBS recipes,
# and its epoch lengths over TinyImageNet's 100,000 training images (the last batch wraps around).
FORK_VBS = {
    "mobilevit": ([(60, 145), (66, 128), (72, 128), (78, 128), (84, 128)], range(761, 765)),
    "resnet": ([(64, 128), (72, 128), (80, 128), (88, 128), (96, 128)], range(782, 783)),
}


VBS_ROWS = [r for r in ALL_ROWS if sampler_kind(load(r)) == "variable"]


@pytest.mark.parametrize("row", VBS_ROWS, ids=lambda r: Path(r).stem)
def test_variable_batch_rows_draw_the_forks_batches(row):
    from data.samplers import SAMPLERS

    cfg = load(row)
    schedule, lengths = FORK_VBS[cfg.model.name]
    make = SAMPLERS.get(cfg.sampler.name)
    sampler = make(100_000, cfg.sampler, cfg.dataset.train_batch_size, shuffle=True, seed=0)
    assert sampler.schedule == schedule
    assert all(sampler.epoch_length(epoch) in lengths for epoch in range(3))
