#!/usr/bin/env bash
# One prepared run for a lent GPU machine: the CUDA tests, then the GPU benchmarks.
# Results go to $OUT (or ./gpu-results). The machine has torch, numpy, matplotlib, tqdm
# and pytest but not Hydra: carry wheels for hydra-core, omegaconf and
# antlr4-python3-runtime (Python 3.12) in .whl/, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       hydra-core==1.3.2 omegaconf==2.3.0
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # it ships an sdist only
# Each step has its own time limit, so that one slow step still leaves the others' results.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
step() {  # step NAME SECONDS COMMAND...: run it, keep its output in $out/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T))"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; python3 -c 'import torch; print(torch.__version__)'; } | tee "$out/gpu.txt"
step cuda-tests 150 python3 -m pytest -q -m cuda -rs -p no:cacheprovider tests
step bench-step 120 python3 -m quadnet.bench step --jobs 1,256,4096,65536 --repeat 2
step bench-sweep-10k 150 python3 -m quadnet.bench sweep --jobs 10000 --sample 3 --device cuda
step bench-sweep-1m 300 python3 -m quadnet.bench sweep --jobs 1000000 --epochs 1000 --sample 2 --device cuda
