# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: L4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Check the runtime (optional)
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/REPLACE-WITH-GITHUB-OWNER/duokit/blob/main/notebooks/00_setup.ipynb)
#
# Every notebook prepares its own VM in its first cells (on Colab each notebook runs on a VM of its own):
# it installs duokit when it is missing, mounts Google Drive and creates duokit's folders on it. This
# notebook does only that and reports what the VM offers — Python, torch, transformers, the GPU and the
# dtype duokit would pick — plus, if asked, the optional flash-attn from a prebuilt wheel.
#
# **Needs:** nothing. **Writes:** the empty layout `MyDrive/duokit/{data,runs,patterns}` on Colab (the
# current folder elsewhere). On a local JupyterLab install duokit yourself first (`pip install -e ".[dev]"`
# in the repository); Drive is then not used.

# %% tags=["parameters"]
DUOKIT_REPO = "https://github.com/REPLACE-WITH-GITHUB-OWNER/duokit"  # or a local checkout's folder
DUOKIT_REF = "main"        # branch, tag or commit that pip installs when duokit is missing
MOUNT_DRIVE = True         # Colab: keep data and runs on Google Drive
FLASH_ATTN = False         # try a prebuilt flash-attn wheel on this VM only (never a source build; see below)

# %% [markdown]
# Set up this VM: install duokit if it is missing, mount Drive, create duokit's folders, read a Hub token
# from Colab's secrets (`HF_TOKEN`) if there is one.

# %%
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("duokit") is None:  # a fresh Colab VM
    source = DUOKIT_REPO if os.path.isdir(DUOKIT_REPO) else f"git+{DUOKIT_REPO}@{DUOKIT_REF}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], check=True)
    importlib.invalidate_caches()

from duokit.runtime import colab_setup

folders = colab_setup(mount=MOUNT_DRIVE)

# %% [markdown]
# What are we running on. duokit's dtype rule: float32 on CPU, bfloat16 from compute capability 8.0
# (L4, A100, H100); on older GPUs (T4) float16, except Qwen-VL models, which overflow in float16: float32
# where their weights fit, refused otherwise — Qwen2.5-VL-3B is (docs/architecture.md, "dtype on GPUs without
# bfloat16"). The GPU line says which sizes fit.

# %%
from duokit.runtime import describe_runtime

print(describe_runtime())

# %% [markdown]
# flash-attn (optional): `setup_colab.sh --flash-attn` installs it only from a prebuilt wheel that matches
# this runtime's Python, torch, CUDA and C++ ABI, within a time limit, and never compiles it (a source
# build takes hours on Colab). The script comes from a checkout of the repository (cloned here when
# DUOKIT_REPO is a URL; `git clone --branch` needs DUOKIT_REF to be a branch or tag). Without flash-attn
# duokit uses PyTorch's sdpa.
#
# It is installed on this VM only, and on Colab 02, 03 and 04 each run on a VM of their own: `FLASH_ATTN`
# here does not reach them. What it tells you is whether a wheel exists for this runtime; to use it in a
# later notebook, run this cell's commands in that notebook before its model loads.

# %%
if FLASH_ATTN:
    checkout = DUOKIT_REPO if os.path.isdir(DUOKIT_REPO) else "/content/duokit-src"
    if not os.path.isdir(checkout):
        subprocess.run(["git", "clone", "--depth", "1", "--branch", DUOKIT_REF, DUOKIT_REPO, checkout], check=True)
    subprocess.run(["bash", "setup_colab.sh", "--no-install", "--flash-attn"], cwd=checkout, check=True)
