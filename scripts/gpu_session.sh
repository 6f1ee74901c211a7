#!/usr/bin/env bash
# One GPU session on a lent machine, from the repo root, everything in one call (the lease is
# short): check the CUDA path against the CPU, benchmark, train the sweep in configs/sweep side
# by side, evaluate, and leave the results and the two best checkpoints (split in 15 MB parts)
# in $OUT. Needs .pack/tokens (`hope train --config configs/bundled.toml --export-tokens
# .pack/tokens`) and, for the HTTP benchmark, the server's wheels in .whl. STAGES picks stages
# (default "check bench train"). SMOKE=1 runs them for a few seconds on the CPU, to test this script.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/hope-gpu-out}
mkdir -p "$OUT" runs
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
if [ "${SMOKE:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
DEV=cuda; MIN=${TRAIN_MINUTES:-3.3}; LEVELS=1,16,64,256,512; B=""; GC=60
STEPS=""
if [ "${SMOKE:-0}" = 1 ]; then DEV=cpu; MIN=0.15; LEVELS=1,2; B="--quick"; GC=300; STEPS="--steps 2"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())" >> "$OUT/gpu.txt"

STAGES=${STAGES:-check bench train}
# each session trains into runs of its own (hope train never writes over a run)
RUNS=${RUNS:-runs/gpu-$(date -u +%Y%m%d-%H%M%S)}
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }

if has check; then
stamp "check the CUDA path"
timeout $GC python3 scripts/gpu_check.py "$OUT/gpu_check.json" > "$OUT/gpu_check.log" 2>&1; echo "rc $?"
tail -n 4 "$OUT/gpu_check.log"
fi

if has bench; then
stamp "benchmarks"
timeout 110 python3 -m hope.cli bench $B --device $DEV --only engine,gpu --levels $LEVELS \
  --json "$OUT/bench_engine.json" --write "$OUT/bench_engine.md" > "$OUT/bench_engine.log" 2>&1; echo "rc $?"
timeout 70 python3 -m hope.cli bench $B --device $DEV --only baselines --levels ${BASE_LEVELS:-$LEVELS} \
  --json "$OUT/bench_baselines.json" --write "$OUT/bench_baselines.md" > "$OUT/bench_baselines.log" 2>&1; echo "rc $?"
timeout 40 python3 -m hope.cli bench $B --device $DEV --only arithmetic \
  --json "$OUT/bench_arithmetic.json" --write "$OUT/bench_arithmetic.md" > "$OUT/bench_arithmetic.log" 2>&1; echo "rc $?"
timeout 70 python3 -m hope.cli bench $B --device $DEV --only http --levels 1,16,64 \
  --json "$OUT/bench_http.json" --write "$OUT/bench_http.md" > "$OUT/bench_http.log" 2>&1; echo "rc $?"
for part in engine baselines arithmetic http; do grep -v "^\s*$" "$OUT/bench_$part.log" | tail -n 12; done
fi

if has train; then
stamp "train the sweep side by side ($MIN minutes)"
for c in a b c; do
  python3 -m hope_core.train --config configs/sweep/$c.toml --token-dir .pack/tokens --out "$RUNS/sweep-$c" \
    --max-minutes "$MIN" --device $DEV $STEPS > "$OUT/train_$c.log" 2>&1 &
done
wait
for c in a b c; do grep -E "captur|step .*(00|50)/|final|Error|error" "$OUT/train_$c.log" | tail -n 6; done

stamp "evaluate"
for c in a b c; do
  timeout 60 python3 -m hope_core.evaluate --checkpoint "$RUNS/sweep-$c/best" --device $DEV --quick --json \
    --no-ablations --token-dir .pack/tokens > "$RUNS/sweep-$c/eval.json" 2> "$OUT/eval_$c.log" &
done
wait
python3 scripts/pick_checkpoint.py "$RUNS/sweep-a" "$RUNS/sweep-b" "$RUNS/sweep-c" | tee "$OUT/pick.json"

fi

stamp "pack"
for run in $(python3 -c "import json; print(' '.join(r['run'] for r in json.load(open('$OUT/pick.json'))[:2]))" 2>/dev/null); do
  name=$(basename "$run")
  tar cf - -C "$run" best | split -b 15m - "$OUT/$name.tar.part-"
done
tar czf "$OUT/logs.tgz" "$RUNS"/*/log.jsonl "$RUNS"/*/progress.json "$RUNS"/*/eval.json "$OUT"/*.log "$OUT"/*.json "$OUT"/*.md "$OUT/gpu.txt" 2>/dev/null
rm -f "$OUT"/*.log "$OUT"/bench_*.json "$OUT"/bench_*.md "$OUT/gpu_check.json"
ls -la "$OUT"
stamp "done"
