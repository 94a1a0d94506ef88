#!/usr/bin/env bash
# Set up a fresh machine for nemo_layerfx: system tools for the offline corpus, then a virtual environment
# (.venv) with NeMo 3.0 and the plugin. Safe to run again; it only installs what is missing.
#   TORCH_SPEC  torch requirement to install first (default torch==2.13.0, the CPU wheel on our CI machines;
#               on a GPU machine use e.g. TORCH_SPEC='torch==2.13.0' --index-url of your CUDA build)
#   EXTRAS      pip extras of the plugin to install (default: test)
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v sox >/dev/null || missing+=(sox)
[ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing ${missing[*]} (offline speech synthesis and text)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=sudo
  else
    echo "[setup] error: ${missing[*]} missing and no root rights; install them with:" >&2
    echo "        sudo apt-get install -y espeak-ng sox wordnet-base" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null; then
    echo "[setup] error: no apt-get here; install espeak-ng, sox and WordNet (wordnet-base) with your package manager" >&2
    exit 1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng sox wordnet-base >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import nemo_layerfx, nemo.collections.asr" >/dev/null 2>&1 || [ "${FORCE_INSTALL:-0}" = 1 ]; then
  echo "[setup] installing torch, NeMo 3.0 and nemo_layerfx into .venv (a few minutes the first time)"
  python -m pip install -q --upgrade pip
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q -e ".[${EXTRAS:-test}]"
fi
python -c "import nemo, torch, nemo_layerfx; print(f'[setup] ok: nemo {nemo.__version__}, torch {torch.__version__}, nemo_layerfx {nemo_layerfx.__version__}')" 2>/dev/null | tail -1
