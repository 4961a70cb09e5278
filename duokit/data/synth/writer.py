"""Write a synthetic set to disk: DIR/videos/<haystack>_<subtask>.mp4, DIR/annotations.json (the VNBench
schema) and DIR/manifest.json (seeds and sources, for the held-out guarantee)."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from duokit.data.synth.generate import Synthesizer
from duokit.data.video import write_video
from duokit.io import atomic_write_json


def write_synth_set(synthesizer: Synthesizer, out_dir: str | Path, progress: bool = True) -> Path:
    """Encode every sample and write the annotations last, so an interrupted run leaves no annotation
    file pointing at missing videos. Returns the annotations path."""
    out_dir = Path(out_dir)
    synthesizer.check()
    records, entries = [], []
    for sample in tqdm(synthesizer, total=len(synthesizer), desc="synth", unit="video", disable=not progress):
        name = f"{sample.sample_id}.mp4"
        write_video(out_dir / "videos" / name, sample.frames, sample.fps)
        records += sample.records(f"./videos/{name}")
        entries.append(synthesizer.manifest_entry(sample))
    atomic_write_json(out_dir / "manifest.json", synthesizer.manifest(entries))
    return atomic_write_json(out_dir / "annotations.json", records)
