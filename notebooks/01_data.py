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
# # 01 · Data: VNBench, or synthetic needle videos
#
# VNBench hides a "needle" (a subtitle, an inserted picture) in each video and asks about it:
# retrieval, ordering and counting, 9 sub-tasks, each question asked 4 times with permuted options.
# Its annotations come from the Hugging Face Hub and its videos from one ~11 GB zip on Google Drive.
# Without that download, `duokit synth` makes VNBench-style needle videos in the same schema, from
# procedural haystacks or from any folder of your own videos.

# %% tags=["parameters"]
SOURCE = "synth"         # "synth" (no download) or "vnbench" (~11 GB)
DATA_DIR = "data/synth"  # for VNBench: e.g. "/content/vnbench" (local disk is faster than Drive)
PER_TASK = 2             # synthetic haystacks per sub-task
SECONDS = 12.0           # synthetic video length
SIZE = (160, 120)        # synthetic frame size (W, H)
FRAME_BUDGETS = (8, 16, 32, 64, 128)

# %% [markdown]
# Fetching verifies what it downloads: the first download records each file's sha256 next to the
# data, and every later fetch or `duokit data verify` checks against it. A second fetch is a no-op.

# %%
from pathlib import Path

if SOURCE == "vnbench":
    from duokit.data.manifest import fetch

    paths = fetch("all", DATA_DIR)
    annotations_path, video_dir = paths["annotations"], paths["videos"]
    video_fps = 30.0  # VNBench's frame rates are not recorded; an assumption for the coverage estimate
else:
    from duokit.data.synth.generate import SynthConfig, Synthesizer
    from duokit.data.synth.writer import write_synth_set

    config = SynthConfig(per_task=PER_TASK, seconds=(SECONDS, SECONDS), size=SIZE, split="eval", seed=0)
    annotations_path = write_synth_set(Synthesizer(config), DATA_DIR)
    video_dir = Path(DATA_DIR) / "videos"
    video_fps = config.fps
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
# about a needle it never saw. This share of fully covered samples bounds the accuracy at each budget.

# %%
import matplotlib.pyplot as plt

from duokit.data.video import coverage_report

needles = [s.needle_time for s in samples]
lengths = [s.tries[0].length for s in samples]
shares = [coverage_report(needles, lengths, n, fps=video_fps)["fully_covered_share"] for n in FRAME_BUDGETS]
plt.plot(FRAME_BUDGETS, shares, marker="o")
plt.xscale("log", base=2)
plt.xlabel("frames sampled")
plt.ylabel("samples with every needle seen")
plt.ylim(0, 1.05)
plt.title("Needle coverage bounds accuracy")
plt.show()

# %% [markdown]
# One needle, as a model sees it: the frame nearest the first needle of a sample.

# %%
from duokit.data.video import load_frames

sample = samples[0]
video = load_frames(Path(video_dir) / sample.video_name)
needle_frame = int(abs(video.timestamps - sample.needle_time[0] - 0.5).argmin())
plt.imshow(video.frames[needle_frame])
plt.title(f"{sample.subtask}: {sample.question}")
plt.axis("off")
plt.show()
