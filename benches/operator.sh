#!/usr/bin/env bash
# The operator's speed and memory (issue 18): pgpilot-operator as its own process against a test
# API server built with optimisations (the test kubelet's examples/serve, release build, reached
# through KUBECONFIG), its pods real agents with PostgreSQL 15 under the test kubelet. Prints the
# time from creating a 2 shards x 2 instances cluster to Ready (3 trials), the operator's RSS
# idle, its peak RSS while reconciling 50 more clusters (PGPILOT_OPERATOR_CLUSTERS), and the
# writes one changed cluster costs among them.
#
#   benches/operator.sh        (about 3 min on 2 cores, plus a first release build of the server)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/bench
cargo build -q -p pgpilot-agent -p pgpilot-operator
# A debug build of the API server re-runs its controllers after every write and becomes the
# bottleneck past ~20 clusters; the operator under test stays a debug build like the agents.
cargo build -q --release -p pgpilot-test-kubelet --example serve
target/release/examples/serve > target/bench/serve.log 2>&1 &
serve=$!
trap 'kill $serve 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  grep -q '^kubeconfig: ' target/bench/serve.log && break
  sleep 0.2
done
kubeconfig=$(sed -n 's/^kubeconfig: //p' target/bench/serve.log)
[ -n "$kubeconfig" ] || { echo "the test API server did not start:"; cat target/bench/serve.log; exit 1; }
KUBECONFIG=$kubeconfig PGPILOT_OPERATOR_CLUSTERS=${PGPILOT_OPERATOR_CLUSTERS:-50} \
  cargo nextest run -p pgpilot-operator --run-ignored only -E 'test(operator_trials)' \
  --no-capture 2>&1 | tee target/bench/operator.log | grep -E '^(trial|OPERATOR|[0-9]+ (of|clusters))'
