"""Evaluate a checkpoint written by main_train.py (see README.md, or --help for every key).

    python main_eval.py --model.checkpoint results/RUN/checkpoint_best.pt [--eval.split val|test]
"""
import sys

from engine.commands import evaluate

if __name__ == "__main__":
    sys.exit(evaluate())
