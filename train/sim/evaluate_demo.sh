#!/usr/bin/env bash
# Every held-out figure of the shipped demo model (issues 5 and 7), one JSON file per run under OUT.
# Usage: bash train/sim/evaluate_demo.sh [CHECKPOINT] [OUT]   (defaults: assets/demo, runs/eval)
set -euo pipefail
cd "$(dirname "$0")/../.."
C=${1:-assets/demo}
O=${2:-runs/eval}
EP=${EPISODES:-6}
mkdir -p "$O"
ev() {  # ev NAME ARGS...: one evaluation, skipped when its JSON exists
  local name=$1; shift
  [ -s "$O/$name.json" ] || { echo "[eval] $name $(date)"; python -m train.evaluate --checkpoint "$C" --json "$@" > "$O/$name.json.tmp" && mv "$O/$name.json.tmp" "$O/$name.json"; }
}
for s in ar dida; do
  ev explore-$s --task explore --episodes "$EP" --sampler $s --dida-steps 8
  ev manipulate-$s --task manipulate --episodes "$EP" --sampler $s --dida-steps 8
done
ev explore-f2-map15 --task explore --episodes 2 --wad freedoom2.wad --map MAP15
ev explore-f1-e1m1 --task explore --episodes 2 --wad freedoom1.wad --map E1M1
ev guide --task guide --episodes "$EP"
ev story --task story --episodes "$EP"
echo "[eval] done $(date)"
