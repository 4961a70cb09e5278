"""NeedleNet's offline tokenizer: one token per word of the closed VNBench-style language.

Every prompt the synthesizer and the official prompt can produce (duokit/data/synth/tasks.py
QUESTIONS, the option lines "A. x", ANSWER_INSTRUCTION) is split on spaces with `\\n` kept as its own
token; the vocabulary is every piece that occurs, so no prompt word maps to `<unk>`. Answer items keep
their trailing comma as one token ("Sam," "Grace," "Paul," "Bob") and multi-word items ("dining
table", "Eiffel Tower") are single added tokens, so every answer fits in 4 tokens + `<|im_end|>`
within the engine's official `max_new_tokens=5` (VNBench's official LLaVA example, github.com/joez17/VideoNIAH). A `tokenizers.WordLevel` model in a
`PreTrainedTokenizerFast`, as measured in an earlier probe (docs/needlenet.md, "Tokenizer").
"""

from __future__ import annotations

from duokit.data.synth.pools import POOLS, plural
from duokit.data.synth.tasks import NEAR_SPREAD, QUESTIONS, SECTIONS, STICKERS_PER_SECTION
from duokit.data.vnbench import ANSWER_INSTRUCTION, LETTERS

PAD, EOS, UNK = "<|endoftext|>", "<|im_end|>", "<unk>"
SPECIAL_TOKENS = (PAD, "<|im_start|>", EOS, "<|vision_start|>", "<|vision_end|>", "<|video_pad|>",
                  "<|image_pad|>", UNK)
# Qwen chat format without a system turn (shorter prompts); a video item becomes the Qwen placeholder,
# which the processor expands to one <|video_pad|> per video token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Largest count an option can name: cnt_edit2's answer is at most SECTIONS * 4 stickers and its options
# span NEAR_SPREAD above the lowest one (tasks.py).
MAX_COUNT = SECTIONS * STICKERS_PER_SECTION[1] + NEAR_SPREAD


def answer_items() -> list[str]:
    """Every option item of every pool, bare and with the comma it carries inside an order."""
    items = [item for pool in POOLS.values() for item in pool]
    return items + [f"{item}," for item in items] + [str(n) for n in range(MAX_COUNT + 1)]


def corpus() -> list[str]:
    """Texts covering every word a prompt or answer can contain."""
    plurals = [plural(item) for pool in ("fruit", "object") for item in POOLS[pool]]
    questions = [q.format(plural=p) for q in QUESTIONS.values() for p in plurals]
    return [*questions, ANSWER_INSTRUCTION, *(f"{letter}." for letter in LETTERS), *answer_items(),
            "user\nassistant\n"]


def _split_core(vocab: dict[str, int]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated")])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return core


def _wrap(core, multiword: list[str]):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS, PAD, UNK)],
        chat_template=CHAT_TEMPLATE)
    # single_word: "tv monitor" must not match inside the plural "tv monitors".
    tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in multiword])
    return tokenizer


def build_tokenizer():
    """The NeedleNet tokenizer (deterministic: the same vocabulary and ids on every run)."""
    multiword = sorted({item for item in answer_items() if " " in item})
    # Pass 1: special and multi-word tokens only; every piece that comes out as <unk> is a vocabulary word.
    probe = _wrap(_split_core({t: i for i, t in enumerate(SPECIAL_TOKENS)}), multiword)
    words = set()
    for text in corpus():
        encoding = probe(text, add_special_tokens=False, return_offsets_mapping=True)
        words |= {text[a:b] for token, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"])
                  if token == probe.unk_token_id}
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *sorted(words)])}
    return _wrap(_split_core(vocab), multiword)
