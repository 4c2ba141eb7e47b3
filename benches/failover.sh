#!/usr/bin/env bash
# Unplanned failover write unavailability (issue 16's speed target): three agent pods with
# PostgreSQL 15 under the test kubelet, default [kubernetes] settings; each trial freezes the
# primary's pod (SIGSTOP: a hung node) and times from the freeze to the first committed write on
# the new primary. Prints every trial and a FAILOVER line with p50/p99.
#
#   benches/failover.sh [trials]                  default 10 (about 25 s per trial on 2 cores)
#   benches/failover.sh --side-by-side [trials]   Patroni first (3 nodes + etcd, its defaults,
#                                                 the primary's Patroni and Postgres frozen the
#                                                 same way; benches/switchover.py --failover),
#                                                 then pgpilot, in one run; run as root
set -euo pipefail
cd "$(dirname "$0")/.."
side_by_side=
if [ "${1:-}" = "--side-by-side" ]; then side_by_side=1; shift; fi
export PGPILOT_FAILOVER_TRIALS="${1:-10}"
mkdir -p target/bench
if [ -n "$side_by_side" ]; then
  ./benches/install-peers.sh
  python3 benches/switchover.py --peer patroni --failover --trials "$PGPILOT_FAILOVER_TRIALS" \
    2>&1 | tee target/bench/failover-patroni.log | grep -E '^( *failover|==>|P8)'
fi
cargo nextest run -p pgpilot-agent --run-ignored only -E 'binary(kubernetes) & test(=failover_trials)' \
  --no-capture 2>&1 | tee target/bench/failover.log | grep -E '^(trial|FAILOVER)'
