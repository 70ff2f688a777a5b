"""Train a model from a YAML config (see README.md, or --help for every key).

    python main_train.py --common.config-file config/mobilevit_tiny.yaml [--section.key value ...]
    cvnets-torchrun --nproc_per_node 2 main_train.py --common.config-file ...    (DDP; torchrun works too)
"""
import sys

from engine.commands import train

if __name__ == "__main__":
    sys.exit(train())
