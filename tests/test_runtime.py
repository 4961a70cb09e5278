"""duokit.runtime: Colab detection, Drive mount and flush, duokit's folders, HF cache and token, device and dtype
rules (Colab and GPU faked)."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import sys
import types
from pathlib import Path

import pytest
import torch

from duokit import runtime


def fake_colab(monkeypatch, mount, secrets=None, flush=None):
    """Install google, google.colab, .drive and .userdata modules: drive.mount is `mount`, userdata.get
    reads `secrets` (a missing name raises like Colab's SecretNotFoundError)."""
    modules = {}
    for name in ("google", "google.colab", "google.colab.drive", "google.colab.userdata"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        modules[name] = module
        monkeypatch.setitem(sys.modules, name, module)

    class SecretNotFoundError(Exception):
        pass

    def get(key):
        if key not in (secrets or {}):
            raise SecretNotFoundError(f"Secret {key} does not exist.")
        return secrets[key]

    modules["google.colab.drive"].mount = mount
    modules["google.colab.drive"].flush_and_unmount = flush
    modules["google.colab.userdata"].get = get
    modules["google.colab"].drive = modules["google.colab.drive"]
    modules["google.colab"].userdata = modules["google.colab.userdata"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    # setenv first records the real value, so whatever colab_setup sets is undone after each test
    for name in (runtime.ROOT_ENV, runtime.LOCAL_ENV, runtime.HF_CACHE_ENV, runtime.TOKEN_ENV):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def fake_gpu(monkeypatch, capability, name="Tesla T4", memory_gib=15):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=memory_gib * 2**30))


def test_outside_colab_mount_drive_says_what_to_do():
    assert not runtime.in_colab()
    with pytest.raises(RuntimeError, match=r"only be mounted from a Colab notebook.*current directory"):
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


def test_mount_refused_by_the_user(monkeypatch):
    def refuse(path, **kwargs):
        raise ValueError("mount failed")  # what Colab raises when the permission dialog is declined

    fake_colab(monkeypatch, refuse)
    with pytest.raises(RuntimeError, match="Google Drive was not mounted.*mount failed"):
        runtime.mount_drive()


def test_roots_off_colab(tmp_path, monkeypatch):
    assert runtime.project_root(tmp_path) == Path(".")
    assert runtime.default_run_root(tmp_path) == Path("runs")
    (tmp_path / "MyDrive").mkdir()
    assert runtime.default_run_root(tmp_path) == tmp_path / "MyDrive" / "duokit" / "runs"
    monkeypatch.setenv(runtime.ROOT_ENV, str(tmp_path / "mine"))
    assert runtime.default_run_root(tmp_path) == tmp_path / "mine" / "runs"


def test_on_colab_without_drive_there_is_no_silent_local_root(monkeypatch, tmp_path):
    fake_colab(monkeypatch, lambda path, **kwargs: None)
    with pytest.raises(runtime.DriveNotMountedError, match=r"not mounted.*colab_setup.*DUOKIT_ROOT"):
        runtime.default_run_root(tmp_path)
    monkeypatch.setenv(runtime.ROOT_ENV, str(tmp_path / "vm"))
    assert runtime.default_run_root(tmp_path) == tmp_path / "vm" / "runs"


def test_layout_and_model_slugs(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.ROOT_ENV, str(tmp_path))
    folders = runtime.layout(tmp_path / "drive")
    assert (folders.data, folders.runs, folders.local) == (tmp_path / "data", tmp_path / "runs", tmp_path)
    assert folders.pattern("Qwen/Qwen2.5-VL-3B-Instruct") == tmp_path / "patterns" / "Qwen2.5-VL-3B-Instruct"
    assert runtime.model_slug("tiny:qwen2_5_vl") == "tiny-qwen2_5_vl"
    assert runtime.model_slug("needlenet") == "needlenet"
    assert runtime.model_slug("/models/my-vlm/") == "my-vlm"
    monkeypatch.setenv(runtime.LOCAL_ENV, str(tmp_path / "fast"))
    assert runtime.layout(tmp_path / "drive").local == tmp_path / "fast"


def test_colab_setup_mounts_drive_and_creates_the_layout(monkeypatch, tmp_path, capsys):
    drive = tmp_path / "drive"

    def mount(path, **kwargs):
        (Path(path) / "MyDrive").mkdir(parents=True)

    fake_colab(monkeypatch, mount, secrets={"HF_TOKEN": "hf_secret_value"})
    monkeypatch.setattr(runtime, "COLAB_LOCAL", tmp_path / "vm-disk")
    folders = runtime.colab_setup(hf_cache="drive", drive_path=drive)
    root = drive / "MyDrive" / "duokit"
    assert folders == runtime.Layout(root, tmp_path / "vm-disk")
    assert all(p.is_dir() for p in (root / "data", root / "runs", root / "patterns", tmp_path / "vm-disk"))
    assert runtime.os.environ[runtime.HF_CACHE_ENV] == str(root / "hf-cache")
    assert runtime.os.environ[runtime.TOKEN_ENV] == "hf_secret_value"
    out = capsys.readouterr().out
    assert "Google Drive: kept across sessions" in out and "from the Colab secret HF_TOKEN" in out
    assert "hf_secret_value" not in out
    runtime.colab_setup(drive_path=drive)  # again: Drive already mounted, nothing else changes
    assert "hf_secret_value" not in capsys.readouterr().out


def test_colab_setup_when_the_user_refuses_drive(monkeypatch, tmp_path):
    def refuse(path, **kwargs):
        raise ValueError("mount failed")

    fake_colab(monkeypatch, refuse)
    with pytest.raises(runtime.DriveNotMountedError, match=r"not mounted.*allow access.*root="):
        runtime.colab_setup(drive_path=tmp_path / "drive")
    folders = runtime.colab_setup(root=tmp_path / "vm", drive_path=tmp_path / "drive")  # on purpose
    assert folders.root == tmp_path / "vm" and (tmp_path / "vm" / "runs").is_dir()


def test_hf_token_sources(monkeypatch):
    assert runtime.load_hf_token().startswith("none")
    fake_colab(monkeypatch, None, secrets={})
    assert "SecretNotFoundError" in runtime.load_hf_token() and runtime.TOKEN_ENV not in runtime.os.environ
    monkeypatch.setenv(runtime.TOKEN_ENV, "hf_from_env")
    assert runtime.load_hf_token() == "from $HF_TOKEN"


def test_flush_drive(monkeypatch, tmp_path):
    calls = []
    assert runtime.flush_drive(tmp_path) is False  # not Colab
    fake_colab(monkeypatch, None, flush=lambda: calls.append("flush"))
    assert runtime.flush_drive(tmp_path) is False and calls == []  # Colab, Drive not mounted
    (tmp_path / "MyDrive").mkdir()
    assert runtime.flush_drive(tmp_path) is True and calls == ["flush"]


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
    assert runtime.describe_runtime().endswith(
        "GPU: Tesla T4, 15.0 GiB, sm75 -> float16; Qwen-VL models float32 up to 3.49B parameters, larger ones "
        "refused (Qwen2-VL-2B has 2.21B, Qwen2.5-VL-3B 3.75B)")
    fake_gpu(monkeypatch, (8, 0), name="NVIDIA A100-SXM4-40GB", memory_gib=40)
    assert runtime.gpu_line() == "GPU: NVIDIA A100-SXM4-40GB, 40.0 GiB, sm80 -> bfloat16"


def test_a_model_the_gpu_would_refuse_is_refused_from_its_config_alone(monkeypatch, tmp_path):
    """Qwen2.5-VL-3B's published geometry on a T4: refused before weights (or data) are fetched, naming the
    notebook's ways out; on an L4 and on a CPU the dtype load_vlm will use."""
    import transformers
    from test_planner_real_configs import COMMON, CONFIGS

    from duokit.models.loading import NoSafeDtypeError

    transformers.Qwen2_5_VLConfig(**COMMON, **CONFIGS["3B"]).save_pretrained(tmp_path)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_weights)
    fake_gpu(monkeypatch, (7, 5))
    with pytest.raises(NoSafeDtypeError) as err:
        runtime.check_gpu_for_model(str(tmp_path))
    message = str(err.value)
    assert "13.99 GiB" in message and "L4 or A100" in message and 'MODEL = "Qwen/Qwen2-VL-2B-Instruct"' in message
    assert "\n" not in message
    fake_gpu(monkeypatch, (8, 9), name="NVIDIA L4", memory_gib=22)
    assert runtime.check_gpu_for_model(str(tmp_path)) == f"model {tmp_path}: bfloat16 on cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.check_gpu_for_model(str(tmp_path)) == f"model {tmp_path}: float32 on cpu"
