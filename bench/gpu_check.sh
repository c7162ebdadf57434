#!/usr/bin/env bash
# shellcheck disable=SC1091  # .venv/bin/activate exists only at run time
# One prepared GPU check, run once on a lent CUDA machine from a copy of this working tree:
#
#     bash bench/gpu_check.sh OUTDIR
#
# Steps, most important first, each under `timeout` (cap in seconds) and allowed to fail without
# stopping the rest. The whole run stays under 8 minutes: GPU_CHECK_BUDGET (default 465 s) cuts a
# step to what is left and skips it when less than 20 s is left. Expected times on an H200 in ().
#
#   setup                   150 (~15)  .venv as README's test command makes it; offline without the
#                                      local wheels: the machine's python3 and torch, plus the wheels
#                                      in $GPU_CHECK_WHEELS (default .whl/), clipcond from this tree
#   probe                    60 (~15)  nvidia-smi; torch version and device name; tiny-sdxl on cuda
#   test_gpu                120 (~60)  python -m pytest -q tests/test_gpu.py (junit OUTDIR/test_gpu.xml)
#   t5                       90 (~50)  bench_t5_gpu.py: a T5-XL-size random encoder, float16 and bfloat16,
#                                      masked (by length, input order) and padded to 512: captions/s,
#                                      TFLOP/s, finite, error against float32
#   encode_float16/sdxl     100 (~55)  bench_encode.py, cuda, float16, batch 1 16 64 256, real size
#                                      (random weights), peak CUDA memory, against the naive loop
#   precompute              130 (~80)  bench_precompute.py, SDXL real size, float16, batch 256,
#                                      10,000 captions (30% repeats), 2 alternating repeats
#   encode_float16/clip-vit-l-14  70 (~40), encode_float16/openclip-vit-h-14  70 (~45)
#   encode_bfloat16/sdxl     50 (~30)  the same grid in bfloat16, clipcond only (--no-naive)
#   encode_bfloat16/clip-vit-l-14  40 (~22), encode_bfloat16/openclip-vit-h-14  40 (~25)
#   pipeline                 45 (~25)  bench_pipeline.py: this machine's tokenizer/writer ceiling (no GPU)
#
# One bench_encode.py run per encoder, so that a timeout loses one encoder's rows, not the grid.
# OUTDIR gets at most 9 files (what the device tool brings back): gpu_check.log (everything),
# summary.txt, test_gpu.xml, t5.txt, encode_float16.txt and encode_bfloat16.txt (one table per encoder),
# precompute.txt, pipeline.txt (each bench's stdout: its table) and bench_json.tar.gz (the benches'
# JSON, with every timed iteration). Exit status: 0 when every step exited 0, else 1.
#
# Knobs (environment): GPU_CHECK_BUDGET (seconds for the whole run), GPU_CHECK_WHEELS (a folder of
# wheels installed with --no-index into a --target folder when the fallback is used; the GPU image
# lacks open_clip_torch, ftfy and wcwidth: see bench/README.md), GPU_CHECK_DRY_RUN=1 (print the
# steps, run nothing).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOTAL_BUDGET=${GPU_CHECK_BUDGET:-465}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
MIN_STEP=20  # a step with less than this left is skipped
# README.md's test command, install part (.ci/run runs it verbatim, then pytest).
README_INSTALL='python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.14.1 torchvision==0.29.1 && pip install -q -e ".[test]"'
BATCHES=(1 16 64 256)

PY=python
SUMMARY=()  # "name|rc|seconds|budget|note"

say() { printf '\n=== [%4ds] %s\n' "$SECONDS" "$*"; }

# Seconds the next step may take: its own budget, cut to what is left of the whole run.
allowance() {
  local budget=$1 left=$((TOTAL_BUDGET - SECONDS - 10))  # 10 s for the summary and the tarball
  if ((left < budget)); then budget=$left; fi
  echo "$budget"
}

record() { SUMMARY+=("$1|$2|$3|$4|${5:-}"); }

# step NAME BUDGET OUTFILE|+OUTFILE|- CMD...: run CMD under timeout; its stdout also goes to OUTFILE
# (+OUTFILE: appended; -: nowhere else).
# Sets STEP_RC for post-checks; never fails itself.
step() {
  local name=$1 budget=$2 outfile=$3
  shift 3
  local allowed start rc=0 note=""
  allowed=$(allowance "$budget")
  if ((allowed < MIN_STEP)); then
    say "$name: skipped, ${allowed}s left of the ${TOTAL_BUDGET}s budget"
    record "$name" skip 0 "$budget" "not run: out of time"
    STEP_RC=1
    return 0
  fi
  say "$name (timeout ${allowed}s): $*"
  start=$SECONDS
  if [[ $DRY_RUN == 1 ]]; then
    echo "DRY RUN: $*"
  elif [[ $outfile == - ]]; then
    timeout -k 10 "$allowed" "$@" || rc=$?
  elif [[ $outfile == +* ]]; then
    timeout -k 10 "$allowed" "$@" | tee -a "${outfile#+}" || rc=$?
  else
    timeout -k 10 "$allowed" "$@" | tee "$outfile" || rc=$?
  fi
  if ((rc == 124 || rc == 137)); then note="timed out after ${allowed}s"; fi
  record "$name" "$rc" $((SECONDS - start)) "$budget" "$note"
  STEP_RC=$rc
  say "$name: exit $rc after $((SECONDS - start))s ${note}"
}

# Replace the last summary row's exit code and note (post-checks of a step that exited 0).
amend_last() {
  local last=${SUMMARY[${#SUMMARY[@]}-1]} name rc secs budget note
  IFS='|' read -r name rc secs budget note <<<"$last"
  SUMMARY[${#SUMMARY[@]}-1]="$name|$1|$secs|$budget|$2"
}

# The environment: README's .venv when it is there or can be made; else this machine's python3.
setup() {
  local start=$SECONDS rc=0 note budget=150 allowed
  say "setup"
  cd "$REPO"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
  if [[ $DRY_RUN == 1 ]]; then
    note="dry run: $(command -v python3 || echo 'no python3')"
    PY=python3
  elif [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch, clipcond' 2>/dev/null; then
    set +u; . .venv/bin/activate; set -u
    note="existing .venv"
  else
    if [[ ! -e .venv ]]; then
      allowed=$(allowance "$budget")
      echo "no .venv: README's install command (timeout ${allowed}s): $README_INSTALL"
      # Offline without the workplace's local wheels pip fails at once instead of retrying for minutes.
      if PIP_RETRIES=${PIP_RETRIES:-0} PIP_DEFAULT_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-10} \
          timeout -k 10 "$allowed" bash -c "$README_INSTALL"; then
        set +u; . .venv/bin/activate; set -u
        note="README install"
      else
        echo "README's install failed (exit $?; offline without the local torch==2.14.1 wheels?): removing the .venv it began"
        rm -rf .venv
      fi
    else
      echo ".venv is there but cannot import torch and clipcond: not using it"
    fi
    if [[ -z ${note:-} ]]; then
      PY=python3
      note="fallback: $(command -v python3) with its own torch"
      local site=${TMPDIR:-/tmp}/clipcond_gpu_check_site
      if compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "installing wheels from $WHEELS into $site:" "$WHEELS"/*.whl
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
          "$WHEELS"/*.whl || rc=$?
        note="$note + $WHEELS"
      fi
      # clipcond itself from the working tree (no editable install needed: nothing uses its console script).
      export PYTHONPATH="$REPO:$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
  fi
  echo "python: $(command -v "$PY")"
  if [[ $DRY_RUN != 1 ]]; then
    # clipcond's runtime needs: a missing one fails every later step, so say which.
    "$PY" - <<'EOF' || rc=$?
import importlib, importlib.util, sys
missing = []
for name in ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "tqdm", "ftfy", "open_clip",
             "pytest", "clipcond"):
    if importlib.util.find_spec(name) is None:
        missing.append(name)
        continue
    module = importlib.import_module(name) if name != "open_clip" else None  # open_clip: only its vocab file
    print(f"  {name} {getattr(module, '__version__', '') if module else 'found'}")
if missing:
    print(f"MISSING: {' '.join(missing)} (carry wheels: open_clip_torch ftfy wcwidth; see bench/README.md)")
    sys.exit(1)
EOF
  fi
  record setup "$rc" $((SECONDS - start)) "$budget" "$note"
  say "setup: exit $rc after $((SECONDS - start))s ($note)"
}

run_all() {
  local outdir=$1 json
  json=$(mktemp -d "${TMPDIR:-/tmp}/clipcond_gpu_check_json.XXXXXX")
  : >"$outdir/encode_float16.txt"
  : >"$outdir/encode_bfloat16.txt"  # appended to, one table per encoder
  echo "clipcond GPU check: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -n), repo $REPO, out $outdir"
  echo "budget ${TOTAL_BUDGET}s; git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no .git')"
  setup

  # 1. What the machine is.
  step probe 60 - bash -c "
    nvidia-smi; nvidia_rc=\$?
    $PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' || exit 1
    $PY -c 'import torch, clipcond
tc = clipcond.TextConditioner.from_pretrained(\"tiny-sdxl\", device=\"cuda\", dtype=torch.float16)
c = tc([\"a photo of a cat\", \"a dog\"])
print(\"tiny-sdxl on cuda:\", tuple(c.sequence.shape), c.sequence.dtype, c.sequence.device)' || exit 1
    exit \$nvidia_rc"

  # 2. The CUDA tests (all skipped without CUDA, which pytest calls a pass: counted as a failure here).
  step test_gpu 120 - "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py --junitxml "$outdir/test_gpu.xml"
  if [[ $DRY_RUN != 1 && $STEP_RC == 0 ]] && ! "$PY" - "$outdir/test_gpu.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
tests, skipped = (sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "skipped"))
print(f"test_gpu: {tests} tests, {skipped} skipped")
sys.exit(1 if tests == 0 or skipped == tests else 0)
EOF
  then
    amend_last 5 "every test skipped: no CUDA?"
  fi

  # 3. T5 (issue 19): a T5-XL-size encoder in float16 and bfloat16, finite, batched to the longest prompt.
  step t5 90 "$outdir/t5.txt" "$PY" bench/bench_t5_gpu.py --device cuda --out "$json/t5_gpu.json"

  # 4. The issue's GPU target: SDXL float16 >= 40% of the float16 matmul peak at batch >= 64.
  encode_step float16 sdxl 100
  # 5. End to end: precompute at real SDXL size against the naive loop (device busy, disk).
  step precompute 130 "$outdir/precompute.txt" "$PY" bench/bench_precompute.py --device cuda --encoder sdxl \
    --size real --dtype float16 --batch-size 256 --threads 0 --captions 10000 --repeats 2 \
    --out "$json/precompute.json"
  # 6. The rest of the encoder grid: SD 1.x and SD 2.x in float16, then all three in bfloat16 (clipcond only).
  encode_step float16 clip-vit-l-14 70
  encode_step float16 openclip-vit-h-14 70
  encode_step bfloat16 sdxl 50 --no-naive
  encode_step bfloat16 clip-vit-l-14 40 --no-naive
  encode_step bfloat16 openclip-vit-h-14 40 --no-naive

  # 7. How fast this machine's CPUs and disk can tokenize and write SDXL rows (no GPU): precompute's ceiling.
  step pipeline 45 "$outdir/pipeline.txt" "$PY" bench/bench_pipeline.py --encoder sdxl --dtype float16 \
    --captions 10000 --repeats 2 --out "$json/pipeline.json"

  if [[ $DRY_RUN != 1 ]] && compgen -G "$json/*.json" >/dev/null; then
    tar -czf "$outdir/bench_json.tar.gz" -C "$json" . || true
  fi
  rm -rf "$json"
  summary "$outdir"
}

# encode_step DTYPE ENCODER BUDGET [FLAGS...]: bench_encode.py for one encoder (sd15 = clip-vit-l-14,
# sd2 = openclip-vit-h-14, sdxl), its table appended to OUTDIR/encode_DTYPE.txt.
encode_step() {
  local dtype=$1 encoder=$2 budget=$3 file
  shift 3
  file=encode_${dtype}_${encoder}.json
  step "encode_$dtype/$encoder" "$budget" "+$outdir/encode_$dtype.txt" "$PY" bench/bench_encode.py \
    --device cuda --encoders "$encoder" --dtypes "$dtype" --batches "${BATCHES[@]}" "$@" --out "$json/$file"
  # bench_encode.py reports a failed worker (OOM, import error) as a row, and still exits 0.
  if [[ $DRY_RUN != 1 && $STEP_RC == 0 && -f $json/$file ]] && grep -q '"error"' "$json/$file"; then
    echo "$encoder $dtype: a worker failed (its row says 'exit N'; its stderr is in the log above)"
    amend_last 3 "worker failed"
  fi
}

summary() {
  local outdir=$1 row name rc secs budget note failed=0 text
  text=$'\n'"clipcond GPU check: ${SECONDS}s in all (budget ${TOTAL_BUDGET}s)"$'\n\n'
  text+=$'| step | exit | seconds | budget (s) | note |\n|---|---:|---:|---:|---|\n'
  for row in "${SUMMARY[@]}"; do
    IFS='|' read -r name rc secs budget note <<<"$row"
    text+="| $name | $rc | $secs | $budget | $note |"$'\n'
    [[ $rc == 0 ]] || failed=$((failed + 1))
  done
  if ((failed == 0)); then text+=$'\nall steps passed'; else text+=$'\n'"$failed step(s) failed"; fi
  printf '%s\n' "$text" | tee "$outdir/summary.txt"
  ((failed == 0))
}

main() {
  if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    echo "usage: $0 OUTDIR   (see the comment at the top of this file)" >&2
    exit 2
  fi
  mkdir -p "$1"
  local outdir
  outdir=$(cd "$1" && pwd)
  : >"$outdir/gpu_check.log"
  # set -e stays on inside run_all (a plain pipeline, no || around it); pipefail gives its status.
  run_all "$outdir" 2>&1 | tee -a "$outdir/gpu_check.log"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
