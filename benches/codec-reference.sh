#!/usr/bin/env bash
# `make bench-codec`: runs the archive codec benchmark (criterion, benches/benches/codec.rs) and
# measures this machine's reference speeds with the C tools on the same real WAL data
# (zstd -b1, lz4 -b1, gzip, openssl speed aes-256-gcm / sha256), then prints a table of our
# MB/s per core beside the "sum of stages" limit those tools imply, and the ratio. The table is
# also written to target/bench/codec.md. Idempotent: installs zstd/lz4/python3 only if missing.
#
#   BENCH_SKIP_CRITERION=1  reuse the last criterion results in target/criterion
#   BENCH_FILTER=regex      pass a filter to criterion (e.g. 'segment-')
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="$root/target/bench"
mkdir -p "$out"
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v zstd >/dev/null || missing+=(zstd)
command -v lz4 >/dev/null || missing+=(lz4)
command -v openssl >/dev/null || missing+=(openssl)
command -v gzip >/dev/null || missing+=(gzip)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ -z "${BENCH_SKIP_CRITERION:-}" ]; then
  echo "==> cargo bench -p pgpilot-benches --bench codec (a few minutes; generates real WAL once)"
  cargo bench -p pgpilot-benches --bench codec -- ${BENCH_FILTER:-} 2>&1 | tee "$out/criterion.log" | grep -E '^(segment|stage|stream)|thrpt' || true
fi

wal_dir="$root/target/bench-data/wal"
mapfile -t segs < <(find "$wal_dir" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' | sort | head -4)
[ ${#segs[@]} -ge 1 ] || { echo "no WAL segments in $wal_dir: run without BENCH_SKIP_CRITERION first" >&2; exit 1; }
data="$root/target/bench-data/wal-concat.bin"
cat "${segs[@]}" > "$data"

echo "==> reference tools on the same ${#segs[@]} WAL segments"
python3 - "$root" "$data" "$out" <<'PY'
import json, os, re, subprocess, sys, time, glob

root, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
size = os.path.getsize(data)
MB = 1e6

def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    return (p.stdout + p.stderr).replace("\r", "\n")

def bench_line(text):
    # The final result line carries both speeds: "<spinner>-name : 67108864 -> 6093065 (x11.01),
    # 1404.3 MB/s, 3702.4 MB/s" (zstd) or "…(6.515),2804.5 MB/s ,10625.5 MB/s" (lz4).
    lines = [l for l in text.splitlines() if len(re.findall(r"MB/s", l)) >= 2]
    if not lines:
        sys.exit("cannot parse benchmark output:\n" + text)
    speeds = re.findall(r"([\d.]+)\s*MB/s", lines[-1])
    return float(speeds[0]), float(speeds[1]), lines[-1].strip().lstrip("|/-\\=").strip()

ref = {}
# zstd level 1 on independent 1 MiB blocks, as our chunks are.
c, d, line = bench_line(run(["zstd", "-b1", "-i3", "-B1048576", data]))
ref["zstd-1"] = (c, d, "zstd -b1 -B1MiB: " + line)
c, d, line = bench_line(run(["lz4", "-b1", "-i3", data]))
ref["lz4"] = (c, d, "lz4 -b1: " + line)

def timed(cmd, stdin_path, repeat=3):
    best = None
    for _ in range(repeat):
        with open(stdin_path, "rb") as f:
            t = time.perf_counter()
            subprocess.run(cmd, stdin=f, stdout=subprocess.DEVNULL, check=True)
            el = time.perf_counter() - t
        best = el if best is None else min(best, el)
    return best

gz = data + ".gz"
with open(data, "rb") as f, open(gz, "wb") as g:
    subprocess.run(["gzip", "-6", "-c"], stdin=f, stdout=g, check=True)
gc = size / timed(["gzip", "-6", "-c"], data) / MB
gd = size / timed(["gzip", "-d", "-c"], gz) / MB
ref["gzip-6"] = (gc, gd, f"gzip -6: {gc:.1f} MB/s, gzip -d: {gd:.1f} MB/s")
os.remove(gz)

def openssl_speed(alg):
    text = run(["openssl", "speed", "-evp", alg, "-bytes", "1048576", "-seconds", "3"])
    line = [l for l in text.splitlines() if l.lower().startswith(alg.lower())][-1]
    k = float(re.findall(r"([\d.]+)k", line)[-1])
    return k * 1000 / MB, line.strip()

aes, aes_line = openssl_speed("aes-256-gcm")
sha, sha_line = openssl_speed("sha256")

ratios = json.load(open(os.path.join(out, "codec-ratios.json")))

def crit(group, bench):
    base = os.path.join(root, "target", "criterion", group, bench, "new")
    try:
        est = json.load(open(os.path.join(base, "estimates.json")))
        bj = json.load(open(os.path.join(base, "benchmark.json")))
    except FileNotFoundError:
        return None
    ns = est["mean"]["point_estimate"]
    nbytes = bj["throughput"]["Bytes"]
    return nbytes / ns * 1e9 / MB

def limit(codec, enc, direction):
    r = ratios[codec]
    inv = 1 / sha
    if codec != "none":
        c, d, _ = ref[codec]
        inv += 1 / (c if direction == "write" else d)
    if enc:
        inv += r / aes
    return 1 / inv

stream_groups = [os.path.basename(p) for p in glob.glob(os.path.join(root, "target", "criterion", "stream-*cores"))]
stream_group = stream_groups[0] if stream_groups else None
cores = int(stream_group.split("-")[1].replace("cores", "")) if stream_group else os.cpu_count()

rows = []
for codec in ["none", "zstd-1", "lz4", "gzip-6"]:
    for enc in [False, True]:
        lab = f"{codec}_{'aes' if enc else 'plain'}"
        w, rd = crit("segment-write", lab), crit("segment-read", lab)
        lw, lr = limit(codec, enc, "write"), limit(codec, enc, "read")
        sw = crit(stream_group, "write_" + lab) if stream_group and enc else None
        sr = crit(stream_group, "read_" + lab) if stream_group and enc else None
        rows.append((codec, "aes-256-gcm" if enc else "-", ratios[codec], w, lw, rd, lr, sw, sr))

def f(x, pct=False):
    if x is None:
        return "n/a"
    return f"{x*100:.0f}%" if pct else f"{x:,.0f}"

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = set(next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), []))
hw = " ".join(x for x in ["aes", "pclmulqdq", "vaes", "vpclmulqdq", "sha_ni", "avx2"] if x in flags)
md = []
md.append(f"# Archive codec pipeline — {cpu}, {os.cpu_count()} cores (CPU flags: {hw})\n")
md.append(f"Data: {size // (16<<20)} real 16 MiB WAL segments from a pgbench run (target/bench-data/wal). MB = 10^6 bytes.")
md.append("Per core = the single-threaded encoder/decoder. Limit = sum of stages measured by the C tools on")
md.append("this machine: 1 / (1/codec + ratio/AES-GCM + 1/SHA-256) (AES runs on compressed bytes).\n")
md.append("| codec | encryption | stored/plain | write MB/s/core | write limit | write % of limit | read MB/s/core | read limit | read % of limit | 1 GiB stream write MB/s (" + str(cores) + " cores) | 1 GiB stream read MB/s |")
md.append("|---|---|---|---|---|---|---|---|---|---|---|")
for codec, enc, r, w, lw, rd, lr, sw, sr in rows:
    md.append(f"| {codec} | {enc} | {r:.3f} | {f(w)} | {f(lw)} | {f(w/lw if w else None, True)} | {f(rd)} | {f(lr)} | {f(rd/lr if rd else None, True)} | {f(sw)} | {f(sr)} |")
md.append("\nReference stages (C tools, one core, same data):\n")
for k in ["zstd-1", "lz4", "gzip-6"]:
    md.append(f"- {ref[k][2]}")
md.append(f"- openssl speed -evp aes-256-gcm (1 MiB blocks): {aes:,.0f} MB/s — ring (ours): {f(crit('stage', 'aes-256-gcm'))} MB/s, aes-gcm crate: {f(crit('stage', 'aes-256-gcm-crate'))} MB/s")
md.append(f"- openssl speed -evp sha256 (1 MiB blocks): {sha:,.0f} MB/s — sha2 crate (ours): {f(crit('stage', 'sha256'))} MB/s, ring: {f(crit('stage', 'sha256-ring'))} MB/s")
text = "\n".join(md) + "\n"
open(os.path.join(out, "codec.md"), "w").write(text)
print(text)
print(f"(written to {os.path.join(out, 'codec.md')})")
PY
