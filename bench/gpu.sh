#!/usr/bin/env bash
# The GPU tier in one prepared script, for a lent GPU machine (a bare one: it installs what it
# needs from the registries), well under ten minutes there:
#   1. the tests marked `cuda` (the whole pipeline on CUDA against the CPU, fp16 extraction, the
#      Tip-Adapter caches' logits on CUDA against the CPU's);
#   2. the text-encoder, generator, extraction and cache benchmarks on CUDA, random weights,
#      absolute times and the same ratios as on the CPU.
# Without a CUDA device it runs its CPU fallback: the cuda tests are skipped and the benchmarks
# run small on the CPU, so the script itself is checked on every machine.
#
#   bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import shipyard.cli" 2>/dev/null; then
    pip install -q torch torchvision
    # faiss-gpu and faiss-cpu ship the same module: one or the other, never both.
    if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        pip install -q -e ".[dev,gpu]" || { echo "gpu extra not installable here; faiss-cpu instead"; pip install -q -e ".[dev,faiss]"; }
    else
        pip install -q -e ".[dev,faiss]"
    fi
fi

DEVICE=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
python - <<'PY'
import torch, faiss
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
print(f"faiss {faiss.__version__}, GPU indexes: {hasattr(faiss, 'StandardGpuResources')}")
PY

echo "== tests marked cuda ($DEVICE)"
python -m pytest -m cuda -q -rs -p no:cacheprovider

echo "== benchmarks on $DEVICE"
if [ "$DEVICE" = cuda ]; then
    python bench/text_encoder.py --device cuda --models shipyard-tiny ViT-B-16 --large-reps 5
    python bench/generator.py --device cuda --models shipyard-tiny ViT-B-16
    python bench/extract.py --device cuda --model ViT-B-16 --images 512 --batch 128
    # dense and the classes index on CUDA tensors, FAISS flat / ivf on the GPU with faiss-gpu
    python bench/cache.py --device cuda --sizes 16000,160000,1600000 --queries 2048,2048,1024 --kinds ivf,classes
else
    echo "(no CUDA device: the CPU fallback, small sizes)"
    python bench/text_encoder.py --models shipyard-tiny --reps 2
    python bench/generator.py --models shipyard-tiny --epochs 1
    python bench/extract.py --model shipyard-tiny --images 64 --reps 1
    python bench/cache.py --sizes 16000 --queries 256 --kinds ivf,classes
fi
