"""Held-out accuracy of a model on a fresh synthetic set, in memory (no video files).

The same path as `duokit eval` minus encoding: samples from the synthesizer's eval split (never a
training seed, splits.py), frames by the official uniform rule, the engine's `answer_tries` (prefix
once, 4 tries, greedy, max_new_tokens=5), the scorer's 4-try circular scoring. `duokit synth` +
`duokit eval` measure the same thing through H.264 files (docs/needlenet.md gives both commands).
"""

from __future__ import annotations

from typing import Any

from duokit.data.vnbench import SUBTASKS


def heldout_scores(model: Any, adapter: Any, parser: str, frames: int, per_task: int, seed: int,
                   tasks: tuple[str, ...] = SUBTASKS, progress: bool = False, method: Any = None) -> dict:
    """Scorer JSON (duokit.data.scoring.score_predictions) on `per_task` fresh samples per sub-task, with
    `method` (a registered duokit method, e.g. `get_method("duo", ...)`) applied; the dense baseline if None."""
    from tqdm.auto import tqdm

    from duokit.data.scoring import prediction_record, score_predictions
    from duokit.data.synth.generate import Synthesizer
    from duokit.data.vnbench import parse_record, question_part
    from duokit.engine import LM, SampleInput, Try, answer_tries
    from duokit.methods import get_method
    from duokit.models.needlenet.data import eval_synth_config, sampled

    synthesizer = Synthesizer(eval_synth_config(frames, per_task, seed, tuple(tasks)))
    method = method or get_method("baseline")
    predictions = []
    lm = LM(model, adapter)
    with method.apply(model, adapter):
        for sample in tqdm(synthesizer, total=len(synthesizer), desc=f"held-out {method.name}", disable=not progress):
            raws = sample.records(f"./videos/{sample.sample_id}.mp4")
            records = [parse_record(raw, index, "synthetic held-out set") for index, raw in enumerate(raws)]
            video, fps = sampled(sample.frames, sample.fps, frames)
            tries = [Try(record.prompt, question_part(record.question)) for record in records]
            result = answer_tries(lm, method, SampleInput(video, fps), tries)
            predictions += [prediction_record(record, answer.text, parser)
                            for record, answer in zip(records, result.answers)]
    return score_predictions(predictions)
