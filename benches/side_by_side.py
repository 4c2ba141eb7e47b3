#!/usr/bin/env python3
"""Side-by-side benchmarks: pgpilot vs pgBackRest, barman-cloud and pg_basebackup (issue 6).

    python3 benches/side_by_side.py p1|p2|p3|p4|p6|report [--quick]      (as root)

Every scenario runs pgpilot and its peers in the same run, alternating them inside each
repetition, and writes target/bench/<scenario>.{md,json}; `report` merges them into
target/bench/side-by-side.{md,json} (target/bench/quick/… with --quick). Python 3 stdlib only.

Environment:
    PGPILOT_BENCH_REPS    repetitions (default: P1 50 full / 6 quick; P2, P4 2 / 1; P3 3 / 1)
    PGPILOT_BENCH_SCALE   pgbench scale for P3 and P4 (default 340 ≈ 5 GiB full; quick: 20 for P3, 10 for P4)
    PGPILOT_BENCH_BACKLOG P2 backlog in segments (default 1000 full, 100 quick)
    PGPILOT_BENCH_WAL_MIB P4 WAL replayed after the backup (default 2048 full, 128 quick)
    PGPILOT_BENCH_KEEP=1  keep the work directory
"""
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "bench")
AGENT = BUILT_AGENT = os.path.join(ROOT, "target", "release", "pgpilot-agent")
# archive_command's front, built next to the agent (docs/archiving.md, "The archive commands").
WAL_FRONT = os.path.join(ROOT, "target", "release", "pgpilot-wal")
PGBIN = "/usr/lib/postgresql/15/bin"
BARMAN_VENV = os.environ.get("BARMAN_VENV", "/opt/pgpilot-tools/barman-venv")
S3S_FS = "/opt/pgpilot-tools/bin/s3s-fs"
S3_BUCKET = "bench"  # S3Server creates it (a directory in its data dir)
QUICK = "--quick" in sys.argv or os.environ.get("PGPILOT_BENCH_QUICK") == "1"
if QUICK:  # quick runs never overwrite the full run's tables
    OUT = os.path.join(OUT, "quick")
CLK_TCK = os.sysconf("SC_CLK_TCK")
S3_AK, S3_SK = "benchak", "benchsecretkey1234"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sh(cmd, **kw):
    """Run a command, fail loudly with its output."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    r = subprocess.run(cmd, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} exited {r.returncode}:\n{r.stdout}")
    return r.stdout


def timed(cmd, **kw):
    """Wall seconds, CPU seconds (children) and max RSS (KiB) of one command."""
    before = os.times()
    r0 = resource_children()
    t0 = time.perf_counter()
    out = sh(cmd, **kw)
    wall = time.perf_counter() - t0
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu, r0, out


def resource_children():
    import resource
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


# ---------------------------------------------------------------- machine and versions

def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
    }


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def versions():
    def v(cmd):
        try:
            return subprocess.run(cmd, text=True, capture_output=True).stdout.strip().splitlines()[-1]
        except (OSError, IndexError):
            return "missing"
    rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], text=True,
                         capture_output=True).stdout.strip()
    built = time.strftime("%H:%M UTC", time.gmtime(os.stat(BUILT_AGENT).st_mtime))
    rev = f"checkout {rev}, binary built {built}"
    return {
        "pgpilot": v([AGENT, "--version"]) + f" (release build; {rev})",
        "pgbackrest": v(["pgbackrest", "version"]),
        "barman-cloud": v([f"{BARMAN_VENV}/bin/barman-cloud-wal-archive", "--version"]),
        "pg_basebackup": v([f"{PGBIN}/pg_basebackup", "--version"]),
        "postgres": v([f"{PGBIN}/postgres", "--version"]),
    }


# ---------------------------------------------------------------- statistics and report

def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(xs):
    return {"n": len(xs), "min": min(xs), "p50": statistics.median(xs), "p99": pct(xs, 99), "max": max(xs)}


def fmt(x, digits=1):
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:,.{digits}f}"


def write_report(name, title, meta, columns, rows, notes):
    """rows: list of dicts; columns: list of (key, header, digits). Writes md + json, prints md."""
    os.makedirs(OUT, exist_ok=True)
    lines = [f"### {title}", ""]
    lines.append(f"Machine: {meta['machine']['nproc']} cores, {meta['machine']['cpu']}, "
                 f"{meta['machine']['ram_gib']} GiB RAM; load average before {meta['load_before']}, "
                 f"after {meta['load_after']} (shared machine: other engineers build and test on it). "
                 f"Repetitions: {meta['reps']} ({'quick' if meta['quick'] else 'full'} run, {meta['date']}).")
    lines.append("")
    lines.append("Versions: " + "; ".join(f"{k} `{v}`" for k, v in meta["versions"].items()))
    lines.append("")
    lines.append("Settings:")
    for k, v in meta["settings"].items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    lines.append("| " + " | ".join(h for _, h, _ in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k), d) for k, _, d in columns) + " |")
    lines.append("")
    for n in notes:
        lines.append(f"- {n}")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, f"{name}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump({"scenario": name, "title": title, "meta": meta, "rows": rows, "notes": notes}, f, indent=2)
    print(md, flush=True)


def base_meta(reps, settings):
    return {
        "machine": machine(),
        "versions": versions(),
        "reps": reps,
        "quick": QUICK,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": loadavg(),
        "settings": settings,
    }


# ---------------------------------------------------------------- processes we start

class Work:
    """A temp dir reachable by the postgres user, and the processes started in it."""

    def __init__(self, tag):
        base = "/var/tmp"
        self.dir = tempfile.mkdtemp(prefix=f"pgpilot-sbs-{tag}-", dir=base)
        os.chmod(self.dir, 0o755)
        self.procs = []

    def path(self, *p):
        return os.path.join(self.dir, *p)

    def spawn(self, cmd, logname, **kw):
        f = open(self.path(logname), "ab")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
        self.procs.append(p)
        return p

    def stop(self, p, timeout=60):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def close(self):
        for p in list(self.procs):
            self.stop(p)
        if os.environ.get("PGPILOT_BENCH_KEEP"):
            log(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


class S3Server:
    """s3s-fs on a free 127.0.0.1 port; objects are files under work/s3/<bucket>/<key>."""

    def __init__(self, work):
        self.work = work
        self.port = free_port()
        self.data = work.path("s3")
        os.makedirs(os.path.join(self.data, S3_BUCKET), exist_ok=True)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self):
        """(Re)starts the server on the same port and data."""
        self.proc = self.work.spawn([S3S_FS, "--host", "127.0.0.1", "--port", str(self.port),
                                     "--access-key", S3_AK, "--secret-key", S3_SK, self.data], "s3s-fs.log")
        wait_port(self.port)

    def stop(self):
        """Takes the store away: clients get connection refused until start()."""
        self.work.stop(self.proc)


class TlsFront:
    """stunnel on a free 127.0.0.1 port in front of the plain-HTTP S3Server (pgBackRest's S3 repo
    only speaks https), with a self-signed certificate for 127.0.0.1 made by openssl."""

    def __init__(self, work, s3):
        self.cert, key = work.path("tls-cert.pem"), work.path("tls-key.pem")
        # pgBackRest 2.45 checks the host against the DNS entries of the SAN only, hence DNS:127.0.0.1 too
        sh(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:127.0.0.1", "-keyout", key, "-out", self.cert])
        self.port = free_port()
        conf = work.path("stunnel.conf")
        with open(conf, "w") as f:
            f.write("foreground = yes\npid =\nsyslog = no\ndebug = warning\n"
                    f"[s3]\naccept = 127.0.0.1:{self.port}\nconnect = 127.0.0.1:{s3.port}\n"
                    f"cert = {self.cert}\nkey = {key}\n")
        self.proc = work.spawn(["stunnel", conf], "stunnel.log")
        try:
            wait_port(self.port)
        except RuntimeError:
            raise RuntimeError("stunnel not listening:\n" + tail(work.path("stunnel.log")))


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


class Agent:
    """A standalone pgpilot-agent (release build) with its own Postgres 15."""

    def __init__(self, work, name="agent"):
        self.work = work
        self.dir = work.path(name)
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.pg_port, self.api, self.lo = free_port(), free_port(), free_port()
        token = os.path.join(self.dir, "token")
        with open(token, "w") as f:
            f.write("bench-token\n")
        os.chmod(token, 0o600)  # the agent refuses a secret file every user can read
        self.key = os.path.join(self.dir, "key")
        postgres_secret(self.key, os.urandom(32).hex())
        self.proc = None

    def configure(self, store, encrypt=False, level=1, extra_backup="", extra=""):
        lines = [
            'data_dir = "pg"',
            f"postgres_port = {self.pg_port}",
            f'pg_bin_dir = "{PGBIN}"',
            f'api_listen = "127.0.0.1:{self.api}"',
            f'api_loopback_listen = "127.0.0.1:{self.lo}"',
            'api_token_file = "token"',
            extra,
            "[backup]",
            f'store = "{store}"',
            'compression = "zstd"',
            f"zstd_level = {level}",
        ]
        if encrypt:
            lines.append(f'encryption_key_files = ["{self.key}"]')
        lines.append(extra_backup)
        with open(os.path.join(self.dir, "pgpilot.toml"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self):
        self.proc = self.work.spawn([AGENT, "run", "--config", "pgpilot.toml"], "agent.log",
                                    cwd=self.dir, env={**os.environ, "PGPILOT_LOG": "warn"})
        end = time.time() + 180
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("agent exited:\n" + tail(self.work.path("agent.log")))
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.lo}/readyz", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("agent not ready:\n" + tail(self.work.path("agent.log")))

    def stop(self):
        if self.proc:
            self.work.stop(self.proc, 120)
            self.proc = None

    @property
    def pgdata(self):
        return os.path.join(self.dir, "pg")

    @property
    def socket_dir(self):
        return os.path.join(self.dir, "run")

    def password(self):
        with open(os.path.join(self.dir, "superuser-password")) as f:
            return f.read().strip()

    def runtime(self):
        for dp, _, files in os.walk(self.dir):
            if "archive-runtime.json" in files:
                return os.path.join(dp, "archive-runtime.json")
        raise RuntimeError("no archive-runtime.json")

    def pgenv(self):
        return {**os.environ, "PGPASSWORD": self.password(), "PGHOST": "127.0.0.1",
                "PGPORT": str(self.pg_port), "PGUSER": "postgres", "PGDATABASE": "postgres"}

    def psql(self, sql):
        return sh([f"{PGBIN}/psql", "-Atq", "-c", sql], env=self.pgenv()).strip()

    def status(self):
        """GET /v1/status over HTTP (no CLI process, so cheap enough to poll)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.lo}/v1/status", timeout=5) as r:
            return json.load(r)

    def proc_stat(self):
        """(cpu seconds, VmHWM KiB, VmRSS KiB) of the agent process."""
        pid = self.proc.pid
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        hwm = rss = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        return cpu, hwm, rss


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


class PgBackRest:
    """pgBackRest stanza `bench` on the agent's cluster, one posix repo per setting, or with
    tls (a TlsFront) an S3 repo in the S3Server's bucket, reached through stunnel."""

    def __init__(self, work, agent, name, encrypt, extra=None, tls=None, cipher_pass=None):
        self.work, self.agent = work, agent
        self.conf = work.path(f"pgbackrest-{name}.conf")
        for d in ("pgbr-log", "pgbr-lock", "pgbr-spool"):
            os.makedirs(work.path(d), exist_ok=True)
        if tls:
            self.repo = work.path("s3", S3_BUCKET, f"pgbackrest-{name}")  # where s3s-fs keeps the objects
            repo = {
                "repo1-type": "s3",
                "repo1-path": f"/pgbackrest-{name}",
                "repo1-s3-bucket": S3_BUCKET,
                "repo1-s3-endpoint": "127.0.0.1",
                "repo1-storage-port": str(tls.port),
                "repo1-s3-region": "us-east-1",
                "repo1-s3-uri-style": "path",
                "repo1-storage-ca-file": tls.cert,
                "repo1-s3-key": S3_AK,  # in the config file (0600), never on a command line
                "repo1-s3-key-secret": S3_SK,
            }
        else:
            self.repo = work.path(f"pgbr-{name}")
            repo = {"repo1-path": self.repo, "repo1-type": "posix"}
        g = {
            **repo,
            "compress-type": "zst",
            "compress-level": "1",
            "log-level-console": "warn",
            "log-level-file": "off",
            "log-path": work.path("pgbr-log"),
            "lock-path": work.path("pgbr-lock"),
            "spool-path": work.path("pgbr-spool"),
            "start-fast": "y",
            "archive-check": "n",
        }
        if encrypt:
            g["repo1-cipher-type"] = "aes-256-cbc"
            self.cipher_pass = cipher_pass or os.urandom(24).hex()
            g["repo1-cipher-pass"] = self.cipher_pass
        g.update(extra or {})
        self.settings = {k: v for k, v in g.items()
                         if not k.endswith(("-path", "-pass", "-key", "-secret", "-file")) and not k.startswith("log")}
        with open(os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("[global]\n" + "".join(f"{k}={v}\n" for k, v in g.items()))
            f.write(f"[bench]\npg1-path={agent.pgdata}\npg1-port={agent.pg_port}\n"
                    f"pg1-socket-path={agent.socket_dir}\npg1-user=postgres\n")

    def cmd(self, *args):
        return ["pgbackrest", f"--config={self.conf}", "--stanza=bench", *args]

    def env(self):
        return {**os.environ, "PGPASSWORD": self.agent.password()}

    def stanza_create(self):
        sh(self.cmd("stanza-create"), env=self.env())


def barman_cmd(tool, s3, *args):
    return [f"{BARMAN_VENV}/bin/{tool}", "--cloud-provider", "aws-s3", "--endpoint-url", s3.endpoint, *args]


def postgres_secret(path, content):
    """A secret file the agent accepts (it refuses one every user can read) that the direct
    path, running as postgres, can still read: 0640, group postgres."""
    with open(path, "w") as f:
        f.write(content)
    os.chmod(path, 0o640)
    if os.geteuid() == 0:
        import grp
        os.chown(path, 0, grp.getgrnam("postgres").gr_gid)


def barman_env():
    return {**os.environ, "AWS_ACCESS_KEY_ID": S3_AK, "AWS_SECRET_ACCESS_KEY": S3_SK,
            "AWS_DEFAULT_REGION": "us-east-1"}


def s3_backup_lines(agent, s3):
    ak, sk = os.path.join(agent.dir, "s3-ak"), os.path.join(agent.dir, "s3-sk")
    for p, v in ((ak, S3_AK), (sk, S3_SK)):
        postgres_secret(p, v)
    return (f'endpoint = "{s3.endpoint}"\npath_style = true\nregion = "us-east-1"\n'
            f'access_key_id_file = "{ak}"\nsecret_access_key_file = "{sk}"')


# ---------------------------------------------------------------- P1: one archive_command call

def p1():
    reps = int(os.environ.get("PGPILOT_BENCH_REPS", "6" if QUICK else "50"))
    work = Work("p1")
    try:
        return _p1(work, reps)
    finally:
        work.close()


def _p1(work, reps):
    s3 = S3Server(work)
    tls = TlsFront(work, s3)
    agent = Agent(work)
    store_plain = f"file://{work.path('store-plain')}"
    store_enc = f"file://{work.path('store-enc')}"
    agent.configure(store_plain)
    agent.start()
    meta = base_meta(reps, {})

    # Real WAL from this cluster (pgBackRest checks the system id in each segment's header):
    # keep the segments with a slot while pgbench writes them, then copy four of them.
    log("==> P1: generating WAL with pgbench on the agent's cluster")
    agent.psql("SELECT pg_create_physical_replication_slot('bench_keep', true)")
    env = agent.pgenv()
    sh([f"{PGBIN}/pgbench", "-i", "-s", "5", "-q"], env=env)
    sh([f"{PGBIN}/pgbench", "-c", "4", "-t", "3000", "-n"], env=env)
    current = agent.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    segdir = work.path("segments")
    os.makedirs(segdir)
    wal = os.path.join(agent.pgdata, "pg_wal")
    names = sorted(n for n in os.listdir(wal) if re.fullmatch(r"[0-9A-F]{24}", n) and n < current)[-4:]
    if len(names) < 4:
        raise RuntimeError(f"only {names} before {current}")
    for n in names:
        shutil.copy(os.path.join(wal, n), segdir)
    agent.psql("SELECT pg_drop_replication_slot('bench_keep')")
    segments = [os.path.join(segdir, n) for n in names]

    pgbr = {False: PgBackRest(work, agent, "plain", False), True: PgBackRest(work, agent, "enc", True)}
    pgbr_s3 = {False: PgBackRest(work, agent, "s3-plain", False, tls=tls),
               True: PgBackRest(work, agent, "s3-enc", True, tls=tls)}
    for b in (*pgbr.values(), *pgbr_s3.values()):
        b.stanza_create()

    counter = [0]

    def place(i):
        """A real segment under a fresh name in pg_wal, without a .ready file."""
        counter[0] += 1
        name = f"0000009900000FFF{counter[0]:08X}"
        dst = os.path.join(wal, name)
        shutil.copy(segments[i % len(segments)], dst)
        shutil.chown(dst, "postgres", "postgres")
        return name

    def run_one(cmd, name, env=None):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=agent.pgdata, env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{cmd}: exit {r.returncode}\n{r.stdout}{r.stderr}")
        os.unlink(os.path.join(wal, name))
        return dt * 1000

    def pgpilot_cmd(name):
        """archive_command as the agent renders it: the front, then the agent binary."""
        return [WAL_FRONT, *agent_only_cmd(name)]

    def agent_only_cmd(name):
        """archive_command without the front (where pgpilot-wal is not installed)."""
        return [AGENT, "wal-push", "--runtime", agent.runtime(), f"pg_wal/{name}"]

    def pgbr_cmd(enc, name):
        return pgbr[enc].cmd("archive-push", os.path.join(wal, name))

    def pgbr_s3_cmd(enc, name):
        return pgbr_s3[enc].cmd("archive-push", os.path.join(wal, name))

    def barman_push(name):
        return barman_cmd("barman-cloud-wal-archive", s3, "--zstd", "--compression-level", "1",
                          f"s3://{S3_BUCKET}/barman", "bench", f"pg_wal/{name}")

    results = {}  # row label -> list of ms

    def phase(label, tools):
        """tools: list of (row label, fn(name) -> cmd, env). Alternates them, `reps` rounds."""
        log(f"==> P1 {label}: {reps} rounds of {', '.join(t[0] for t in tools)}")
        for r in range(reps + 1):
            order = tools if r % 2 == 0 else list(reversed(tools))
            for row, mk, env in order:
                name = place(r)
                ms = run_one(mk(name), name, env)
                if r > 0:  # round 0 warms caches and connections
                    results.setdefault(row, []).append(ms)

    be = barman_env()
    # file:// store, agent running (the archive_command path in production)
    phase("file, plain, agent up", [
        ("pgpilot wal-push (agent), file, zstd-1", pgpilot_cmd, None),
        ("pgBackRest archive-push, posix, zst-1", lambda n: pgbr_cmd(False, n), None),
    ])
    agent.stop()
    agent.configure(store_enc, encrypt=True)
    agent.start()
    phase("file, encrypted, agent up", [
        ("pgpilot wal-push (agent), file, zstd-1 + AES-256-GCM", pgpilot_cmd, None),
        ("pgBackRest archive-push, posix, zst-1 + aes-256-cbc", lambda n: pgbr_cmd(True, n), None),
        ("pgpilot-agent wal-push without the front (agent), file, zstd-1 + AES-256-GCM",
         agent_only_cmd, None),
    ])
    agent.stop()  # direct path: wal-push uploads by itself
    phase("file, encrypted, agent down", [
        ("pgpilot wal-push (direct), file, zstd-1 + AES-256-GCM", pgpilot_cmd, None),
        ("pgBackRest archive-push, posix, zst-1 + aes-256-cbc", lambda n: pgbr_cmd(True, n), None),
    ])
    agent.configure(store_plain)
    agent.start()
    agent.stop()  # rewrite the runtime file for the plain store, then down
    phase("file, plain, agent down", [
        ("pgpilot wal-push (direct), file, zstd-1", pgpilot_cmd, None),
        ("pgBackRest archive-push, posix, zst-1", lambda n: pgbr_cmd(False, n), None),
    ])
    # S3: pgpilot straight to s3s-fs (http), pgBackRest through the stunnel front (https)
    agent.configure(f"s3://{S3_BUCKET}/pgpilot", extra_backup=s3_backup_lines(agent, s3))
    agent.start()
    phase("S3, plain, agent up", [
        ("pgpilot wal-push (agent), S3, zstd-1", pgpilot_cmd, None),
        ("pgBackRest archive-push, S3, zst-1", lambda n: pgbr_s3_cmd(False, n), None),
        ("barman-cloud-wal-archive, S3, zstd-1", barman_push, be),
    ])
    agent.stop()
    phase("S3, plain, agent down", [
        ("pgpilot wal-push (direct), S3, zstd-1", pgpilot_cmd, None),
        ("pgBackRest archive-push, S3, zst-1", lambda n: pgbr_s3_cmd(False, n), None),
        ("barman-cloud-wal-archive, S3, zstd-1", barman_push, be),
    ])
    agent.configure(f"s3://{S3_BUCKET}/pgpilot-enc", encrypt=True, extra_backup=s3_backup_lines(agent, s3))
    agent.start()
    phase("S3, encrypted, agent up", [
        ("pgpilot wal-push (agent), S3, zstd-1 + AES-256-GCM", pgpilot_cmd, None),
        ("pgBackRest archive-push, S3, zst-1 + aes-256-cbc", lambda n: pgbr_s3_cmd(True, n), None),
    ])
    agent.stop()
    phase("S3, encrypted, agent down", [
        ("pgpilot wal-push (direct), S3, zstd-1 + AES-256-GCM", pgpilot_cmd, None),
        ("pgBackRest archive-push, S3, zst-1 + aes-256-cbc", lambda n: pgbr_s3_cmd(True, n), None),
    ])

    # every tool really stored its segments
    stored = {}
    bucket = work.path("s3", S3_BUCKET)
    for label, top in (("pgpilot file plain", work.path("store-plain")), ("pgpilot file enc", work.path("store-enc")),
                       ("pgBackRest plain", pgbr[False].repo), ("pgBackRest enc", pgbr[True].repo),
                       ("pgpilot S3 plain", os.path.join(bucket, "pgpilot")),
                       ("pgpilot S3 enc", os.path.join(bucket, "pgpilot-enc")),
                       ("pgBackRest S3 plain", pgbr_s3[False].repo), ("pgBackRest S3 enc", pgbr_s3[True].repo),
                       ("barman S3", os.path.join(bucket, "barman"))):
        stored[label] = sum(1 for _, _, fs in os.walk(top) for f in fs if f.startswith("0000009900000FFF"))
    log(f"    objects stored: {stored}")
    if min(stored.values()) < reps:
        raise RuntimeError(f"a tool did not store its segments: {stored}")

    # one row per (phase tool); the peer of each pgpilot row is another tool of its phase. The
    # plain S3 pgpilot rows have two peers (pgBackRest, barman-cloud): they appear once per peer.
    rows = []
    pairs = [
        ("pgpilot wal-push (agent), file, zstd-1", "pgBackRest archive-push, posix, zst-1"),
        ("pgpilot wal-push (direct), file, zstd-1", "pgBackRest archive-push, posix, zst-1"),
        ("pgpilot wal-push (agent), file, zstd-1 + AES-256-GCM", "pgBackRest archive-push, posix, zst-1 + aes-256-cbc"),
        ("pgpilot-agent wal-push without the front (agent), file, zstd-1 + AES-256-GCM",
         "pgBackRest archive-push, posix, zst-1 + aes-256-cbc"),
        ("pgpilot wal-push (direct), file, zstd-1 + AES-256-GCM", "pgBackRest archive-push, posix, zst-1 + aes-256-cbc"),
        ("pgpilot wal-push (agent), S3, zstd-1", "pgBackRest archive-push, S3, zst-1"),
        ("pgpilot wal-push (direct), S3, zstd-1", "pgBackRest archive-push, S3, zst-1"),
        ("pgpilot wal-push (agent), S3, zstd-1 + AES-256-GCM", "pgBackRest archive-push, S3, zst-1 + aes-256-cbc"),
        ("pgpilot wal-push (direct), S3, zstd-1 + AES-256-GCM", "pgBackRest archive-push, S3, zst-1 + aes-256-cbc"),
        ("pgpilot wal-push (agent), S3, zstd-1", "barman-cloud-wal-archive, S3, zstd-1"),
        ("pgpilot wal-push (direct), S3, zstd-1", "barman-cloud-wal-archive, S3, zstd-1"),
    ]
    done = set()
    for ours, peer in pairs:
        for row in (ours, peer):
            if (row, peer) in done or (row == peer and row in done):
                continue
            done.update({(row, peer), row})
            s = summarize(results[row])
            entry = {"tool": row, **{k: s[k] for k in ("n", "min", "p50", "p99", "max")}}
            if row == ours:
                p = summarize(results[peer])
                entry["peer"] = peer.split(",")[0]
                entry["ratio_p50"] = s["p50"] / p["p50"]
                entry["ratio_p99"] = s["p99"] / p["p99"]
            rows.append(entry)
    # pgBackRest runs in two phases per setting (agent up / down): rows above pool both.
    meta["load_after"] = loadavg()
    meta["settings"] = {
        "segments": "4 real 16 MiB segments written by pgbench (-s 5, -c 4 -t 3000) on the same "
                    "cluster, pushed under fresh names (timeline 0x99) from pg_wal without a .ready "
                    "file, so pgpilot's look-ahead never uploads them first",
        "pgpilot": "release build; [backup] compression=zstd, zstd_level=1, default upload_concurrency; "
                   "encrypted rows: encryption_key_files=[32-byte key] (AES-256-GCM); "
                   "`agent` rows: wal-push handed to the running agent, `direct` rows: agent stopped; "
                   "`pgpilot` rows run archive_command as the agent renders it, `pgpilot-wal <agent> "
                   "wal-push` (the small front, which execs the agent binary with --direct when the agent "
                   "is down); the `without the front` row runs `pgpilot-agent wal-push` itself",
        "pgBackRest": "archive-push (sync), repo1-type=posix on the same disk, compress-type=zst, "
                      "compress-level=1; encrypted rows: repo1-cipher-type=aes-256-cbc; S3 rows: repo1-type=s3 "
                      "(bucket on the same s3s-fs, repo1-s3-uri-style=path) through stunnel on 127.0.0.1 (TLS with a "
                      "self-signed certificate, repo1-storage-ca-file): pgBackRest's S3 client only speaks https, "
                      "so its S3 rows pay a TLS handshake and a proxy hop per call that pgpilot and barman-cloud "
                      "(plain http to s3s-fs) do not",
        "barman-cloud": "barman-cloud-wal-archive --zstd --compression-level 1 to s3s-fs 0.14.1 on "
                        "127.0.0.1 (barman-cloud has no local-directory store; no client-side encryption)",
        "stored": f"segment objects found in each store afterwards: {stored}",
        "timing": "wall time of the whole command (process start included), rounds alternate the "
                  "tool order, first round discarded as warm-up",
    }
    write_report("p1", "P1: one archive_command call on a ready 16 MiB segment (ms)", meta,
                 [("tool", "tool", 0), ("n", "n", 0), ("min", "min ms", 1), ("p50", "p50 ms", 1),
                  ("p99", "p99 ms", 1), ("max", "max ms", 1), ("peer", "vs", 0),
                  ("ratio_p50", "p50 ratio pgpilot/peer", 2), ("ratio_p99", "p99 ratio", 2)],
                 rows, ["ratio < 1: pgpilot faster. Target (issue 24): wal-push p50 ≤ 0.45× pgBackRest's on the local dir, encrypted, agent up (issue 4 asked ≤ 1/3; docs/benchmarks.md)."])
    return rows



def descendants_rss(root_pid):
    """Sum of VmRSS (KiB) of root_pid and all its descendants."""
    children, rss = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/statm") as f:
                rss[int(pid)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    total, todo = 0, [root_pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def run_sampled(cmd, env=None):
    """Run a command; peak of the summed RSS (KiB) of its process tree, sampled every 50 ms."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    import threading
    out = []
    t = threading.Thread(target=lambda: out.append(p.stdout.read()))
    t.start()
    while p.poll() is None:
        peak = max(peak, descendants_rss(p.pid))
        time.sleep(0.05)
    t.join()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} exited {p.returncode}:\n{out[0] if out else ''}")
    return peak


class PgCtlCluster:
    """Postgres 15 run by the postgres user with pg_ctl: self.pgdata, self.socket_dir, self.env."""

    def start(self, wait=True):
        sh(["runuser", "-u", "postgres", "--", f"{PGBIN}/pg_ctl", "-D", self.pgdata, "-l",
            os.path.join(self.socket_dir, "postgres.log"), "-t", "3600", "-w" if wait else "-W", "start"])

    def stop(self):
        subprocess.run(["runuser", "-u", "postgres", "--", f"{PGBIN}/pg_ctl", "-D", self.pgdata, "-m", "fast",
                        "-w", "stop"], capture_output=True)

    def psql(self, sql):
        return sh([f"{PGBIN}/psql", "-Atq", "-c", sql], env=self.env).strip()


class PeerCluster(PgCtlCluster):
    """A plain Postgres 15 run by the postgres user for pgBackRest, with the agent cluster's WAL
    settings, archive_command = pgbackrest archive-push, stanza `bench` created."""

    def __init__(self, work, agent, pgbr_extra, name="peer", encrypt=True):
        self.settings = {k: agent.psql(f"SHOW {k}") for k in
                         ("shared_buffers", "max_wal_size", "min_wal_size", "wal_compression",
                          "checkpoint_timeout", "full_page_writes", "wal_buffers")}
        self.pgdata, self.socket_dir = work.path(f"{name}-pg"), work.path(f"{name}-run")
        for d in (self.pgdata, self.socket_dir, work.path("pgbr-log"), work.path("pgbr-lock"),
                  work.path("pgbr-spool")):
            os.makedirs(d, exist_ok=True)
            shutil.chown(d, "postgres", "postgres")
        os.chmod(self.pgdata, 0o700)
        sh(["runuser", "-u", "postgres", "--", f"{PGBIN}/initdb", "-D", self.pgdata, "-U", "postgres",
            "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"])
        self.pg_port = free_port()
        self.pgbr = PgBackRest(work, self, name, encrypt, pgbr_extra)
        shutil.chown(self.pgbr.conf, "postgres", "postgres")
        os.makedirs(self.pgbr.repo)
        shutil.chown(self.pgbr.repo, "postgres", "postgres")
        self.conf_lines = (
            f"port = {self.pg_port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.socket_dir}'\n"
            "archive_mode = on\nwal_level = replica\n"
            f"archive_command = 'pgbackrest --config={self.pgbr.conf} --stanza=bench archive-push %p'\n"
            + "".join(f"{k} = '{v}'\n" for k, v in self.settings.items()))
        self.write_conf()
        self.start()
        sh(["runuser", "-u", "postgres", "--", *self.pgbr.cmd("stanza-create")])
        self.env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(self.pg_port), "PGUSER": "postgres",
                    "PGDATABASE": "postgres"}

    def write_conf(self):
        with open(os.path.join(self.pgdata, "postgresql.auto.conf"), "a") as f:
            f.write(self.conf_lines)

    def password(self):
        return ""


# ---------------------------------------------------------------- P2: drain a backlog

def proc_table():
    """pid -> (ppid, cmdline, cpu ticks incl. waited-for children, own cpu ticks, rss KiB)."""
    page = os.sysconf("SC_PAGE_SIZE") // 1024
    t = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        own = int(fields[11]) + int(fields[12])
        t[int(pid)] = (int(fields[1]), cmd, own + int(fields[13]) + int(fields[14]), own, rss)
    return t


class Sampler:
    """Every 100 ms: the summed RSS and the CPU of the processes a predicate selects.
    CPU per pid is the last value seen (a process that ends between two samples loses < 100 ms)."""

    def __init__(self, select):
        import threading
        self.select, self.peak_rss, self.cpu = select, 0, {}
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop_ev.is_set():
            t = proc_table()
            rss = 0
            for pid, (ppid, cmd, cpu_all, own, r) in t.items():
                use = self.select(pid, ppid, cmd, t)
                if use:
                    rss += r
                    if use in ("own", "all"):
                        self.cpu[pid] = own if use == "own" else cpu_all
            self.peak_rss = max(self.peak_rss, rss)
            self.stop_ev.wait(0.1)

    def stop(self):
        self.stop_ev.set()
        self.thread.join()
        return sum(self.cpu.values()) / CLK_TCK, self.peak_rss


def ready_count(pgdata):
    d = os.path.join(pgdata, "pg_wal", "archive_status")
    return sum(1 for n in os.listdir(d) if n.endswith(".ready"))


def wait_drained(pgdata, timeout=900):
    end = time.time() + timeout
    while ready_count(pgdata) > 0:
        if time.time() > end:
            raise RuntimeError(f"{pgdata}: still {ready_count(pgdata)} ready after {timeout} s")
        time.sleep(0.1)


def archiver_cpu(pgdata):
    """CPU seconds of the archiver and the archive_command processes it waited for."""
    with open(os.path.join(pgdata, "postmaster.pid")) as f:
        pm = int(f.readline())
    for pid, (ppid, cmd, cpu_all, _, _) in proc_table().items():
        if ppid == pm and cmd.startswith("postgres: archiver"):
            return cpu_all / CLK_TCK
    return 0.0


def make_backlog(env, pgdata, n, nudge_table):
    """pgbench until n segments are waiting to be archived."""
    scale = 10
    while ready_count(pgdata) < n:
        sh([f"{PGBIN}/pgbench", "-i", "-s", str(scale), "-q"], env=env)
        sh([f"{PGBIN}/pgbench", "-c", "4", "-T", "3", "-n"], env=env)
    sh([f"{PGBIN}/psql", "-Atq", "-c", f"CREATE TABLE IF NOT EXISTS {nudge_table} (x int)"], env=env)


def ready_segments(pgdata):
    d = os.path.join(pgdata, "pg_wal", "archive_status")
    return {n[: -len(".ready")] for n in os.listdir(d) if n.endswith(".ready")}


def load_tree(src, dst, link):
    """dst := a copy of the stopped data dir src, owners and modes kept; the WAL segments named
    in `link` (ready ones, which nobody writes again; wal_recycle = off so none is reused in
    place) are hard links, so a 16 GiB backlog is loaded in a second and never copied."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    for dp, _, fs in os.walk(src):
        rel = os.path.relpath(dp, src)
        out = os.path.normpath(os.path.join(dst, rel))
        st = os.stat(dp)
        os.makedirs(out, exist_ok=True)
        os.chmod(out, st.st_mode & 0o7777)
        os.chown(out, st.st_uid, st.st_gid)
        for f in fs:
            s, d = os.path.join(dp, f), os.path.join(out, f)
            if rel == "pg_wal" and f in link:
                os.link(s, d)
            else:
                shutil.copy2(s, d)
                st = os.stat(s)
                os.chown(d, st.st_uid, st.st_gid)


def warm(pgdata, names):
    """Reads the backlog into the page cache, as it is when Postgres has just written it."""
    buf = bytearray(1 << 20)
    for n in names:
        with open(os.path.join(pgdata, "pg_wal", n), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def break_file_store(path):
    """A regular file where a file:// store's directory should be: every push fails."""
    with open(path, "w") as f:
        f.write("archiving is failing on purpose\n")


def give_back_file_store(path):
    os.unlink(path)
    os.makedirs(path)


def clear_hwm(pid):
    """Resets a process's VmHWM (peak RSS) to its current RSS."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def agent_sampler(agent):
    """Sampler of the agent's CPU and RSS plus the RSS of its wal-push processes; the agent's
    VmHWM is reset first."""
    pid, rt = agent.proc.pid, agent.runtime()
    clear_hwm(pid)
    return Sampler(lambda p, pp, cmd, t: "own" if p == pid else (rt in cmd and "rss"))


def wait_archive_failed(psql, timeout=120):
    end = time.time() + timeout
    while int(psql("SELECT failed_count FROM pg_stat_archiver")) == 0:
        if time.time() > end:
            raise RuntimeError("archiving did not fail with the store taken away")
        time.sleep(0.2)


class CopyPeer(PgCtlCluster):
    """Postgres 15 started by pg_ctl on a copy of the agent cluster's stopped data dir (same
    system id, same WAL, the same settings from pgpilot.conf), for pgBackRest: port, sockets,
    pg_hba and archive_command overridden in postgresql.auto.conf; archive_command reads the
    pgBackRest config at self.active, a copy of the repo variant in use."""

    def __init__(self, work, agent, name="peer"):
        self.pgdata, self.socket_dir = work.path(f"{name}-pg"), work.path(f"{name}-run")
        for d in (self.socket_dir, work.path("pgbr-log"), work.path("pgbr-lock"), work.path("pgbr-spool")):
            os.makedirs(d, exist_ok=True)
            shutil.chown(d, "postgres", "postgres")
        self.spool = work.path("pgbr-spool")
        self.pg_port = free_port()
        self._password = agent.password()
        self.active = work.path(f"pgbackrest-{name}-active.conf")
        self.conf_lines = (
            f"port = {self.pg_port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.socket_dir}'\n"
            f"hba_file = '{self.pgdata}/pg_hba.conf'\nrestore_command = ''\narchive_mode = on\n"
            f"archive_command = 'pgbackrest --config={self.active} --stanza=bench archive-push %p'\n")
        self.env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(self.pg_port), "PGUSER": "postgres",
                    "PGDATABASE": "postgres", "PGPASSWORD": self._password}

    def load(self, template, link):
        load_tree(template, self.pgdata, link)
        with open(os.path.join(self.pgdata, "postgresql.auto.conf"), "a") as f:
            f.write(self.conf_lines)

    def password(self):
        return self._password

    def repo(self, work, name, enc, extra, tls=None):
        """A pgBackRest repo variant for this cluster, its stanza created (the cluster runs)."""
        b = PgBackRest(work, self, name, enc, extra, tls=tls)
        shutil.chown(b.conf, "postgres", "postgres")
        if not tls:
            os.makedirs(b.repo)
            shutil.chown(b.repo, "postgres", "postgres")
        sh(["runuser", "-u", "postgres", "--", *b.cmd("stanza-create")], env=self.env)
        return b

    def use(self, pgbr):
        """archive_command now pushes to this repo variant; its archive and the async spool
        emptied, so the drain stores every segment anew."""
        shutil.copy(pgbr.conf, self.active)
        shutil.chown(self.active, "postgres", "postgres")
        os.chmod(self.active, 0o600)
        arch = os.path.join(pgbr.repo, "archive", "bench")
        for n in os.listdir(arch):
            if not n.startswith("archive.info"):
                shutil.rmtree(os.path.join(arch, n))
        shutil.rmtree(os.path.join(self.spool, "archive"), ignore_errors=True)


def p2():
    reps = int(os.environ.get("PGPILOT_BENCH_REPS", "1" if QUICK else "2"))
    n = int(os.environ.get("PGPILOT_BENCH_BACKLOG", "100" if QUICK else "1000"))
    work = Work("p2")
    try:
        return _p2(work, reps, n)
    finally:
        work.close()


def bench_stores():
    stores = [s for s in os.environ.get("PGPILOT_BENCH_STORES", "file,s3").split(",") if s]
    bad = [s for s in stores if s not in ("file", "s3")]
    if bad or not stores:
        sys.exit(f"PGPILOT_BENCH_STORES: {bad or stores} not in file,s3")
    return stores


P2_PGBR = {"archive-async": "y", "process-max": "2", "archive-push-queue-max": "64GiB"}


def _p2(work, reps, n):
    stores = bench_stores()
    configs = [(st, enc) for st in stores for enc in (True, False)]
    s3 = S3Server(work)
    tls = TlsFront(work, s3) if "s3" in stores else None
    agent = Agent(work)
    params = '[postgres.parameters]\nwal_recycle = "off"'
    broken = work.path("store-broken")
    break_file_store(broken)
    agent.configure(f"file://{broken}", encrypt=True, extra=params)
    agent.start()
    meta = base_meta(reps, {})
    time.sleep(5)
    meta["agent_idle_rss_kib"] = agent.proc_stat()[2]  # P6
    settings = {k: agent.psql(f"SHOW {k}") for k in
                ("shared_buffers", "max_wal_size", "wal_compression", "checkpoint_timeout", "full_page_writes",
                 "wal_buffers", "wal_recycle")}

    # One backlog, written once while archiving fails; every drain (both tools, every store,
    # every round) starts from a copy of it: the same WAL bytes for everyone.
    log(f"==> P2: pgbench until {n} segments wait to be archived (archiving failing)")
    t0 = time.perf_counter()
    make_backlog(agent.pgenv(), agent.pgdata, n, "nudge")
    agent.stop()
    template = work.path("template")
    backlog = ready_segments(agent.pgdata)
    os.rename(agent.pgdata, template)
    log(f"    {len(backlog)} segments in {time.perf_counter() - t0:.0f} s")

    peer = CopyPeer(work, agent)
    peer.load(template, backlog)
    peer.start()
    repos = {(st, enc): peer.repo(work, f"p2-{st}-{'enc' if enc else 'plain'}", enc, P2_PGBR,
                                  tls=tls if st == "s3" else None)
             for st, enc in configs}
    peer.stop()

    def break_repo(st, repo):
        if st == "s3":
            s3.stop()
        else:
            os.chmod(repo, 0)

    def fix_repo(st, repo):
        if st == "s3":
            s3.start()
        else:
            os.chmod(repo, 0o750)

    def drain_pgpilot(st, enc, r):
        name = f"p2-{r}-{'enc' if enc else 'plain'}"
        if st == "s3":
            where = work.path("s3", S3_BUCKET, name)
            agent.configure(f"s3://{S3_BUCKET}/{name}", encrypt=enc, extra=params,
                            extra_backup=s3_backup_lines(agent, s3))
            s3.stop()
        else:
            where = work.path(name)
            agent.configure(f"file://{where}", encrypt=enc, extra=params)
            break_file_store(where)
        load_tree(template, agent.pgdata, backlog)
        agent.start()
        wait_archive_failed(agent.psql)
        warm(agent.pgdata, backlog)
        a0, _, _ = agent.proc_stat()
        arch0 = archiver_cpu(agent.pgdata)
        sampler = agent_sampler(agent)
        t0 = time.perf_counter()
        if st == "s3":
            s3.start()
        else:
            give_back_file_store(where)
        agent.psql("INSERT INTO nudge VALUES (1); SELECT pg_switch_wal()")
        wait_drained(agent.pgdata)
        wall = time.perf_counter() - t0
        _, peak = sampler.stop()
        a1, hwm, _ = agent.proc_stat()
        cpu = (a1 - a0) + (archiver_cpu(agent.pgdata) - arch0)
        agent.stop()
        stored = sum(1 for _, _, fs in os.walk(where) for f in fs if re.match(r"[0-9A-F]{24}", f))
        shutil.rmtree(where)
        return stored, wall, cpu, max(peak, hwm)

    def drain_pgbackrest(st, enc, r):
        pgbr = repos[(st, enc)]
        peer.load(template, backlog)
        peer.use(pgbr)
        break_repo(st, pgbr.repo)
        peer.start()
        wait_archive_failed(peer.psql)
        warm(peer.pgdata, backlog)
        arch0 = archiver_cpu(peer.pgdata)

        def sel(p, pp, cmd, t):  # detached async pgBackRest processes (the archiver is counted apart)
            if peer.active not in cmd:
                return False
            while pp > 1:
                if t.get(pp, (0, ""))[1].startswith("postgres: archiver"):
                    return "rss"  # RSS counted, CPU comes with the archiver's
                pp = t.get(pp, (0,))[0]
            return "own"
        sampler = Sampler(sel)
        t0 = time.perf_counter()
        fix_repo(st, pgbr.repo)
        peer.psql("INSERT INTO nudge VALUES (1); SELECT pg_switch_wal()")
        wait_drained(peer.pgdata)
        wall = time.perf_counter() - t0
        detached_cpu, peak = sampler.stop()
        cpu = detached_cpu + (archiver_cpu(peer.pgdata) - arch0)
        peer.stop()
        stored = sum(1 for _, _, fs in os.walk(os.path.join(pgbr.repo, "archive")) for f in fs
                     if re.match(r"[0-9A-F]{24}-", f))
        return stored, wall, cpu, peak

    results = {}
    try:
        for r in range(reps):
            for st, enc in configs:
                tools = [("pgpilot", drain_pgpilot), ("pgBackRest", drain_pgbackrest)]
                for tool, fn in (tools if r % 2 == 0 else list(reversed(tools))):
                    log(f"==> P2 round {r + 1}: {tool}, {st}, {'encrypted' if enc else 'plain'}: drain")
                    stored, wall, cpu, peak = fn(st, enc, r)
                    log(f"    {stored} segments stored in {wall:.1f} s = {len(backlog) / wall:.1f} segments/s, "
                        f"CPU {cpu:.1f} s, peak RSS {peak / 1024:.0f} MiB")
                    if stored < len(backlog):
                        raise RuntimeError(f"{tool} stored {stored} of {len(backlog)} segments")
                    results.setdefault((tool, st, enc), []).append(
                        {"wall": wall, "seg_s": len(backlog) / wall, "cpu": cpu, "rss": peak})
    finally:
        peer.stop()
        agent.stop()

    label = {
        "pgpilot": "pgpilot (agent look-ahead + wal-push), zstd-1",
        "pgBackRest": "pgBackRest archive-push async, process-max 2, zst-1",
    }
    rows = []
    for st, enc in configs:
        pair = []
        for tool in ("pgpilot", "pgBackRest"):
            rs = results[(tool, st, enc)]
            v = [x["seg_s"] for x in rs]
            cipher = {"pgpilot": " + AES-256-GCM", "pgBackRest": " + aes-256-cbc"}[tool] if enc else ""
            store = {"file": "local dir", "s3": "S3"}[st]
            pair.append({"tool": f"{label[tool]}{cipher}, {store}", "n": len(rs), "backlog": len(backlog),
                         "min": min(v), "p50": statistics.median(v), "max": max(v),
                         "mbps": statistics.median(v) * 16.777216,
                         "cpu_s": statistics.median(x["cpu"] for x in rs),
                         "cpu_per_seg_ms": statistics.median(x["cpu"] for x in rs) / len(backlog) * 1000,
                         "rss_mib": max(x["rss"] for x in rs) / 1024, "store": st, "encrypted": enc})
        pair[0]["ratio"] = pair[0]["p50"] / pair[1]["p50"]
        rows.extend(pair)
    meta["load_after"] = loadavg()
    meta["settings"] = {
        "backlog": f"{len(backlog)} segments written once by `pgbench -i -s 10` + `pgbench -c 4 -T 3` loops "
                   "on the agent's cluster while archiving failed, then the cluster stopped; every drain starts "
                   "from a copy of that data dir (ready segments hard-linked; wal_recycle = off so no segment "
                   "is rewritten in place), so every tool, store and round drains the same WAL bytes",
        "drain": "the cluster is started with its store unreachable and waits until pg_stat_archiver counts a "
                 "failure; the backlog is read into the page cache (as when Postgres has just written it); "
                 "timing starts when the store is given back (local dir: pgpilot's store path made a directory, "
                 "pgBackRest's repo chmod 750; S3: s3s-fs restarted on the same port) and a pg_switch_wal "
                 "wakes the archiver, and ends when pg_wal/archive_status holds no .ready file; every segment "
                 "is then counted in the store, which is emptied before the next drain",
        "pgpilot": "release build, store on the same disk or s3s-fs (http), zstd_level=1, encrypted rows "
                   "AES-256-GCM; default push_concurrency (= upload_concurrency 4)",
        "pgBackRest": "Postgres 15 started by pg_ctl on a copy of the same data dir (same settings: "
                      f"{', '.join(f'{k}={v}' for k, v in settings.items())}), archive_command = pgbackrest "
                      "archive-push, archive-async=y, process-max=2, compress-type=zst compress-level=1, posix "
                      "repo on the same disk or S3 repo on the same s3s-fs through stunnel (https, which "
                      "pgBackRest's S3 client requires), encrypted rows repo1-cipher-type=aes-256-cbc",
        "measured": "CPU = the agent (pgpilot) or the detached async pgBackRest processes, plus the archiver "
                    "and the archive_command processes it waited for; peak RSS = the summed RSS of those "
                    "processes (agent VmHWM reset before the drain), sampled every 100 ms",
        "limit": "2-core codec limit for zstd-1 + AES-256-GCM from `make bench-codec` (target/bench/codec.md): "
                 "2 × the per-core write limit; the issue's target is 80 % of it",
    }
    write_report("p2", f"P2: drain a backlog of {len(backlog)} ready segments", meta,
                 [("tool", "tool", 0), ("n", "rounds", 0), ("backlog", "segments", 0), ("min", "seg/s min", 1),
                  ("p50", "seg/s median", 1), ("max", "seg/s max", 1), ("mbps", "MB/s (plain WAL)", 0),
                  ("cpu_s", "CPU s", 1), ("cpu_per_seg_ms", "CPU ms/segment", 0),
                  ("rss_mib", "peak RSS MiB", 0), ("ratio", "pgpilot/pgBackRest speed", 2)],
                 rows, ["Ratio > 1: pgpilot drains faster (against the pgBackRest row below it: same store, "
                        "same encryption setting)."])
    return rows


# ---------------------------------------------------------------- P4: restore to the latest point

def metric(agent, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.lo}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


class WaitSampler(Sampler):
    """Lifetimes of restore_command processes (every 20 ms): an estimate of the time replay
    waited for WAL (a process shorter than 20 ms may be missed: a prefetch hit)."""

    def __init__(self, marker):
        self.marker, self.seen = marker, {}
        super().__init__(lambda *a: False)

    def run(self):
        while not self.stop_ev.is_set():
            now = time.perf_counter()
            for pid, (ppid, cmd, _, _, _) in proc_table().items():
                # the restore_command itself, not a shell around it nor pgBackRest's background
                # prefetch (archive-get:async) and its workers (archive-get:local)
                if (self.marker in cmd and not cmd.startswith(("runuser", "sh ", "/bin/sh "))
                        and ":async" not in cmd and ":local" not in cmd):
                    first, _ = self.seen.get(pid, (now, now))
                    self.seen[pid] = (first, now)
            self.stop_ev.wait(0.02)

    def stop(self):
        self.stop_ev.set()
        self.thread.join()
        return sum(last - first + 0.02 for first, last in self.seen.values()), len(self.seen)


def wal_bytes_since(psql, lsn):
    return int(float(psql(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn}')")))


S3_UPLOAD = r"""
import os, sys, boto3
from concurrent.futures import ThreadPoolExecutor
endpoint, bucket, top, prefix = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=endpoint)
files = [os.path.join(dp, f) for dp, _, fs in os.walk(top) for f in fs if not os.path.islink(os.path.join(dp, f))]
def put(path):
    s3.upload_file(path, bucket, prefix + "/" + os.path.relpath(path, top).replace(os.sep, "/"))
with ThreadPoolExecutor(8) as ex:
    list(ex.map(put, files))
print(len(files))
"""


def s3_upload_tree(s3, top, prefix):
    """Uploads a store or repo directory to the S3 server under prefix (with boto3 from the
    barman-cloud venv), so that each tool restores from S3 the very objects it wrote to disk."""
    out = sh([f"{BARMAN_VENV}/bin/python", "-c", S3_UPLOAD, s3.endpoint, S3_BUCKET, top, prefix], env=barman_env())
    return int(out.strip().splitlines()[-1])


def p4():
    reps = int(os.environ.get("PGPILOT_BENCH_REPS", "1" if QUICK else "2"))
    scale = int(os.environ.get("PGPILOT_BENCH_SCALE", "10" if QUICK else "340"))
    wal_mib = int(os.environ.get("PGPILOT_BENCH_WAL_MIB", "128" if QUICK else "2048"))
    stores = bench_stores()
    results, notes = {}, {}
    meta = None
    for enc in (True, False):
        work = Work(f"p4-{'enc' if enc else 'plain'}")
        try:
            m = _p4(work, reps, scale, wal_mib, enc, stores, results, notes)
            meta = meta or m
        finally:
            work.close()
    return p4_report(meta, results, notes, stores, scale, wal_mib)


def _p4(work, reps, scale, wal_mib, enc, stores, results, notes):
    """One backup chain per tool (encrypted or not) on the local dir; the S3 rows restore from
    an upload of the same objects to s3s-fs."""
    s3 = S3Server(work) if "s3" in stores else None
    tls = TlsFront(work, s3) if s3 else None
    agent = Agent(work)
    store = work.path("store")
    os.makedirs(store)
    agent.configure(f"file://{store}", encrypt=enc)
    agent.start()
    meta = base_meta(reps, {})
    pgbr_extra = {"archive-async": "y", "process-max": "2", "archive-push-queue-max": "64GiB",
                  "archive-get-queue-max": "1GiB"}
    peer = PeerCluster(work, agent, pgbr_extra, encrypt=enc)
    api = ["--api-url", f"http://127.0.0.1:{agent.lo}", "--token-file", os.path.join(agent.dir, "token")]
    kind = "encrypted" if enc else "plain"
    try:
        for name, env in (("pgpilot", agent.pgenv()), ("pgBackRest", peer.env)):
            log(f"==> P4 {kind}: {name} cluster: pgbench -i -s {scale}")
            sh([f"{PGBIN}/pgbench", "-i", "-s", str(scale), "-q"], env=env)
        log(f"==> P4 {kind}: base backups")
        sh([AGENT, "backup", *api, "--label", "p4"], env={**os.environ, "PGPILOT_LOG": "warn"})
        sh(["runuser", "-u", "postgres", "--", *peer.pgbr.cmd("--type=full", "backup")])
        log(f"==> P4 {kind}: {wal_mib} MiB of WAL after the backups (pgbench -c 4), on both clusters")
        for psql, env in ((agent.psql, agent.pgenv()), (peer.psql, peer.env)):
            lsn = psql("SELECT pg_current_wal_lsn()")
            while wal_bytes_since(psql, lsn) < wal_mib * 1024 * 1024:
                sh([f"{PGBIN}/pgbench", "-c", "4", "-T", "10", "-n"], env=env)
            psql("SELECT pg_switch_wal()")
        for pgdata in (agent.pgdata, peer.pgdata):
            wait_drained(pgdata)
        notes["data_bytes"] = tree_bytes(agent.pgdata, skip="pg_wal")
        repos = {"file": (f"file://{store}", "", peer.pgbr, store)}
        if s3:
            log(f"==> P4 {kind}: the same objects uploaded to S3 for the S3 rows")
            n1 = s3_upload_tree(s3, store, "p4-pgpilot")
            pgbr_s3 = PgBackRest(work, peer, "p4-s3", enc, pgbr_extra, tls=tls,
                                 cipher_pass=getattr(peer.pgbr, "cipher_pass", None))
            shutil.chown(pgbr_s3.conf, "postgres", "postgres")
            n2 = s3_upload_tree(s3, peer.pgbr.repo, "pgbackrest-p4-s3")
            log(f"    {n1} pgpilot objects, {n2} pgBackRest objects")
            repos["s3"] = (f"s3://{S3_BUCKET}/p4-pgpilot", s3_backup_lines(agent, s3), pgbr_s3,
                           work.path("s3", S3_BUCKET, "p4-pgpilot"))
        # Every restore starts from these archives as they are now: a restore promotes a new
        # timeline that the cluster then archives, and a store switched to with a cluster from
        # another store's timeline would hold segments without their history (a real gap, which
        # pgpilot refuses). Hard links: the tools replace objects, never write into one.
        pristine = {}
        for _, _, pgbr, top in repos.values():
            for d in (top, pgbr.repo):
                pristine[d] = d + ".pristine"
                sh(["cp", "-al", d, pristine[d]])

        def reset(top):
            shutil.rmtree(top)
            sh(["cp", "-al", pristine[top], top])

        def restore_pgpilot(st):
            url, lines, _, top = repos[st]
            agent.stop()
            ready = os.path.join(agent.pgdata, "pg_wal", "archive_status")
            for n in os.listdir(ready):  # nothing of the old timeline goes to the restored-from store
                if n.endswith(".ready"):
                    os.unlink(os.path.join(ready, n))
            reset(top)
            agent.configure(url, encrypt=enc, extra_backup=lines)
            agent.start()
            hits0 = metric(agent, "pgpilot_wal_prefetch_hits_total")
            miss0 = metric(agent, "pgpilot_wal_prefetch_misses_total")
            waits = WaitSampler("wal-fetch")
            cpu0 = agent.proc_stat()[0]
            t0 = time.perf_counter()
            proc = subprocess.Popen([AGENT, "restore", "--latest", "--force", *api], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PGPILOT_LOG": "warn"})
            cpu = None  # the agent's CPU until the base backup is in place (download_seconds set)
            while proc.poll() is None:
                if cpu is None and (agent.status().get("restore") or {}).get("download_seconds") is not None:
                    cpu = agent.proc_stat()[0] - cpu0
                time.sleep(0.05)
            out = proc.communicate()[0]
            if proc.returncode != 0:
                raise RuntimeError(f"pgpilot restore exited {proc.returncode}:\n{out}")
            wall = time.perf_counter() - t0
            waited, calls = waits.stop()
            st = agent.status().get("restore") or {}
            return {"wall": wall, "download": st.get("download_seconds"), "replay": st.get("replay_seconds"),
                    "waited": waited, "calls": calls, "cpu": cpu,
                    "hits": metric(agent, "pgpilot_wal_prefetch_hits_total") - hits0,
                    "misses": metric(agent, "pgpilot_wal_prefetch_misses_total") - miss0}

        def restore_pgbackrest(st):
            pgbr = repos[st][2]
            peer.stop()
            reset(pgbr.repo)
            rm0 = time.process_time()  # pgpilot's base CPU includes emptying the data dir (--force)
            shutil.rmtree(peer.pgdata)
            rm_cpu = time.process_time() - rm0
            os.makedirs(peer.pgdata, mode=0o700)
            shutil.chown(peer.pgdata, "postgres", "postgres")
            t0 = time.perf_counter()
            _, cpu, _, _ = timed(["runuser", "-u", "postgres", "--", *pgbr.cmd("--type=default", "restore")])
            t1 = time.perf_counter()
            waits = WaitSampler("archive-get")
            peer.start(wait=False)
            while True:
                try:
                    if peer.psql("SELECT pg_is_in_recovery()") == "f":
                        break
                except RuntimeError:
                    pass
                time.sleep(0.1)
            t2 = time.perf_counter()
            waited, calls = waits.stop()
            return {"wall": t2 - t0, "download": t1 - t0, "replay": t2 - t1, "waited": waited, "calls": calls,
                    "cpu": cpu + rm_cpu}

        tools = [("pgpilot", restore_pgpilot), ("pgBackRest", restore_pgbackrest)]
        for r in range(reps):
            for st in stores:
                for name, fn in (tools if r % 2 == 0 else list(reversed(tools))):
                    log(f"==> P4 round {r + 1}: {name} restore --latest, {st}, {kind}")
                    res = fn(st)
                    log(f"    total {res['wall']:.1f} s: base {res['download'] or 0:.1f} s, "
                        f"replay {res['replay'] or 0:.1f} s, restore_command ~{res['waited']:.1f} s over "
                        f"{res['calls']} calls")
                    results.setdefault((name, st, enc), []).append(res)
    finally:
        peer.stop()
        agent.stop()
    return meta


def p4_report(meta, results, notes, stores, scale, wal_mib):
    rows = []
    store_label = {"file": "local dir", "s3": "S3"}
    for st in stores:
        for enc in (True, False):
            pair = []
            for name, label in (("pgpilot", "pgpilot restore --latest (wal-fetch prefetch 8), zstd-1"),
                                ("pgBackRest", "pgBackRest restore, process-max 2, archive-get async, zst-1")):
                rs = results[(name, st, enc)]

                def med(k):
                    v = [r[k] for r in rs if r.get(k) is not None]
                    return statistics.median(v) if v else None
                cipher = {"pgpilot": " + AES-256-GCM", "pgBackRest": " + aes-256-cbc"}[name] if enc else ""
                row = {"tool": f"{label}{cipher}, {store_label[st]}", "n": len(rs),
                       "base_min": min(r["download"] or 0 for r in rs), "base_p50": med("download"),
                       "base_max": max(r["download"] or 0 for r in rs), "cpu_p50": med("cpu"),
                       "replay_p50": med("replay"),
                       "total_p50": med("wall"), "waited_p50": med("waited"), "calls": med("calls"),
                       "store": st, "encrypted": enc}
                row["waited_pct"] = 100 * row["waited_p50"] / row["replay_p50"] if row["replay_p50"] else None
                if name == "pgpilot":
                    row["hits_misses"] = f"{med('hits'):.0f} / {med('misses'):.0f}"
                pair.append(row)
            for k in ("base_p50", "replay_p50", "total_p50"):
                pair[0][k.replace("_p50", "_ratio")] = pair[1][k] / pair[0][k] if pair[0][k] else None
            rows.extend(pair)
    meta["load_after"] = loadavg()
    meta["settings"] = {
        "data": f"pgbench -i -s {scale} (data dir {notes['data_bytes'] / 1e9:.2f} GB), a base backup, then {wal_mib} "
                "MiB of WAL from pgbench -c 4 on each cluster (pgpilot's agent cluster; pgBackRest's own cluster "
                "with the same WAL settings), all archived before the restores; done once encrypted and once "
                "plain (new clusters each time)",
        "stores": "local dir: the store / posix repo the chain was written to; S3: the same objects uploaded "
                  "(boto3) to s3s-fs on 127.0.0.1 and restored from there (pgpilot over http, pgBackRest "
                  "through stunnel, https, which its S3 client requires); s3s-fs 0.14 streams each GET body in 4 KiB "
                  "reads, so the S3 rows measure that test server as much as the tools",
        "pgpilot": "`pgpilot-agent restore --latest --force` on the running agent; zstd-1, encrypted rows "
                   "AES-256-GCM; base = download_seconds, replay = replay_seconds from /v1/status; prefetch = 8 "
                   "(default)",
        "pgBackRest": "data dir emptied, `pgbackrest restore --type=default` (process-max 2, zst-1, encrypted rows "
                      "aes-256-cbc), then Postgres started and polled until pg_is_in_recovery() is false; "
                      "archive-get async (archive-get-queue-max 1GiB)",
        "base CPU": "median CPU seconds (user + system) spent restoring the base backup: for pgpilot the agent "
                    "process from the `restore` call until /v1/status reports download_seconds (polled every "
                    "50 ms), emptying the data dir (--force) included; for pgBackRest the harness emptying the "
                    "data dir plus the `pgbackrest restore` command and the processes it starts",
        "waited": "sum of the lifetimes of restore_command processes (wal-fetch / archive-get) sampled every 20 ms: "
                  "the time replay spent waiting for WAL, approximately (calls faster than 20 ms are missed)",
    }
    write_report("p4", "P4: restore of a base backup plus WAL to the latest point (s)", meta,
                 [("tool", "tool", 0), ("n", "rounds", 0), ("base_min", "base min s", 1), ("base_p50", "base median s", 1),
                  ("base_max", "base max s", 1), ("cpu_p50", "base CPU s", 1),
                  ("replay_p50", "replay median s", 1), ("total_p50", "total median s", 1),
                  ("waited_p50", "waited for WAL s", 1), ("waited_pct", "waited % of replay", 1),
                  ("hits_misses", "prefetch hits / misses", 0), ("base_ratio", "base speedup vs pgBackRest", 2),
                  ("replay_ratio", "replay speedup", 2), ("total_ratio", "total speedup", 2)],
                 rows, ["Speedup > 1: pgpilot faster (against the pgBackRest row below it: same store, same "
                        "encryption setting). Target (issue 5): base restore ≥ 2× pgBackRest; waiting for WAL "
                        "< 5 % of replay."])
    return rows


# ---------------------------------------------------------------- P3: base backup

def pg_cpu(agent):
    """CPU seconds of the whole Postgres cluster so far: the postmaster, its exited children
    (cutime/cstime, e.g. a walsender that compressed for pg_basebackup) and its live children."""
    with open(os.path.join(agent.pgdata, "postmaster.pid")) as f:
        pm = int(f.readline())
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == pm:
            total += sum(int(x) for x in fields[11:15])
        elif int(fields[1]) == pm:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def drop_backups(store):
    """Deletes the base backups in a pgpilot store directory (its WAL stays), so that repeated
    backups of a 5 GB database do not fill the disk."""
    for dp, dns, _ in os.walk(store):
        if os.path.basename(dp) == "backups":
            for d in dns:
                shutil.rmtree(os.path.join(dp, d))
            dns[:] = []


def tree_bytes(top, skip=None):
    n = 0
    for dp, dns, fs in os.walk(top):
        if skip:
            dns[:] = [d for d in dns if d != skip]
        for f in fs:
            try:
                n += os.lstat(os.path.join(dp, f)).st_size
            except OSError:
                pass
    return n


def p3():
    reps = int(os.environ.get("PGPILOT_BENCH_REPS", "1" if QUICK else "3"))
    scale = int(os.environ.get("PGPILOT_BENCH_SCALE", "20" if QUICK else "340"))
    work = Work("p3")
    try:
        return _p3(work, reps, scale)
    finally:
        work.close()


def _p3(work, reps, scale):
    stores = bench_stores()
    s3 = S3Server(work)
    tls = TlsFront(work, s3) if "s3" in stores else None
    agent = Agent(work)
    # One store per encryption setting: a store records its system in an object written with
    # the store's key (system-identifier.pgpilot), which an agent without that key cannot read.
    def store_of(enc):
        return work.path("store-enc" if enc else "store")

    def s3_prefix(enc):
        return "p3-pgpilot-enc" if enc else "p3-pgpilot"

    def s3_store_of(enc):  # where s3s-fs keeps the objects
        return work.path("s3", S3_BUCKET, s3_prefix(enc))

    agent.configure(f"file://{store_of(True)}", encrypt=True)
    agent.start()
    meta = base_meta(reps, {})
    pgbr = {}
    for enc in (False, True):
        pgbr[enc] = PgBackRest(work, agent, "enc" if enc else "plain", enc,
                               {"process-max": "2", "repo1-retention-full": "1"})
        pgbr[enc].stanza_create()
        if tls:
            pgbr[("s3", enc)] = PgBackRest(work, agent, "s3-enc" if enc else "s3-plain", enc,
                                           {"process-max": "2", "repo1-retention-full": "1"}, tls=tls)
            pgbr[("s3", enc)].stanza_create()
    env = agent.pgenv()

    def agent_backup():
        out = sh([AGENT, "backup", "--api-url", f"http://127.0.0.1:{agent.lo}",
                  "--token-file", os.path.join(agent.dir, "token"), "--label", "bench"],
                 env={**os.environ, "PGPILOT_LOG": "warn"})
        return out

    def newest_backup(repo):
        """Bytes of the newest backup in a pgBackRest repo (retention-full=1 expired the one before)."""
        top = os.path.join(repo, "backup", "bench")
        names = sorted(n for n in os.listdir(top) if re.fullmatch(r"\d{8}-\d{6}F", n))
        return tree_bytes(os.path.join(top, names[-1]))

    def measure(tool, dataset, enc, db_bytes):
        """One backup; returns a result row."""
        ch0 = os.times()
        pg0 = pg_cpu(agent)
        a_cpu0, _, _ = agent.proc_stat()
        top = s3_store_of(enc) if tool == "pgpilot S3" else store_of(enc)
        if tool.startswith("pgpilot"):
            clear_hwm(agent.proc.pid)
            size0 = tree_bytes(top, skip="wal")
        t0 = time.perf_counter()
        if tool.startswith("pgpilot"):
            agent_backup()
        elif tool.startswith("pgBackRest"):
            b = pgbr[("s3", enc) if tool == "pgBackRest S3" else enc]
            peer_rss = run_sampled(b.cmd("--type=full", "backup"), env=b.env())
        elif tool == "pg_basebackup":
            dst = work.path("pgbb")
            peer_rss = run_sampled([f"{PGBIN}/pg_basebackup", "-h", agent.socket_dir, "-p", str(agent.pg_port), "-U", "postgres",
                "-D", dst, "-Ft", "--compress=server-zstd:1", "-X", "none", "-c", "fast", "--no-sync"], env=env)
        elif tool == "barman-cloud":
            peer_rss = run_sampled(barman_cmd("barman-cloud-backup", s3, "--immediate-checkpoint", "--lz4", "-J", "2",
                          "-h", agent.socket_dir, "-p", str(agent.pg_port), "-U", "postgres",
                          "s3://bench/barman", "bench"), env={**barman_env(), "PGPASSWORD": agent.password()})
        wall = time.perf_counter() - t0
        ch1 = os.times()
        tool_cpu = (ch1.children_user - ch0.children_user) + (ch1.children_system - ch0.children_system)
        pg_s = pg_cpu(agent) - pg0
        a_cpu1, a_hwm, _ = agent.proc_stat()
        if tool.startswith("pgpilot"):
            tool_cpu += a_cpu1 - a_cpu0
            rss = a_hwm
            stored = tree_bytes(top, skip="wal") - size0
            drop_backups(top)
        else:
            rss = peer_rss
        if tool.startswith("pgBackRest"):
            stored = newest_backup(b.repo)
        elif tool == "pg_basebackup":
            stored = tree_bytes(work.path("pgbb"))
            shutil.rmtree(work.path("pgbb"))
        elif tool == "barman-cloud":
            top = work.path("s3", "bench", "barman", "bench", "base")
            stored = tree_bytes(top)
            shutil.rmtree(top)
        return {"wall": wall, "mbps": db_bytes / 1e6 / wall, "stored": stored, "cpu": tool_cpu + pg_s,
                "tool_cpu": tool_cpu, "pg_cpu": pg_s, "rss_kib": rss}

    tools = [("pgpilot", False), ("pgpilot", True), ("pgBackRest", False), ("pgBackRest", True),
             ("pg_basebackup", False)]
    if tls:
        tools += [("pgpilot S3", False), ("pgpilot S3", True), ("pgBackRest S3", False), ("pgBackRest S3", True),
                  ("barman-cloud", False)]
    label = {("pgpilot", False): "pgpilot backup, zstd-1", ("pgpilot", True): "pgpilot backup, zstd-1 + AES-256-GCM",
             ("pgBackRest", False): "pgBackRest backup, zst-1, process-max 2",
             ("pgBackRest", True): "pgBackRest backup, zst-1 + aes-256-cbc, process-max 2",
             ("pg_basebackup", False): "pg_basebackup --compress=server-zstd:1 -Ft",
             ("pgpilot S3", False): "pgpilot backup, zstd-1, S3",
             ("pgpilot S3", True): "pgpilot backup, zstd-1 + AES-256-GCM, S3",
             ("pgBackRest S3", False): "pgBackRest backup, zst-1, process-max 2, S3",
             ("pgBackRest S3", True): "pgBackRest backup, zst-1 + aes-256-cbc, process-max 2, S3",
             ("barman-cloud", False): "barman-cloud-backup --lz4 -J 2, S3"}
    # the pgpilot row each peer is compared with: same store, same encryption setting
    ours = {"pgBackRest": "pgpilot", "pg_basebackup": "pgpilot", "pgBackRest S3": "pgpilot S3",
            "barman-cloud": "pgpilot S3"}
    results = {}
    datasets = []

    def run_dataset(name):
        agent.psql("CHECKPOINT")
        db_bytes = tree_bytes(agent.pgdata, skip="pg_wal")
        datasets.append(f"{name}: data dir {db_bytes / 1e9:.2f} GB without pg_wal")
        log(f"==> P3 {name}: data dir {db_bytes / 1e9:.2f} GB, {reps} rounds of {len(tools)} tools")
        # pgpilot switches between plain and encrypted by restarting with the other config
        for r in range(reps):
            order = tools if r % 2 == 0 else list(reversed(tools))
            for tool, enc in order:
                if tool.startswith("pgpilot"):
                    agent.stop()
                    if tool == "pgpilot S3":
                        agent.configure(f"s3://{S3_BUCKET}/{s3_prefix(enc)}", encrypt=enc,
                                        extra_backup=s3_backup_lines(agent, s3))
                    else:
                        agent.configure(f"file://{store_of(enc)}", encrypt=enc)
                    agent.start()
                row = measure(tool, name, enc, db_bytes)
                log(f"    {label[(tool, enc)]}: {row['wall']:.1f} s, {row['mbps']:.0f} MB/s, "
                    f"stored {row['stored'] / 1e6:.0f} MB, CPU {row['cpu']:.1f} s")
                results.setdefault((name, tool, enc), []).append(row)

    log(f"==> P3: pgbench -i -s {scale}")
    sh([f"{PGBIN}/pgbench", "-i", "-s", str(scale), "-q"], env=env)
    run_dataset("pgbench")
    pgbench_bytes = tree_bytes(agent.pgdata, skip="pg_wal")
    log("==> P3: random text database of similar size (base64 of random bytes)")
    agent.psql("DROP TABLE pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers")
    agent.psql("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    agent.psql("CREATE TABLE rtext (id bigint, body text)")
    rows_wanted = int(pgbench_bytes / 1170)
    batch = 200_000
    for start in range(0, rows_wanted, batch):
        n = min(batch, rows_wanted - start)
        agent.psql(f"INSERT INTO rtext SELECT g, encode(gen_random_bytes(768), 'base64') "
                   f"FROM generate_series({start}, {start + n - 1}) g")
    agent.psql("VACUUM rtext")
    run_dataset("random text")
    agent.stop()

    rows = []
    for name in ("pgbench", "random text"):
        for tool, enc in tools:
            rs = results[(name, tool, enc)]
            mb = [r["mbps"] for r in rs]
            rss = [r["rss_kib"] for r in rs if r["rss_kib"]]
            row = {"dataset": name, "tool": label[(tool, enc)], "n": len(rs),
                   "mbps_min": min(mb), "mbps_p50": statistics.median(mb), "mbps_max": max(mb),
                   "stored_mb": statistics.median(r["stored"] for r in rs) / 1e6,
                   "cpu_s": statistics.median(r["cpu"] for r in rs),
                   "tool_cpu_s": statistics.median(r["tool_cpu"] for r in rs),
                   "pg_cpu_s": statistics.median(r["pg_cpu"] for r in rs),
                   "rss_mib": max(rss) / 1024 if rss else None}
            if tool in ours:
                mine = statistics.median(r["mbps"] for r in results[(name, ours[tool], enc)])
                row["speed_ratio"] = mine / row["mbps_p50"]
            rows.append(row)
    meta["load_after"] = loadavg()
    meta["settings"] = {
        "datasets": "; ".join(datasets) + f" (pgbench -i -s {scale}; then the pgbench tables dropped and "
                    "a table of 1,024-character base64 text of random bytes loaded to the same size)",
        "pgpilot": "release build, `pgpilot-agent backup` through the running agent, file:// store on the same "
                   "disk, [backup] compression=zstd zstd_level=1, default upload_concurrency (4); encrypted row: "
                   "AES-256-GCM (32-byte key file); SHA-256 of every file always",
        "pgBackRest": "backup --type=full, repo1-type=posix on the same disk, process-max=2, compress-type=zst "
                      "compress-level=1, start-fast=y, archive-check=n; encrypted row: repo1-cipher-type=aes-256-cbc",
        "S3 rows": "the same s3s-fs on 127.0.0.1 for every tool; pgpilot and barman-cloud over http, pgBackRest "
                   "through stunnel (https with a self-signed certificate: its S3 client speaks nothing else)",
        "pg_basebackup": "-Ft --compress=server-zstd:1 -X none -c fast --no-sync (compression in the walsender)",
        "barman-cloud": "barman-cloud-backup --immediate-checkpoint --lz4 -J 2 to s3s-fs on 127.0.0.1 "
                        "(no zstd option in barman-cloud-backup 3.19; lz4 is its fastest codec)",
        "measured": "MB/s = data-dir bytes (without pg_wal) / wall seconds of the command; CPU = the tool's "
                    "processes (for pgpilot: the agent) + the whole Postgres cluster during the backup; "
                    "peak RSS = VmHWM of the agent (reset before each backup; its Postgres not included) or, for a "
                    "peer, the peak of the summed RSS of the tool's process tree sampled every 50 ms (the "
                    "walsender doing pg_basebackup's server-side compression not included)",
    }
    write_report("p3", "P3: base backup (MB/s of data dir, stored size, CPU, peak RSS)", meta,
                 [("dataset", "dataset", 0), ("tool", "tool", 0), ("n", "n", 0), ("mbps_min", "MB/s min", 0),
                  ("mbps_p50", "MB/s median", 0), ("mbps_max", "MB/s max", 0), ("stored_mb", "stored MB", 0),
                  ("cpu_s", "CPU s (tool + PG)", 1), ("rss_mib", "peak RSS MiB", 0),
                  ("speed_ratio", "pgpilot/peer speed", 2)],
                 rows, ["pgpilot/peer speed > 1: pgpilot faster (against the pgpilot row with the same store and "
                        "encryption setting; pg_basebackup against pgpilot unencrypted on the local dir, barman-cloud "
                        "against pgpilot unencrypted on S3).",
                        "Targets (issue 4): faster than pg_basebackup server-zstd:1 while encrypting, and ≥ 2× pgBackRest."])
    return rows



# ---------------------------------------------------------------- P6: agent memory

def p6():
    reps = int(os.environ.get("PGPILOT_BENCH_REPS", "1" if QUICK else "2"))
    scale = int(os.environ.get("PGPILOT_BENCH_SCALE", "20" if QUICK else "100"))
    n = int(os.environ.get("PGPILOT_BENCH_BACKLOG", "50" if QUICK else "200"))
    work = Work("p6")
    try:
        return _p6(work, reps, scale, n)
    finally:
        work.close()


def _p6(work, reps, scale, n):
    """The agent's RSS idle, then at full parallel upload: a base backup and the drain of a WAL
    backlog, at the default concurrency (4) and at 16."""
    agent = Agent(work)
    store = work.path("store")
    params = '[postgres.parameters]\nwal_recycle = "off"'

    def configure(conc, where=None):
        agent.configure(f"file://{where or store}", encrypt=True,
                        extra=f"{params}\n[archive]\npush_concurrency = {conc}",
                        extra_backup=f"upload_concurrency = {conc}")

    os.makedirs(store)
    configure(4)
    agent.start()
    meta = base_meta(reps, {})
    idle_wait = 10 if QUICK else 60
    samples = {}

    def rss_now():
        return agent.proc_stat()[2]

    after_s = (1, 5, 10)

    def after_series(t_end):
        """The agent's VmRSS 1, 5 and 10 s after the work ended (at t_end, time.monotonic())."""
        out = []
        for s in after_s:
            time.sleep(max(0.0, t_end + s - time.monotonic()))
            out.append(rss_now())
        return out

    time.sleep(5)
    samples["idle, 5 s after start"] = [rss_now()]
    time.sleep(idle_wait - 5)
    samples[f"idle, {idle_wait} s after start"] = [rss_now()]
    log(f"==> P6 idle: {samples}")
    speeds = {}  # state -> MB/s of the work (10^6 bytes per second)

    def peak_during(fn):
        """VmHWM of the agent (reset first) and the peak summed RSS of the agent and its wal-push
        children, sampled every 100 ms, while fn runs; with fn's wall seconds and when it ended."""
        sampler = agent_sampler(agent)
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        t_end = time.monotonic()
        _, peak = sampler.stop()
        return max(agent.proc_stat()[1], peak), wall, t_end

    def record(what, then, peak, after, mb_s):
        """Rows `what: peak` (with the work's MB/s) and `N s after {then}` for each after sample."""
        samples.setdefault(f"{what}: peak", []).append(peak)
        speeds.setdefault(f"{what}: peak", []).append(mb_s)
        for s, rss in zip(after_s, after):
            samples.setdefault(f"{s} s after {then}", []).append(rss)

    log(f"==> P6: pgbench -i -s {scale}")
    sh([f"{PGBIN}/pgbench", "-i", "-s", str(scale), "-q"], env=agent.pgenv())
    agent.psql("CHECKPOINT")
    db_bytes = tree_bytes(agent.pgdata, skip="pg_wal")
    api = ["--api-url", f"http://127.0.0.1:{agent.lo}", "--token-file", os.path.join(agent.dir, "token")]
    for r in range(reps):
        for conc in (4, 16) if r % 2 == 0 else (16, 4):
            agent.stop()
            configure(conc)
            agent.start()
            peak, wall, t_end = peak_during(lambda: sh([AGENT, "backup", *api, "--label", "p6"],
                                                       env={**os.environ, "PGPILOT_LOG": "warn"}))
            after = after_series(t_end)
            mb_s = db_bytes / 1e6 / wall
            log(f"    backup, concurrency {conc}: {mb_s:.0f} MB/s, peak {peak / 1024:.0f} MiB, 1/5/10 s later "
                + "/".join(f"{a / 1024:.0f}" for a in after) + " MiB")
            record(f"base backup ({db_bytes / 1e9:.1f} GB), upload_concurrency {conc}",
                   f"that backup (upload_concurrency {conc})", peak, after, mb_s)
            drop_backups(store)

    # A WAL backlog written once while archiving fails, drained from a copy of it each time.
    log(f"==> P6: a backlog of {n} segments (archiving failing), then drains")
    broken = work.path("broken")
    break_file_store(broken)
    agent.stop()
    configure(4, broken)
    agent.start()
    make_backlog(agent.pgenv(), agent.pgdata, n, "nudge")
    agent.stop()
    template = work.path("template")
    backlog = ready_segments(agent.pgdata)
    os.rename(agent.pgdata, template)
    for r in range(reps):
        for conc in (4, 16) if r % 2 == 0 else (16, 4):
            where = work.path(f"wal-{r}-{conc}")
            break_file_store(where)
            configure(conc, where)
            load_tree(template, agent.pgdata, backlog)
            agent.start()
            wait_archive_failed(agent.psql)

            def drain():
                give_back_file_store(where)
                agent.psql("INSERT INTO nudge VALUES (1); SELECT pg_switch_wal()")
                wait_drained(agent.pgdata)
            peak, wall, t_end = peak_during(drain)
            after = after_series(t_end)
            agent.stop()
            shutil.rmtree(where)
            mb_s = len(backlog) * 16 * 2**20 / 1e6 / wall
            log(f"    drain of {len(backlog)} segments, push_concurrency {conc}: {mb_s:.0f} MB/s, peak "
                f"{peak / 1024:.0f} MiB, 1/5/10 s later " + "/".join(f"{a / 1024:.0f}" for a in after) + " MiB")
            record(f"draining {len(backlog)} ready segments, push_concurrency {conc} (look-ahead window {2 * conc})",
                   f"that drain (push_concurrency {conc})", peak, after, mb_s)

    rows = []
    for k, v in samples.items():
        row = {"state": k, "n": len(v), "min_mib": min(v) / 1024, "max_mib": max(v) / 1024}
        if k in speeds:
            row["min_mb_s"], row["max_mb_s"] = min(speeds[k]), max(speeds[k])
        rows.append(row)
    meta["load_after"] = loadavg()
    meta["settings"] = {
        "agent": "release build, standalone, its Postgres 15 running, file:// store on the same disk, zstd-1 + "
                 "AES-256-GCM, 1 MiB chunks",
        "measured": "idle: VmRSS of the agent process; at work (peak): the larger of the agent's VmHWM (reset "
                    "before) and the peak summed RSS of the agent and its wal-push processes sampled every 100 ms; "
                    "after the work: the agent's VmRSS 1, 5 and 10 s after the `backup` command returned / the "
                    "last .ready file went; Postgres not included",
        "work": f"`pgpilot-agent backup` of pgbench -i -s {scale}; drain of {len(backlog)} segments written by "
                "pgbench while archiving failed (as in P2); MB/s: database bytes (pg_wal excluded) / wall time of "
                "the `backup` command, 16 MiB × segments / time from giving the store back to no .ready file left "
                "(MB = 10^6 bytes)",
    }
    write_report("p6", "P6: agent memory (MiB)", meta,
                 [("state", "state", 0), ("n", "samples", 0), ("min_mib", "RSS MiB min", 0),
                  ("max_mib", "RSS MiB max", 0), ("min_mb_s", "work MB/s min", 0), ("max_mb_s", "work MB/s max", 0)],
                 rows, ["Memory at work grows with the objects in flight (upload_concurrency for a backup, the "
                        "look-ahead window of 2 × push_concurrency for WAL); each holds up to (2 × codec threads + 2) "
                        "chunks of 1 MiB (docs/archive-format.md). After the work the agent's malloc_trim thread (every 2 s, "
                        "agent/src/alloc.rs) returns the freed chunks, and the idle codec threads, which hold their "
                        "stacks and cached zstd contexts, exit 3 s after their last task."])
    return rows


# ---------------------------------------------------------------- report: merge the scenarios

def p6_rows(merged):
    """P6 from what P2 and P3 measured: the agent's RSS idle and at full parallel upload."""
    lines = []
    p2 = merged.get("p2")
    if p2 and p2["meta"].get("agent_idle_rss_kib"):
        lines.append(f"| idle (5 s after start, Postgres running, store configured) | "
                     f"{p2['meta']['agent_idle_rss_kib'] / 1024:,.0f} | VmRSS |")
    if p2:
        r = p2["rows"][0]
        lines.append(f"| draining the WAL backlog (P2, push_concurrency 4, look-ahead) | {r['rss_mib']:,.0f} | "
                     "VmHWM + wal-push processes |")
    p3 = merged.get("p3")
    if p3:
        for r in p3["rows"]:
            if r["tool"].startswith("pgpilot") and r.get("rss_mib"):
                lines.append(f"| base backup, {r['dataset']}, {r['tool'].split(', ', 1)[1]} (upload_concurrency 4) | "
                             f"{r['rss_mib']:,.0f} | VmHWM |")
    if not lines:
        return None
    merged["p6"] = {"rows": lines}
    return ("### P6: agent memory (MiB)\n\nFrom the P2 and P3 runs above (same machine and load).\n\n"
            "| state | RSS MiB | measure |\n|---|---|---|\n" + "\n".join(lines) + "\n")


def report():
    """target/bench/side-by-side.{md,json} from the scenario files present (P5 = codec.md)."""
    parts, merged = [], {}
    for name in ("p1", "p2", "p3", "p4", "p6"):
        path = os.path.join(OUT, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                merged[name] = json.load(f)
            with open(os.path.join(OUT, f"{name}.md")) as f:
                parts.append(f.read())
    p6 = None if "p6" in merged else p6_rows(merged)  # no P6 run: what P2 and P3 measured
    if p6:
        parts.append(p6)
    codec = os.path.join(ROOT, "target", "bench", "codec.md")
    if os.path.exists(codec):
        with open(codec) as f:
            parts.append("### P5: codec pipeline vs this machine's limit (`make bench-codec`)\n\n" + f.read())
        merged["p5"] = {"markdown": "target/bench/codec.md"}
    else:
        parts.append("### P5: codec pipeline\n\nRun `make bench-codec` (target/bench/codec.md).\n")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "side-by-side.md"), "w") as f:
        f.write("## Side-by-side benchmarks\n\n" + "\n".join(parts))
    with open(os.path.join(OUT, "side-by-side.json"), "w") as f:
        json.dump(merged, f, indent=2)
    log(f"wrote {OUT}/side-by-side.md and .json ({', '.join(merged) or 'nothing yet'})")


# ---------------------------------------------------------------- main

def main():
    global AGENT, WAL_FRONT
    if sys.argv[1:2] == ["report"]:
        return report()
    if os.geteuid() != 0:
        sys.exit("run as root (Postgres runs as the postgres user, peers read its data dir)")
    if not (os.access(AGENT, os.X_OK) and os.access(WAL_FRONT, os.X_OK)):
        sys.exit("build first: cargo build --release -p pgpilot-agent (pgpilot-agent and pgpilot-wal)")
    what = [a for a in sys.argv[1:] if not a.startswith("--")] or ["p1"]
    # Other engineers rebuild target/release in this checkout: run private copies of the
    # binaries, side by side as the build leaves them, so that the agent renders pgpilot-wal
    # into archive_command and restore_command (P2, P4) as it does in production.
    private = tempfile.mkdtemp(prefix="pgpilot-sbs-bin-", dir="/var/tmp")
    os.chmod(private, 0o755)
    for src in (AGENT, WAL_FRONT):
        shutil.copy(src, os.path.join(private, os.path.basename(src)))
        os.chmod(os.path.join(private, os.path.basename(src)), 0o755)
    AGENT = os.path.join(private, os.path.basename(AGENT))
    WAL_FRONT = os.path.join(private, os.path.basename(WAL_FRONT))
    try:
        for w in what:
            {"p1": p1, "p2": p2, "p3": p3, "p4": p4, "p6": p6}[w]()
    finally:
        shutil.rmtree(private)


if __name__ == "__main__":
    main()
