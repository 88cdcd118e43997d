#!/usr/bin/env bash
# One prepared run for a lent GPU machine: the CUDA tests, then the GPU benchmarks.
# Results go to $OUT (or ./gpu-results). The machine has torch, numpy, matplotlib, tqdm
# and pytest but not Hydra: carry wheels for hydra-core, omegaconf and
# antlr4-python3-runtime (Python 3.12) in .whl/, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
# (antlr4 ships an sdist only: build its wheel here with `pip wheel --no-deps -w .whl`).
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
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -m cuda -rs -p no:cacheprovider tests 2>&1 | tee "$out/cuda-tests.txt"
python3 -m quadnet.bench single --repeat 3 2>&1 | tee "$out/bench-single.txt"
python3 -m quadnet.bench sweep --jobs 10000 --sample 3 --device cuda 2>&1 | tee "$out/bench-sweep.txt"
