"""setup_colab.sh: syntax, the real report (--no-install), and the install path against a fake interpreter.

The fake interpreter logs every `pip` call (with the constraints file's contents) instead of installing, and
answers the GPU-capability and torch-import probes from environment variables; everything else goes to the
real Python, so the constraints the script computes are the real installed torch versions.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "setup_colab.sh"
FAKE_PYTHON = f"""#!/usr/bin/env bash
if [[ "${{1:-}}" == "-m" && "${{2:-}}" == "pip" ]]; then
  echo "pip ${{*:3}}" >> "$FAKE_LOG"
  args=("$@")
  for ((i = 0; i < ${{#args[@]}}; i++)); do
    [[ "${{args[i]}}" == "-c" ]] && sed 's/^/constraint /' "${{args[i + 1]}}" >> "$FAKE_LOG"
  done
  [[ "$*" == *flash_attn* && -n "${{FAKE_FLASH_FAIL:-}}" ]] && exit 1
  [[ -n "${{FAKE_PIP_SLEEP:-}}" ]] && sleep "$FAKE_PIP_SLEEP"
  exit 0
fi
if [[ "${{1:-}}" == "-c" && "$2" == *get_device_capability* ]]; then echo "$FAKE_CAPABILITY"; exit 0; fi
if [[ "${{1:-}}" == "-c" && "$2" == "import torch" ]]; then exit "${{FAKE_NO_TORCH:-0}}"; fi
if [[ "${{1:-}}" == "-m" && "${{2:-}}" == "duokit.runtime" ]]; then echo "runtime report"; exit 0; fi
exec {sys.executable} "$@"
"""


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    log = tmp_path / "log"
    return {"PYTHON": str(path), "FAKE_LOG": str(log), "FAKE_CAPABILITY": "none"}, log


def test_syntax_and_options():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    assert "--flash-attn" in run_script("--help").stdout
    result = run_script("--reinstall-torch")
    assert result.returncode == 2 and "unknown option '--reinstall-torch'" in result.stderr


def test_report_only_runs_the_real_runtime_report():
    """Also the test of `python -m duokit.runtime`, which the script ends with (one slow torch import)."""
    result = run_script("--no-install", env={"PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("python ")  # nothing installed or tried before the report
    assert "flash-attn: not installed" in result.stdout or "flash-attn: 2." in result.stdout
    assert f"transformers: {importlib.metadata.version('transformers')}" in result.stdout
    assert "\nGPU: " in result.stdout


def test_install_holds_torch_and_installs_the_clone(fake_python):
    env, log = fake_python
    for _ in range(2):  # re-running does the same thing again
        result = run_script(env=env)
        assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    constraint_files = set(re.findall(r" -c (\S+)", log.read_text()))
    assert len(constraint_files) == 2 and not any(Path(p).exists() for p in constraint_files)  # removed
    lines = [re.sub(r" -c \S+", " -c CONSTRAINTS", line) for line in lines]
    pins = [f"constraint torch=={importlib.metadata.version('torch')}",
            f"constraint torchvision=={importlib.metadata.version('torchvision')}"]
    once = [f"pip install -q -c CONSTRAINTS -r {SCRIPT.parent}/requirements.txt", *pins,
            f"pip install -q -c CONSTRAINTS -e {SCRIPT.parent}", *pins]
    assert lines == once + once
    assert result.stdout.rstrip().endswith("runtime report")


# A stand-in torch for the wheel-name probe: Colab's torch 2.11 CUDA 12.8 build, C++11 ABI.
FAKE_TORCH = """
__version__ = "2.11.0+cu128"
class version:
    cuda = "12.8"
class _C:
    _GLIBCXX_USE_CXX11_ABI = True
"""


@pytest.mark.parametrize("capability, fail, message", [
    ("none", "", "flash-attn: skipped, no GPU"),
    ("75", "", "needs sm80+ and this GPU is sm75; duokit uses 'sdpa'"),
    ("90", "1", "flash-attn: no prebuilt wheel for this Python/torch/CUDA/C++ ABI"),
    ("90", "", "flash-attn: installed"),
])
def test_flash_attn_only_from_the_matching_release_wheel(fake_python, tmp_path, capability, fail, message):
    env, log = fake_python
    (tmp_path / "fake_torch" / "torch").mkdir(parents=True)
    (tmp_path / "fake_torch" / "torch" / "__init__.py").write_text(FAKE_TORCH)
    env = {**env, "FAKE_CAPABILITY": capability, "FAKE_FLASH_FAIL": fail, "PYTHONPATH": str(tmp_path / "fake_torch")}
    result = run_script("--no-install", "--flash-attn", env=env)
    assert result.returncode == 0, result.stderr
    assert message in result.stdout
    tried = [line for line in log.read_text().splitlines() if "flash" in line] if log.exists() else []
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheel = ("https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/"
             f"flash_attn-2.8.3+cu12torch2.11cxx11abiTRUE-{py}-{py}-linux_x86_64.whl")
    # Only the wheel file, only binaries: pip has nothing it could build.
    assert [re.sub(r" -c \S+", "", line) for line in tried] == (
        [f"pip install -q --only-binary :all: {wheel}"] if capability == "90" else [])
    assert "flash-attn" not in run_script(env=env).stdout  # not asked: not tried


def test_flash_attn_wheel_url_override_and_timeout(fake_python):
    env, _ = fake_python
    env = {**env, "FAKE_CAPABILITY": "89", "FLASH_ATTN_WHEEL_URL": "https://example.org/flash_attn-x.whl",
           "FLASH_ATTN_TIMEOUT": "1", "FAKE_PIP_SLEEP": "5"}
    result = run_script("--no-install", "--flash-attn", env=env)
    assert result.returncode == 0, result.stderr
    assert "trying the prebuilt wheel https://example.org/flash_attn-x.whl" in result.stdout
    assert "(or it timed out); duokit uses 'sdpa'" in result.stdout


def test_flash_attn_without_a_cuda_torch_names_no_wheel(fake_python, tmp_path):
    env, log = fake_python
    (tmp_path / "cpu_torch" / "torch").mkdir(parents=True)
    (tmp_path / "cpu_torch" / "torch" / "__init__.py").write_text(FAKE_TORCH.replace('"12.8"', "None"))
    result = run_script("--no-install", "--flash-attn", env={**env, "FAKE_CAPABILITY": "80",
                                                             "PYTHONPATH": str(tmp_path / "cpu_torch")})
    assert result.returncode == 0, result.stderr
    assert "cannot name a wheel for this torch; duokit uses 'sdpa'" in result.stdout and not log.exists()


def test_missing_torch_stops_before_pip(fake_python):
    env, log = fake_python
    result = run_script(env={**env, "FAKE_NO_TORCH": "1"})
    assert result.returncode == 1 and "torch==2.14.1 torchvision==0.29.1" in result.stderr
    assert not log.exists()
