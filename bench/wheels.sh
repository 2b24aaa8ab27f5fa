#!/usr/bin/env bash
# Download, into .whl/, the wheels that bench/gpu.sh installs on a GPU machine that has Python and torch
# but none of our other dependencies and no internet. Run it here, where PyPI is reachable:
#
#   bench/wheels.sh                  # for the GPU machine: CPython 3.12, x86-64 Linux
#   PY_VERSION=3.11 bench/wheels.sh  # for the CPU proof of bench/gpu.sh on this machine
#
# The versions are those of this checkout's .venv (what the tests ran with). The list is what our code
# imports beyond what the GPU machine's image ships (numpy, pillow, pandas, accelerate, safetensors, tqdm,
# pyyaml, tensorboard, requests, ...); bench/gpu.sh's CPU proof fails on an import if it misses one.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION=${PY_VERSION:-3.12}
WHEELS=${WHEELS:-.whl}
packages=(
  diffusers transformers tokenizers huggingface_hub peft importlib_metadata compel pyparsing
  pydantic pydantic_core pydantic-settings annotated-types typing-inspection python-dotenv
  celery kombu billiard amqp vine tzlocal click-didyoumean click-repl click-plugins prompt_toolkit wcwidth
  redis
)
pinned=()
for package in "${packages[@]}"; do
  version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")
  pinned+=("$package==$version")
done
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp "${platforms[@]}" -d "$WHEELS" "${pinned[@]}"
echo "$(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), in $WHEELS for Python $PY_VERSION"
