#!/usr/bin/env bash
# Tokens/s of a preset on one local flex device against 2 and 3 `burn-moe serve` servers on
# 127.0.0.1 (experts spread over them, each micro-batch split over them). The servers share the
# machine's cores with the client, so this measures the overhead of remote devices, not a
# speed-up. Usage: bench/devices.sh PRESET STEPS [BATCH]   (prints one table row per layout)
set -euo pipefail
preset=${1:-tiny}; steps=${2:-20}; batch=${3:-12}
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
run() {
  local name=$1; shift
  local line
  line=$("$bin" train --preset "$preset" --config "$work/short.toml" --text "$work/corpus.txt" --out "$work/run-$name" --overwrite \
    --backend flex --steps "$steps" --batch-size "$batch" --eval-every "$steps" --samples 0 "$@" 2>"$work/run-$name.err" \
    | grep -o '([0-9.]* tokens/s)' | tr -d '()') || { grep -v INFO "$work/run-$name.err" | tail -3; exit 1; }
  echo "| $preset | $name | $line |"
}
echo "| preset | devices | tokens/s |"
echo "|---|---|---|"
run "1 local" --devices local
run "2 loopback servers" --devices "${urls[0]},${urls[1]}"
run "3 loopback servers" --devices "${urls[0]},${urls[1]},${urls[2]}"
