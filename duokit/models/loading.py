"""What `load_vlm` decides before it loads weights: the dtype, the attention kernel, and one clear line
when a model cannot be loaded.

dtype ("auto"): float32 on CPU; bfloat16 on GPUs with bf16 tensor cores (compute capability 8.0 and up:
A100, L4, H100); on older GPUs (T4, sm75) float16, except for Qwen-VL models, which overflow in float16
(huggingface/transformers#33294: inf/NaN activations, "!!!!" answers): they run in float32 when their
float32 weights leave `FP32_HEADROOM_BYTES` of the GPU free, and are refused with the numbers otherwise
(docs/architecture.md, "dtype on GPUs without bfloat16").

Attention ("auto"): `flash_attention_2` when the `flash_attn` package imports, the device is a CUDA GPU
of compute capability 8.0 or more and the dtype is float16 or bfloat16 (flash-attn 2's requirements,
github.com/Dao-AILab/flash-attention README); `sdpa` otherwise. It applies to the vision tower and to
the language model of methods that keep the model's own attention (the baseline); methods that register
their own attention function (DuoAttention) set it on the language model only, inside `Method.apply`.

Hub access reads the token from the `HF_TOKEN` environment variable (huggingface_hub's own rule); duokit
never prints or stores it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

# bf16 tensor cores and flash-attn 2 both start with Ampere (sm80); a T4 is sm75.
BF16_MIN_CAPABILITY = (8, 0)
FLASH_MIN_CAPABILITY = (8, 0)
# GPU memory left free beyond the float32 weights for KV, activations, the vision tower and the CUDA
# context before a Qwen-VL model is run in float32 on a GPU without bf16 (docs/architecture.md).
FP32_HEADROOM_BYTES = 2 * 2**30
# Families whose float16 activations overflow (huggingface/transformers#33294).
FP16_UNSAFE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message is one line naming the model and the fix."""


class NoSafeDtypeError(ModelLoadError):
    """The GPU has no dtype the model runs safely in (`resolve_dtype`): a refusal about this machine, not
    about the model's files, so a notebook can say which runtime or model to pick instead."""


def explain_load_error(name: str, err: BaseException) -> ModelLoadError:
    """The one-line reason `name` did not load, from transformers' OSError (or its huggingface_hub cause)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    causes = [err]
    while causes[-1].__cause__ is not None and len(causes) < 8:
        causes.append(causes[-1].__cause__)

    def caused_by(*kinds: type) -> bool:
        return any(isinstance(cause, kinds) for cause in causes)

    if caused_by(GatedRepoError):
        return ModelLoadError(
            f"model {name}: gated repository; accept its license at https://huggingface.co/{name} and set a token "
            "that may read it (HF_TOKEN, or in Colab the notebook's Secrets: HF_TOKEN)")
    if caused_by(RepositoryNotFoundError):
        return ModelLoadError(
            f"model {name}: no such local folder or Hugging Face repository; check the id (e.g. "
            "Qwen/Qwen2.5-VL-3B-Instruct) or the path; a private repository needs HF_TOKEN")
    if caused_by(LocalEntryNotFoundError, OfflineModeIsEnabled):
        return ModelLoadError(
            f"model {name}: not in the local Hugging Face cache and the Hub cannot be reached (no connection, or "
            "HF_HUB_OFFLINE=1); connect and run again to download it, or pass a local folder holding the model")
    if isinstance(err, OSError):
        return ModelLoadError(f"model {name}: cannot be loaded ({str(err).splitlines()[0]}); check the id or path "
                              "and the connection")
    return ModelLoadError(f"model {name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")


def load_config(name: str, path: str) -> Any:
    """`AutoConfig.from_pretrained(path)`, with load failures turned into one clear `ModelLoadError`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except OSError as err:
        raise explain_load_error(name, err) from err
    except (ValueError, KeyError) as err:  # a config.json whose model_type transformers does not know
        raise ModelLoadError(
            f"model {name}: its architecture is not supported by the installed transformers "
            f"({str(err).splitlines()[0]}); duokit supports the families in docs/architecture.md") from err


def capability(device: Any) -> tuple[int, int] | None:
    """The CUDA compute capability of `device`, None for other devices."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def device_kind(device: Any) -> str:
    """What a run records about its device: "cpu", or "cuda <name> sm<XY>"."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = capability(device)
    return f"cuda {torch.cuda.get_device_name(device)} sm{major}{minor}"


def to_torch_dtype(dtype: Any) -> Any:
    """A torch dtype from a torch dtype or its name ("bfloat16")."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    torch_dtypes = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
    if dtype not in torch_dtypes:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return torch_dtypes[dtype]


def count_parameters(config: Any, loader: Any) -> int:
    """Parameters of the model `config` describes, from shapes on the meta device (nothing allocated)."""
    import torch

    with torch.device("meta"):
        model = loader.from_config(config)
    return sum(p.numel() for p in model.parameters())


def max_float32_parameters(total_memory: int) -> float:
    """The most parameters whose float32 weights fit a GPU of `total_memory` bytes with FP32_HEADROOM_BYTES
    left over: what a Qwen-VL model may have to run on a GPU without bfloat16."""
    return (total_memory - FP32_HEADROOM_BYTES) / 4


def resolve_dtype(name: str, config: Any, device: Any, dtype: Any = "auto", num_params: int | None = None,
                  loader: Any = None) -> Any:
    """The torch dtype to load `config`'s model in on `device` (module docstring); refuses what cannot run."""
    import torch

    if dtype != "auto":
        return to_torch_dtype(dtype)
    cap = capability(device)
    if cap is None:
        return torch.float32
    if cap >= BF16_MIN_CAPABILITY:
        return torch.bfloat16
    if config.model_type not in FP16_UNSAFE_MODEL_TYPES:
        return torch.float16
    if num_params is None:
        num_params = count_parameters(config, loader)
    weights = num_params * 4
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if num_params <= max_float32_parameters(total):
        return torch.float32
    raise NoSafeDtypeError(
        f"model {name}: this GPU (sm{cap[0]}{cap[1]}, {total / 2**30:.1f} GiB) has no bfloat16, {config.model_type} "
        f"overflows in float16, and its float32 weights ({num_params / 1e9:.2f}B parameters = "
        f"{weights / 2**30:.2f} GiB) + {FP32_HEADROOM_BYTES / 2**30:.0f} GiB headroom do not fit; use a GPU with "
        "bfloat16 (L4, A100, H100), a smaller model (Qwen/Qwen2-VL-2B-Instruct fits in float32), or --dtype "
        "float16 at your own risk (NaN answers are then recorded as errors)")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def pick_attn_implementation(device: Any, dtype: Any, requested: str = "auto") -> str:
    """The `attn_implementation` the model loads with (module docstring)."""
    import torch

    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {requested!r}; use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    cap = capability(device)
    half = to_torch_dtype(dtype) in (torch.float16, torch.bfloat16)
    flash_ok = flash_attn_available() and cap is not None and cap >= FLASH_MIN_CAPABILITY and half
    if requested == "flash_attention_2" and not flash_ok:
        raise ValueError("attention flash_attention_2 needs the flash_attn package, a CUDA GPU of compute "
                         "capability 8.0+ (A100, L4, H100) and float16/bfloat16; use sdpa")
    if requested != "auto":
        return requested
    return "flash_attention_2" if flash_ok else "sdpa"
