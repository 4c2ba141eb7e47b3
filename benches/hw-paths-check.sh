#!/usr/bin/env bash
# Shows that the aes-gcm and sha2 crates take their hardware paths (AES-NI + PCLMULQDQ, SHA-NI)
# on this machine: builds one tiny program twice, with the crates' runtime CPU detection
# (default) and with the software backends forced (`--cfg aes_force_soft --cfg
# polyval_force_soft`, sha2's `force-soft` feature), and prints both speeds beside the CPU flags.
# The default build must be several times faster; docs/benchmarks.md records a run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$root/target/hw-paths-check"
mkdir -p "$work/src"
aes_gcm=$(grep -m1 '^aes-gcm = ' "$root/Cargo.toml" | cut -d'"' -f2)
sha2=$(grep -m1 '^sha2 = ' "$root/Cargo.toml" | cut -d'"' -f2)
cat > "$work/Cargo.toml" <<TOML
[package]
name = "hw-paths-check"
version = "0.0.0"
edition = "2024"
publish = false
[workspace]
[dependencies]
aes-gcm = "$aes_gcm"
sha2 = "$sha2"
[features]
soft = ["sha2/force-soft"]
[profile.release]
debug = false
TOML
cat > "$work/src/main.rs" <<'RS'
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};
use std::time::Instant;

fn main() {
    let mut buf = vec![0x5au8; 64 << 20];
    let cipher = Aes256Gcm::new(&[7u8; 32].into());
    let t = Instant::now();
    for (i, chunk) in buf.chunks_mut(1 << 20).enumerate() {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&(i as u64).to_be_bytes());
        cipher.encrypt_in_place_detached(&Nonce::from(n), b"", chunk).unwrap();
    }
    let aes = buf.len() as f64 / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    let d = Sha256::digest(&buf);
    let sha = buf.len() as f64 / t.elapsed().as_secs_f64() / 1e6;
    println!("aes-256-gcm {aes:>8.0} MB/s   sha256 {sha:>8.0} MB/s   (digest {:02x}{:02x}…)", d[0], d[1]);
}
RS
echo "CPU flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'aes|pclmulqdq|sha_ni|vaes|vpclmulqdq|avx2' | tr '\n' ' ')"
cd "$work"
printf 'runtime detection (what pgpilot ships): '
CARGO_TARGET_DIR="$work/target-hw" RUSTFLAGS="" cargo run -q --release
printf 'software forced:                        '
CARGO_TARGET_DIR="$work/target-soft" RUSTFLAGS="--cfg aes_force_soft --cfg polyval_force_soft" cargo run -q --release --features soft
