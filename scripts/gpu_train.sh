#!/usr/bin/env bash
# Train a built-in nuclei model on a lent NVIDIA machine (the device tool), finish it here.
#
# The device image has PyTorch with CUDA, numpy, scipy, numba and scikit-image; the DSB2018
# copy beside the checkout does not travel, so copy the train split into the repository
# first (runs/ is ignored; train/ and index.json are about 48 MB of the 64 MiB allowed):
#
#   mkdir -p runs/dsb2018 && cp -r ../shared/data/dsb2018/{train,index.json} runs/dsb2018/
#
# then, through the device tool's run (carry ["runs/dsb2018"]), first a short call to learn
# the seconds per epoch of the chosen network, then the real run sized to end inside the
# call's 600 s limit (a run stops itself after --time-limit and keeps its checkpoint):
#
#   bash scripts/gpu_train.sh runs/v3-probe --epochs 400 --time-limit 60 --width 32 --crop 256 --batch-size 16
#   bash scripts/gpu_train.sh runs/nuclei-v3 --epochs N --width 32 --crop 256 --batch-size 16 \
#        --diameter 20 --zoom 0.75 1.33 --name nuclei --version 3.0 --time-limit 500
#
# What comes back under $OUT: train.log and checkpoint.pt (the final weights, the epochs'
# history and where they ran; no optimizer state, so it stays under the 16 MiB a returned
# file may have up to width ~40). Finish here (threshold tuning, ONNX export checked against
# PyTorch, the val metrics and the card) with the same options and --device auto:
#
#   mkdir -p runs/nuclei-v3 && cp <files_at>/checkpoint.pt runs/nuclei-v3/
#   python scripts/train_builtin.py --data ../shared/data/dsb2018 --workdir runs/nuclei-v3 \
#        --epochs N --width 32 ... --device auto
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="$1"; shift
OUT="${OUT:-$workdir/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
[ -e segstudio/sample_data ] || ln -s ../sample_data segstudio/sample_data
[ -e segstudio/resources ] || ln -s ../resources segstudio/resources
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# the CPU only augments: one torch thread per loader thread (16 intra-op threads each would fight)
loaders=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
python3 scripts/train_builtin.py --data runs/dsb2018 --workdir "$workdir" "$@" \
    --device cuda --loader-threads "$loaders" --threads 1 --train-only 2>&1 | tee "$OUT/train.log"
# the final weights without the optimizer state (a third of the size)
python3 - "$workdir/checkpoint.pt" "$OUT/checkpoint.pt" <<'EOF'
import sys, torch
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
torch.save({k: ckpt[k] for k in ("model", "epoch", "seconds", "history")}, sys.argv[2])
print(f"epoch {ckpt['epoch']}, {ckpt['seconds']:.0f} s of training -> {sys.argv[2]}")
EOF
