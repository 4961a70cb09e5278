"""FlexAttention (`flex`) evidence on NeedleNet: does attention-guided re-injection recover what low resolution loses?

One fresh held-out synthetic set (split `eval`, never VNBench; procedural haystacks, 56x56 frames, all
nine sub-tasks), 4-try scoring with NeedleNet's `text` parser, four rows on the same samples:

- baseline at high res: the run's own frames (56x56 px: 2x2 merged tokens per 2-frame group);
- baseline at low res: `--low-pixels` per frame (784 = 28x28 px: one merged token per group);
- flex, attention selection: low-res context + the high-res tokens of the cells the question's
  attention at `select_layer` picks (FlexAttention's rule; NeedleNet's 2x2 high-res grid is one cell);
- flex, random selection (FlexAttention's `special=random`), with p = the attention row's measured
  fraction of selected high-res tokens, so both re-inject the same number of tokens on average.

Per family (retrieval / ordering / counting) it prints 4-try accuracy and the mean selected tokens. For
the attention row it also reports what the probe looks at: the share of the question rows' attention
mass on the groups that hold a needle (vs those groups' share of all groups), and how often a
selected group holds a needle.

    python benchmarks/flex_needle.py --per-task 10 --seed 1717 --json runs/flex_needle.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
from collections import defaultdict

import numpy as np

# The flex rows (each with its random control at the same selected-token count): FlexAttention's rule
# with the question's rows united; capped at a quarter of the high-res tokens (the ablation's ρ = 0.5
# split: low-res context ≈ ρ/2, re-injected ≤ ρ/2); FlexAttention's own inference row (the last token).
VARIANTS = {"attention": {}, "attention, budget 0.25": {"budget": "0.25"}, "attention, last row": {"rows": "last"}}
# Controls that separate the selection from the look-again format: every high-res token re-injected
# (after the low-res context, and after a high-res context).
CONTROLS = {"all re-injected": {"selection": "random", "random_p": "1"},
            "all re-injected, high-res context": {"selection": "random", "random_p": "1", "low_res": "1.0"}}


def load_samples(frames: int, per_task: int, seed: int):
    from duokit.data.synth.generate import Synthesizer
    from duokit.data.video import uniform_indices
    from duokit.data.vnbench import parse_record, question_part
    from duokit.engine import Try
    from duokit.models.needlenet.data import eval_synth_config, sampled

    samples = []
    for sample in Synthesizer(eval_synth_config(frames, per_task, seed)):
        raws = sample.records(f"./videos/{sample.sample_id}.mp4")
        records = [parse_record(raw, index, "synthetic held-out set") for index, raw in enumerate(raws)]
        video, fps = sampled(sample.frames, sample.fps, frames)
        indices = uniform_indices(len(sample.frames), frames)
        # Sampled frame k belongs to temporal group k // 2 (Qwen-VL's temporal patch of 2 frames).
        needle_groups = sorted({k // 2 for k, index in enumerate(indices)
                                for start, end in sample.needle_spans if start <= index < end})
        tries = [Try(record.prompt, question_part(record.question)) for record in records]
        samples.append({"records": records, "video": video, "fps": fps, "tries": tries,
                        "needle_groups": needle_groups, "question": question_part(records[0].question)})
    return samples


def evaluate(lm, method, samples, pixels=None):
    """(scorer JSON, per-sample costs) of `method` on `samples`, frames at `pixels` per frame if given;
    prints the overall accuracy as soon as it is known (long CPU runs)."""
    from duokit.data.scoring import prediction_record, score_predictions
    from duokit.engine import SampleInput, answer_tries

    adapter = lm.adapter
    saved = adapter.max_pixels, adapter.min_pixels
    if pixels is not None:
        adapter.set_pixel_limits(pixels, pixels)
    predictions, costs = [], []
    try:
        with method.apply(lm.model, adapter):
            for sample in samples:
                result = answer_tries(lm, method, SampleInput(sample["video"], sample["fps"]), sample["tries"])
                predictions += [prediction_record(record, answer.text, "text")
                                for record, answer in zip(sample["records"], result.answers)]
                costs.append({"subtask": sample["records"][0].subtask, **result.cost})
    finally:
        adapter.set_pixel_limits(*saved)
    scores = score_predictions(predictions)
    print(f"# done: {method.settings()} at {pixels or 'the run'} px: overall {100 * scores['overall']:.1f}, "
          f"families {scores['families']}", flush=True)
    return scores, costs


def probe_diagnostics(lm, method, samples):
    """What the attention selection looks at: mass on needle groups, and needles among selected groups."""
    import torch

    from duokit.engine import SampleInput
    from duokit.methods.flex.method import embed_at
    from duokit.methods.flex.probe import question_attention

    rows = []
    with method.apply(lm.model, lm.adapter):
        layer = method.layer(lm.geometry.num_layers)
        for sample in samples:
            view = SampleInput(sample["video"], sample["fps"], question=sample["question"])
            low = embed_at(lm, view, round(method.low_res))
            rows_from = int(low.video_mask.nonzero()[-1, 0]) + 1 if method.rows == "question" else low.num_tokens - 1
            attention = question_attention(lm, low, layer, rows_from, 2048).sum(0)
            groups = low.frame_of[low.video_mask]
            mass = torch.zeros(int(groups.max()) + 1).index_add_(0, groups.cpu(), attention)
            prefix = method.prepare_prefix(lm.embed(view), view, lm)
            injected = prefix.frame_of[low.num_tokens:]
            chosen = sorted(set(injected[injected >= 0].tolist()))
            needles = sample["needle_groups"]
            rows.append({"subtask": sample["records"][0].subtask, "groups": len(mass),
                         "needle_groups": len(needles), "selected_groups": len(chosen),
                         "needle_mass": float(mass[needles].sum() / mass.sum()) if needles else None,
                         "needle_share": len(needles) / len(mass),
                         "selected_needles": len(set(chosen) & set(needles)),
                         "top_group_is_needle": int(mass.argmax()) in needles})
    return rows


def probe_summary(rows: list[dict]) -> dict:
    with_needles = [d for d in rows if d["needle_groups"]]
    return {
        "needle_mass": statistics.fmean(d["needle_mass"] for d in with_needles),
        "needle_share": statistics.fmean(d["needle_share"] for d in with_needles),
        "top_group_is_needle": statistics.fmean(d["top_group_is_needle"] for d in with_needles),
        "selected_needle_groups": sum(d["selected_needles"] for d in with_needles)
        / max(1, sum(d["selected_groups"] for d in with_needles)),
        "needles_selected": sum(d["selected_needles"] for d in with_needles)
        / max(1, sum(d["needle_groups"] for d in with_needles)),
    }


def family_of(subtask: str) -> str:
    return {"ret": "retrieval", "ord": "ordering", "cnt": "counting"}[subtask[:3]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-task", type=int, default=10, help="samples per sub-task (9 sub-tasks)")
    parser.add_argument("--seed", type=int, default=1717, help="held-out set seed (a fresh one)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--low-pixels", type=int, default=28 * 28, help="pixels per frame of the low-res context")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra flex settings")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="flex rows to run (each with its random control)")
    parser.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the all-re-injected controls and the per-layer probe sweep")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import torch

    from duokit.engine import LM
    from duokit.methods import get_method
    from duokit.models import load_vlm

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, _, adapter = load_vlm("needlenet", device="cpu")
    lm = LM(model, adapter)
    samples = load_samples(args.frames, args.per_task, args.seed)
    extra = dict(item.split("=", 1) for item in args.set)
    low = str(args.low_pixels)
    results, diagnostics, random_p = {}, {}, {}
    results["baseline high res"] = evaluate(lm, get_method("baseline"), samples)
    results["baseline low res"] = evaluate(lm, get_method("baseline"), samples, pixels=args.low_pixels)
    for label, variant in ((label, VARIANTS[label]) for label in args.variants):
        attention = get_method("flex", low_res=low, **extra, **variant)
        results[f"flex {label}"] = evaluate(lm, attention, samples)
        costs = results[f"flex {label}"][1]
        fraction = sum(c["selected_tokens"] for c in costs) / sum(c["high_res_tokens"] for c in costs)
        # Same count: under a budget every cell is drawn and the cap keeps random ones up to it; without
        # one, each cell is drawn with the attention row's selected fraction.
        chance = "1" if "budget" in variant else str(fraction)
        random_p[label] = float(chance)
        control = get_method("flex", low_res=low, **extra, **variant, selection="random", random_p=chance)
        results[f"flex {label}, random"] = evaluate(lm, control, samples)
        diagnostics[label] = probe_diagnostics(lm, attention, samples)
    if args.controls:
        for label, control in CONTROLS.items():
            results[f"flex {label}"] = evaluate(lm, get_method("flex", **{"low_res": low, **extra, **control}), samples)
        for rows in ("question", "last"):
            for layer in range(lm.geometry.num_layers):
                method = get_method("flex", low_res=low, **{**extra, "rows": rows, "select_layer": str(layer)})
                diagnostics[f"layer {layer}, rows {rows}"] = probe_diagnostics(lm, method, samples)

    date = datetime.date.today().isoformat()
    command = "python " + shlex.join(["benchmarks/flex_needle.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"# {date}: {command}")
    print(f"# {len(samples)} samples, {args.frames} frames; flex low_res={low} {extra or ''}; random p {random_p}")
    print(f"{'row':<30} {'overall':>7} {'ret':>6} {'ord':>6} {'cnt':>6} {'video tok':>9} {'selected':>8} "
          "(ret/ord/cnt)")
    table = {}
    for name, (scores, sample_costs) in results.items():
        by_family = defaultdict(list)
        for cost in sample_costs:
            by_family[family_of(cost["subtask"])].append(cost.get("selected_tokens", 0))
        selected = {family: statistics.fmean(values) for family, values in by_family.items()}
        families = {family_of(f + "_"): 100 * v for f, v in scores["families"].items()}
        video = statistics.fmean(c["video_tokens"] for c in sample_costs)
        table[name] = {"overall": 100 * scores["overall"], "families": families, "mean_video_tokens": video,
                       "mean_selected_tokens": selected,
                       "mean_selection_s": statistics.fmean(c.get("selection_s", 0.0) for c in sample_costs)}
        print(f"{name:<30} {100 * scores['overall']:7.1f} {families['retrieval']:6.1f} {families['ordering']:6.1f} "
              f"{families['counting']:6.1f} {video:9.1f} "
              f"{'/'.join(f'{selected[f]:.1f}' for f in ('retrieval', 'ordering', 'counting')):>8}")
    probe = {}
    for label, rows in diagnostics.items():
        probe[label] = summary = probe_summary(rows)
        print(f"# probe, {label}: attention mass on needle groups {summary['needle_mass']:.3f} vs their share "
              f"of groups {summary['needle_share']:.3f}; top group a needle in {summary['top_group_is_needle']:.2f} "
              f"of samples; {summary['selected_needle_groups']:.3f} of selected groups hold a needle; "
              f"{summary['needles_selected']:.3f} of needle groups selected")
    if args.json:
        from duokit.io import atomic_write_text

        atomic_write_text(args.json, json.dumps({"date": date, "command": command, "random_p": random_p,
                                                 "rows": table, "probe": probe},
                                                indent=1))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
