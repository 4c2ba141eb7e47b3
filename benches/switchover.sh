#!/usr/bin/env bash
# P7 side by side: write unavailability of a planned switchover, pgpilot and Patroni in one run
# (benches/switchover.py). Installs the peers (etcd, Patroni: benches/install-peers.sh), builds
# nothing: the agent binary comes from AGENT_BIN, by default target/release/pgpilot-agent when
# it exists, else target/debug/pgpilot-agent. Run as root.
#
#   benches/switchover.sh [--background] [switchover.py arguments]   default: --both (20 switchovers each)
#   e.g. benches/switchover.sh --peer patroni --switchovers 5
#   --background: detach, log to target/bench/switchover.log; the table lands in target/bench/p7.md
set -euo pipefail
cd "$(dirname "$0")/.."
background=
args=()
for a in "$@"; do
  case "$a" in
    --background) background=1 ;;
    *) args+=("$a") ;;
  esac
done
[ ${#args[@]} -gt 0 ] || args=(--both)
mkdir -p target/bench
if [ -n "$background" ]; then
  nohup "$0" "${args[@]}" >target/bench/switchover.log 2>&1 </dev/null &
  echo "running in the background (pid $!): tail -f target/bench/switchover.log"
  exit 0
fi
if [ -z "${AGENT_BIN:-}" ]; then
  AGENT_BIN=target/debug/pgpilot-agent
  [ -x target/release/pgpilot-agent ] && AGENT_BIN=target/release/pgpilot-agent
fi
./benches/install-peers.sh
exec python3 benches/switchover.py --agent-bin "$AGENT_BIN" "${args[@]}"
