"""Wall time of the engine (prefix prefilled once, 4 tries reuse it) vs naive per-try generation.

Naive: `model.generate` on the full prompt (video + question) once per try, as a plain loop over
the 4 tries would do. Engine: `duokit.engine.answer_tries`. Both produce the same tokens (checked).
Run: `python benchmarks/prefix_reuse.py [--model tiny:qwen2_5_vl] [--frames 64] [--size 224]`.
Frames of size x size px give (size/28)^2 video tokens per 2 frames on Qwen2/2.5-VL.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:qwen2_5_vl")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="frame height and width in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    args = parser.parse_args()

    import torch

    from duokit.data.vnbench import official_prompt, permuted_options
    from duokit.engine import LM, MAX_NEW_TOKENS, SampleInput, answer_tries
    from duokit.methods import get_method
    from duokit.models import load_vlm

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, processor, adapter = load_vlm(args.model)
    pixels = args.size * args.size
    # Let the processor keep the frames at size x size (the tiny processors cap them at 112 px).
    processor.video_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, args.size, args.size, 3), dtype=np.uint8)
    fps = 1.0
    prompts = [official_prompt("What is the secret word?", options)
               for options in permuted_options(["Alice", "Bob", "Carol", "Dave"])]
    method = get_method("baseline")

    def naive() -> list[list[int]]:
        outputs = []
        for prompt in prompts:
            inputs = adapter.build_inputs(frames, fps, prompt)
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            outputs.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
        return outputs

    def engine() -> list[list[int]]:
        with method.apply(model, adapter):
            result = answer_tries(LM(model, adapter), method, SampleInput(frames, fps), prompts)
        engine.cost = result.cost
        return [answer.tokens for answer in result.answers]

    def best_time(fn) -> tuple[float, list[list[int]]]:
        fn()  # warm-up
        times, out = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    naive_s, naive_tokens = best_time(naive)
    engine_s, engine_tokens = best_time(engine)
    if naive_tokens != engine_tokens:
        raise SystemExit(f"token mismatch: naive {naive_tokens} vs engine {engine_tokens}")
    cost = engine.cost
    print(f"{args.model}: {args.frames} frames {args.size}x{args.size}, {cost['video_tokens']} video tokens, "
          f"prefix {cost['prefix_tokens']} tokens, 4 tries, {MAX_NEW_TOKENS} new tokens each, "
          f"{torch.get_num_threads()} threads")
    print(f"naive per-try generate: {naive_s:.3f} s   engine (prefix reuse): {engine_s:.3f} s   "
          f"speed-up {naive_s / engine_s:.2f}x (tokens identical)")


if __name__ == "__main__":
    main()
