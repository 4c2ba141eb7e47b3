#!/usr/bin/env bash
# The reliability trials (docs/chaos.md): `make chaos` runs every trial with its full run count,
# `make chaos-quick` (part of `make test`) the short mode. Each trial appends one JSON line to
# target/chaos/report.jsonl; the table is printed at the end, with each trial's seed for a replay
# (PGPILOT_CHAOS_SEED=<seed> ./scripts/chaos.sh --only <test name>).
#
#   scripts/chaos.sh [--quick] [--only FILTER] [--kubernetes]
#
# --kubernetes adds the Kubernetes trials (Lease failover under kill -9, freezes and API cuts, with the
# never-two-writers probe); `make chaos` passes it.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
only=""
kubernetes=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --only) only="$2"; shift ;;
    --kubernetes) kubernetes=1 ;;
    *) echo "usage: $0 [--quick] [--only FILTER] [--kubernetes]" >&2; exit 2 ;;
  esac
  shift
done

report="$PWD/target/chaos/report.jsonl"
mkdir -p "$(dirname "$report")"
: >"$report"
export PGPILOT_CHAOS_REPORT="$report"
if [ "$quick" = 1 ]; then export PGPILOT_CHAOS_QUICK=1; fi

filter='binary(chaos)'
if [ "$kubernetes" = 1 ]; then filter="$filter | (binary(kubernetes) & test(/^chaos_/))"; fi
if [ -n "$only" ]; then filter="($filter) & test(/$only/)"; fi

status=0
# --workspace: the same feature set, so the test binaries `make test` built are reused.
${CARGO:-cargo} nextest run --workspace --profile chaos --run-ignored only \
  -E "$filter" --no-capture || status=$?

python3 - "$report" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print("| trial | runs | failures | what was checked | checker self-tests | seed |")
print("|---|---|---|---|---|---|")
for r in rows:
    if r.get("skipped"):
        print(f"| {r['trial']} | skipped | | {r['skipped']} | | |")
        continue
    default = {"R2": "every run plants a damaged object", "R5": "every run is bad input"}.get(
        r["trial"].split()[0], "R1's self-tested checkers")
    selft = ", ".join(("caught: " if s["caught"] else "MISSED: ") + s["checker"] for s in r.get("self_tests", [])) or default
    print(f"| {r['trial']} | {r['runs']} | {r['failures']} | {r['checked']} | {selft} | {r['seed']} |")
print()
for r in rows:
    cov = r.get("coverage") or {}
    if cov:
        print(f"{r['trial']} ({r.get('seconds', '?')} s): " + "; ".join(f"{k}: {v}" for k, v in sorted(cov.items())))
    for f in r.get("first_failures", []):
        print(f"  FAILURE {f[:400]}")
PY
exit $status
