#!/usr/bin/env bash
# Side-by-side benchmarks (issue 6): installs the peers, builds the release agent, runs the
# scenarios one after the other (each alternates pgpilot and its peers inside every repetition)
# and merges the tables into target/bench/side-by-side.{md,json} (--quick: target/bench/quick/).
#
#   benches/side-by-side.sh [--quick] [p1 p3 ...]     default: every scenario
#   PGPILOT_BENCH_REPS, PGPILOT_BENCH_SCALE, PGPILOT_BENCH_KEEP: see benches/side_by_side.py
set -euo pipefail
cd "$(dirname "$0")/.."
quick=
scenarios=()
for a in "$@"; do
  case "$a" in
    --quick) quick=--quick ;;
    *) scenarios+=("$a") ;;
  esac
done
[ ${#scenarios[@]} -gt 0 ] || scenarios=(p1 p2 p3 p4)
./benches/install-peers.sh
[ -x /opt/pgpilot-tools/bin/s3s-fs ] || ./scripts/install-test-deps.sh
echo "==> cargo build --release -p pgpilot-agent"
cargo build --release -q -p pgpilot-agent
out=target/bench${quick:+/quick}
mkdir -p "$out"
for s in "${scenarios[@]}"; do
  echo "==> scenario $s (log: $out/$s.log)"
  python3 benches/side_by_side.py "$s" $quick 2>&1 | tee "$out/$s.log"
done
python3 benches/side_by_side.py report $quick
cat "$out/side-by-side.md"
