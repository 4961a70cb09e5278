"""Held-out splits: train and eval never share a seed, a haystack or a needle instance.

Every random stream of the synthesizer is seeded by `split_seed`, whose top bits name the split, so
the seed sets of the two splits are disjoint by construction (not merely unlikely to collide). A
procedural haystack or needle image is a pure function of its seed, so disjoint seeds give disjoint
haystacks and needle instances. Files (user haystack videos, needle images) are split by a hash of
their name, which keeps a file in the same split when files are added to or removed from its folder.
"""

from __future__ import annotations

import hashlib
import json

SPLITS = ("eval", "train")
_SEED_BITS = 62  # room for the split tag in the top bits of a 64-bit seed


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def tag_seed(raw: int, split: str) -> int:
    """Put `split`'s tag on the low 62 bits of `raw`: seeds of different splits never coincide."""
    _check_split(split)
    return (int(raw) & ((1 << _SEED_BITS) - 1)) | ((SPLITS.index(split) + 1) << _SEED_BITS)


def split_seed(split: str, *keys: object) -> int:
    """A seed for the stream named by `keys` (e.g. user seed, "haystack", index) inside `split`."""
    digest = hashlib.sha256(json.dumps([split, *keys], default=str).encode()).digest()
    return tag_seed(int.from_bytes(digest[:8], "little"), split)


def split_of_seed(seed: int) -> str:
    tag = int(seed) >> _SEED_BITS
    if not 1 <= tag <= len(SPLITS):
        raise ValueError(f"seed {seed} carries no split tag; seeds must come from split_seed/tag_seed")
    return SPLITS[tag - 1]


def split_of_file(name: str) -> str:
    """The split a file belongs to, from a hash of its name (stable when the folder changes)."""
    return SPLITS[hashlib.sha256(name.encode()).digest()[0] % len(SPLITS)]
