#!/usr/bin/env bash
# Unplanned failover write unavailability (issue 16's speed target): three agent pods with
# PostgreSQL 15 under the test kubelet, default [kubernetes] settings; each trial freezes the
# primary's pod (SIGSTOP: a hung node) and times from the freeze to the first committed write on
# the new primary. Prints every trial and a FAILOVER line with p50/p99.
#
#   benches/failover.sh [trials]        default 10 (about 25 s per trial on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export PGPILOT_FAILOVER_TRIALS="${1:-10}"
mkdir -p target/bench
cargo nextest run -p pgpilot-agent --run-ignored only -E 'binary(kubernetes) & test(failover_trials)' \
  --no-capture 2>&1 | tee target/bench/failover.log | grep -E '^(trial|FAILOVER)'
