"""NeedleNet: a tiny Qwen2.5-VL trained from scratch on synthetic needle videos, shipped with duokit.

`tokenizer` (offline word-level tokenizer + chat template), `config` (architecture, processor),
`data` (synthesizer samples -> batches), `train` (the curriculum training loop), `commands`
(`duokit needlenet train`). The trained weights live in duokit/assets/needlenet (docs/needlenet.md).
"""
