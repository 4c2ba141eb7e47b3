#!/usr/bin/env bash
# `make demo`: a scripted tour of the standalone agent. Starts the agent on a fresh data dir,
# writes rows, kills the postmaster with SIGKILL and shows the agent bring it back with the rows
# intact, restarts through the API, then stops the agent with SIGTERM and checks that no
# postmaster is left. Prints each step; the last line says PASS or FAIL; the exit code matches.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=./target/debug/pgpilot-agent
BASE="${DATA_DIR:-./data}/demo"
PGPORT="${DEMO_PGPORT:-5442}"
API="127.0.0.1:${DEMO_API_PORT:-8018}"
LOOP="127.0.0.1:${DEMO_LOOPBACK_PORT:-8019}"
agent_pid=""

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { printf '\n\033[31mFAIL: %s\033[0m (agent log: %s)\n' "$*" "$BASE/agent.log"; exit 1; }
cleanup() { [ -n "$agent_pid" ] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null; }
trap cleanup EXIT

psql_() { PGPASSWORD="$(cat "$BASE/superuser-password")" psql -X -q -t -A -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "$1"; }
status_json() { "$BIN" status --api-url "http://$LOOP" --json 2>/dev/null; }
wait_running() {  # $1: the crash_restarts count to wait for (default 0)
  for _ in $(seq 1 300); do
    s=$(status_json)
    grep -q '"state": "Running"' <<<"$s" && grep -q "\"crash_restarts\": ${1:-0}," <<<"$s" && return 0
    sleep 0.2
  done
  return 1
}
postmaster_pid() { head -1 "$BASE/pg/postmaster.pid" 2>/dev/null; }

command -v psql >/dev/null || fail "psql is missing (apt-get install postgresql-client-15)"
step "1. Start pgpilot-agent on a fresh data dir ($BASE/pg), Postgres on port $PGPORT"
rm -rf "$BASE" && mkdir -p "$BASE" && chmod 755 "$BASE"
"$BIN" run --data-dir "$BASE/pg" --postgres-port "$PGPORT" --api-listen "$API" --api-loopback-listen "$LOOP" \
  >"$BASE/agent.log" 2>&1 &
agent_pid=$!
wait_running || fail "the agent did not reach Running"
"$BIN" status --api-url "http://$LOOP"

step "2. Create a table and write 10000 rows"
psql_ "CREATE TABLE orders (id int PRIMARY KEY, amount numeric); INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(1, 10000) g;" || fail "SQL failed"
echo "rows: $(psql_ 'SELECT count(*) FROM orders')"

step "3. Crash Postgres: kill -9 of the postmaster"
old=$(postmaster_pid); echo "postmaster pid $old"; kill -9 "$old"
wait_running 1 || fail "Postgres did not come back"
new=$(postmaster_pid)
[ "$new" != "$old" ] || fail "postmaster pid did not change"
echo "back with postmaster pid $new; rows: $(psql_ 'SELECT count(*) FROM orders')"
[ "$(psql_ 'SELECT count(*) FROM orders')" = 10000 ] || fail "rows lost after the crash"
status_json | grep '"crash_restarts"'

step "4. Restart through the API (bearer token from $BASE/api-token)"
"$BIN" restart --api-url "http://$LOOP" --token-file "$BASE/api-token" || fail "restart failed"
echo "without the token:"; curl -s -X POST "http://$API/v1/restart"; echo

step "5. Stop the agent with SIGTERM: Postgres shuts down cleanly, no orphan"
pm=$(postmaster_pid)
kill -TERM "$agent_pid"; wait "$agent_pid"; rc=$?; agent_pid=""
[ "$rc" = 0 ] || fail "agent exited with $rc"
kill -0 "$pm" 2>/dev/null && fail "postmaster $pm outlived the agent"
[ -e "$BASE/pg/postmaster.pid" ] && fail "postmaster.pid left behind (unclean shutdown)"
echo "agent exited 0; postmaster $pm is gone"

printf '\n\033[32mPASS: the agent bootstrapped, supervised and cleanly stopped PostgreSQL; 10000 rows survived a kill -9.\033[0m\n'
