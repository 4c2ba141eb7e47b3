#!/usr/bin/env bash
# What can be checked of the images without a registry (images/README.md): each Dockerfile
# builds a workspace package with the pinned toolchain and a locked Cargo.lock, runs it as a
# non-root numeric user, and the binaries it would copy exist and need no glibc newer than
# Debian 12's (2.36: the distroless base and the upstream postgres:14-17 images).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
max_glibc=2.36
toolchain=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
fail() { echo "images: $*" >&2; exit 1; }
[ -f Cargo.lock ] || fail "Cargo.lock is missing: the Dockerfiles build with --locked"
grep -q '^target/' .dockerignore || fail ".dockerignore must leave target/ out of the build context"
for f in images/*.Dockerfile; do
  pkg=$(sed -n 's/.*cargo build --release --locked -p \([a-z-]*\).*/\1/p' "$f")
  [ -n "$pkg" ] || fail "$f: no 'cargo build --release --locked -p <package>'"
  [ -f "$(echo "$pkg" | sed 's/^pgpilot-//')/Cargo.toml" ] || fail "$f: $pkg is not a workspace package"
  grep -q "^ARG RUST_IMAGE=docker.io/library/rust:$toolchain-bookworm$" "$f" ||
    fail "$f: the build image must be rust:$toolchain-bookworm (rust-toolchain.toml)"
  user=$(awk '/^FROM /{u=""} /^USER /{u=$2} END{print u}' "$f")
  [[ "$user" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || fail "$f: the final stage must run as a numeric non-root USER (got '$user')"
  entry=$(sed -n 's/^ENTRYPOINT \["\([^"]*\)".*/\1/p' "$f")
  grep -q "^COPY --from=build /out/$pkg $entry\$" "$f" || fail "$f: ENTRYPOINT $entry is not the binary the build stage makes"
  bin=target/debug/$pkg
  [ -x "$bin" ] || bin=target/release/$pkg
  [ -x "$bin" ] || fail "$pkg is not built: cargo build -p $pkg"
  need=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
  [ "$(printf '%s\n%s\n' "$need" "$max_glibc" | sort -V | tail -1)" = "$max_glibc" ] ||
    fail "$bin needs glibc $need, newer than the images' $max_glibc"
  # Every other binary of the package ships next to the entry point (the agent's pgpilot-wal:
  # `install` copies what sits next to the agent, and archive_command runs it).
  for extra in $(sed -n 's/^name = "\(.*\)"$/\1/p' "$(echo "$pkg" | sed 's/^pgpilot-//')/Cargo.toml" | grep -vx "$pkg"); do
    grep -q "install -D -m 0755 target/release/$extra /out/$extra" "$f" &&
      grep -q "^COPY --from=build /out/$extra $(dirname "$entry")/$extra\$" "$f" ||
      fail "$f: the package's binary $extra must be built and copied next to $entry"
  done
  echo "images: $f builds $pkg ($toolchain), runs as $user, needs glibc $need (<= $max_glibc)"
done
