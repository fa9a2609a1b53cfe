#!/usr/bin/env bash
# The wgpu benchmark in one command: W1-W3, W5 and the tiny and small training steps (W2, with
# the kernel launches and host reads of one step) on wgpu's default adapter, with the adapter's
# name, tokens/s and GFLOP/s printed and the rows written to bench/results-wgpu.json.
#
#   bench/gpu.sh            # the full run
#   bench/gpu.sh --quick    # every row once
#
# On a machine without a GPU wgpu's default adapter may be llvmpipe (software Vulkan): the
# run works there, but measures the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/burn-moe-target}"
exec cargo run --release --bin moe-bench -- --backend wgpu --no-torch \
    --json bench/results-wgpu.json "$@"
