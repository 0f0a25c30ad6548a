#!/usr/bin/env bash
# The recorded `segstudio optimize` runs of benchmarks/README.md ("Optimization"), on DSB2018 fluorescence:
# calibration and recovery on the train split, accuracy on the val split.
#   bash benchmarks/optimize.sh [NAME STEPS]...   (default: the runs in the README)
#   MODEL=nuclei bash benchmarks/optimize.sh NAME STEPS   (another model than nuclei-v1)
#   bash benchmarks/optimize.sh int8-minmax quantize:int8:method=minmax int8-entropy quantize:int8:method=entropy
# Each run writes /tmp/segstudio-opt/NAME/ (models) and copies report.json / report.html to
# benchmarks/results/optimize-NAME-<machine>-<date>.{json,html}.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${SEGSTUDIO_DSB2018:-../shared/data/dsb2018}
PY=${PYTHON:-.venv/bin/python}
MACHINE=${MACHINE:-cpu-$(nproc)core}
DATE=$(date +%F)
if [ $# -eq 0 ]; then
  set -- int8 quantize:int8 \
         prune-int8 prune:0.5,recover:steps=2500,quantize:int8
fi
while [ $# -ge 2 ]; do
  name=$1 steps=$2; shift 2
  out=/tmp/segstudio-opt/$name
  rm -rf "$out"; mkdir -p "$(dirname "$out")"
  /usr/bin/time -v "$PY" -m segstudio.cli optimize --model "${MODEL:-nuclei-v1}" \
      --calib "$DATA/train" --calib-labels --kind fluorescence \
      --val-images "$DATA/val" --val-labels "$DATA/val" \
      --steps "$steps" --max-drop 0.01 --out "$out" 2>&1 | tee "$out.log"
  cp "$out/report.json" "benchmarks/results/optimize-$name-$MACHINE-$DATE.json"
  cp "$out/report.html" "benchmarks/results/optimize-$name-$MACHINE-$DATE.html"
done
