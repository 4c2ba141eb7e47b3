#!/usr/bin/env bash
# Installs the side-by-side peers, idempotently (shared/TESTING.md):
#   - PostgreSQL 15 (pg_basebackup, pgbench, psql) from Debian
#   - pgBackRest from Debian (2.45 on bookworm)
#   - stunnel and the openssl CLI from Debian (TLS in front of s3s-fs: pgBackRest's S3 repo needs https)
#   - barman-cloud (barman[cloud]) from PyPI in a venv made with the system python, at
#     /opt/pgpilot-tools/barman-venv (readable by the postgres user; /root is not)
#   - for P7 (benches/switchover.py): etcd from Debian (etcd-server 3.4 on bookworm; the package
#     `etcd` does not exist there) and Patroni with psycopg2-binary from PyPI in a venv made with
#     the system python, at /opt/pgpilot-bench/patroni-venv (Patroni runs as the postgres user)
set -euo pipefail
venv=${BARMAN_VENV:-/opt/pgpilot-tools/barman-venv}
patroni_venv=${PATRONI_VENV:-/opt/pgpilot-bench/patroni-venv}
apt_missing=()
[ -x /usr/lib/postgresql/15/bin/pgbench ] || apt_missing+=(postgresql-15)
command -v pgbackrest >/dev/null || apt_missing+=(pgbackrest)
command -v stunnel >/dev/null || apt_missing+=(stunnel4)
command -v openssl >/dev/null || apt_missing+=(openssl)
[ -x /usr/bin/python3 ] || apt_missing+=(python3)
/usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || apt_missing+=(python3-venv)
command -v etcd >/dev/null || apt_missing+=(etcd-server)
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "==> apt-get install ${apt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi
if [ ! -x "$venv/bin/barman-cloud-wal-archive" ]; then
  echo "==> barman[cloud] into $venv"
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q 'barman[cloud]==3.19.*' || "$venv/bin/pip" install -q 'barman[cloud]'
fi
# --zstd / --lz4 need the zstandard and lz4 modules (barman's optional extras); boto3 (barman's
# S3 client) also uploads P4's archives to s3s-fs for the S3 restore rows
"$venv/bin/python" -c 'import zstandard, lz4, boto3' 2>/dev/null || "$venv/bin/pip" install -q zstandard lz4 boto3
chmod -R a+rX "$(dirname "$venv")"
# Patroni 4 with etcd (python-etcd for the v2 API, etcd3 over its gRPC gateway needs nothing more)
# and psycopg2-binary, which both Patroni and benches/switchover.py's writer use.
if ! "$patroni_venv/bin/python" -c 'import patroni, psycopg2, etcd' 2>/dev/null; then
  echo "==> patroni[etcd] + psycopg2-binary into $patroni_venv"
  mkdir -p "$(dirname "$patroni_venv")"
  /usr/bin/python3 -m venv "$patroni_venv"
  "$patroni_venv/bin/pip" install -q --upgrade pip
  "$patroni_venv/bin/pip" install -q 'patroni[etcd]' psycopg2-binary
fi
chmod -R a+rX "$(dirname "$patroni_venv")"
echo "pgbackrest: $(pgbackrest version)"
echo "stunnel: $(stunnel -version 2>&1 | grep -m1 "^stunnel ")"
echo "barman-cloud: $("$venv/bin/barman-cloud-wal-archive" --version 2>&1 | tail -1)"
echo "pg_basebackup: $(/usr/lib/postgresql/15/bin/pg_basebackup --version)"
echo "etcd: $(etcd --version 2>&1 | head -1)"
echo "patroni: $("$patroni_venv/bin/patroni" --version 2>&1 | tail -1)"
