#!/usr/bin/env bash
# The checks and measurements that need a CUDA GPU:
#   tests  tests/test_cuda.py (the backend against the reference cache on the GPU, CUDA graphs
#          too; ~3 minutes on an H100 or H200);
#   bench  benchmarks/compile_time.py on FLUX-24 at FLUX.1's width, 1024x1024, bf16: cold
#          compile and per-step time of wavespeed against plain Inductor, with and without
#          CUDA graphs (one cold compile each; warm compiles and the session are the CPU
#          run's). On an H100 the four cold compiles took 27-48 s each, each configuration
#          ~60 s more (model build, eager reference, steps): 6.4 minutes in all.
# Each part fits one 10-minute device command; run them as two commands back to back (the
# machine stays warm between them) or as one (`all`, the default) where time allows.
# Runs with the machine's own python3 and torch; wheels of packages it lacks (diffusers)
# may be given in WHEELS (a folder), installed to a temporary site folder first.
#     benchmarks/gpu.sh OUT_DIR [tests|bench|all]
set -uo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [tests|bench|all]}
part=${2:-all}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/wavepass-site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/wavepass-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '|', torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
if [ "$part" = tests ] || [ "$part" = all ]; then
    started=$SECONDS
    timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
    echo "tests: ${PIPESTATUS[0]} after $((SECONDS - started)) s"
fi
if [ "$part" = bench ] || [ "$part" = all ]; then
    started=$SECONDS
    timeout "${BENCH_TIMEOUT:-560}" python3 benchmarks/compile_time.py --device cuda --scale released \
        --models flux-24 --configs inductor wavespeed inductor-cudagraphs wavespeed-cudagraphs \
        --compile-runs 1 --no-warm --steps 10 --repeats 5 \
        --json "$out/compile-time-cuda.json" --md "$out/compile-time-cuda.md" 2>&1 | tee "$out/compile_time.log"
    echo "benchmark: ${PIPESTATUS[0]} after $((SECONDS - started)) s"
fi
