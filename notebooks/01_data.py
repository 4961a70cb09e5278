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
# # 01 · Data: VNBench, or synthetic needle videos
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/REPLACE-WITH-GITHUB-OWNER/duokit/blob/main/notebooks/01_data.ipynb)
#
# VNBench hides a "needle" (a subtitle, an inserted picture) in each video and asks about it:
# retrieval, ordering and counting, 9 sub-tasks, each question asked 4 times with permuted options.
# Its annotations come from the Hugging Face Hub and its videos from one ~11 GB zip on Google Drive.
# Without that download, `duokit synth` makes VNBench-style needle videos in the same schema, from
# procedural haystacks or from any folder of your own videos.
#
# **Needs:** nothing from earlier notebooks. **Writes** (ROOT = `MyDrive/duokit` on Colab):
# `ROOT/data/vnbench/` (annotations, the zip and its integrity record: downloaded once, ever) with the videos
# unpacked on this VM's disk, or `ROOT/data/synth/` (a synthetic set). 03_eval_vnbench reads them there.
# Without a GPU the notebook makes the small synthetic set NeedleNet, the CPU model, reads (a banner says so).

# %% tags=["parameters"]
DUOKIT_REPO = "https://github.com/REPLACE-WITH-GITHUB-OWNER/duokit"  # or a local checkout's folder
DUOKIT_REF = "main"        # branch, tag or commit that pip installs when duokit is missing
MOUNT_DRIVE = True         # Colab: keep data and runs on Google Drive
SOURCE = "vnbench"         # "vnbench" (~11 GB download, once) or "synth" (no download)
PER_TASK = 2               # synth: haystacks per sub-task
SECONDS = 12.0             # synth: video length
SIZE = [160, 120]          # synth: frame size (W, H)
FRAME_BUDGETS = [8, 16, 32, 64, 128]
ON_CPU = "needlenet"       # without a GPU: "needlenet" makes NeedleNet's held-out set instead; "as-is" keeps these

# %% [markdown]
# Set up this VM: install duokit if it is missing, mount Drive, create duokit's folders. Every notebook
# starts with this cell, because on Colab each notebook runs on its own VM.

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
# Settings derived from the parameters. Without a GPU (CI, a laptop) there is no point in an 11 GB download
# for a model that cannot run: the CPU recipe writes the held-out set NeedleNet reads (its frame size, haystack
# lengths whose 32 sampled frames see every needle, the synthesizer's `eval` split, seed 123), as `duokit demo`
# does.

# %%
import torch

from duokit.data.synth.generate import SynthConfig
from duokit.runtime import banner

synth_config = SynthConfig(per_task=PER_TASK, seconds=(SECONDS, SECONDS), size=tuple(SIZE), split="eval", seed=0)
if not torch.cuda.is_available() and ON_CPU == "needlenet":
    from duokit.models.needlenet.data import eval_synth_config

    SOURCE = "synth"
    synth_config = eval_synth_config(frames=32, per_task=3, seed=123)
    banner("No GPU: CPU recipe. Writing NeedleNet's small synthetic held-out set to ROOT/data/synth instead of "
           "downloading VNBench (use a GPU runtime for VNBench).")
data_dir = folders.data / SOURCE
print("data folder:", data_dir)

# %% [markdown]
# Fetching verifies what it downloads: the first download records each file's sha256 next to the data, on
# Drive, and every later fetch or `duokit data verify` checks against it. The zip stays on Drive; each new
# VM unpacks it to its own disk (`folders.local`, fast to read) after checking its sha256, so a reconnect
# costs an unpack, not an 11 GB download. A synthetic set already written with the same settings is kept.

# %%
import json
from pathlib import Path

from duokit.io import read_json

if SOURCE == "vnbench":
    from duokit.data.manifest import fetch

    paths = fetch("all", data_dir, unpack_to=folders.local / "vnbench")
    annotations_path, video_dir = paths["annotations"], paths["videos"]
    video_fps = 30.0  # VNBench's frame rates are not recorded; an assumption for the coverage estimate
else:
    from duokit.data.synth.generate import Synthesizer
    from duokit.data.synth.writer import write_synth_set

    annotations_path, video_dir = data_dir / "annotations.json", data_dir / "videos"
    manifest = data_dir / "manifest.json"
    wanted = json.loads(json.dumps(synth_config.to_json()))  # as the manifest stores it
    if annotations_path.is_file() and manifest.is_file() and read_json(manifest)["config"] == wanted:
        print(f"{data_dir}: already written with these settings")
    else:
        write_synth_set(Synthesizer(synth_config), data_dir)
    video_fps = synth_config.fps
print(annotations_path, video_dir)

# %% [markdown]
# Each record is validated on load. The sub-task comes from the video's file name, which fixes the
# published label swap between `ret_insert1` (fruit) and `ret_insert2` (landmark).

# %%
from collections import Counter

from duokit.data.vnbench import group_samples, label_disagreements, load_annotations

records = load_annotations(annotations_path)
samples = group_samples(records)
print(f"{len(records)} records, {len(samples)} samples")
print(dict(Counter(s.subtask for s in samples)))
print("label disagreements (published type, sub-task from file name):", label_disagreements(records))
print()
print(records[0].prompt)

# %% [markdown]
# Needles last about 1.5 s, so a small frame budget can miss them entirely, and no model can answer
# about a needle it never saw. This share of fully covered samples bounds the accuracy at each budget
# (the plot is written next to the data by `duokit.report`).

# %%
from IPython.display import Image, display

from duokit.data.video import coverage_report
from duokit.report import plot_coverage

needles = [s.needle_time for s in samples]
lengths = [s.tries[0].length for s in samples]
shares = [coverage_report(needles, lengths, n, fps=video_fps)["fully_covered_share"] for n in FRAME_BUDGETS]
display(Image(filename=str(plot_coverage(FRAME_BUDGETS, shares, data_dir / "coverage.png"))))

# %% [markdown]
# One needle, as a model sees it: of a sample's frames at the largest budget, the one nearest the middle of
# its first needle. Only those frames are decoded: every frame of a minutes-long video would take gigabytes
# of RAM.

# %%
import matplotlib.pyplot as plt

from duokit.data.video import NEEDLE_SECONDS, load_frames

sample = samples[0]
video = load_frames(Path(video_dir) / sample.video_name, num_frames=max(FRAME_BUDGETS))
needle_frame = int(abs(video.timestamps - sample.needle_time[0] - NEEDLE_SECONDS / 2).argmin())
plt.imshow(video.frames[needle_frame])
plt.title(f"{sample.subtask}: {sample.question}")
plt.axis("off")
plt.show()

# %% [markdown]
# On Colab: wait until everything written to Drive is uploaded, and unmount it (the next notebook mounts it
# again). Elsewhere this does nothing.

# %%
from duokit.runtime import flush_drive

flush_drive()
