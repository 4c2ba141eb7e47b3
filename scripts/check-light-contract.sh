#!/usr/bin/env bash
# The operator depends on pgpilot-common without its `archive` feature, so none of the archive
# format's codecs or crypto reach the operator through the contract crate (docs/decisions.md).
# Run by `make lint`. Fails, naming what crept in, when:
#  - the operator's build of pgpilot-common has the `archive` feature on;
#  - a codec or the KDF (zstd, lz4_flex, flate2, hkdf) is anywhere in the operator's tree;
#  - ring is there through anything but the TLS stack: rustls, which the operator needs anyway, and
#    rcgen and x509-parser, with which it issues and reads the agents' certificates (spec.tls).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
fail=0

features=$($cargo tree -p pgpilot-operator -e normal,features -i pgpilot-common --prefix none)
if grep -q '^pgpilot-common feature "archive"' <<<"$features"; then
  echo "pgpilot-operator builds pgpilot-common with the archive feature:" >&2
  $cargo tree -p pgpilot-operator -e normal,features -i pgpilot-common >&2
  fail=1
fi

heavy=$($cargo tree -p pgpilot-operator -e normal --prefix none | grep -E '^(zstd|zstd-sys|lz4_flex|flate2|hkdf) ' | sort -u || true)
if [ -n "$heavy" ]; then
  echo "pgpilot-operator depends on archive codecs or crypto:" >&2
  echo "$heavy" >&2
  for crate in $(awk '{print $1}' <<<"$heavy"); do $cargo tree -p pgpilot-operator -e normal -i "$crate" >&2; done
  fail=1
fi

# `cargo tree -i` fails when the package is not in the tree at all: nothing to check then.
ring_users=$($cargo tree -p pgpilot-operator -e normal -i ring --depth 1 --prefix none 2>/dev/null | tail -n +2 || true)
not_tls=$(grep -vE '^(rustls|rustls-webpki|rcgen|x509-parser) ' <<<"$ring_users" || true)
if [ -n "$not_tls" ]; then
  echo "ring reaches pgpilot-operator other than through the TLS stack (rustls, rcgen, x509-parser):" >&2
  echo "$not_tls" >&2
  fail=1
fi

[ $fail = 0 ] && echo "pgpilot-operator: pgpilot-common without the archive feature, no archive codecs or crypto"
exit $fail
