#!/usr/bin/env bash
# `make demo`: backup -> accident -> point-in-time restore, on a standalone agent with a local
# backup directory. Each step is printed; the last line says PASS or FAIL and the exit code
# matches. Ports and paths can be changed with DATA_DIR, DEMO_PGPORT, DEMO_API_PORT,
# DEMO_LOOPBACK_PORT; BIN points at the agent binary.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-./target/debug/pgpilot-agent}"
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
cli() { "$BIN" "$@" --api-url "http://$LOOP" --token-file "$BASE/api-token"; }
wait_running() {
  for _ in $(seq 1 300); do
    "$BIN" status --api-url "http://$LOOP" --json 2>/dev/null | grep -q '"role": "Primary"' && return 0
    sleep 0.2
  done
  return 1
}
summary() { psql_ "SELECT count(*) || ' rows, checksum ' || md5(string_agg(id || ':' || amount, ',' ORDER BY id)) FROM orders"; }

command -v psql >/dev/null || fail "psql is missing (apt-get install postgresql-client-15)"
[ -x "$BIN" ] || fail "$BIN is missing: run make build"

step "1. Start pgpilot-agent standalone: data in $BASE/pg, backups in $BASE/backups"
rm -rf "$BASE" && mkdir -p "$BASE" && chmod 755 "$BASE"
"$BIN" run --data-dir "$BASE/pg" --postgres-port "$PGPORT" --api-listen "$API" --api-loopback-listen "$LOOP" \
  --backup-store "file://$(cd "$BASE" && pwd)/backups" >"$BASE/agent.log" 2>&1 &
agent_pid=$!
wait_running || fail "the agent did not reach Running"
"$BIN" status --api-url "http://$LOOP"

step "2. Create a table and write 10000 rows"
psql_ "CREATE TABLE orders (id int PRIMARY KEY, amount numeric); INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(1, 10000) g;" || fail "SQL failed"
summary

step "3. Take a base backup"
cli backup || fail "backup failed"

step "4. Write 5000 more rows, then note the time"
psql_ "INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(10001, 15000) g;" || fail "SQL failed"
before=$(summary)
echo "$before"
sleep 1
target=$(psql_ "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
echo "noted time: $target"
sleep 1

step "5. The accident: DROP TABLE orders"
psql_ "DROP TABLE orders;"
psql_ "SELECT count(*) FROM orders" 2>&1 | head -1
# Make sure the WAL holding the accident is archived (archive_timeout would do it within a minute).
last=$(psql_ "SELECT pg_walfile_name(pg_switch_wal())")
for _ in $(seq 1 150); do
  done_=$(psql_ "SELECT last_archived_wal >= '$last' FROM pg_stat_archiver")
  [ "$done_" = t ] && break
  sleep 0.2
done
[ "$done_" = t ] || fail "WAL $last was not archived"
echo "WAL archived through $last"

step "6. Restore to the noted time ($target)"
cli restore --target-time "$target" --force || fail "restore failed"

step "7. The rows are back"
after=$(summary) || fail "the table is not back"
echo "$after"
[ "$after" = "$before" ] || fail "restored '$after', expected '$before'"
"$BIN" status --api-url "http://$LOOP"

printf '\n\033[32mPASS: backup, accident, restore to %s: %s, exactly as before the DROP.\033[0m\n' "$target" "$after"
