#!/usr/bin/env bash
# Every GPU benchmark of the project in one run, written to one JSON file: rendering (eager and compiled,
# against plain diffusers), the hot reload of an adapter, and the trainer. Made for a GPU machine lent for a
# few minutes, with Python and torch but no internet and none of our other dependencies: those travel
# beside it as wheels in .whl/ (bench/wheels.sh downloads them here). From the repository root:
#
#   bench/wheels.sh && bench/gpu.sh [OUT_DIR]    # wheels here; on the GPU: its limits sum to 7.2 min
#   PROFILE=cpu PY_VERSION=3.11 ...              # the same run at CPU sizes, to prove the script here
#
# Each benchmark has its own time limit, so one that hangs or fails costs only its own figures: the JSON
# then holds its error and the tail of its output. SD v1-4's architecture with random weights: no download.
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:-${OUT:-bench-results}}
PROFILE=${PROFILE:-gpu}
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-python3}
mkdir -p "$out/logs"
if [ -d "$WHEELS" ]; then
  site=$(mktemp -d /tmp/imagine-site-XXXX)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

case $PROFILE in
  gpu)
    model=random-sd-v1-4
    render=(--base-model $model --size 512 --steps 30 --stream-steps 20 --jobs 32 --batch 8)
    reload=(--base-model $model --loads 1 --reloads 10)
    trainer=(--base-model $model --resolution 512 --steps 30 --warmup 5 --batch-size 16 --variants recipe,warm)
    limits=(90 170 50 120)
    ;;
  cpu)
    model=tiny
    render=(--base-model $model --size 64 --steps 12 --jobs 16 --batch 8 --repeats 2)
    reload=(--base-model $model --loads 1 --reloads 4)
    trainer=(--base-model $model --resolution 64 --steps 8 --warmup 2)
    limits=(300 600 120 300)
    ;;
  *) echo "PROFILE is gpu or cpu, not $PROFILE" >&2; exit 2 ;;
esac

# The built-in model is built once (random weights, saved with save_pretrained), outside any benchmark's time.
"$PYTHON" -c "from pathlib import Path; from worker.pipeline import ensure_built_in_model as e; \
e('$model', Path('~/.cache/imagine').expanduser())" >"$out/logs/build.log" 2>&1 || { tail "$out/logs/build.log"; exit 1; }

run() {  # NAME LIMIT_S SCRIPT ARGS...: the benchmark's JSON in $out/NAME.json, its output in $out/logs/NAME.log
  local name=$1 limit=$2 script=$3
  shift 3
  echo "== $name ($script $*)"
  timeout --kill-after=10 "$limit" "$PYTHON" "$script" "$@" --json "$out/$name.json" >"$out/logs/$name.log" 2>&1
  local status=$?
  grep -v -e Warning -e "LoRA keys" -e "Loading" -e "^\[transformers\]" "$out/logs/$name.log" | tail -n 8
  [ $status = 0 ] || echo "$name: exit status $status" | tee "$out/$name.error"
}
run render "${limits[0]}" bench/render.py "${render[@]}"
run render_compiled "${limits[1]}" bench/render.py "${render[@]}" --compile
run reload "${limits[2]}" bench/reload.py "${reload[@]}"
run trainer "${limits[3]}" bench/trainer.py "${trainer[@]}"

"$PYTHON" - "$out" "$PROFILE" <<'PY'
import json, platform, subprocess, sys
from pathlib import Path

import torch

out, profile = Path(sys.argv[1]), sys.argv[2]
machine = {"profile": profile, "python": platform.python_version(), "torch": torch.__version__}
machine["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
machine["cpus"] = __import__("os").cpu_count()
try:  # where the tree travelled with its .git and git is installed
    git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
    machine["commit"] = git("rev-parse", "HEAD") + (" with uncommitted changes" if git("status", "--porcelain") else "")
except OSError:
    pass
for package in ("diffusers", "transformers", "peft"):
    machine[package] = __import__(package).__version__
results = {"machine": machine}
for name in ("render", "render_compiled", "reload", "trainer"):
    figures, error = out / f"{name}.json", out / f"{name}.error"
    if figures.is_file() and not error.is_file():
        results[name] = json.loads(figures.read_text())
    else:
        log = (out / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
        results[name] = {"error": error.read_text().strip() if error.is_file() else "no figures", "log": log[-25:]}
(out / "bench.json").write_text(json.dumps(results, indent=2))
print(f"wrote {out / 'bench.json'}")
PY
