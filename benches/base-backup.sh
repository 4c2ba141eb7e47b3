#!/usr/bin/env bash
# Base backup speed: a release pgpilot-agent on PostgreSQL 15 with a pgbench database
# (scale $BENCH_SCALE, default 50), backed up to a file:// store with zstd, without and with
# encryption, beside `pg_basebackup --compress=server-zstd:1` of the same database. Prints MB/s
# of data-dir bytes read. Everything lives in a temp dir removed at the end.
#
#   BENCH_SCALE=50        pgbench scale (with BENCH_DATA=text: 100,000 rows per unit)
#   BENCH_DATA=text       a table of md5 text (compresses ~2:1) instead of pgbench's (~20:1)
#   BENCH_ZSTD_LEVEL=     zstd level for pgpilot (default: the store default, 3)
#   BENCH_KEEP=1          keep the temp dir
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
scale=${BENCH_SCALE:-50}
pgbin=/usr/lib/postgresql/15/bin
[ -x "$pgbin/postgres" ] || { echo "needs Debian postgresql-15 (scripts/install-test-deps.sh)" >&2; exit 1; }

echo "==> cargo build --release -p pgpilot-agent"
cargo build --release -q -p pgpilot-agent
agent="$root/target/release/pgpilot-agent"

work=$(mktemp -d /tmp/pgpilot-bench-backup-XXXXXX)
chmod 755 "$work"
agent_pid=
cleanup() {
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(free_port); api=$(free_port); lo=$(free_port)
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/key"; chmod 600 "$work/key"
echo "bench-token" > "$work/token"; chmod 600 "$work/token"

write_config() { # $1 = store dir, $2 = extra [backup] lines
  cat > "$work/pgpilot.toml" <<EOF
data_dir = "pg"
postgres_port = $pg_port
pg_bin_dir = "$pgbin"
api_listen = "127.0.0.1:$api"
api_loopback_listen = "127.0.0.1:$lo"
api_token_file = "token"
[backup]
store = "file://$1"
compression = "zstd"
${BENCH_ZSTD_LEVEL:+zstd_level = $BENCH_ZSTD_LEVEL}
${BENCH_CODEC_THREADS:+codec_threads = $BENCH_CODEC_THREADS}
$2
EOF
}

start_agent() {
  (cd "$work" && exec "$agent" run --config pgpilot.toml >>agent.log 2>&1) &
  agent_pid=$!
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$lo/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "agent did not start:" >&2; tail -30 "$work/agent.log" >&2; exit 1
}

stop_agent() { kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=; }

cpu_ticks() { awk '{print $14+$15}' "/proc/$agent_pid/stat"; }

backup() { # $1 = name
  local out c0 c1 t0 t1
  c0=$(cpu_ticks); t0=$(date +%s.%N)
  out=$(PGPILOT_API_URL="http://127.0.0.1:$lo" PGPILOT_API_TOKEN_FILE="$work/token" PGPILOT_LOG=warn \
    "$agent" backup --label "$1" 2>&1)
  c1=$(cpu_ticks); t1=$(date +%s.%N)
  echo "$out" | sed "s/^/    /" >&2
  echo "    agent CPU: $(python3 -c "print(f'{($c1-$c0)/$(getconf CLK_TCK):.1f} s over {$t1-$t0:.1f} s wall')")" >&2
  echo "$out" | grep -oE '[0-9.]+ MB/s' | tail -1
}

write_config "$work/store-plain" ""
start_agent
export PGPASSWORD
PGPASSWORD=$(cat "$work/superuser-password")
psql_() { "$pgbin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -At postgres -c "$1"; }
if [ "${BENCH_DATA:-pgbench}" = text ]; then
  rows=$((scale * 100000))
  echo "==> $rows rows of md5 text (compresses about 2:1)"
  psql_ "CREATE TABLE t AS SELECT g, md5(g::text) || md5((g * 3)::text) || md5((g * 7)::text) || md5((g * 11)::text) AS pad FROM generate_series(1, $rows) g" >/dev/null
else
  echo "==> pgbench -i -s $scale"
  "$pgbin/pgbench" -h 127.0.0.1 -p "$pg_port" -U postgres -i -s "$scale" -q postgres >/dev/null 2>&1
fi
echo "    database: $(psql_ "SELECT pg_size_pretty(pg_database_size('postgres'))")"
psql_ "CHECKPOINT" >/dev/null

echo "==> pgpilot backup, zstd, not encrypted"
plain=$(backup plain | tail -1)
stop_agent

write_config "$work/store-enc" "encryption_key_files = [\"$work/key\"]"
start_agent
echo "==> pgpilot backup, zstd, AES-256-GCM"
enc=$(backup encrypted | tail -1)

# Encryption really on: the same 3-byte file is larger encrypted (key id, nonces, GCM tags).
size_of() { stat -c %s "$(find "$1" -path '*/data/PG_VERSION.pgpilot' | head -1)"; }
echo "    PG_VERSION stored: $(size_of "$work/store-plain") bytes plain, $(size_of "$work/store-enc") bytes encrypted"

echo "==> pg_basebackup --compress=server-zstd:1 -Ft (for comparison)"
bytes=$(du -sb --exclude=pg_wal "$work/pg" | cut -f1)
t0=$(date +%s.%N)
"$pgbin/pg_basebackup" -h "$work/run" -p "$pg_port" -U postgres -D "$work/pgbb" -Ft \
  --compress=server-zstd:1 -X none -c fast >"$work/pg_basebackup.log" 2>&1 || { cat "$work/pg_basebackup.log" >&2; exit 1; }
t1=$(date +%s.%N)
bb=$(python3 -c "print(f'{$bytes/1e6/($t1-$t0):.1f} MB/s')")
echo "    $bytes bytes in $(python3 -c "print(f'{$t1-$t0:.1f}')") s"

echo
echo "| run | speed |"
echo "|---|---|"
echo "| pgpilot, zstd | $plain |"
echo "| pgpilot, zstd + AES-256-GCM | $enc |"
echo "| pg_basebackup server-zstd:1 | $bb |"
