"""pytest set-up shared by tests/ and the notebooks that nbmake runs.

Off Colab, duokit's root folder (data, runs, patterns) is the working folder, so the notebooks would write
into notebooks/ of the checkout and a later test session would resume the earlier one's runs instead of
running them. Each session gets its own root instead, unless `$DUOKIT_ROOT` is already set; nbmake's
kernels inherit it, so 01's outputs still reach 02-04.
"""

import os
import shutil
import tempfile

from duokit.runtime import ROOT_ENV

_session_root: str | None = None


def pytest_configure(config):
    global _session_root
    if ROOT_ENV not in os.environ:
        _session_root = tempfile.mkdtemp(prefix="duokit-test-root-")
        os.environ[ROOT_ENV] = _session_root


def pytest_unconfigure(config):
    if _session_root is not None:
        shutil.rmtree(_session_root, ignore_errors=True)
        os.environ.pop(ROOT_ENV, None)
