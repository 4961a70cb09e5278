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
# On a CPU (`FAST`, no GPU) the model is NeedleNet, duokit's tiny trained video VLM (docs/needlenet.md),
# so the accuracy means something: a random tiny model would sit at chance.
#
# Both runs resume after a disconnect: re-run the notebook and finished samples are skipped.

# %% tags=["parameters"]
import os

import torch

FAST = os.environ.get("DUOKIT_FAST", "1" if not torch.cuda.is_available() else "0") == "1"
MODEL = "needlenet" if FAST else "Qwen/Qwen2.5-VL-3B-Instruct"
# On a CPU the held-out set is synthesized here (below); on a GPU it is VNBench, fetched by 01_data.
ANNOTATIONS = "data/needlenet-heldout/annotations.json" if FAST else "/content/vnbench/VNBench-main-4try.json"
VIDEOS = "data/needlenet-heldout/videos" if FAST else "/content/vnbench/VNBench_new"
FRAMES = 32 if FAST else 64         # NeedleNet was trained at 32; the official LLaVA example samples 64
PER_TASK = 3 if FAST else 20        # samples per sub-task (None: all 150)
HELDOUT_SEED = 123                  # seed of the synthesized held-out set (split "eval", unseen in training)
PATTERN = None                      # a pattern directory; None: the one 02_train_duo wrote
SPARSITY = 0.5                      # share of streaming KV heads
# Deploy window. On a CPU: 02's training window 4 + 16 (`recent` means the same in training and
# inference, docs/duoattention.md); on a GPU: the paper's deploy settings.
SINK, RECENT = (4, 16) if FAST else (64, 256)

# %% [markdown]
# Inputs: the head pattern trained in 02_train_duo, and the annotation file. On a GPU that is VNBench
# from 01_data. On a CPU a fresh held-out set is made here in NeedleNet's format
# (`eval_synth_config`, as `duokit demo` does): the synthesizer's `eval` split, which shares no
# haystack or needle with the data NeedleNet and its gates were trained on, frames of NeedleNet's size,
# and haystack lengths whose `FRAMES` uniformly sampled frames see every needle. It is written as mp4
# files + annotations, as `duokit synth` writes it, so the evaluation reads it exactly as it reads VNBench.

# %%
from pathlib import Path

from duokit.runtime import default_run_root

pattern_dir = Path(PATTERN) if PATTERN else default_run_root() / "train_duo" / "pattern"
if not (pattern_dir / "full_attention_heads.tsv").exists():
    raise FileNotFoundError(f"no head pattern at {pattern_dir}: run 02_train_duo first, or set PATTERN")
if FAST and not Path(ANNOTATIONS).exists():
    from duokit.data.synth.generate import Synthesizer
    from duokit.data.synth.writer import write_synth_set
    from duokit.models.needlenet.data import eval_synth_config

    write_synth_set(Synthesizer(eval_synth_config(FRAMES, PER_TASK, HELDOUT_SEED)), Path(ANNOTATIONS).parent)
runs = default_run_root() / "eval"

# %% [markdown]
# Evaluate the dense baseline and DuoAttention on the same samples and frames; DuoAttention keeps the
# full cache in the `1 − SPARSITY` share of KV heads with the highest gates and only the sink + recent
# window in the rest. What to expect on a CPU: NeedleNet answers the retrieval questions (Ret E, Ret I-1,
# Ret I-2) almost always right, far above the 1/256 chance of getting all 4 tries right, and the ordering
# and counting questions in part (20-67% per sub-task; docs/needlenet.md, "Measured accuracy");
# DuoAttention at 50% keeps retrieval and loses most of the ordering (docs/demo.md). With a few
# samples per sub-task one sample moves a sub-task by a third.

# %%
from duokit.eval_command import run_eval

common = {"annotations": ANNOTATIONS, "videos": VIDEOS, "frames": FRAMES, "model": MODEL, "per_task": PER_TASK}
duo = {"pattern": str(pattern_dir), "sparsity": SPARSITY, "sink": SINK, "recent": RECENT}
summaries = {
    "baseline": run_eval(out=runs / "baseline", **common),
    f"duo {SPARSITY:.0%}": run_eval(out=runs / f"duo-{SPARSITY}", method="duo", settings=duo, **common),
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
    print(f"{row[0]:12s} {row[1]:8.1f} {row[2]:8.1f} {row[3]:8.3f} {row[4]:10.3f} {row[5]:14.2f}")

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
