#!/usr/bin/env bash
# One GPU, <= 8 minutes: GaLore's llama-60m pre-trained by the 8 bench methods on the embedded stdlib-code corpus
# (the Python standard library's sources, ~10 MB, tokenized here: no download), for as many steps as fit.
# Writes the bench's tables and plots (results.md with tokens/s and peak MiB = torch.cuda.max_memory_allocated per
# method, claims.md, ppl_vs_memory.png, loss_curves.png) to $OUT/bench, and the timing it sized itself by to
# $OUT/sizing.json. Not part of CI (needs CUDA). A rerun with the same OUT resumes (finished runs are kept).
#
#   bash benchmarks/gpu_bench.sh                     # OUT=runs/gpu_bench, 8 methods, 1 seed
#   OUT=runs/g SEEDS=2 TOTAL_S=480 bash benchmarks/gpu_bench.sh
#
# Sizing: the corpus is built and fira (the slowest step: GaLore's projections + the residual) runs 20 steps; from
# its measured seconds per step, STEPS = (training time per method - fixed cost per run) / (seconds per step),
# clamped to [MIN_STEPS=50, MAX_STEPS=400]: 400 x 128 x 256 tokens is ~5 passes over the corpus's 2.64M training
# tokens (vocab 8192); more would mostly measure memorization.
set -euo pipefail
OUT=${OUT:-runs/gpu_bench}
PY=${PYTHON:-python}
TOTAL_S=${TOTAL_S:-480}      # the whole script's wall-clock budget
SEEDS=${SEEDS:-1}
MAX_STEPS=${MAX_STEPS:-400}
MIN_STEPS=${MIN_STEPS:-50}
PRESET=${PRESET:-gpu-60m}    # PRESET=tiny DEVICE=cpu MIN_STEPS=3 TOTAL_S=30 METHODS=full,galore: a plumbing check on CPU
DEVICE=${DEVICE:-cuda}
METHODS=${METHODS:-full,galore,fira,frugal,lowrank,lowrank-rr,relora,sltrain}
START=$(date +%s)
mkdir -p "$OUT"
if [ "$DEVICE" != cpu ]; then
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_bench.sh needs a CUDA GPU')"
fi

echo "== corpus (offline) =="
$PY -c "from rankwise.bench.presets import get; from rankwise.data import prepare; p = get('$PRESET'); c = prepare(p.data, p.vocab_size); print(f'{p.data}: {len(c.train):,} train tokens, {len(c.val):,} validation tokens')"

echo "== sizing: 20 steps of fira =="
$PY -m rankwise bench --preset "$PRESET" --methods fira --steps 20 --seeds 1 --device "$DEVICE" --out "$OUT/sizing" \
    >/dev/null
NMETHODS=$(echo "$METHODS" | tr ',' '\n' | grep -c .)
if [ -f "$OUT/sizing.json" ]; then  # a rerun resumes the same bench: keep the steps it was sized to
  STEPS=$($PY -c "import json; print(json.load(open('$OUT/sizing.json'))['steps'])")
else
STEPS=$($PY - "$OUT" "$START" "$TOTAL_S" "$NMETHODS" "$SEEDS" "$MAX_STEPS" "$MIN_STEPS" <<'PYEOF'
import json, sys, time
out, start, total, n, seeds, cap, floor = sys.argv[1], *map(float, sys.argv[2:])
r = json.load(open(f"{out}/sizing/runs/fira/default/seed0/result.json"))
c = r["config"]
per_step = c["batch_size"] * c["grad_accum"] * c["seq_len"] / r["tokens_per_s"]
fixed = 25.0 + max(0.0, r["wall_s"] - 20 * per_step)  # process start + model build + evaluations
left = total - (time.time() - start) - 30  # 30 s for the reports
steps = int(max(floor, min(cap, (left / (n * seeds) - fixed) / per_step)))
json.dump({"fira_s_per_step": per_step, "fixed_s_per_run": fixed, "seconds_left": left, "steps": steps,
           "runs": int(n * seeds)}, open(f"{out}/sizing.json", "w"), indent=1)
print(steps)
PYEOF
)
fi
echo "== bench: $PRESET, $STEPS steps, methods $METHODS, $SEEDS seed(s) =="
$PY -m rankwise bench --preset "$PRESET" --methods "$METHODS" --steps "$STEPS" --seeds "$SEEDS" --device "$DEVICE" \
    --out "$OUT/bench"
echo "done in $(( $(date +%s) - START )) s; results in $OUT/bench/results.md"
