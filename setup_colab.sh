#!/usr/bin/env bash
# duokit runtime set-up for Colab or a plain Linux box; safe to re-run.
#   bash setup_colab.sh               install requirements.txt and duokit (editable), then report
#   bash setup_colab.sh --flash-attn  also try flash-attn (sm80+ GPUs only); on failure duokit uses sdpa
#   bash setup_colab.sh --no-install  only report Python, package versions and the GPU
# torch, torchvision and torchcodec are never (re)installed: Colab ships builds matched to its CUDA
# (shared/reference/transformers.md §9), so pip is held to the installed versions by a constraints file.
# PYTHON selects the interpreter (default: python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
install=1
flash_attn=0
for arg in "$@"; do
  case "$arg" in
    --flash-attn) flash_attn=1 ;;
    --no-install) install=0 ;;
    -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup_colab.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

if [[ $install == 1 ]]; then
  if [[ ! -f "$here/requirements.txt" ]]; then
    echo "setup_colab.sh: $here/requirements.txt not found; run the script from a duokit clone" >&2
    exit 1
  fi
  if ! "$python" -c "import torch" 2>/dev/null; then
    echo "setup_colab.sh: torch is not installed. Colab ships it; on a CPU-only x86_64 box install the" >&2
    echo "matched pair first: $python -m pip install torch==2.14.1 torchvision==0.29.1" >&2
    exit 1
  fi
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  "$python" - > "$constraints" <<'EOF'
import importlib.metadata as metadata
for name in ("torch", "torchvision", "torchcodec"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
EOF
  echo "installing requirements.txt (holding $(paste -sd' ' "$constraints"))"
  "$python" -m pip install -q -c "$constraints" -r "$here/requirements.txt"
  if [[ -f "$here/pyproject.toml" ]]; then
    "$python" -m pip install -q -c "$constraints" -e "$here"
  fi
  echo "If this Python session had already imported transformers, restart it (Colab: Runtime > Restart session)."
fi

if [[ $flash_attn == 1 && $install == 0 ]]; then
  echo "flash-attn: not tried (--no-install); duokit uses attn_implementation='sdpa'"
elif [[ $flash_attn == 1 ]]; then
  capability="$("$python" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())) \
if torch.cuda.is_available() else 'none')")"
  if [[ $capability == none ]]; then
    echo "flash-attn: skipped, no GPU; duokit uses attn_implementation='sdpa'"
  elif (( capability < 80 )); then
    echo "flash-attn: skipped, FlashAttention-2 needs sm80+ and this GPU is sm$capability; duokit uses 'sdpa'"
  elif "$python" -m pip install -q -c "$constraints" --no-build-isolation flash-attn; then
    echo "flash-attn: installed"
  else
    echo "flash-attn: install failed (no wheel for this torch/CUDA, or the build failed); duokit uses 'sdpa'"
  fi
fi

PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" -m duokit.runtime
