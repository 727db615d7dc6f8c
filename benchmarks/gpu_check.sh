#!/usr/bin/env bash
# The explanation benchmark at 1 mm brain size on a CUDA GPU (issue 4, item 5), in about 5 minutes.
#
# Network: nnU-Net's 3d_fullres-sized PlainConvUNet for 1 mm brains (6 stages, 32-320 features, 128^3 patch),
# He-initialized; instances: the ground-truth lesions of the phantom case with the most lesions.
#   1. mean aggregation, 2 samples: the study's way (whole-window graph, float32) versus ours with the
#      backward mode measured on the GPU, in float32 and with fp16 autocast (goal: >= 3x faster than the
#      study's way); Captum NoiseTunnel(Saliency) per instance as well; float32 means float32 (no TF32);
#      ours also once without cuDNN's algorithm search, which ours turns on and (i) leaves off;
#   2. one tile's forward and backward per precision and memory layout (benchmarks/tile_precision.py);
#   3. seconds per instance at N = 50 samples, float32, bf16 and fp16, with the mixed-precision maps' error
#      against float32.
# Figures are printed and written as JSON to $OUT. Run from anywhere; PYTHON defaults to the repository's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WORKDIR=${WORKDIR:-/tmp/nnxai-benchmark-1mm}
OUT=${OUT:-benchmarks/results-gpu}
mkdir -p "$OUT"
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: no CUDA GPU visible to torch")'
common=(--workdir "$WORKDIR" --spacing 1 --case most --device cuda --features "32,64,128,256,320,320" --convs 2
        --patch 128 --threads 4)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PYTHON" -m benchmarks.explain_benchmark "${common[@]}" --parts mean --samples 2 --ours-amp fp16 \
    --json "$OUT/mean.json"
"$PYTHON" -m benchmarks.tile_precision --json "$OUT/tile.json"
"$PYTHON" -m benchmarks.explain_benchmark "${common[@]}" --parts amp --instances 3 --samples 50 --amp bf16,fp16 \
    --json "$OUT/n50.json"
