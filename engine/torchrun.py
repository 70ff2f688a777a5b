"""`python -m engine.torchrun ARGS` (or `cvnets-torchrun ARGS`): torchrun with the same ARGS, ending
with the status of a stop (128 + N) when the run was stopped by signal N, as a single trainer
does; see engine.commands.torchrun."""
import sys

if __name__ == "__main__":
    from engine.commands import torchrun

    sys.exit(torchrun())
