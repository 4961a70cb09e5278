"""DuoAttention gate-training data for NeedleNet: its own task family, not the synthesizer's training variant.

The generic gate-training data (`duokit.data.synth.training`, "The 1st secret word is Eve.") is useless
for NeedleNet: its word-level tokenizer knows only the words of VNBench-style prompts and options, so
those sentences become `<unk>` (docs/needlenet.md "Tokenizer"). Here every example is NeedleNet's own
training example (`data.make_example`, synthesizer split "train", never an eval seed): the official
prompt of one try and the gt option's text as the teacher-forced answer, the loss on the answer words.
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "needlenet"  # the `name` a NeedleNet checkpoint records in its duokit.json (train.py)


def is_needlenet(name_or_path: str) -> bool:
    """True for the shipped `needlenet` and any NeedleNet checkpoint directory (its duokit.json says so)."""
    from duokit.models import duokit_metadata, resolve_model_path

    if name_or_path.startswith("tiny:"):
        return False
    return duokit_metadata(resolve_model_path(name_or_path)).get("name") == MODEL_NAME


class NeedleNetTask:
    """`example(index)`: NeedleNet's training example `index` as a teacher-forced gate-training example.

    With several frame counts, example `index` uses `frames[index % len(frames)]`; an example is a pure
    function of (frames, seed, index), so a resumed gate-training run sees the same data.
    """

    def __init__(self, adapter: Any, frames: int | tuple[int, ...], seed: int):
        from duokit.methods.duo.train_data import ChatExamples

        self.encoder = ChatExamples(adapter)
        self.frames = (frames,) if isinstance(frames, int) else tuple(frames)
        self.seed = seed

    def example(self, index: int):
        from duokit.data.synth.training import QA
        from duokit.models.needlenet.data import make_example

        frames = self.frames[index % len(self.frames)]
        item = make_example(self.seed, frames, index, split="train")
        return self.encoder.encode(item.frames, item.fps, [QA(item.prompt, item.answer, ((0, len(item.answer)),))])
