"""Train a model from a YAML config: python main_train.py --common.config-file CONFIG."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from options.cli import fail, parse_args


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_args(argv, prog="main_train.py", description=__doc__)
    fail("training is not available yet (engine issue)", status=1)


if __name__ == "__main__":
    main()
