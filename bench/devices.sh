#!/usr/bin/env bash
# Tokens/s of a preset on one local flex device against 2 and 3 `burn-moe serve` servers on
# 127.0.0.1 (experts spread over them, each micro-batch split over them). The servers share the
# machine's cores with the client, so this measures the overhead of remote devices, not a
# speed-up. Also the bytes the loopback interface carried per step (/proc/net/dev: every
# message between the client and the servers and between servers, with TCP/IP headers, the
# run's one evaluation too; run nothing else on loopback meanwhile).
# Usage: bench/devices.sh PRESET STEPS [BATCH] [PARALLEL] [ALL_REDUCE]
# (prints one table row per layout; PARALLEL and ALL_REDUCE are --parallel's and --all-reduce's
# values, both and f32 by default)
set -euo pipefail
preset=${1:-tiny}; steps=${2:-20}; batch=${3:-12}; parallel=${4:-both}; all_reduce=${5:-f32}
bin=${BURN_MOE:-${CARGO_TARGET_DIR:-target}/release/burn-moe}
work=$(mktemp -d)
cleanup() { [ "$BASHPID" = "$$" ] || return 0; kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
python3 - "$work/corpus.txt" <<'PY'
import random, sys
random.seed(1)
chars = "春山月水风花雨云夜江天地人心日长秋声归来千里"
with open(sys.argv[1], "w") as f:
    for _ in range(4000):
        for line in range(4):
            f.write("".join(random.choice(chars) for _ in range(7)) + ("，" if line % 2 == 0 else "。") + "\n")
        f.write("\n")
PY
printf '[optim]\nwarmup_steps = 2\n' > "$work/short.toml"
urls=()
for i in 1 2 3; do
  "$bin" serve --port 0 --host 127.0.0.1 --backend flex > "$work/server$i.out" 2>/dev/null &
  for _ in $(seq 50); do [ -s "$work/server$i.out" ] && break; sleep 0.1; done
  urls+=("$(grep -o 'ws://[^ ]*' "$work/server$i.out" | head -1)")
done
# Bytes the loopback interface has received.
loopback() { awk '$1 == "lo:" { print $2 }' /proc/net/dev; }
run() {
  local name=$1; shift
  local line before after
  before=$(loopback)
  line=$("$bin" train --preset "$preset" --config "$work/short.toml" --text "$work/corpus.txt" --out "$work/run-$name" --overwrite \
    --backend flex --steps "$steps" --batch-size "$batch" --eval-every "$steps" --samples 0 --parallel "$parallel" "$@" 2>"$work/run-$name.err" \
    | grep -o '([0-9.]* tokens/s)' | tr -d '()') || { grep -v INFO "$work/run-$name.err" | tail -3; exit 1; }
  after=$(loopback)
  echo "| $preset | $name | $line | $(awk -v a="$before" -v b="$after" -v s="$steps" 'BEGIN { printf "%.2f", (b - a) / s / 1e6 }') |"
}
echo "| preset | devices | tokens/s | MB over loopback per step |"
echo "|---|---|---|---|"
run "1 local" --devices local
run "2 loopback servers" --all-reduce "$all_reduce" --devices "${urls[0]},${urls[1]}"
run "3 loopback servers" --all-reduce "$all_reduce" --devices "${urls[0]},${urls[1]},${urls[2]}"
