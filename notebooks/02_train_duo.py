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
# # 02 · Train a DuoAttention head pattern
#
# DuoAttention gives every KV head of the language model one gate α ∈ [0, 1]. During training each head
# outputs α·(full attention) + (1 − α)·(streaming attention over the attention sinks and a recent
# window); the frozen model's full-attention output is the teacher, and an L1 penalty pushes gates
# towards 0. Heads whose gate stays high are *retrieval heads* (they keep the whole KV cache); the rest
# become *streaming heads* (a constant-size cache). The data is synthetic multi-needle video — never
# VNBench itself, which is only for evaluation.
#
# On a CPU (`FAST`, no GPU) the model is NeedleNet, duokit's tiny trained video VLM (docs/needlenet.md):
# a random tiny model would answer at chance, so nothing measured on it would mean anything. Its gates
# train on NeedleNet's own task data (its word-level tokenizer cannot read the generic training
# sentences), at 32 frames with a training window of sink 4 + recent 16 tokens — its whole prompt is
# about 70 tokens, so the paper's 128 + 256 would keep everything — and the loss on the positions that
# predict its one-word answers: the recipe of `duokit demo` (docs/demo.md). The official 2000 steps take
# about 100 s on a CPU; the notebook runs a few hundred, enough to rank the heads.
#
# Training checkpoints every `SAVE_EVERY` steps into the run directory (on Drive once 00_setup mounted
# it): if the runtime disconnects, re-run this notebook and it resumes exactly where it stopped.

# %% tags=["parameters"]
import os

import torch

from duokit.models.needlenet import config as needlenet

# On a CPU (CI, a laptop) a real VLM is out of reach: use NeedleNet and a short run.
FAST = os.environ.get("DUOKIT_FAST", "1" if not torch.cuda.is_available() else "0") == "1"
MODEL = "needlenet" if FAST else "Qwen/Qwen2.5-VL-3B-Instruct"
STEPS = 200 if FAST else 2000       # the official recipe runs 2000 steps (~100 s on CPU for NeedleNet)
SAVE_EVERY = 100
FRAMES = (32,)                      # frame counts of the synthetic training videos
FRAME_SIZE = (needlenet.FRAME_SIZE,) * 2 if FAST else (64, 64)  # (width, height): NeedleNet's own on a CPU
NEEDLES = (2, 5)                    # needles per training video (min, max); NeedleNet's task data has its own
SINK, RECENT = (4, 16) if FAST else (128, 256)  # training sink/recent (official 128/256)
LOSS_POSITIONS = "predicting" if FAST else "answer"  # NeedleNet's answers are one word: the predicting position
RUN_NAME = "train_duo"

# %% [markdown]
# The run directory lives under the run root: `MyDrive/duokit` when Drive is mounted, `./runs` otherwise.

# %%
from duokit.runtime import default_run_root

run_dir = default_run_root() / RUN_NAME
print("run directory:", run_dir)

# %% [markdown]
# Train (or resume). The progress bar shows the loss and the gate statistics.

# %%
from duokit.methods.duo.train import TrainSettings, train_gates

settings = TrainSettings(model=MODEL, steps=STEPS, save_every=SAVE_EVERY, frames=FRAMES, frame_size=FRAME_SIZE,
                         needles=NEEDLES, sink=SINK, recent=RECENT, loss_positions=LOSS_POSITIONS)
summary = train_gates(settings, run_dir)

# %% [markdown]
# The gates as a layers × KV-heads map, their histogram and the loss curve. A clear split between
# bright (retrieval) and dark (streaming) heads is what DuoAttention relies on.

# %%
from IPython.display import Image, display

for plot in sorted((run_dir / "plots").glob("*.png")):
    display(Image(filename=str(plot)))

# %% [markdown]
# The pattern is written in the official DuoAttention format (`full_attention_heads.tsv` + `config.json`).
# At 50% streaming, these are the retrieval heads of each layer (the official global-quantile rule):

# %%
from duokit.methods.duo.pattern import binarize, load_pattern, retrieval_heads_per_layer

pattern = load_pattern(run_dir / "pattern")
retrieval, achieved = binarize(pattern.gates, sparsity=0.5)
print(f"streaming share {achieved:.2f}")
for layer, heads in enumerate(retrieval_heads_per_layer(retrieval)):
    print(f"layer {layer:2d}: retrieval KV heads {heads}")
