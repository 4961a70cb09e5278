"""GPU smoke test: the real CUDA kernels on the small models, in a few minutes on one GPU.

    python benchmarks/gpu_smoke.py                       # writes runs/gpu_smoke.json
    python benchmarks/gpu_smoke.py --json OUT.json

On a GPU (bf16 where the GPU has it, else the dtype `load_vlm` picks) it checks, for tiny:qwen2_5_vl and
the shipped NeedleNet through `duokit eval`'s own path (`run_eval`):
  - duo at sparsity 0 (every head full) gives the baseline's tokens exactly;
  - duo at sparsity 1 with a window that holds the whole prompt (streaming heads on the masked kernel,
    nothing evicted) gives the baseline's tokens;
  - chunked prefill (chunks of 7 tokens: bottom-right masks, cache growth) gives the one-chunk tokens,
    for the baseline and for duo;
  - two gate-training steps with activation checkpointing run (finite losses; the second, with gates
    below 1, has a non-zero distillation loss) and change the gates;
  - the eval memory planner against `torch.cuda.max_memory_allocated` (planned / measured peak).
On CPU the same code paths run in float32 and the GPU-only parts (bf16 kernels, flash-attn, the peak
memory comparison) are listed as skipped. Each check prints one line; the JSON holds the date, the
command, the device, versions and every check's result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from duokit.data.video import write_video
from duokit.data.vnbench import LETTERS, permuted_options
from duokit.eval_command import run_eval
from duokit.io import atomic_write_json, iter_jsonl
from duokit.methods.duo.pattern import save_pattern

MODELS = ("tiny:qwen2_5_vl", "needlenet")
FRAMES = 8
SMALL_CHUNK = 7  # tokens per prefill chunk in the chunked runs: several uneven chunks over any prefix
OPTIONS = ["Alice", "Bob", "Carol", "Dave"]


def write_dataset(root: Path, samples: int = 2) -> tuple[Path, Path]:
    """`samples` random 64x64 clips and their 4 tries each, in the VNBench annotation schema."""
    videos = root / "videos"
    videos.mkdir(parents=True)
    records = []
    for index in range(samples):
        name = f"s{index}_ret_edit1"
        rng = np.random.default_rng(index)
        write_video(videos / f"{name}.mp4", rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8), fps=8.0)
        for try_index, options in enumerate(permuted_options(OPTIONS)):
            records.append({"video": f"./VNBench/{name}.mp4", "question": "What is the secret word?",
                            "options": options, "gt": OPTIONS[index], "gt_option": LETTERS[options.index(
                                OPTIONS[index])], "type": "ret_edit1", "try": try_index, "needle_time": [0.5],
                            "length": 2.0})
    annotations = root / "annotations.json"
    annotations.write_text(json.dumps(records))
    return annotations, videos


def tokens(run: Path) -> dict[str, list[int]]:
    records = list(iter_jsonl(run / "predictions.jsonl"))
    errors = [r["error"] for r in records if r["error"]]
    if errors:
        raise RuntimeError(f"{run}: {len(errors)} tries failed, e.g. {errors[0]}")
    return {r["record_id"]: r["output_tokens"] for r in records}


class Report:
    def __init__(self) -> None:
        self.checks: list[dict] = []
        self.skipped: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "", seconds: float = 0.0) -> None:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail, "seconds": round(seconds, 2)})
        print(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s){': ' + detail if detail else ''}", flush=True)

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        print(f"SKIP {what}", flush=True)


def eval_checks(report: Report, model: str, root: Path, device: str, dtype: str) -> None:
    """Baseline vs duo exactness and chunked prefill through `run_eval`, plus the planner's peak."""
    from duokit.models import load_vlm

    annotations, videos = write_dataset(root / "data")
    _, _, adapter = load_vlm(model, dtype=dtype, device=device)
    layers, kv_heads = adapter.num_layers, adapter.num_kv_heads
    save_pattern(root / "pattern", np.ones((layers, kv_heads)), sink_size=4, recent_size=8)
    common = {"annotations": annotations, "videos": videos, "frames": FRAMES, "model": model, "dtype": dtype,
              "device": device}

    def run(name: str, chunk_size: int, method: str = "baseline", **settings) -> tuple[dict, dict]:
        start = time.perf_counter()
        summary = run_eval(out=root / name, method=method, settings=settings, chunk_size=chunk_size, **common)
        return tokens(root / name), {**summary["cost"], "seconds": time.perf_counter() - start}

    base, base_cost = run("baseline", 2048)
    prefix = int(base_cost["prefix_tokens"])
    pattern = str(root / "pattern")
    for name, chunk, settings in (
            ("duo sparsity 0", 2048, {"sparsity": 0.0, "sink": 4, "recent": 8}),
            ("duo sparsity 1, window over the prompt", 2048, {"sparsity": 1.0, "sink": 4, "recent": 4096}),
            ("baseline chunked prefill", SMALL_CHUNK, None),
            ("duo sparsity 0 chunked prefill", SMALL_CHUNK, {"sparsity": 0.0, "sink": 4, "recent": 8})):
        method = "baseline" if settings is None else "duo"
        got, cost = run(name.replace(" ", "_").replace(",", ""), chunk, method,
                        **({} if settings is None else {"pattern": pattern, **settings}))
        same = sum(got[key] == base[key] for key in base)
        report.check(f"{model}: {name} = baseline tokens", same == len(base),
                     f"{same}/{len(base)} tries equal; prefix {prefix} tokens, chunk {chunk}", cost["seconds"])

    if device.startswith("cuda"):
        import torch

        from duokit.methods import get_method
        from duokit.metrics import plan_memory

        vlm, _, adapter = load_vlm(model, dtype=dtype, device=device)
        plan = plan_memory(vlm, adapter, get_method("baseline"), FRAMES, 64, 64, chunk_size=2048)
        measured = base_cost["peak_memory_bytes_max"]
        ratio = plan.total_bytes / measured
        report.check(f"{model}: planner >= measured peak", ratio >= 1.0,
                     f"planned {plan.total_bytes} B, max_memory_allocated {measured} B, ratio {ratio:.2f}; "
                     f"{plan.attention_kernel} attention, device total "
                     f"{torch.cuda.get_device_properties(device).total_memory} B")
        del vlm
    else:
        report.skip(f"{model}: planner vs torch.cuda.max_memory_allocated (no GPU)")


def training_check(report: Report, root: Path, device: str, dtype: str) -> None:
    from duokit.methods.duo.train import TrainSettings, train_gates

    start = time.perf_counter()
    settings = TrainSettings(model="tiny:qwen2_5_vl", steps=2, save_every=2, sink=4, recent=8, frames=(FRAMES,),
                             frame_size=(56, 56), needles=(1, 1), gradient_checkpointing=True, dtype=dtype,
                             device=device, progress=False)
    summary = train_gates(settings, root / "train")
    history = list(iter_jsonl(root / "train" / "gate_history.jsonl"))
    moved = float(np.abs(summary["gates"] - 1.0).max())
    # Step 1 starts from gates of 1 (student = teacher, distillation 0); step 2 has a real distillation loss.
    ok = (len(history) == 2 and all(np.isfinite(h["loss"]) for h in history) and history[1]["distill_loss"] > 0
          and moved > 0)
    report.check("tiny:qwen2_5_vl: two gate-training steps with activation checkpointing", ok,
                 f"losses {[round(h['loss'], 6) for h in history]}, distill {history[1]['distill_loss']:.3g} at "
                 f"step 2, {history[0]['tokens']} tokens, largest gate change {moved:.3g}",
                 time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="runs/gpu_smoke.json", help="where the results go")
    args = parser.parse_args(argv)
    import transformers

    from duokit.models.loading import BF16_MIN_CAPABILITY, flash_attn_available, pick_attn_implementation

    report = Report()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        bf16 = torch.cuda.get_device_capability(0) >= BF16_MIN_CAPABILITY
        dtype = "bfloat16" if bf16 else "auto"
        name = f"{torch.cuda.get_device_name(0)} sm{''.join(map(str, torch.cuda.get_device_capability(0)))}"
        attention = pick_attn_implementation(device, torch.bfloat16 if bf16 else torch.float16)
    else:
        dtype, name, attention = "float32", "cpu", "sdpa"
        report.skip("CUDA kernels in bf16 (no GPU: the same code paths run on CPU in float32)")
    if attention != "flash_attention_2":
        report.skip(f"flash_attention_2 (flash_attn installed: {flash_attn_available()}; {name})")
    print(f"device {name}, dtype {dtype}, attention {attention}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            eval_checks(report, model, Path(tmp) / model.replace(":", "_"), device, dtype)
        training_check(report, Path(tmp), device, dtype)
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", *sys.argv]),
        "device": name, "dtype": dtype, "attention": attention, "seconds": round(time.perf_counter() - started, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "checks": report.checks, "skipped": report.skipped,
        "ok": all(check["ok"] for check in report.checks),
    }
    atomic_write_json(args.json, result)
    print(f"{sum(c['ok'] for c in report.checks)}/{len(report.checks)} checks passed, {len(report.skipped)} "
          f"skipped, {result['seconds']} s -> {args.json}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
