#!/usr/bin/env bash
# One prepared run for a lent GPU machine: the CUDA tests, then the GPU benchmarks, within a
# 15-minute lease (the step limits add up to 10 minutes, leaving the machine's start-up and the
# transfers the rest). The million-job sweep runs for a fixed time: bench prints the jobs it
# completed, their rate and the time all would take, and this script whether that is <= 10 minutes.
#   bash scripts/gpu-check.sh          on the GPU machine
#   bash scripts/gpu-check.sh --dry    every step on the CPU in tiny sizes (what CI runs, so that
#                                      the script cannot rot between the times a GPU is lent)
# Results go to $OUT (or ./gpu-results). The machine has torch, numpy, matplotlib, tqdm
# and pytest but not Hydra: carry wheels for hydra-core, omegaconf and
# antlr4-python3-runtime (Python 3.12) in .whl/, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       hydra-core==1.3.2 omegaconf==2.3.0 PyYAML   # (PyYAML if the machine lacks it)
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # it ships an sdist only
# Each step has its own time limit, so that one slow step still leaves the others' results.
# The exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
dry=0
case "${1:-}" in
  --dry) dry=1 ;;
  "") ;;
  *) echo "error: unknown argument '$1': give --dry or nothing" >&2; exit 2 ;;
esac
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [[ $dry -eq 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
failed=()
step() {  # step NAME SECONDS COMMAND...: run it, keep its output in $out/NAME.txt
  local name=$1 limit=$2 rc
  shift 2
  echo "=== $name ($(date +%T))"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || failed+=("$name")
}
verdict() {  # verdict FILE: the million-job sweep's figures (bench's JSON in FILE) against 10 minutes
  "$py" - "$1" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
r = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]["rows"][0]
meets = "meets" if r["projected_s"] <= 600 else "does not meet"
print(f"million-job step: {r['done']} of {r['jobs']} jobs done, {r['jobs_per_s']:.0f} jobs/s after {r['startup_s']:.0f} s "
      f"of start-up: all in {r['projected_s']:.0f} s projected, which {meets} 10 minutes")
EOF
}

if [[ $dry -eq 1 ]]; then  # (tiny sizes on the CPU: seconds a step)
  device=cpu step_jobs=1,8 repeat=1 sweep=(--jobs 4 --epochs 10 --sample 3) big=(--jobs 20000 --epochs 10 --seconds 15 --table-only)
else  # (the million-job sweep stopped after 150 s: a Hydra sweeper that lists a million jobs first takes minutes)
  device=cuda step_jobs=1,256,4096 repeat=1 sweep=(--jobs 10000 --epochs 1000 --sample 3)
  big=(--jobs 1000000 --epochs 1000 --seconds 150 --table-only)
fi
{ [[ $dry -eq 1 ]] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc;
  "$py" -c 'import torch; print(torch.__version__, "cuda:", torch.cuda.is_available())'; } | tee "$out/gpu.txt"
# -m cuda: every test with a CUDA variant, on the CPU and (not --dry) on CUDA
step cuda-tests 120 "$py" -m pytest -q -m cuda -rs -p no:cacheprovider -o addopts= tests  # (no xdist there)
step bench-step 100 "$py" -m quadnet.bench step --jobs "$step_jobs" --repeat "$repeat"
step bench-sweep 90 "$py" -m quadnet.bench sweep "${sweep[@]}" --device "$device"
step bench-sweep-1m 270 "$py" -m quadnet.bench sweep "${big[@]}" --sample 3 --device "$device" --json
verdict "$out/bench-sweep-1m.txt" | tee "$out/verdict.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || failed+=(verdict)
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "gpu-check: failed steps: ${failed[*]}"
  exit 1
fi
echo "gpu-check: every step passed"
