"""Where we run: Colab or a local machine, the Drive mount, duokit's folders, the device and its dtype.

Every notebook starts with `colab_setup()`, which prepares the VM it runs on (docs/colab.md): it mounts
Google Drive on Colab, picks duokit's root folder, points the Hugging Face cache where asked and reads a
Hub token from Colab's secrets. The root holds the same layout everywhere:

ROOT/data/       data sets (VNBench's zip and annotations, synthetic sets)
ROOT/runs/       run directories (gate training, evaluations, the demo); each resumes where it stopped
ROOT/patterns/   DuoAttention head patterns, one folder per model, written by 02 and read by 03

ROOT is `$DUOKIT_ROOT` when set, else `MyDrive/duokit` when Drive is mounted, else (off Colab) the current
directory. On Colab without Drive there is no default: a folder on the VM's disk would vanish at the next
disconnect, so `project_root()` refuses instead of falling back silently.
`python -m duokit.runtime` prints `describe_runtime()`; setup_colab.sh ends with it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

# google.colab.drive's default mount point (https://colab.research.google.com/notebooks/io.ipynb).
DRIVE_MOUNT = Path("/content/drive")
DRIVE_FOLDER = "duokit"  # MyDrive/duokit
ROOT_ENV = "DUOKIT_ROOT"
LOCAL_ENV = "DUOKIT_LOCAL"
# The VM's own disk: fast, but wiped with the VM. Unpacked videos go here (docs/colab.md, "Data on Drive").
COLAB_LOCAL = Path("/content/duokit-local")
# Hugging Face reads its cache folder from HF_HUB_CACHE when huggingface_hub is imported
# (https://huggingface.co/docs/huggingface_hub/package_reference/environment_variables).
HF_CACHE_ENV = "HF_HUB_CACHE"
TOKEN_ENV = "HF_TOKEN"
# bf16 tensor cores start with Ampere (sm80: A100; sm89: L4; sm90: H100); a T4 is sm75
# (https://docs.nvidia.com/cuda/cuda-c-programming-guide/#compute-capabilities).
BF16_MIN_CAPABILITY = (8, 0)
REPORTED_PACKAGES = ("duokit", "torch", "torchvision", "torchcodec", "transformers", "huggingface-hub", "av", "gdown",
                     "flash-attn")


class DriveNotMountedError(RuntimeError):
    """On Colab, no duokit root without Drive (or an explicit local folder)."""


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
            "Google Drive can only be mounted from a Colab notebook; on this machine duokit's folders live "
            f"under the current directory (or ${ROOT_ENV})."
        )
    from google.colab import drive

    try:
        drive.mount(str(path), force_remount=False, timeout_ms=120000)
    except NotImplementedError as err:  # Colab Enterprise and local runtimes (/var/colab/mp exists)
        raise RuntimeError(f"this Colab runtime cannot mount Drive ({err}); use a local folder instead") from err
    except Exception as err:  # the user closed or refused the permission dialog, or it timed out
        raise RuntimeError(f"Google Drive was not mounted ({type(err).__name__}: {err})") from err
    return path / "MyDrive"


def project_root(drive_path: str | Path = DRIVE_MOUNT) -> Path:
    """duokit's root folder: `$DUOKIT_ROOT`, else `MyDrive/duokit` (Drive mounted), else `.` off Colab.

    On Colab without Drive this raises DriveNotMountedError: runs written to the VM's disk are lost at
    the next disconnect, which the notebooks promise not to do."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser()
    my_drive = Path(drive_path) / "MyDrive"
    if my_drive.is_dir():
        return my_drive / DRIVE_FOLDER
    if in_colab():
        raise DriveNotMountedError(
            "Google Drive is not mounted, so duokit's data, runs and patterns would go to this VM's disk and "
            "vanish at the next disconnect. Run `duokit.runtime.colab_setup()` (it mounts Drive), or, to keep "
            f"them on the VM on purpose, choose a folder: `colab_setup(root=\"/content/duokit\")` or set "
            f"${ROOT_ENV}."
        )
    return Path(".")


def default_run_root(drive_path: str | Path = DRIVE_MOUNT) -> Path:
    """ROOT/runs (see `project_root`): `MyDrive/duokit/runs` on Colab with Drive, `./runs` elsewhere."""
    return project_root(drive_path) / "runs"


def model_slug(model: str) -> str:
    """A folder name for a model: the hub id's last part, `tiny-<family>`, or a local folder's name."""
    name = model.rstrip("/").split("/")[-1]
    return name.replace(":", "-") or "model"


@dataclass(frozen=True)
class Layout:
    """duokit's folders: `root` (on Drive on Colab) and `local`, the VM's own disk for unpacked data."""

    root: Path
    local: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def patterns(self) -> Path:
        return self.root / "patterns"

    def pattern(self, model: str) -> Path:
        """Where 02 writes the head pattern of `model` and 03 reads it."""
        return self.patterns / model_slug(model)


def layout(drive_path: str | Path = DRIVE_MOUNT) -> Layout:
    """The folders (not created): root from `project_root`; local from `$DUOKIT_LOCAL`, else
    /content/duokit-local on Colab, else the root itself (a local machine's disk persists)."""
    root = project_root(drive_path)
    if os.environ.get(LOCAL_ENV):
        local = Path(os.environ[LOCAL_ENV]).expanduser()
    else:
        local = COLAB_LOCAL if in_colab() else root
    return Layout(root, local)


def load_hf_token() -> str:
    """Make a Hugging Face token available to huggingface_hub (via $HF_TOKEN) and say where it came from.

    `$HF_TOKEN` wins; on Colab the secret named HF_TOKEN (key icon in the left bar, with notebook access
    granted) is read with `google.colab.userdata.get`. The token itself is never printed or written."""
    if os.environ.get(TOKEN_ENV):
        return f"from ${TOKEN_ENV}"
    if not in_colab():
        return f"none (set ${TOKEN_ENV} for gated models)"
    from google.colab import userdata

    try:
        token = userdata.get(TOKEN_ENV)
    except Exception as err:  # noqa: BLE001 - SecretNotFoundError, NotebookAccessError, TimeoutException
        return (f"none ({type(err).__name__}); for gated models add a secret named {TOKEN_ENV} in Colab's "
                "Secrets panel and allow this notebook to read it")
    if not token:
        return f"none (the Colab secret {TOKEN_ENV} is empty)"
    os.environ[TOKEN_ENV] = token
    return f"from the Colab secret {TOKEN_ENV}"


def set_hf_cache(where: str | Path | None, root: Path) -> str:
    """Point the Hugging Face cache: None keeps its default (~/.cache/huggingface on the VM's disk: fast,
    downloaded again on each VM), "drive" puts it in ROOT/hf-cache (kept across VMs; Drive reads are slower
    than the Hub's CDN for the first load on a VM), anything else is a folder."""
    if where is None:
        return os.environ.get(HF_CACHE_ENV, "Hugging Face's default (~/.cache/huggingface/hub)")
    folder = root / "hf-cache" if str(where) == "drive" else Path(where).expanduser()
    if "huggingface_hub" in sys.modules and os.environ.get(HF_CACHE_ENV) != str(folder):
        print(f"warning: huggingface_hub was imported before the cache moved to {folder}; restart the session "
              "(Runtime > Restart session) and run colab_setup first for it to take effect", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[HF_CACHE_ENV] = str(folder)
    return str(folder)


def colab_setup(mount: bool = True, root: str | Path | None = None, hf_cache: str | Path | None = None,
                drive_path: str | Path = DRIVE_MOUNT) -> Layout:
    """Prepare this VM for a notebook and return duokit's folders (created).

    On Colab: mount Drive (unless `mount=False` or a `root` is given), so ROOT is MyDrive/duokit. `root`
    chooses another folder (sets $DUOKIT_ROOT). `hf_cache`: see `set_hf_cache`. A Hub token is taken from
    $HF_TOKEN or Colab's secrets (`load_hf_token`). Prints what it chose, never the token."""
    if root is not None:
        os.environ[ROOT_ENV] = str(Path(root).expanduser())
    if in_colab() and mount and not os.environ.get(ROOT_ENV) and not (Path(drive_path) / "MyDrive").is_dir():
        try:
            mount_drive(drive_path)
        except RuntimeError as err:
            raise DriveNotMountedError(
                f"{err}. Re-run this cell and allow access to Drive, or keep everything on this VM on purpose "
                "(lost at the next disconnect): colab_setup(root=\"/content/duokit\")") from err
    folders = layout(drive_path)
    for folder in (folders.data, folders.runs, folders.patterns, folders.local):
        folder.mkdir(parents=True, exist_ok=True)
    on_drive = str(folders.root.resolve()).startswith(str(Path(drive_path).resolve()))
    print(f"duokit root: {folders.root} ({'Google Drive: kept across sessions' if on_drive else 'this machine'})")
    if folders.local != folders.root:
        print(f"local disk:  {folders.local} (unpacked videos; wiped with the VM)")
    print(f"HF cache:    {set_hf_cache(hf_cache, folders.root)}")
    print(f"HF token:    {load_hf_token()}")
    return folders


def flush_drive(drive_path: str | Path = DRIVE_MOUNT) -> bool:
    """At the end of a long step on Colab: wait until every file written to Drive has been uploaded, then
    unmount it (`google.colab.drive.flush_and_unmount`); the next `colab_setup()` mounts it again. Without
    a mounted Drive it does nothing. Returns whether it flushed."""
    if not in_colab() or not (Path(drive_path) / "MyDrive").is_dir():
        return False
    from google.colab import drive

    drive.flush_and_unmount()
    print("Drive flushed and unmounted: everything written is on Drive (run colab_setup() to mount it again)")
    return True


def banner(text: str) -> None:
    """A message a notebook reader cannot miss (a highlighted block in Jupyter/Colab, framed text elsewhere)."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Markdown(f"> ⚠️ **{text}**"))
    rule = "!" * 100
    print(f"{rule}\n{text}\n{rule}")


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's thread count (process-wide) set to `count` inside the block; the caller's is given back."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def check_gpu_for_model(model: str) -> str:
    """Fail fast where this machine's GPU cannot run `model`, before its weights or any data are fetched.

    `load_vlm` refuses a Qwen-VL model on a GPU without bfloat16 (T4) when its float32 weights do not fit
    (Qwen2.5-VL-3B: docs/architecture.md, "dtype on GPUs without bfloat16"); the same rule
    (`duokit.models.resolve_precision`, from the model's config alone) is asked here, and the refusal
    names the notebook's way out. Returns the line "model M: DTYPE on DEVICE"."""
    from duokit.models import resolve_precision
    from duokit.models.loading import NoSafeDtypeError

    try:
        device, dtype = resolve_precision(model)
    except NoSafeDtypeError as err:
        raise NoSafeDtypeError(
            f"{err}. In the notebooks: Runtime > Change runtime type > L4 or A100 GPU, or set MODEL = "
            "\"Qwen/Qwen2-VL-2B-Instruct\" (in 02, 03 and 04 alike: head patterns are per model)") from None
    return f"model {model}: {str(dtype).removeprefix('torch.')} on {device}"


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
    if (major, minor) < BF16_MIN_CAPABILITY:
        from duokit.models.loading import max_float32_parameters

        # Qwen-VL overflows in float16, so there it runs in float32 where it fits (docs/architecture.md).
        largest = max_float32_parameters(torch.cuda.get_device_properties(0).total_memory) / 1e9
        dtype += (f"; Qwen-VL models float32 up to {largest:.2f}B parameters, larger ones refused (Qwen2-VL-2B "
                  "has 2.21B, Qwen2.5-VL-3B 3.75B)")
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
