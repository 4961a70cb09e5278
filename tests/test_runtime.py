"""duokit.runtime: Colab detection, Drive mount, run root, device and dtype rules (GPU faked)."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import sys
import types
from pathlib import Path

import pytest
import torch

from duokit import runtime


def fake_colab(monkeypatch, mount):
    """Install google, google.colab and google.colab.drive modules whose drive.mount is `mount`."""
    modules = {}
    for name in ("google", "google.colab", "google.colab.drive"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        modules[name] = module
        monkeypatch.setitem(sys.modules, name, module)
    modules["google.colab.drive"].mount = mount
    modules["google.colab"].drive = modules["google.colab.drive"]


def fake_gpu(monkeypatch, capability, name="Tesla T4", memory_gib=15):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=memory_gib * 2**30))


def test_outside_colab_mount_drive_says_what_to_do():
    assert not runtime.in_colab()
    with pytest.raises(RuntimeError, match=r"only be mounted from a Colab notebook.*\./runs"):
        runtime.mount_drive()


def test_mount_drive_in_colab(monkeypatch, tmp_path):
    calls = []
    fake_colab(monkeypatch, lambda path, **kwargs: calls.append((path, kwargs)))
    assert runtime.in_colab()
    assert runtime.mount_drive(tmp_path / "drive") == tmp_path / "drive" / "MyDrive"
    assert calls == [(str(tmp_path / "drive"), {"force_remount": False, "timeout_ms": 120000})]


def test_mount_drive_on_a_runtime_without_drive(monkeypatch):
    def refuse(path, **kwargs):
        raise NotImplementedError("Mounting drive is unsupported in this environment.")

    fake_colab(monkeypatch, refuse)
    with pytest.raises(RuntimeError, match="cannot mount Drive.*unsupported"):
        runtime.mount_drive()


def test_default_run_root(tmp_path):
    assert runtime.default_run_root(tmp_path) == Path("runs")
    (tmp_path / "MyDrive").mkdir()
    assert runtime.default_run_root(tmp_path) == tmp_path / "MyDrive" / "duokit"


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.pick_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.pick_device() == "cuda"


@pytest.mark.parametrize("capability, dtype", [
    ((6, 1), torch.float16), ((7, 5), torch.float16),  # P100-era, T4
    ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16),  # A100, L4, H100
])
def test_pick_dtype_follows_compute_capability(monkeypatch, capability, dtype):
    fake_gpu(monkeypatch, capability)
    assert runtime.pick_dtype("cuda") == dtype
    assert runtime.pick_dtype("cuda:0") == dtype
    assert runtime.pick_dtype("cpu") == torch.float32


def test_describe_runtime_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = runtime.describe_runtime()
    assert f"transformers: {importlib.metadata.version('transformers')}" in text
    assert f"torch: {importlib.metadata.version('torch')}" in text
    assert "torchcodec: " in text and text.endswith("GPU: none (CPU only) -> float32")


def test_describe_runtime_gpu_line(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    assert runtime.describe_runtime().endswith("GPU: Tesla T4, 15.0 GiB, sm75 -> float16")
    fake_gpu(monkeypatch, (8, 0), name="NVIDIA A100-SXM4-40GB", memory_gib=40)
    assert runtime.gpu_line() == "GPU: NVIDIA A100-SXM4-40GB, 40.0 GiB, sm80 -> bfloat16"
