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
SHIPPED_MODELS = ("needlenet",)  # trained models inside the package, under duokit/assets/<name> (docs/needlenet.md)

__all__ = ["DEFAULT_MODEL", "TINY_FAMILIES", "Adapter", "Prefix", "adapter_for", "adapters", "answer_parser",
           "duokit_metadata", "load_vlm", "resolve_model_path"]


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


def load_vlm(name_or_path: str, dtype: Any = "auto", device: Any = "auto") -> tuple[Any, Any, Any]:
    """Load `(model, processor, adapter)`; dtype/device "auto" pick fp16 on T4, bf16 on sm80+, fp32 on CPU."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    from duokit.runtime import pick_device, pick_dtype

    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    adapter_cls = adapter_for(config.model_type)
    # The M-RoPE rule for text after a video the model was trained with (Qwen-VL; docs/architecture.md).
    text_after_video = duokit_metadata(path).get("text_after_video")
    if text_after_video is not None and text_after_video not in getattr(adapter_cls, "text_after_video_rules", ()):
        raise ValueError(f"{Path(path) / 'duokit.json'}: text_after_video {text_after_video!r} is not a rule of "
                         f"{config.model_type} models; Qwen-VL models take 'qwen' or 'transformers'")
    device = torch.device(pick_device() if device == "auto" else device)
    dtype = pick_dtype(str(device)) if dtype == "auto" else dtype
    if isinstance(dtype, str):  # "bfloat16" -> torch.bfloat16
        torch_dtypes = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
        if dtype not in torch_dtypes:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
        dtype = torch_dtypes[dtype]
    loader = AutoModelForImageTextToText if adapter_cls.is_multimodal else AutoModelForCausalLM
    # Weights load straight onto the device (a Colab VM has less RAM than an A100 has memory).
    model = loader.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", device_map=str(device))
    model.eval()
    processor = (AutoProcessor if adapter_cls.is_multimodal else AutoTokenizer).from_pretrained(path)
    adapter = adapter_cls(model, processor)
    if text_after_video is not None:
        adapter.text_after_video = text_after_video
    return model, processor, adapter
