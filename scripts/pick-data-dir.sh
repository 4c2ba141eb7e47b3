#!/usr/bin/env bash
# Prints the directory `make run` / `make demo` keep their data in: ./data, unless the agent
# runs as root and the unprivileged `postgres` user cannot reach the clone (e.g. a clone under
# /root, mode 0700); then /var/lib/pgpilot-standalone, with a note on stderr.
set -euo pipefail
here=$(pwd)
if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 && ! runuser -u postgres -- test -x "$here" 2>/dev/null; then
  echo "note: user postgres cannot reach $here, so the data lives in /var/lib/pgpilot-standalone" >&2
  echo /var/lib/pgpilot-standalone
else
  echo ./data
fi
