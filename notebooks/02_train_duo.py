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
# # 02 · Train a DuoAttention head pattern
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/REPLACE-WITH-GITHUB-OWNER/duokit/blob/main/notebooks/02_train_duo.ipynb)
#
# DuoAttention gives every KV head of the language model one gate α ∈ [0, 1]. During training each head
# outputs α·(full attention) + (1 − α)·(streaming attention over the attention sinks and a recent
# window); the frozen model's full-attention output is the teacher, and an L1 penalty pushes gates
# towards 0. Heads whose gate stays high are *retrieval heads* (they keep the whole KV cache); the rest
# become *streaming heads* (a constant-size cache). The data is synthetic multi-needle video, made on the
# fly — never VNBench itself, which is only for evaluation.
#
# **Needs:** nothing from earlier notebooks (01's data is for evaluation). **Writes** (ROOT =
# `MyDrive/duokit` on Colab): the training run `ROOT/runs/train_duo-<model>/` (checkpoints, plots) and the
# finished pattern `ROOT/patterns/<model>/`, where 03_eval_vnbench reads it.
#
# On a GPU the recipe is `duokit train-duo`'s defaults (docs/duo_training.md): the official 2000 steps and
# training window sink 128 + recent 256, on synthetic videos of 32, 64 and 128 frames of 448×252 px — 2,304
# to 9,216 video tokens on Qwen2.5-VL-3B, planned to fit an L4 with gradient checkpointing.
#
# Without a GPU the model is NeedleNet, duokit's tiny trained video VLM (docs/needlenet.md), and a banner
# says so: a random tiny model would answer at chance, so nothing measured on it would mean anything. Its
# gates train on NeedleNet's own task data (its word-level tokenizer cannot read the generic training
# sentences), at 32 frames with a training window of sink 4 + recent 16 tokens — its whole prompt is about
# 70 tokens, so the paper's 128 + 256 would keep everything — and the loss on the positions that predict
# its one-word answers: the recipe of `duokit demo` (docs/demo.md). The official 2000 steps take about
# 100 s on a CPU; the notebook runs 200, enough to rank the heads.
#
# Training checkpoints every `SAVE_EVERY` steps into the run directory on Drive: after a disconnect,
# re-run the notebook and it resumes from the last checkpoint that reached Drive (docs/colab.md).

# %% tags=["parameters"]
DUOKIT_REPO = "https://github.com/REPLACE-WITH-GITHUB-OWNER/duokit"  # or a local checkout's folder
DUOKIT_REF = "main"            # branch, tag or commit that pip installs when duokit is missing
MOUNT_DRIVE = True             # Colab: keep runs and patterns on Google Drive
HF_CACHE = None                # None: the VM's disk (downloaded per VM); "drive": ROOT/hf-cache; or a folder
MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
STEPS = 2000                   # the official recipe
SAVE_EVERY = 50                # the official cadence; a checkpoint is small (see docs/colab.md)
FRAMES = [32, 64, 128]         # frame counts of the synthetic training videos (train-duo's default)
FRAME_SIZE = [448, 252]        # (width, height): train-duo's default, 72 tokens per frame on Qwen2.5-VL
NEEDLES = [2, 5]               # needles per training video (min, max)
SINK = 128                     # training window: the official sink 128 + recent 256 (03 deploys 64 + 256)
RECENT = 256
LOSS_POSITIONS = "answer"
ON_CPU = "needlenet"           # without a GPU: "needlenet" swaps in NeedleNet's CPU recipe; "as-is" keeps these

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

folders = colab_setup(mount=MOUNT_DRIVE, hf_cache=HF_CACHE)

# %% [markdown]
# Settings derived from the parameters, and where the run and the pattern go. The model is checked against
# this GPU from its config alone: on a GPU without bfloat16 (a T4) Qwen2.5-VL-3B cannot run — it overflows
# in float16 and its float32 weights do not fit (docs/architecture.md) — so the cell stops here, before any
# download, and says what to change.

# %%
import torch

from duokit.runtime import banner, check_gpu_for_model, model_slug

if not torch.cuda.is_available() and ON_CPU == "needlenet":
    from duokit.models.needlenet import config as needlenet

    MODEL, STEPS, SAVE_EVERY, FRAMES = "needlenet", 200, 100, [32]
    FRAME_SIZE, SINK, RECENT, LOSS_POSITIONS = [needlenet.FRAME_SIZE] * 2, 4, 16, "predicting"
    banner(f"No GPU: CPU recipe. Training NeedleNet's gates ({STEPS} steps, window {SINK} + {RECENT}) instead "
           "of Qwen2.5-VL's; use a GPU runtime for the real model.")
run_dir = folders.runs / f"train_duo-{model_slug(MODEL)}"
pattern_dir = folders.pattern(MODEL)
print(f"{check_gpu_for_model(MODEL)}\nrun directory: {run_dir}\npattern for 03: {pattern_dir}")

# %% [markdown]
# Train (or resume). The progress bar shows the loss and the gate statistics.

# %%
from duokit.methods.duo.train import TrainSettings, train_gates

settings = TrainSettings(model=MODEL, steps=STEPS, save_every=SAVE_EVERY, frames=tuple(FRAMES),
                         frame_size=tuple(FRAME_SIZE), needles=tuple(NEEDLES), sink=SINK, recent=RECENT,
                         loss_positions=LOSS_POSITIONS)
summary = train_gates(settings, run_dir)

# %% [markdown]
# The gates as a layers × KV-heads map, their histogram and the loss curve. A clear split between
# bright (retrieval) and dark (streaming) heads is what DuoAttention relies on.

# %%
from IPython.display import Image, display

for plot in sorted((run_dir / "plots").glob("*.png")):
    display(Image(filename=str(plot)))

# %% [markdown]
# The pattern is written in the official DuoAttention format (`full_attention_heads.tsv` + `config.json`)
# and copied, whole, to `ROOT/patterns/<model>/` for 03. At 50% streaming, these are the retrieval heads of
# each layer (the official global-quantile rule):

# %%
from duokit.io import copy_folder
from duokit.methods.duo.pattern import binarize, load_pattern, retrieval_heads_per_layer

copy_folder(run_dir / "pattern", pattern_dir)
pattern = load_pattern(pattern_dir)
retrieval, achieved = binarize(pattern.gates, sparsity=0.5)
print(f"streaming share {achieved:.2f}")
for layer, heads in enumerate(retrieval_heads_per_layer(retrieval)):
    print(f"layer {layer:2d}: retrieval KV heads {heads}")

# %% [markdown]
# On Colab: wait until the run and the pattern are uploaded to Drive, and unmount it. Elsewhere this does
# nothing.

# %%
from duokit.runtime import flush_drive

flush_drive()
