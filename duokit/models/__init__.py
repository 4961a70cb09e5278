"""`load_vlm(name)`: a model, its processor and the adapter that knows its family.

Names: a hub id (e.g. `Qwen/Qwen2.5-VL-3B-Instruct`, the default family), a local directory, or
`tiny:<family>` for a seeded tiny random-init model (see `duokit.models.tiny`). Every name goes through
`from_pretrained`, so tiny models exercise the path real checkpoints take. Remote code is never run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from duokit.models.tiny import TINY_FAMILIES, tiny_path

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
# The default cap on pixels per frame handed to processors that resize by pixel count (Qwen-VL): 448 x 448,
# 128 language-model tokens per frame for Qwen2/2.5-VL at any input resolution (docs/video.md).
DEFAULT_MAX_PIXELS = 448 * 448
SHIPPED_MODELS = ("needlenet",)  # trained models inside the package, under duokit/assets/<name> (docs/needlenet.md)

__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MODEL", "TINY_FAMILIES", "Adapter", "Prefix", "adapter_for", "adapters",
           "answer_parser", "duokit_metadata", "load_vlm", "resolve_model_path", "resolve_precision"]


def __getattr__(name: str) -> Any:
    # `Adapter` and `Prefix` import torch; loading them lazily keeps `import duokit.models` (and so
    # `duokit --help`, whose sub-command modules live under this package) free of torch.
    if name in ("Adapter", "Prefix"):
        from duokit.models import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def adapters() -> tuple[type, ...]:
    """The adapter classes, one per family; adding a family = adding its class here."""
    from duokit.models.llava_onevision import LlavaOnevisionAdapter
    from duokit.models.qwen_vl import QwenVLAdapter
    from duokit.models.text import TextAdapter

    return (QwenVLAdapter, LlavaOnevisionAdapter, TextAdapter)


def resolve_model_path(name_or_path: str) -> str:
    """The directory or hub id `from_pretrained` gets for a model name.

    `tiny:<family>` is built and saved once; a local path (`~` allowed) is expanded; anything else is a
    hub id. This is the one place where duokit's own model names (such as a shipped `needlenet`) map
    to directories.
    """
    if name_or_path.startswith("tiny:"):
        return str(tiny_path(name_or_path.removeprefix("tiny:")))
    if name_or_path in SHIPPED_MODELS:
        shipped = Path(__file__).resolve().parent.parent / "assets" / name_or_path
        if not (shipped / "config.json").exists():
            raise FileNotFoundError(f"{shipped}: the shipped {name_or_path} model is missing; reinstall duokit "
                                    f"or train one (`duokit {name_or_path} train --out DIR`) and pass DIR/model")
        return str(shipped)
    local = Path(name_or_path).expanduser()
    return str(local) if local.exists() else name_or_path


def duokit_metadata(path: str) -> dict:
    """duokit's own notes on a model directory (`duokit.json`, written by NeedleNet training); {} if none."""
    import json

    meta = Path(path) / "duokit.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def answer_parser(name_or_path: str) -> str:
    """The answer parser a model was trained for: `answer_parser` of its `duokit.json` (NeedleNet answers
    in option text, docs/needlenet.md), else the official letter parser."""
    return duokit_metadata(resolve_model_path(name_or_path)).get("answer_parser", "official")


def adapter_for(model_type: str) -> type:
    """The adapter class for a `config.model_type`."""
    for adapter in adapters():
        if model_type in adapter.model_types:
            return adapter
    known = sorted(t for adapter in adapters() for t in adapter.model_types)
    raise ValueError(f"model type {model_type!r} is not supported by duokit; supported: {', '.join(known)}")


def _model_config(name_or_path: str) -> tuple[str, Any, type, Any]:
    """(path, config, adapter class, transformers auto class) of a model name, reading its config only."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from duokit.models.loading import ModelLoadError, load_config

    path = resolve_model_path(name_or_path)
    config = load_config(name_or_path, path)
    try:
        adapter_cls = adapter_for(config.model_type)
    except ValueError as err:
        raise ModelLoadError(f"model {name_or_path}: {err}") from err
    loader = AutoModelForImageTextToText if adapter_cls.is_multimodal else AutoModelForCausalLM
    return path, config, adapter_cls, loader


def resolve_precision(name_or_path: str, dtype: Any = "auto", device: Any = "auto") -> tuple[Any, Any]:
    """(torch device, torch dtype) `load_vlm` would use, from the model's config only (no weights)."""
    import torch

    from duokit.models.loading import resolve_dtype
    from duokit.runtime import pick_device

    _, config, _, loader = _model_config(name_or_path)
    device = torch.device(pick_device() if device == "auto" else device)
    return device, resolve_dtype(name_or_path, config, device, dtype, loader=loader)


def load_vlm(name_or_path: str, dtype: Any = "auto", device: Any = "auto", max_pixels: int | None = None,
             min_pixels: int | None = None, attn_implementation: str = "auto") -> tuple[Any, Any, Any]:
    """Load `(model, processor, adapter)`.

    dtype "auto": fp32 on CPU, bf16 on sm80+, fp16 on older GPUs except Qwen-VL (fp32 or refused);
    attn_implementation "auto": flash_attention_2 where it can run, else sdpa (duokit.models.loading).
    `max_pixels`/`min_pixels`: pixels per frame the processor resizes frames into (Qwen-VL; None: the
    processor's own, capped at DEFAULT_MAX_PIXELS; docs/video.md). A model that cannot be loaded raises
    `ModelLoadError` with one line naming the model and the fix.
    """
    import torch
    from transformers import AutoProcessor, AutoTokenizer

    from duokit.models.loading import explain_load_error, pick_attn_implementation, resolve_dtype
    from duokit.runtime import pick_device

    path, config, adapter_cls, loader = _model_config(name_or_path)
    # The M-RoPE rule for text after a video the model was trained with (Qwen-VL; docs/architecture.md).
    text_after_video = duokit_metadata(path).get("text_after_video")
    if text_after_video is not None and text_after_video not in getattr(adapter_cls, "text_after_video_rules", ()):
        raise ValueError(f"{Path(path) / 'duokit.json'}: text_after_video {text_after_video!r} is not a rule of "
                         f"{config.model_type} models; Qwen-VL models take 'qwen' or 'transformers'")
    device = torch.device(pick_device() if device == "auto" else device)
    dtype = resolve_dtype(name_or_path, config, device, dtype, loader=loader)
    attention = pick_attn_implementation(device, dtype, attn_implementation)
    try:
        # Weights load straight onto the device (a Colab VM has less RAM than an A100 has memory).
        model = loader.from_pretrained(path, dtype=dtype, attn_implementation=attention, device_map=str(device))
        processor = (AutoProcessor if adapter_cls.is_multimodal else AutoTokenizer).from_pretrained(path)
    except OSError as err:
        raise explain_load_error(name_or_path, err) from err
    model.eval()
    adapter = adapter_cls(model, processor)
    adapter.set_pixel_limits(max_pixels, min_pixels)
    if text_after_video is not None:
        adapter.text_after_video = text_after_video
    # The frame size the model was trained on, every video resized to it (NeedleNet, docs/needlenet.md).
    frame_fit = duokit_metadata(path).get("frame_fit")
    if frame_fit is not None:
        if not (isinstance(frame_fit, list) and len(frame_fit) == 2 and all(isinstance(v, int) and v > 0
                                                                            for v in frame_fit)):
            raise ValueError(f"{Path(path) / 'duokit.json'}: frame_fit must be [width, height] in pixels, "
                             f"got {frame_fit!r}")
        adapter.frame_fit = tuple(frame_fit)
    return model, processor, adapter
