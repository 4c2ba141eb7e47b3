#!/usr/bin/env bash
# The write gap of a planned drain of the primary (issue 17's speed target, next to P7): three
# agent pods with PostgreSQL 15 under the test kubelet, WAL archived to a file:// store, the
# preStop drain hook. Each trial sets pgpilot.io/drain=Started on the primary's pod and times
# from that patch to the first committed write on the new primary, then deletes the drained pod
# and waits until it is back as a replica. Prints every trial and a DRAIN line with p50/p99.
#
#   benches/drain.sh [trials]        default 10 (about 10 s per trial on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export PGPILOT_DRAIN_TRIALS="${1:-10}"
mkdir -p target/bench
cargo nextest run -p pgpilot-agent --run-ignored only -E 'binary(kubernetes) & test(drain_trials)' \
  --no-capture 2>&1 | tee target/bench/drain.log | grep -E '^(trial|DRAIN)'
