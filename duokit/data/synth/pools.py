"""Answer pools of the nine VNBench sub-tasks (the VNBench annotations; docs/synth.md)."""

from __future__ import annotations

# One name per letter A-Z, verbatim from the VNBench edit options (the published annotations).
NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Harry", "Ivy", "Jack", "Kate", "Leo", "Mary",
    "Nick", "Olivia", "Paul", "Quentin", "Rachel", "Sam", "Tom", "Uma", "Victor", "Wendy", "Xander",
    "Yvonne", "Zach",
)
# The 12 fruits of ret_insert1 / ord_insert1 (the published annotations).
FRUITS = (
    "apple", "banana", "orange", "lemon", "pear", "coconut", "blueberry", "mango", "grapes", "strawberry",
    "peach", "kiwifruit",
)
# The 20 PASCAL-VOC-style classes of ord_insert2 / cnt_insert1, "flower" replacing "potted plant" (the published
# annotations).
OBJECTS = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table",
    "dog", "flower", "horse", "motorbike", "person", "sheep", "sofa", "train", "tv monitor",
)
# VNBench draws 134 Google-Landmarks-style names that are not published; this pool is our choice of
# well-known landmarks, big enough for 3 distractors and distinct procedural pictures (docs/synth.md,
# "How our needles differ from the official ones", "Needle pictures").
LANDMARKS = (
    "Eiffel Tower", "Big Ben", "Colosseum", "Taj Mahal", "Sydney Opera House", "Golden Gate Bridge",
    "Statue of Liberty", "Great Wall", "Machu Picchu", "Christ the Redeemer", "Petra", "Chichen Itza",
    "Leaning Tower of Pisa", "Sagrada Familia", "Brandenburg Gate", "Tower Bridge", "Mount Fuji",
    "Angkor Wat", "Burj Khalifa", "Parthenon", "Stonehenge", "Neuschwanstein Castle", "Arc de Triomphe",
    "Forbidden City", "Hagia Sophia", "Pretoria Bridge", "ETH Zurich", "Charles Bridge", "Alhambra",
    "Mont Saint-Michel", "Space Needle", "CN Tower", "Kremlin", "Potala Palace", "Golden Temple",
    "Louvre Pyramid", "Atomium", "Little Mermaid", "Matterhorn", "Table Mountain",
)
POOLS = {"name": NAMES, "fruit": FRUITS, "object": OBJECTS, "landmark": LANDMARKS}

_IRREGULAR_PLURALS = {"sheep": "sheep", "person": "people", "grapes": "grapes", "kiwifruit": "kiwifruits",
                      "mango": "mangoes"}


def plural(name: str) -> str:
    """English plural for the counting questions ("How many {plural} appeared in the video?")."""
    if name in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[name]
    if name.endswith(("s", "sh", "ch")):
        return name + "es"
    if name.endswith("y") and name[-2] not in "aeiou":
        return name[:-1] + "ies"
    return name + "s"
