"""Export a checkpoint written by main_train.py as TorchScript or ONNX (see README.md, or --help).

    python main_export.py --model.checkpoint results/RUN/checkpoint_best.pt [--export.format onnx]
"""
import sys

from engine.commands import export

if __name__ == "__main__":
    sys.exit(export())
