#!/bin/bash
# Runs W6 of two or more moe-bench builds in turn, ROUNDS times, and prints each shape's
# median ratio to the dense FFN per build: the way to compare builds on a machine whose speed
# drifts (BENCHMARKS.md's before/after figures on flex).
#
#   bench/alternate.sh ROUNDS LABEL BINARY [LABEL BINARY ...]
#   bench/alternate.sh 10 before /tmp/moe-bench-before after target/release/moe-bench
set -euo pipefail
if [ $# -lt 3 ] || [ $(( ($# - 1) % 2 )) -ne 0 ]; then
    echo "usage: $0 ROUNDS LABEL BINARY [LABEL BINARY ...]" >&2
    exit 2
fi
rounds=$1
shift
labels=()
binaries=()
while [ $# -gt 0 ]; do
    labels+=("$1")
    binaries+=("$2")
    shift 2
done
rows=$(mktemp)
trap 'rm -f "$rows"' EXIT
for _ in $(seq "$rounds"); do
    for i in "${!labels[@]}"; do
        "${binaries[$i]}" --only w6 --no-torch |
            awk -v label="${labels[$i]}" '/^ +[0-9]+ +[0-9]+ +[0-9]+ /{print label, $1 "x" $2, $5}' >>"$rows"
    done
done
python3 - "$rows" <<'PY'
import collections, statistics, sys
ratios = collections.defaultdict(list)
for line in open(sys.argv[1]):
    label, shape, ratio = line.split()
    ratios[(shape, label)].append(float(ratio))
print("experts x top-k  build  median over dense  (min)")
for (shape, label), values in sorted(ratios.items(), key=lambda kv: (int(kv[0][0].split("x")[0]), kv[0][1])):
    print(f"{shape:>15}  {label}  {statistics.median(values):.2f}  ({min(values):.2f})")
PY
