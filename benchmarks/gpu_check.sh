#!/usr/bin/env bash
# The GPU check of issue 3, run on a lent NVIDIA machine (the device tool), whose
# image has PyTorch with CUDA but no napari, OpenVINO or TensorRT. Writes under $OUT:
#   gpu.txt, gpu-tests.log, bench-<gpu>-tile<T>-batch<B>.json/.png for three tile / batch sizes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
# run from the source tree: make the two top-level package folders importable
[ -e segstudio/sample_data ] || ln -s ../sample_data segstudio/sample_data
[ -e segstudio/resources ] || ln -s ../resources segstudio/resources
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numpy, numba, scipy, skimage; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'numpy', numpy.__version__, 'numba', numba.__version__)" | tee -a "$OUT/gpu.txt"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")

python3 benchmarks/make_image.py 2048 /tmp/bench2048.tif

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_backends.py tests/test_pipeline.py \
  tests/test_postprocess.py tests/test_tiling.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -5

variants="torch@cuda:fp32,torch@cuda:fp32+cl+graph,torch@cuda:fp16,torch@cuda:fp16+cl,torch@cuda:fp16+cl+graph,\
torch@cuda:bf16+cl+graph,onnxruntime"
for cfg in "512 4" "512 16" "1024 4"; do
  set -- $cfg
  timeout 150 python3 -m segstudio.cli bench --image /tmp/bench2048.tif --backends "$variants" --repeats 10 -q \
    --tile "$1" --batch-size "$2" --json "$OUT/bench-$gpu-tile$1-batch$2.json" 2>&1 | tail -11
done
