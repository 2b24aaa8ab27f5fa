#!/usr/bin/env bash
# Create .venv and install the project with everything the worker, the bot and the tests need.
# torch goes in first and pinned: an unpinned torch (or one pulled in by diffusers) brings a
# multi-GB CUDA build even on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
# On a CPU-only machine, point this at PyTorch's CPU wheels (https://download.pytorch.org/whl/cpu)
# unless pip already finds a CPU wheel (PIP_FIND_LINKS, a local mirror).
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}

stamp="$VENV/.installed-$(cat pyproject.toml scripts/setup-venv.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
if "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "torch $TORCH_VERSION already installed"
else
  echo "installing torch==$TORCH_VERSION ${TORCH_INDEX_URL:+from $TORCH_INDEX_URL}"
  "${pip[@]}" "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
fi
echo "installing the project and its dependencies"
"${pip[@]}" -e ".[worker,bot,web,monitor,dev]"
rm -f "$VENV"/.installed-*
touch "$stamp"
