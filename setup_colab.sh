#!/usr/bin/env bash
# duokit runtime set-up for Colab or a plain Linux box; safe to re-run.
#   bash setup_colab.sh               install requirements.txt and duokit (editable), then report
#   bash setup_colab.sh --flash-attn  also flash-attn from a prebuilt wheel (sm80+ GPUs); else duokit uses sdpa
#   bash setup_colab.sh --no-install  skip the requirements and duokit (with --flash-attn: only flash-attn)
# torch, torchvision and torchcodec are never (re)installed: Colab ships builds matched to its CUDA, so pip is
# held to the installed versions by a constraints file (https://pip.pypa.io/en/stable/user_guide/#constraints-files).
# flash-attn is never compiled (hours on Colab): only the release wheel built for this Python, torch, CUDA and
# C++ ABI is tried, within FLASH_ATTN_TIMEOUT seconds (default 300). FLASH_ATTN_VERSION (default 2.8.3) picks
# the release; FLASH_ATTN_WHEEL_URL names a wheel yourself. PYTHON selects the interpreter (default: python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
install=1
flash_attn=0
for arg in "$@"; do
  case "$arg" in
    --flash-attn) flash_attn=1 ;;
    --no-install) install=0 ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup_colab.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

if [[ $install == 1 || $flash_attn == 1 ]]; then
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
fi

if [[ $install == 1 ]]; then
  if [[ ! -f "$here/requirements.txt" ]]; then
    echo "setup_colab.sh: $here/requirements.txt not found; run the script from a duokit clone" >&2
    exit 1
  fi
  echo "installing requirements.txt (holding $(paste -sd' ' "$constraints"))"
  "$python" -m pip install -q -c "$constraints" -r "$here/requirements.txt"
  if [[ -f "$here/pyproject.toml" ]]; then
    "$python" -m pip install -q -c "$constraints" -e "$here"
  fi
  echo "If this Python session had already imported transformers, restart it (Colab: Runtime > Restart session)."
fi

if [[ $flash_attn == 1 ]]; then
  capability="$("$python" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())) \
if torch.cuda.is_available() else 'none')")"
  if [[ $capability == none ]]; then
    echo "flash-attn: skipped, no GPU; duokit uses attn_implementation='sdpa'"
  elif (( capability < 80 )); then
    echo "flash-attn: skipped, FlashAttention-2 needs sm80+ and this GPU is sm$capability; duokit uses 'sdpa'"
  else
    # Release assets of https://github.com/Dao-AILab/flash-attention are named
    # flash_attn-VERSION+cuCUDA_MAJORtorchMAJOR.MINORcxx11abiTRUE|FALSE-cpXY-cpXY-linux_ARCH.whl.
    wheel="${FLASH_ATTN_WHEEL_URL:-}"
    if [[ -z $wheel ]] && ! wheel="$("$python" - "${FLASH_ATTN_VERSION:-2.8.3}" <<'EOF'
import platform, sys, torch  # flash-attn wheel name
version = sys.argv[1]
if torch.version.cuda is None:
    sys.exit("this torch has no CUDA")
torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
abi = "TRUE" if torch._C._GLIBCXX_USE_CXX11_ABI else "FALSE"
py = f"cp{sys.version_info.major}{sys.version_info.minor}"
name = f"flash_attn-{version}+cu{torch.version.cuda.split('.')[0]}torch{torch_version}cxx11abi{abi}-{py}-{py}"
print(f"https://github.com/Dao-AILab/flash-attention/releases/download/v{version}/"
      f"{name}-linux_{platform.machine()}.whl")
EOF
)"; then
      wheel=""
    fi
    if [[ -z $wheel ]]; then
      echo "flash-attn: cannot name a wheel for this torch; duokit uses 'sdpa'"
    else
      echo "flash-attn: trying the prebuilt wheel $wheel"
      # A wheel file's URL is never built from source; --only-binary keeps its dependencies (einops) wheels too.
      if timeout "${FLASH_ATTN_TIMEOUT:-300}" "$python" -m pip install -q -c "$constraints" --only-binary :all: \
          "$wheel"; then
        echo "flash-attn: installed"
      else
        echo "flash-attn: no prebuilt wheel for this Python/torch/CUDA/C++ ABI (or it timed out); duokit uses 'sdpa'"
      fi
    fi
  fi
fi

PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" -m duokit.runtime
