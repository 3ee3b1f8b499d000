#!/usr/bin/env bash
# tools/bench_segment_gpu.py on the project's offline GPU machine (Python 3.12 with torch, timm and
# torchvision, without OpenSlide, zarr or imagecodecs, and without the network):
#   bash tools/gpu_bench.sh prepare      here: wheels of what that image lacks and the CMU sample into
#                                        build/gpu_bench (ignored by git, about 40 MB)
#   bash tools/gpu_bench.sh run [ARGS]   there, with build/gpu_bench carried: install them under /tmp and
#                                        run the benchmark; its JSON lines land in $OUT/gpu_bench.jsonl
set -euo pipefail
DIR=build/gpu_bench
case "${1:-}" in
prepare)
    mkdir -p "$DIR"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$DIR" openslide-python==1.4.7 openslide-bin==4.0.1.2 zarr==3.1.6 \
        numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 imagecodecs==2026.3.6
    cp "${WSISEG_CACHE:-$HOME/.cache/wsiseg}/cmu_svs.svs" "$DIR/"
    du -sh "$DIR"
    ;;
run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DIR"/*.whl
    export PYTHONPATH="/tmp/site:$PWD" WSISEG_CACHE="$PWD/$DIR" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
    python3 tools/bench_segment_gpu.py --out "${OUT:-/tmp}/gpu_bench.jsonl" "$@"
    ;;
*)
    echo "usage: $0 prepare | run [bench_segment_gpu.py options]" >&2
    exit 2
    ;;
esac
