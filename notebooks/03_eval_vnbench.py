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
# # 03 · Baseline vs DuoAttention on VNBench
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/REPLACE-WITH-GITHUB-OWNER/duokit/blob/main/notebooks/03_eval_vnbench.ipynb)
#
# Each VNBench question is asked 4 times with permuted options; a sample counts only if all 4 answers
# are right (the official circular score). duokit decodes each video once, prefills the shared video
# prefix once, and answers the 4 tries from copies of that cache, so the tries cost little more than one.
# DuoAttention keeps the full KV cache only in its retrieval heads; we compare accuracy, the KV-cache
# bytes actually held after prefill, and latency, on the same samples and frames.
#
# **Needs** (ROOT = `MyDrive/duokit` on Colab): the data of 01_data in `ROOT/data/<DATASET>/` and the
# pattern of 02_train_duo for the same model in `ROOT/patterns/<model>/`. On a new VM, VNBench's videos are
# unpacked again from the zip 01 left on Drive (no download). **Writes:** the two evaluation runs and their
# report (table, plots) under `ROOT/runs/eval-<model>-<dataset>/`; a comparison picked below goes to
# `ROOT/runs/compare/`.
#
# Without a GPU the model is NeedleNet, duokit's tiny trained video VLM (docs/needlenet.md), on the
# synthetic held-out set 01 wrote for it, and a banner says so: a random tiny model would sit at chance.
#
# Both runs resume after a disconnect: re-run the notebook and finished samples are skipped.

# %% tags=["parameters"]
DUOKIT_REPO = "https://github.com/REPLACE-WITH-GITHUB-OWNER/duokit"  # or a local checkout's folder
DUOKIT_REF = "main"            # branch, tag or commit that pip installs when duokit is missing
MOUNT_DRIVE = True             # Colab: keep data and runs on Google Drive
HF_CACHE = None                # None: the VM's disk (downloaded per VM); "drive": ROOT/hf-cache; or a folder
MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
DATASET = "vnbench"            # the folder of ROOT/data that 01_data wrote: "vnbench" or "synth"
FRAMES = 64                    # the official LLaVA example samples 64
PER_TASK = 20                  # samples per sub-task (None: all 150)
PATTERN = None                 # a pattern folder; None: ROOT/patterns/<model>, written by 02_train_duo
SPARSITY = 0.5                 # share of streaming KV heads
SINK = 64                      # deploy window: the paper's sink 64 + recent 256
RECENT = 256
ON_CPU = "needlenet"           # without a GPU: "needlenet" swaps in NeedleNet's CPU recipe; "as-is" keeps these
RETRY_ERRORS = False           # True: a resume evaluates again the samples that failed (e.g. out of GPU memory)

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
# Settings derived from the parameters. The CPU recipe evaluates NeedleNet at the 32 frames it was trained
# at, on the 27-sample set 01 wrote (3 per sub-task), with 02's training window 4 + 16 deployed as it is
# (`recent` means the same in training and inference, docs/duoattention.md). The model is checked against
# this GPU from its config alone, so a T4, where Qwen2.5-VL-3B cannot run (no bfloat16; docs/architecture.md),
# stops here, before the videos are unpacked or the weights downloaded, with what to change.

# %%
from pathlib import Path

import torch

from duokit.runtime import banner, check_gpu_for_model, model_slug

if not torch.cuda.is_available() and ON_CPU == "needlenet":
    MODEL, DATASET, FRAMES, PER_TASK, SINK, RECENT = "needlenet", "synth", 32, 3, 4, 16
    banner("No GPU: CPU recipe. Evaluating NeedleNet on the synthetic set from 01_data instead of "
           "Qwen2.5-VL on VNBench; use a GPU runtime for the real model.")
data_dir = folders.data / DATASET
pattern_dir = Path(PATTERN) if PATTERN else folders.pattern(MODEL)
runs = folders.runs / f"eval-{model_slug(MODEL)}-{DATASET}"
print(f"{check_gpu_for_model(MODEL)}\ndata: {data_dir}\npattern: {pattern_dir}\nruns: {runs}")

# %% [markdown]
# Find what 01 and 02 left. VNBench's videos are unpacked from the zip on Drive to this VM's disk if they
# are not there yet (checked against the recorded sha256). Nothing is downloaded here: if 01's download did
# not finish (its integrity record has no complete zip), the cell stops and says to run 01 again.

# %%
from duokit.data.manifest import fetch, unfinished

if not (pattern_dir / "full_attention_heads.tsv").is_file():
    raise FileNotFoundError(f"no head pattern at {pattern_dir}: run 02_train_duo with MODEL={MODEL!r} first, "
                            "or set PATTERN")
if DATASET == "vnbench":
    if (why := unfinished(data_dir)) is not None:
        raise FileNotFoundError(f"VNBench at {data_dir} is not complete ({why}): run 01_data with "
                                "SOURCE='vnbench' first (it resumes an interrupted download)")
    paths = fetch("all", data_dir, unpack_to=folders.local / "vnbench")
    annotations, videos = paths["annotations"], paths["videos"]
else:
    annotations, videos = data_dir / "annotations.json", data_dir / "videos"
    if not annotations.is_file():
        raise FileNotFoundError(f"no annotations at {annotations}: run 01_data with SOURCE={DATASET!r} first")

# %% [markdown]
# Evaluate the dense baseline and DuoAttention on the same samples and frames; DuoAttention keeps the
# full cache in the `1 − SPARSITY` share of KV heads with the highest gates and only the sink + recent
# window in the rest. What to expect on a CPU: NeedleNet answers the retrieval questions (Ret E, Ret I-1,
# Ret I-2) almost always right, far above the 1/256 chance of getting all 4 tries right, and the ordering
# and counting questions in part (docs/needlenet.md, "Measured accuracy"). With 3 samples per sub-task one
# sample moves a sub-task by 33 points, so only large differences mean anything here; `duokit demo`
# (docs/demo.md) measures the same comparison on 144 samples. Measured 2026-12-06 on NeedleNet v2 with this
# notebook's CPU defaults after 01 and 02 (each run with papermill, `-p MOUNT_DRIVE False`, one torch thread;
# 23 s, 71 s and 44 s on 2 CPU cores): Overall 4-try 59.3% for the baseline and 44.4% for DuoAttention at 50%
# (retrieval 100% and 77.8%, ordering 55.6% and 33.3%, counting 22.2% for both), with DuoAttention holding
# 0.176 MiB of KV cache per sample against the baseline's 0.270 MiB.
#
# A sample that fails (a video that cannot be read, out of GPU memory) is recorded, counted wrong and listed
# in the report's errors column; after fixing the cause, `RETRY_ERRORS = True` evaluates those samples again.

# %%
from duokit.eval_command import run_eval

common = {"annotations": annotations, "videos": videos, "frames": FRAMES, "model": MODEL, "per_task": PER_TASK,
          "retry_errors": RETRY_ERRORS}
duo = {"pattern": str(pattern_dir), "sparsity": SPARSITY, "sink": SINK, "recent": RECENT}
run_eval(out=runs / "baseline", **common)
run_eval(out=runs / f"duo-{SPARSITY}", method="duo", settings=duo, **common)

# %% [markdown]
# The report, from `duokit.report` (the same table and plots as `duokit demo`): accuracy (4-try circular
# and 1-try), KV-cache memory held after prefill, peak memory, latency per sample and failed samples. It is
# saved with the runs (`results.md`, `results.json`, `plots/`).
#
# First the two runs just made; below it, a picker to compare any finished evaluations under `ROOT/runs`
# (other models, frame counts, sparsities) — select some and press the button.

# %%
import ipywidgets
from IPython.display import Image, display

from duokit.report import COLUMNS_NOTE, finished_runs, run_rows, text_table, write_report

choices = {str(path.relative_to(folders.runs)): path for path in finished_runs(folders.runs)}
just_run = [str((runs / name).relative_to(folders.runs)) for name in ("baseline", f"duo-{SPARSITY}")]


def compare(selected):
    if not folders.root.is_dir():  # the last cell's flush_drive unmounted Drive: mount it again
        colab_setup(mount=MOUNT_DRIVE, hf_cache=HF_CACHE)
    if not selected:
        print("select at least one run")
        return
    rows = run_rows([choices[name] for name in selected], labels=list(selected))
    folder = runs / "report" if list(selected) == just_run else folders.runs / "compare"
    paths = write_report(folder, f"{MODEL} on {DATASET}" if folder.parent == runs else "comparison", COLUMNS_NOTE,
                         rows)
    print(text_table(rows))
    for name in ("accuracy_subtasks", "accuracy_kv", "latency"):
        display(Image(filename=str(paths[name])))


compare(just_run)
picker = ipywidgets.SelectMultiple(options=list(choices), value=just_run, rows=min(8, len(choices)),
                                   description="runs", layout=ipywidgets.Layout(width="90%"))
ipywidgets.interact_manual(compare, selected=picker);

# %% [markdown]
# On Colab: wait until the runs and the report are uploaded to Drive, and unmount it (the picker above
# mounts it again when pressed later). Elsewhere this does nothing.

# %%
from duokit.runtime import flush_drive

flush_drive()
