"""The `duokit` command line: one sub-command per notebook step.

Each sub-command lives in the module that does the work and registers itself through a
`register(subparsers)` function; modules are imported lazily so `duokit --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# sub-command -> module defining `register(subparsers)`; the module's parser sets `func`.
COMMAND_MODULES = {
    "ablate": "duokit.ablate",
    "data": "duokit.data.commands",
    "demo": "duokit.demo",
    "needlenet": "duokit.models.needlenet.commands",
    "pattern": "duokit.methods.duo.commands",
    "score": "duokit.data.score_command",
    "eval": "duokit.eval_command",
    "synth": "duokit.data.synth.commands",
    "train-duo": "duokit.methods.duo.train_command",
}


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duokit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"duokit {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in commands or COMMAND_MODULES:
        importlib.import_module(COMMAND_MODULES[name]).register(subparsers)
    return parser


def _version() -> str:
    from duokit import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the command asked for; `--help` imports them all.
    wanted = [argv[0]] if argv and argv[0] in COMMAND_MODULES else None
    parser = build_parser(wanted)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`duokit score --json | head`): not an error of ours. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE
