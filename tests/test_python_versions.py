"""Colab runs Python 3.12/3.13 while CI runs 3.11: no duokit code may import a module those versions removed.

Removed in 3.12: distutils, imp, asynchat, asyncore, smtpd (https://docs.python.org/3/whatsnew/3.12.html).
Removed in 3.13, PEP 594's "dead batteries" and lib2to3 (https://docs.python.org/3/whatsnew/3.13.html).
Deprecated calls on their way out are listed too (locale.getdefaultlocale: 3.15; datetime.utcnow).
That requirements.txt resolves on 3.12/3.13 is `.ci/colab_python`'s check (it needs the network).
"""

from __future__ import annotations

import ast
from pathlib import Path

import jupytext

REPO = Path(__file__).resolve().parents[1]
REMOVED_MODULES = {
    "distutils", "imp", "asynchat", "asyncore", "smtpd",  # 3.12
    "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "mailcap", "msilib", "nis", "nntplib",
    "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib", "lib2to3",  # 3.13
}
DEPRECATED_CALLS = {("locale", "getdefaultlocale"), ("locale", "resetlocale"), ("datetime", "utcnow"),
                    ("datetime", "utcfromtimestamp"), ("unittest", "makeSuite"), ("ssl", "wrap_socket")}


def sources() -> dict[str, str]:
    files = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8")
             for folder in ("duokit", "tests", "benchmarks") for p in (REPO / folder).rglob("*.py")}
    for notebook in (REPO / "notebooks").glob("[0-9][0-9]_*.py"):  # code cells only
        cells = jupytext.read(notebook).cells
        files[str(notebook.relative_to(REPO))] = "\n".join(c.source for c in cells if c.cell_type == "code")
    return files


def problems(name: str, text: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(text, name)):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        found += [f"{name}:{node.lineno}: imports {m}" for m in modules if m.split(".")[0] in REMOVED_MODULES]
        if isinstance(node, ast.Attribute) and node.attr in {attr for _, attr in DEPRECATED_CALLS}:
            found.append(f"{name}:{node.lineno}: uses {ast.unparse(node)}")
    return found


def test_no_module_removed_in_python_3_12_or_3_13():
    files = sources()
    assert len(files) > 50 and "duokit/runtime.py" in files
    assert [p for name, text in files.items() for p in problems(name, text)] == []


def test_the_check_finds_what_it_looks_for():
    text = ("import imp\nfrom distutils.util import strtobool\nimport locale\nlocale.getdefaultlocale()\n"
            "import datetime\ndatetime.datetime.utcnow()\n")
    assert problems("x.py", text) == ["x.py:1: imports imp", "x.py:2: imports distutils.util",
                                      "x.py:4: uses locale.getdefaultlocale", "x.py:6: uses datetime.datetime.utcnow"]
