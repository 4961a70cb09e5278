"""DuoAttention: inference (official head patterns, a split KV cache, the `duokit_duo` attention, the
`duo` method; docs/duoattention.md) and gate training (docs/duo_training.md)."""
