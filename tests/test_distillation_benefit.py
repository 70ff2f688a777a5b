"""A held-out check on the generated sample: a MobileViT-Tiny student distilled from a trained
MobileViT-XS teacher ends with a lower validation loss than the same student, same seed, trained
alone for the same steps. 3 to 7 minutes on 2 shared CPU cores (the teacher's 24 epochs dominate):

    python -m pytest -q -m slow tests/test_distillation_benefit.py -s    # -s prints the figures
"""
import json
import os

import pytest

from data.fake import make_fake_tinyimagenet
from engine.commands import train
from engine_helpers import REPO

pytestmark = pytest.mark.slow

# 40 classes make the generated sample hard enough that 3 epochs leave the student well short
# of a teacher trained for 24.
SAMPLE = dict(classes=40, train_per_class=25, val_per_class=20, test_per_class=0, seed=0)
STUDENT_EPOCHS, TEACHER_EPOCHS = 3, 24


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_distilled_student_reaches_a_lower_val_loss_than_the_student_alone(tmp_path, capsys):
    root = make_fake_tinyimagenet(str(tmp_path / "tiny-imagenet-200"), **SAMPLE)
    quickstart = os.path.join(REPO, "config", "quickstart.yaml")
    common = ["--common.config-file", quickstart, "--dataset.root", root, "--dataset.fake.enable", "false",
              "--dataset.workers", "0", "--common.results-loc", str(tmp_path), "--common.resume", "null",
              "--sampler.crop-size", "32", "--image-augmentation.val", "[{name: resize, size: 36}, {name: center_crop, "
              "size: 32}]", "--dataset.train-batch-size", "32", "--dataset.val-batch-size", "100",
              "--common.log-every-batches", "100", "--ema.enable", "false", "--scheduler.warmup-iterations", "10",
              "--common.seed", "0"]
    assert train([*common, "--common.run-label", "teacher", "--model.mobilevit.mode", "x_small",
                  "--scheduler.max-epochs", str(TEACHER_EPOCHS)]) == 0
    student = [*common, "--scheduler.max-epochs", str(STUDENT_EPOCHS)]
    assert train([*student, "--common.run-label", "alone"]) == 0
    assert train([*student, "--common.run-label", "distilled", "--loss.name", "distillation",
                  "--loss.distillation.teacher", str(tmp_path / "teacher" / "checkpoint_best.pt"),
                  "--loss.distillation.kind", "soft", "--loss.distillation.temperature", "4",
                  "--loss.distillation.alpha", "0.5"]) == 0

    teacher, alone, distilled = (_rows(tmp_path / name) for name in ("teacher", "alone", "distilled"))
    with capsys.disabled():
        for name, rows in (("teacher", teacher), ("student alone", alone), ("student distilled", distilled)):
            print(f"\n{name}: val loss {rows[-1]['val_loss']:.3f}, val top-1 {rows[-1]['val_top1']:.2f} "
                  f"after {len(rows)} epochs")
    assert min(r["val_loss"] for r in teacher) < alone[-1]["val_loss"]  # a teacher worth learning from
    assert [r["train_images"] for r in distilled] == [r["train_images"] for r in alone]  # the same steps
    assert distilled[-1]["val_loss"] < alone[-1]["val_loss"]
