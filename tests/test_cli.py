"""The `duokit` entry point: every sub-command registers, and help stays light."""

import subprocess
import sys

from duokit.cli import COMMAND_MODULES, build_parser, main


def test_every_command_registers_a_parser_with_a_function():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == set(COMMAND_MODULES)
    for name, sub in subparsers.choices.items():
        assert sub.get_default("func") is not None or sub._subparsers is not None, name


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_help_does_not_import_torch():
    code = ("import sys; from duokit.cli import build_parser; build_parser(); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_module_entry_point_reports_version():
    out = subprocess.run([sys.executable, "-m", "duokit", "--version"], check=False, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("duokit ")


def test_a_closed_pipe_ends_quietly(tmp_path):
    script = tmp_path / "spam.py"
    script.write_text(
        "import argparse, sys\n"
        "from duokit import cli\n"
        "def spam(args):\n"
        "    while True:\n"
        "        print('x' * 1000)\n"
        "parser = argparse.ArgumentParser()\n"
        "parser.set_defaults(func=spam)\n"
        "cli.build_parser = lambda commands=None: parser\n"
        "sys.exit(cli.main([]))\n")
    reader = subprocess.run(f"{sys.executable} {script} | head -c 10", shell=True, check=False, capture_output=True, text=True)
    assert reader.stdout == "x" * 10
    assert "Traceback" not in reader.stderr, reader.stderr
