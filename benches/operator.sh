#!/usr/bin/env bash
# The operator's speed and memory (issue 18): pgpilot-operator as its own process against the
# test API server, its pods real agents with PostgreSQL 15 under the test kubelet. Prints the
# time from creating a 2 shards x 2 instances cluster to Ready (3 trials), the operator's RSS
# idle, its peak RSS while reconciling 20 more clusters (PGPILOT_OPERATOR_CLUSTERS), and the
# writes one changed cluster costs.
#
#   benches/operator.sh        (about 2 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/bench
cargo build -q -p pgpilot-agent -p pgpilot-operator
cargo nextest run -p pgpilot-operator --run-ignored only -E 'test(operator_trials)' \
  --no-capture 2>&1 | tee target/bench/operator.log | grep -E '^(trial|OPERATOR|[0-9]+ clusters)'
