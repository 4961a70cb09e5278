"""Where we run: Colab or a local machine, the Drive mount, the run root, the device and its dtype.

Colab facts (Drive mount, GPUs and their dtypes): ../shared/reference/transformers.md §9.
`python -m duokit.runtime` prints `describe_runtime()`; setup_colab.sh ends with it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path

DRIVE_MOUNT = Path("/content/drive")
# bf16 tensor cores start with Ampere (sm80: A100; sm89: L4; sm90: H100); a T4 is sm75 (transformers.md §9).
BF16_MIN_CAPABILITY = (8, 0)
REPORTED_PACKAGES = ("duokit", "torch", "torchvision", "torchcodec", "transformers", "huggingface-hub", "av", "gdown",
                     "flash-attn")


def in_colab() -> bool:
    try:
        return importlib.util.find_spec("google.colab") is not None
    except ModuleNotFoundError:  # no `google` package at all
        return False


def mount_drive(path: str | Path = DRIVE_MOUNT) -> Path:
    """Mount Google Drive (Colab only) and return its `MyDrive` folder."""
    path = Path(path)
    if not in_colab():
        raise RuntimeError(
            "Google Drive can only be mounted from a Colab notebook; on this machine runs are written under "
            "./runs (or pass a folder of your choice)."
        )
    from google.colab import drive

    try:
        drive.mount(str(path), force_remount=False, timeout_ms=120000)
    except NotImplementedError as err:  # Colab Enterprise and local runtimes (/var/colab/mp exists)
        raise RuntimeError(f"this Colab runtime cannot mount Drive ({err}); use a local folder instead") from err
    return path / "MyDrive"


def default_run_root(drive_path: str | Path = DRIVE_MOUNT) -> Path:
    """`MyDrive/duokit` when Drive is mounted (runs survive the session), else `./runs`."""
    my_drive = Path(drive_path) / "MyDrive"
    return my_drive / "duokit" if my_drive.is_dir() else Path("runs")


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str = "cpu"):
    """fp32 on CPU, fp16 before sm80 (T4: no bf16 tensor cores), bf16 from sm80 on."""
    import torch

    if not str(device).startswith("cuda"):
        return torch.float32
    capability = tuple(torch.cuda.get_device_capability(device))
    return torch.bfloat16 if capability >= BF16_MIN_CAPABILITY else torch.float16


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gpu_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return "GPU: none (CPU only) -> float32"
    name = torch.cuda.get_device_name(0)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    major, minor = torch.cuda.get_device_capability(0)
    dtype = str(pick_dtype("cuda:0")).removeprefix("torch.")
    return f"GPU: {name}, {memory_gib:.1f} GiB, sm{major}{minor} -> {dtype}"


def describe_runtime() -> str:
    lines = [f"python {platform.python_version()} ({sys.executable})",
             f"platform: {platform.platform()}{', Colab' if in_colab() else ''}"]
    lines += [f"{package}: {_version(package)}" for package in REPORTED_PACKAGES]
    if importlib.util.find_spec("torch") is not None:
        lines.append(gpu_line())
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_runtime())
