# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Set up the runtime
#
# Run this first, once per Colab session. It makes `duokit` importable (installing it and its
# requirements when needed), reports the Python/torch/transformers versions and the GPU, picks the
# dtype the later notebooks use, and mounts Google Drive so long runs checkpoint somewhere that
# survives a disconnect. On a local JupyterLab or a course lab it only reports: install with
# `pip install -e ".[dev]"` from the repository instead.

# %% tags=["parameters"]
# Where the duokit repository lives on Colab. Leave DUOKIT_REPO_URL empty if you uploaded or cloned
# the repository yourself to DUOKIT_DIR (for instance from your Drive).
DUOKIT_REPO_URL = ""
DUOKIT_DIR = "/content/duokit"
MOUNT_DRIVE = True
FLASH_ATTN = False  # flash-attn is optional; duokit runs on sdpa without it

# %% [markdown]
# On Colab, `setup_colab.sh` installs the requirements without touching Colab's own torch,
# torchvision and torchcodec (re-installing them breaks their CUDA match). It is safe to re-run.

# %%
import os
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    if not os.path.isdir(DUOKIT_DIR):
        if not DUOKIT_REPO_URL:
            raise SystemExit(f"duokit is not at {DUOKIT_DIR}: set DUOKIT_REPO_URL to the repository's git URL, "
                             "or upload the repository there, then re-run this cell.")
        subprocess.run(["git", "clone", "--depth", "1", DUOKIT_REPO_URL, DUOKIT_DIR], check=True)
    flags = ["--flash-attn"] if FLASH_ATTN else []
    subprocess.run(["bash", "setup_colab.sh", *flags], cwd=DUOKIT_DIR, check=True)
    sys.path.insert(0, DUOKIT_DIR)

# %% [markdown]
# What are we running on? The dtype rule: fp32 on CPU, fp16 below compute capability 8.0 (T4),
# bf16 from 8.0 (L4, A100, H100).

# %%
from duokit.runtime import default_run_root, describe_runtime, mount_drive, pick_device, pick_dtype

print(describe_runtime())
device = pick_device()
print(f"device {device}, dtype {pick_dtype(device)}")

# %% [markdown]
# Long work (training, full VNBench evaluations) writes its run directory under the run root:
# `MyDrive/duokit` once Drive is mounted, `./runs` otherwise. Every run resumes where it stopped.

# %%
if IN_COLAB and MOUNT_DRIVE:
    mount_drive()
print("runs go to", default_run_root())
