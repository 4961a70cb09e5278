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
# # 04 · Ablations: five methods and their controls at matched budgets
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/REPLACE-WITH-GITHUB-OWNER/duokit/blob/main/notebooks/04_ablations.ipynb)
#
# Every efficiency method is asked to keep the same share ρ of the video's KV cache (the *budget*) and is
# then compared on the same samples, frames, prompt and greedy decoding: DuoAttention (retrieval-head
# ratio), LLaVolta (pooling stride), FlexAttention (low-res context + high-res selection), VideoLLaMB
# (memory + last segment) and Vamba (chunked video attention). Controls sit next to them as rows like any
# other: the *token-matched baseline* (fewer frames, or fewer pixels per frame, with full attention),
# random visual-token dropping, Duo with random heads, Flex with random selection, VideoLLaMB with uniform
# segments. The table shows the budget each cell asked for and the one it really achieved, measured from
# the KV bytes it held.
#
# **Needs** (ROOT = `MyDrive/duokit` on Colab): on a GPU, VNBench from 01_data in `ROOT/data/vnbench/`, and
# the head pattern of 02_train_duo in `ROOT/patterns/<model>/` (without one, gates are trained here once).
# **Writes:** the ablation under `ROOT/runs/ablate-<model>-<dataset>/`: one `duokit eval` run per cell in
# `cells/<row>/<cell>/`, `results.csv`, `results.json`, `results.md` and `plots/`.
#
# Without a GPU the model is NeedleNet, duokit's tiny trained video VLM (docs/needlenet.md), on a small
# synthetic held-out set this notebook writes, and a banner says so. Methods not yet part of the installed
# duokit are then skipped with a note.
#
# The run resumes after a disconnect: re-run the notebook and finished cells and samples are skipped.

# %% tags=["parameters"]
DUOKIT_REPO = "https://github.com/REPLACE-WITH-GITHUB-OWNER/duokit"  # or a local checkout's folder
DUOKIT_REF = "main"            # branch, tag or commit that pip installs when duokit is missing
MOUNT_DRIVE = True             # Colab: keep data and runs on Google Drive
HF_CACHE = None                # None: the VM's disk (downloaded per VM); "drive": ROOT/hf-cache; or a folder
CONFIG = None                  # an ablation config file (YAML) to run instead of the one built below
MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
DATASET = "vnbench"            # the folder of ROOT/data that 01_data wrote
FRAMES = 64                    # the official LLaVA example samples 64
PER_TASK = 30                  # samples per sub-task: 270 questions, 1,080 prompts
BUDGETS = [0.5, 0.25]          # retained visual-KV fractions
METHODS = ["duo", "llavolta", "flex", "llamb", "vamba"]
CONTROLS = True                # token-matched baselines, random dropping, random heads/selection, uniform segments
PATTERN = None                 # a Duo pattern folder; None: ROOT/patterns/<model> from 02, else trained here
GATE_STEPS = 2000              # when the gates are trained here: 02's recipe (train-duo's defaults), 2000 steps,
GATE_FRAMES = [32, 64, 128]    # frames of 448x252 px,
GATE_SINK = 128                # and the official training window sink 128 + recent 256
GATE_RECENT = 256
LLAVOLTA_LAYER = 2             # the layer K where LLaVolta pools (2: its heavy setting)
SINK = 64                      # Duo's deploy window: the paper's sink 64 + recent 256 (as 03)
RECENT = 256
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
# The configuration. The CPU recipe (CI-sized): NeedleNet at the 32 frames it was trained at, 1 sample per
# sub-task of a synthetic set written into the run, one budget, Duo's window 4 + 16 in training and
# deployment (NeedleNet's whole context is about 70 tokens) and 30 gate-training steps unless 02 left a
# pattern; `duokit ablate --example cpu` is the larger CPU comparison.
#
# On a GPU this is the comparison of `duokit ablate --example gpu`: gates trained here (when 02 left no
# pattern) follow 02's recipe, training window 128 + 256, and are deployed with the paper's 64 + 256. The
# model is first checked against the GPU from its config alone, so a T4, where Qwen2.5-VL-3B cannot run (no
# bfloat16; docs/architecture.md), stops here with what to change, before the videos are unpacked or the
# weights downloaded. The data is VNBench from Drive, unpacked to this VM's disk if needed; nothing is
# downloaded here: if 01's download did not finish, the cell stops and says to run 01 again. A `CONFIG` file
# replaces all of this (`duokit ablate --example gpu` prints the GPU one).

# %%
from pathlib import Path

import torch
import yaml

from duokit.ablate_config import standard_config
from duokit.runtime import banner, check_gpu_for_model, model_slug

cpu_recipe = not torch.cuda.is_available() and ON_CPU == "needlenet"
if cpu_recipe:
    MODEL, DATASET, FRAMES, PER_TASK, BUDGETS, SINK, RECENT = "needlenet", "synth", 32, 1, [0.5], 4, 16
    GATE_STEPS, GATE_FRAMES, GATE_SINK, GATE_RECENT = 30, [32], SINK, RECENT
    banner("No GPU: CPU recipe. Comparing the methods on NeedleNet and a small synthetic set instead of "
           "Qwen2.5-VL on VNBench; use a GPU runtime for the real model.")
run_dir = folders.runs / f"ablate-{model_slug(MODEL)}-{DATASET}"
if CONFIG is not None:
    config = yaml.safe_load(Path(CONFIG).read_text())
else:
    print(check_gpu_for_model(MODEL))
    if DATASET == "synth":
        data = {"synth": {"per_task": PER_TASK, "seed": 1}}  # written into the run on first use
    else:
        from duokit.data.manifest import fetch, unfinished

        if (why := unfinished(folders.data / DATASET)) is not None:
            raise FileNotFoundError(f"VNBench at {folders.data / DATASET} is not complete ({why}): run 01_data "
                                    "with SOURCE='vnbench' first (it resumes an interrupted download)")
        paths = fetch("all", folders.data / DATASET, unpack_to=folders.local / DATASET)
        data = {"annotations": str(paths["annotations"]), "videos": str(paths["videos"])}
    pattern_dir = Path(PATTERN) if PATTERN else folders.pattern(MODEL)
    trained = (pattern_dir / "full_attention_heads.tsv").is_file()
    pattern = str(pattern_dir) if trained else "@duo_gates"
    prepare = None if trained else {"duo_gates": {"steps": GATE_STEPS, "frames": GATE_FRAMES, "sink": GATE_SINK,
                                                  "recent": GATE_RECENT}}
    config = standard_config(MODEL, data, FRAMES, None if DATASET == "synth" else PER_TASK, BUDGETS, METHODS,
                             pattern, SINK, RECENT, llavolta_layer=LLAVOLTA_LAYER, controls=CONTROLS,
                             optional=cpu_recipe, prepare=prepare,
                             **({"dtype": "float32", "device": "cpu"} if cpu_recipe else {}))
print(f"run: {run_dir}\n" + yaml.safe_dump(config, sort_keys=False, width=120))

# %% [markdown]
# The plan before anything runs: every cell, its visual tokens and planned memory, and an estimated time
# from one timed sample (cells whose Duo gates are not trained yet are planned once they are).

# %%
from duokit.ablate import dry_run, run_ablation

print(dry_run(config, run_dir))

# %% [markdown]
# Run every cell (resumable: finished cells and samples are skipped after a disconnect). Each cell is an
# ordinary `duokit eval` run directory; a cell whose settings changed since it ran is refused by name.

# %%
results = run_ablation(config, run_dir)

# %% [markdown]
# ## Reading the table and the plots
#
# - **asked / KV ach.**: the budget asked for and the one achieved: the cell's retained KV bytes after the
#   prefix (sinks, recent windows, memory and re-injected tokens included) minus the reference's text
#   bytes, over the reference's visual bytes. Duo keeps more than asked (its streaming heads keep sink +
#   recent); LLaVolta keeps all tokens in the layers before K; Vamba keeps the full KV (compare it on
#   prefill time and FLOPs instead). **tok ach.**: visual tokens × layers the prefill ran on.
# - **4-try %**: all four option orders right (the official VNBench score); **1-try %** the share of
#   single answers. With n samples a 4-try accuracy p has a standard error of √(p(1−p)/n): at 270
#   samples about 3 points, at the CPU recipe's 9 samples about 16 — differences smaller than twice that
#   are noise (the table's 95% CI column gives each cell's interval).
# - **ret / ord / cnt**: retrieval, ordering, counting. Query-guided selection (Flex) should help retrieval;
#   ordering and counting need every needle kept, which budget cuts threaten first.
# - A method is only worth its complexity where it beats the **token-matched baseline** and the **random**
#   controls at the same achieved budget. The dashed line in the first plot is the Pareto front: cells no
#   other cell beats on both accuracy and KV memory.

# %%
from IPython.display import Image, display

from duokit.report import ablation_text_table

print(ablation_text_table(results["cells"]))
for name in ("accuracy_kv", "accuracy_prefill", "families", "accuracy_budget"):
    display(Image(filename=str(run_dir / "plots" / f"{name}.png")))

# %% [markdown]
# On Colab: wait until the runs and the report are uploaded to Drive, and unmount it. Elsewhere this does
# nothing.

# %%
from duokit.runtime import flush_drive

flush_drive()
