"""The three commands (train, evaluate, export): the only place that turns errors into exit statuses.

Exit status: 0 done; 1 the run failed (non-finite loss, full disk, run folder in use, a failed
parity check); 2 bad input (config, flags, dataset, checkpoint: one line naming the problem and
the fix); 128 + N stopped by signal N after saving (130 SIGINT, 143 SIGTERM, 138 SIGUSR1, 129 SIGHUP).
main_train.py, main_eval.py, main_export.py and the console scripts cvnets-train, cvnets-eval,
cvnets-export and cvnets-torchrun call these functions and exit with what they return.
"""
from __future__ import annotations

import functools
import logging
import os
import shlex
import signal
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from options.cli import parse_config
from options.config import ConfigError, help_text
from options.schema import Config, literal_choices
from utils.files import DiskFullError

logger = logging.getLogger("cvnets")

TRAIN_DOC = """Train a model from a YAML config.

    python main_train.py --common.config-file config/mobilevit_tiny.yaml [--section.key value ...]
    cvnets-torchrun --nproc_per_node 2 main_train.py --common.config-file ...    (DDP; torchrun works too)

--list-transforms lists the transforms image_augmentation.train and .val can name, with their settings."""

EVAL_DOC = """Evaluate a checkpoint written by main_train.py.

    python main_eval.py --model.checkpoint results/RUN/checkpoint_best.pt [--eval.split val|test]
        [--common.config-file CONFIG] [--eval.ema true] [--eval.output-json PATH] [--eval.per-class true]

The model is rebuilt from the config stored in the checkpoint; a config file given as well
must describe the same model (its dataset and eval settings are used)."""

EXPORT_DOC = f"""Export a checkpoint written by main_train.py as TorchScript or ONNX, for deployment.

    python main_export.py --model.checkpoint results/RUN/checkpoint_best.pt
        [--common.config-file CONFIG] [--export.format {"|".join(literal_choices("export.format"))}] [--export.output PATH]
        [--export.ema true] [--export.batch-size 1] [--export.dynamic-batch true]
        [--export.dynamic-shape true] [--export.verify false] [--export.tolerance 0.001]

Every BatchNorm that directly follows a convolution is folded into it, and the artifact is
written only after it reproduces the checkpoint model's logits. ONNX needs the export extra:
pip install -e '.[export]'."""


def _user_errors() -> tuple:
    """Errors that mean bad input: one line, exit status 2. Library code raises ValueError naming
    the key for a setting that cannot work (a ConfigError is one too)."""
    from cvnets.export import MissingExtraError
    from data.base import DatasetError
    from engine.checkpoint import CheckpointError

    return ValueError, DatasetError, CheckpointError, MissingExtraError


def _run(body: Callable[[], int]) -> int:
    """Run a command body, mapping the errors a user can meet to one line and an exit status."""
    from cvnets.export import ParityError
    from engine.loops import NonFiniteLossError
    from engine.run_folder import RunFolderBusy
    from engine.trainer import TrainingInterrupted

    try:
        return body()
    except TrainingInterrupted as e:
        logger.warning(str(e))
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C before training began (or after it ended): nothing to save
        _error("interrupted before training started; nothing was written")
        return 128 + signal.SIGINT
    except _user_errors() as e:
        _error(str(e))
        return 2
    except (NonFiniteLossError, DiskFullError, RunFolderBusy, ParityError) as e:
        _error(str(e))
        return 1


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


class _Stdout(logging.StreamHandler):
    """Log lines to whatever sys.stdout is at the time (callers may redirect it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _setup_logging(rank: int, timestamps: bool) -> None:
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handler = next((h for h in logger.handlers if isinstance(h, _Stdout)), None)
    if handler is None:
        handler = _Stdout(sys.stdout)
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s" if timestamps else "%(message)s", "%H:%M:%S"))


def _transforms() -> str:
    """Every transform image_augmentation.train / .val may list, with its settings (--list-transforms)."""
    from data.transforms import describe_transforms

    return ("Transforms of image_augmentation.train and .val (a list of entries, applied in order; the "
            "settings and their defaults):\n" + "\n".join(f"  {line}" for line in describe_transforms()))


def _check(cfg: Config, training: bool = True) -> None:
    from engine.build import check_config

    check_config(cfg, training)


# ----------------------------------------------------------------------------- train
def _train_doc() -> str:
    return f"{TRAIN_DOC}\n\n{_transforms()}"


def train(argv: Optional[Sequence[str]] = None) -> int:
    """main_train.py / cvnets-train."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # training the defaults into results/run/ is never what a bare command meant
        print(f"{help_text('main_train.py').splitlines()[0]}\n\n{_train_doc()}\n\n--help lists every key.",
              file=sys.stderr)
        return 2
    cfg = parse_config(argv, "main_train.py", _train_doc(), check=_check,
                       listings={"list-transforms": _transforms})
    _setup_logging(int(os.environ.get("RANK", "0")), timestamps=True)
    command = shlex.join([sys.argv[0] if sys.argv and sys.argv[0] else "main_train.py", *argv])
    return _run(lambda: _train(cfg, command))


def _train(cfg: Config, command: str = "") -> int:
    from engine.build import (build_trainer, check_startable, describe_process, run_dir_for, setup_process,
                              with_absolute_paths)
    from engine.run_folder import RunFolder, error_line, resume_path
    from engine.trainer import TrainingInterrupted, closing_block

    run_dir = run_dir_for(cfg)
    resume_path(run_dir, cfg.common.resume)  # refuses to overwrite a run before any work
    check_startable(cfg)  # what can fail at once fails before the run folder exists
    cfg = with_absolute_paths(cfg)
    # The lock first: a second trainer on this folder stops before anything else happens.
    folder = RunFolder(run_dir, writer=int(os.environ.get("RANK", "0")) == 0)
    try:
        folder.open(logger)
        try:
            process = setup_process(cfg)
            logger.info("run folder: %s", os.path.abspath(run_dir))
            logger.info("command line: %s", command)
            logger.info("%s", describe_process(process))
            summary = build_trainer(cfg, process).run(folder)
        except TrainingInterrupted:
            raise
        except Exception as e:
            folder.record_failure(error_line(e), cfg.scheduler.max_epochs)
            raise
        for line in closing_block(summary):
            logger.info(line)
        _barrier()  # no rank tears the process group down while rank 0 still writes
    finally:
        folder.close(logger)
        _end_process_group()
    return 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _end_process_group() -> None:
    dist = sys.modules.get("torch.distributed")  # never imported: nothing to end
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- evaluate, export
def _from_checkpoint(argv: Optional[Sequence[str]], prog: str, doc: str,
                     outputs: Sequence[str] = ()) -> Tuple[Config, Dict[str, Any]]:
    """(the config, the checkpoint) of a command that starts from --model.checkpoint: its stored
    config lies beneath the config file, which must describe the same model; `outputs` are the
    keys of files the command will write, checked before any work."""
    loaded: Dict[str, Any] = {}

    def base(flags: Mapping[str, Any]) -> Mapping[str, Any]:
        from engine import checkpoint as ckpt

        path = flags.get("model.checkpoint")
        if not path:
            raise ConfigError(f"{prog} needs --model.checkpoint PATH (a checkpoint_*.pt of a run folder)")
        try:
            loaded["state"] = ckpt.load(path)
        except ckpt.CheckpointError as e:
            raise ConfigError(str(e)) from None
        return loaded["state"]["config"]

    def check(cfg: Config) -> None:
        from engine.evaluation import check_output_file, check_same_model

        _check(cfg, training=False)
        check_same_model(cfg, loaded["state"]["config"])
        for key in outputs:
            check_output_file(key, functools.reduce(getattr, key.split("."), cfg))

    cfg = parse_config(argv, f"{prog}.py", doc, check=check, base=base)
    _setup_logging(0, timestamps=False)
    return cfg, loaded["state"]


def evaluate(argv: Optional[Sequence[str]] = None) -> int:
    """main_eval.py / cvnets-eval."""
    cfg, state = _from_checkpoint(argv, "main_eval", EVAL_DOC, outputs=("eval.output_json", "eval.predictions_csv"))

    def body() -> int:
        from engine.evaluation import evaluate_checkpoint, report
        from utils.files import write_json

        result = evaluate_checkpoint(cfg, state)
        for line in report(result):
            print(line)
        if cfg.eval.output_json:
            write_json(cfg.eval.output_json, result)
        return 0

    return _run(body)


def export(argv: Optional[Sequence[str]] = None) -> int:
    """main_export.py / cvnets-export."""
    cfg, state = _from_checkpoint(argv, "main_export", EXPORT_DOC)

    def body() -> int:
        from engine.export import export_checkpoint, report

        for line in report(export_checkpoint(cfg, state)):
            print(line)
        return 0

    return _run(body)


# ----------------------------------------------------------------------------- upgrade
def upgrade_checkpoint(argv: Optional[Sequence[str]] = None) -> int:
    """python -m engine.checkpoint --upgrade PATH: a trusted format-1 checkpoint in today's format."""
    import argparse

    from engine import checkpoint as ckpt

    parser = argparse.ArgumentParser(prog="python -m engine.checkpoint",
                                     description="Convert a trusted format-1 checkpoint to the current format.")
    parser.add_argument("--upgrade", metavar="PATH", required=True)
    args = parser.parse_args(argv)
    try:
        ckpt.upgrade(args.upgrade)
    except ckpt.CheckpointError as e:
        _error(str(e))
        return 2
    print(f"upgraded {args.upgrade} to checkpoint format {ckpt.VERSION}")
    return 0


# ----------------------------------------------------------------------------- torchrun
def torchrun(argv: Optional[Sequence[str]] = None) -> int:
    """python -m engine.torchrun / cvnets-torchrun: torchrun, with its arguments, ending as its trainers do.

    torchrun ends with status 1 and a traceback both when a stop signal reaches it (it passes the
    signal on to its trainers, which save and stop) and when its trainers stop after saving
    (128 + N), so neither a launcher nor a job script could tell a stopped run from a failed one.
    Here a stop ends 128 + N with one line; a failure ends 1 with torchrun's report of the ranks."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from engine.signals import STOP_SIGNALS

    args = parse_args(argv)
    try:
        run(args)
    except SignalException as e:
        _error(f"torchrun stopped by {e.sigval.name}: passed on to its trainers, which save and stop")
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode - 128 in STOP_SIGNALS:
            _error(f"rank {rank} stopped by {signal.Signals(failure.exitcode - 128).name} "
                   f"(exit status {failure.exitcode}); its state is saved")
            return failure.exitcode
        print(e.format_msg(), file=sys.stderr, flush=True)
        return 1
    return 0
