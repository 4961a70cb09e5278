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
# # 03 · Baseline vs DuoAttention on VNBench
#
# Each VNBench question is asked 4 times with permuted options; a sample counts only if all 4 answers
# are right (the official circular score). duokit decodes each video once, prefills the shared video
# prefix once, and answers the 4 tries from copies of that cache, so the tries cost little more than one.
# DuoAttention keeps the full KV cache only in its retrieval heads; we compare accuracy, the KV-cache
# bytes actually held after prefill, and latency, on the same samples and frames.
#
# Both runs resume after a disconnect: re-run the notebook and finished samples are skipped.

# %% tags=["parameters"]
import os

import torch

FAST = os.environ.get("DUOKIT_FAST", "1" if not torch.cuda.is_available() else "0") == "1"
MODEL = "tiny:qwen2_5_vl" if FAST else "Qwen/Qwen2.5-VL-3B-Instruct"
ANNOTATIONS = "data/synth/annotations.json" if FAST else "/content/vnbench/VNBench-main-4try.json"
VIDEOS = "data/synth/videos" if FAST else "/content/vnbench/VNBench_new"
FRAMES = 8 if FAST else 64          # the official LLaVA example samples 64 frames
PER_TASK = 1 if FAST else 20        # samples per sub-task (None: all 150)
PATTERN = None                      # a pattern directory; None: the one 02_train_duo wrote
SPARSITY = 0.5                      # share of streaming KV heads
SINK, RECENT = (4, 16) if FAST else (64, 256)  # deploy settings of the paper

# %% [markdown]
# Inputs: the annotation file from 01_data (a small synthetic set is made here if it is missing on a CPU
# run) and the head pattern trained in 02_train_duo.

# %%
from pathlib import Path

from duokit.runtime import default_run_root

if FAST and not Path(ANNOTATIONS).exists():
    from duokit.data.synth.generate import SynthConfig, Synthesizer
    from duokit.data.synth.writer import write_synth_set

    write_synth_set(Synthesizer(SynthConfig(per_task=1, seconds=(12.0, 12.0), size=(112, 84))),
                    Path(ANNOTATIONS).parent)
pattern_dir = Path(PATTERN) if PATTERN else default_run_root() / "train_duo" / "pattern"
if not (pattern_dir / "full_attention_heads.tsv").exists():
    raise FileNotFoundError(f"no head pattern at {pattern_dir}: run 02_train_duo first, or set PATTERN")
runs = default_run_root() / "eval"

# %%
from duokit.eval_command import run_eval

common = dict(annotations=ANNOTATIONS, videos=VIDEOS, frames=FRAMES, model=MODEL, per_task=PER_TASK)
summaries = {
    "baseline": run_eval(out=runs / "baseline", **common),
    f"duo {SPARSITY:.0%}": run_eval(out=runs / f"duo-{SPARSITY}", method="duo",
                                     settings=dict(pattern=str(pattern_dir), sparsity=SPARSITY, sink=SINK,
                                                   recent=RECENT), **common),
}

# %% [markdown]
# Accuracy (4-try circular and 1-try), KV-cache memory held after prefill, and latency per sample.

# %%
rows = []
for name, summary in summaries.items():
    scores, cost = summary["scores"], summary["cost"]
    rows.append((name, 100 * scores["overall"], 100 * scores["overall_1try"], cost["kv_bytes"] / 2**20,
                 cost["prefill_s"], 1000 * cost["decode_s_per_token"]))
print(f"{'run':12s} {'4-try %':>8s} {'1-try %':>8s} {'KV MiB':>8s} {'prefill s':>10s} {'decode ms/tok':>14s}")
for row in rows:
    print(f"{row[0]:12s} {row[1]:8.1f} {row[2]:8.1f} {row[3]:8.2f} {row[4]:10.3f} {row[5]:14.2f}")

# %% [markdown]
# Per sub-task accuracy under the paper's labels, and where each run sits on accuracy against memory.

# %%
import matplotlib.pyplot as plt
import numpy as np

from duokit.data.vnbench import PAPER_LABELS, SUBTASKS

figure, (bars, scatter) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [2, 1]})
width = 0.8 / len(summaries)
for i, (name, summary) in enumerate(summaries.items()):
    subtasks = summary["scores"]["subtasks"]
    accuracy = [100 * subtasks[t]["accuracy"] if t in subtasks else np.nan for t in SUBTASKS]
    bars.bar(np.arange(len(SUBTASKS)) + i * width, accuracy, width, label=name)
bars.set_xticks(np.arange(len(SUBTASKS)) + width * (len(summaries) - 1) / 2,
                [PAPER_LABELS[t] for t in SUBTASKS], rotation=30)
bars.set_ylabel("4-try accuracy %")
bars.set_ylim(0, 100)
bars.legend()
for name, accuracy, _, kv_mib, _, _ in rows:
    scatter.scatter(kv_mib, accuracy, s=60)
    scatter.annotate(name, (kv_mib, accuracy), textcoords="offset points", xytext=(5, 5))
scatter.set_xlabel("KV cache after prefill (MiB)")
scatter.set_ylabel("Overall 4-try %")
scatter.set_xlim(left=0)
scatter.set_ylim(0, 100)
plt.tight_layout()
plt.show()
