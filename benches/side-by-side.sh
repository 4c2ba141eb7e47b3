#!/usr/bin/env bash
# Side-by-side benchmarks (issue 6): installs the peers, builds the release agent, runs the
# scenarios one after the other (each alternates pgpilot and its peers inside every repetition)
# and merges the tables into target/bench/side-by-side.{md,json} (--quick: target/bench/quick/).
#
#   benches/side-by-side.sh [--quick] [--background] [p1 p2 p3 p4 p6]    default: every scenario
#   --background: detach, log to target/bench[/quick]/side-by-side.log (the full run takes
#                 about an hour on 2 cores; each scenario also logs to <out>/<scenario>.log)
#   PGPILOT_BENCH_REPS, _SCALE, _BACKLOG, _WAL_MIB, _STORES, _KEEP: see benches/side_by_side.py
set -euo pipefail
cd "$(dirname "$0")/.."
quick=
background=
scenarios=()
for a in "$@"; do
  case "$a" in
    --quick) quick=--quick ;;
    --background) background=1 ;;
    p1|p2|p3|p4|p6) scenarios+=("$a") ;;
    *) echo "unknown argument: $a (expected --quick, --background, p1 p2 p3 p4 p6)" >&2; exit 2 ;;
  esac
done
[ ${#scenarios[@]} -gt 0 ] || scenarios=(p1 p2 p3 p4 p6)
out=target/bench${quick:+/quick}
mkdir -p "$out"
if [ -n "$background" ]; then
  nohup "$0" $quick "${scenarios[@]}" >"$out/side-by-side.log" 2>&1 </dev/null &
  echo "running in the background (pid $!): tail -f $out/side-by-side.log"
  echo "tables: $out/side-by-side.md when it ends"
  exit 0
fi
./benches/install-peers.sh
[ -x /opt/pgpilot-tools/bin/s3s-fs ] || ./scripts/install-test-deps.sh
echo "==> cargo build --release -p pgpilot-agent"
cargo build --release -q -p pgpilot-agent
for s in "${scenarios[@]}"; do
  echo "==> scenario $s (log: $out/$s.log)"
  python3 benches/side_by_side.py "$s" $quick 2>&1 | tee "$out/$s.log"
done
python3 benches/side_by_side.py report $quick
cat "$out/side-by-side.md"
