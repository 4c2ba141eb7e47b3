#!/usr/bin/env bash
# Runs scripts/chart.py with the chart venv's python (made by scripts/install-test-deps.sh, in
# the same tools dir): `scripts/chart.sh check`, `scripts/chart.sh render NAME NS ...`.
set -euo pipefail
if [ "$(id -u)" = 0 ]; then default_tools=/opt/pgpilot-tools; else default_tools="$HOME/.cache/pgpilot-tools"; fi
tools="${PGPILOT_TOOLS_DIR:-$default_tools}"
python="$tools/chart-venv/bin/python"
if [ ! -x "$python" ]; then
  echo "chart: $python is missing: run scripts/install-test-deps.sh (make test does)" >&2
  exit 1
fi
export PATH="$tools/bin:$PATH"
exec "$python" "$(dirname "$0")/chart.py" "$@"
