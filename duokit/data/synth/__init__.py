"""VideoNIAH synthesizer: VNBench-style needle videos from procedural or user haystacks (docs/synth.md).

Modules, one concept each: `pools` (answer pools), `images` (needle images), `haystack`, `needles`
(subtitles, stickers, inserted frames), `tasks` (the nine sub-tasks), `generate` (in-memory samples),
`writer` (mp4 + annotations.json + manifest.json), `training` (the DuoAttention training variant),
`splits` (the held-out guarantee), `commands` (`duokit synth`).
"""
