#!/usr/bin/env python3
"""P7: write unavailability of a planned switchover, pgpilot side by side with Patroni.

    python3 benches/switchover.py --peer patroni|pgpilot [--agent-bin PATH] [--switchovers N]
    python3 benches/switchover.py --both --agent-bin PATH          patroni, then pgpilot, one table
    python3 benches/switchover.py --peer patroni --failover [--trials N]   P8, unplanned (see below)

Run as root (Postgres, and Patroni, run as the `postgres` OS user). Each peer gets a 3-node
cluster of PostgreSQL 15 on free 127.0.0.1 ports in a temp dir under /var/tmp:

    patroni  etcd (Debian etcd-server) + 3 Patroni nodes (PyPI, venv made by install-peers.sh),
             Patroni's own defaults (ttl 30, loop_wait 10, retry_timeout 10), etcd3 API
    pgpilot  3 agents (`AGENT run --config FILE`): n1 initdb's and is primary, n2 and n3 clone it

The same client measures both. A writer thread discovers the primary by polling `GET /primary`
on every node's REST API (200 on the primary, 503 elsewhere; Patroni's API answers it too),
connects (autocommit, short connect timeout) and runs `INSERT INTO p7(id) VALUES (n)` every
--interval-ms; on any error it rediscovers and reconnects. It keeps the time and id of every
acknowledged commit. pgbench (-c 2, unthrottled unless --pgbench-rate) runs against the current
primary for the whole run and is restarted on the new primary after each switchover.

The unavailability of one switchover is the time from the last acknowledged commit before the
first failed write to the next acknowledged commit (an "outage"). Outages are attributed to the
switchover whose window (trigger .. first commit after the cluster is healthy again) they touch;
a window with more than one outage counts their sum, and a stall without a failed write longer
than --stall-ms counts as an outage too (a write that hangs is unavailability as well). The
cluster is healthy when the target answers /primary 200 and the other two /replica 200. At the
end every acknowledged id must be on the final primary: a missing one is a LOST COMMIT (exit 1).

Targets rotate: from the primary to the next node in n1 → n2 → n3 → n1 order.
Output: one line per switchover, then n/p50/p99/max, and a line `P7 {json}` per peer;
target/bench/p7.{md,json} hold the table (--both: side by side with the ratio pgpilot/Patroni).
Python 3 stdlib + psycopg2 (re-executes itself under the Patroni venv's python when needed).

P8 for Patroni, an unplanned failover (--failover, with --peer patroni only): the Patroni side of
P8 (`make bench-failover`, agent/tests/kubernetes.rs::failover_trials), make-free:

    python3 benches/switchover.py --peer patroni --failover --trials 10

Same cluster, writer and pgbench as above. Each trial finds the primary, freezes the whole node
(SIGSTOP to its Patroni, to its postmaster, read from the data dir's postmaster.pid, then to every
descendant of either, found by /proc/*/stat parent links and rescanned until none is left
running: a hung node, which neither renews its leader key nor answers), and
times from the freeze to the writer's first acknowledged commit on another node. Then it thaws
(SIGCONT) the old primary and waits until the cluster is healthy again as above (the new primary
answers /primary, the others /replica and stream from it) and the writer commits, before the
next trial. A frozen server keeps its TCP connections open, so in this mode the writer fails an
INSERT that has not answered after --client-timeout s (it shuts its socket down) and rediscovers.
Replication is asynchronous (Patroni's default): an unplanned failover may lose the last commits,
so the acknowledged ids missing on the final primary are reported as a count (lost_commits), not
a failure. Output: one line per trial, then `P8 {json}` (n, p50, p99, min, max in seconds;
percentiles by nearest rank, as failover_trials' summary); target/bench/p8-patroni.{md,json}.
"""
import argparse
import bisect
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import free_port, log, tail  # noqa: E402  (shared with the P1-P6 harness)

PATRONI_VENV = os.environ.get("PATRONI_VENV", "/opt/pgpilot-bench/patroni-venv")

try:
    import psycopg2
except ImportError:  # the system python has no psycopg2: the venv's python has (install-peers.sh)
    venv_python = os.path.join(PATRONI_VENV, "bin", "python")
    if os.access(venv_python, os.X_OK) and os.path.realpath(sys.executable) != os.path.realpath(venv_python):
        os.execv(venv_python, [venv_python, os.path.abspath(__file__)] + sys.argv[1:])
    sys.exit(f"psycopg2 missing: run benches/install-peers.sh (venv {PATRONI_VENV})")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "bench")
PGBIN = "/usr/lib/postgresql/15/bin"
NAMES = ["n1", "n2", "n3"]
# As root, Postgres and Patroni run as this OS user; otherwise as ourselves.
PG_OS_USER = "postgres" if os.geteuid() == 0 else None


def now():
    return time.monotonic()


def sh(cmd, **kw):
    """Run a command, fail loudly with its output."""
    r = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}")
    return r.stdout


def first_line(cmd):
    try:
        out = subprocess.run(cmd, text=True, capture_output=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "missing"


def http(method, url, body=None, headers=None, timeout=1.0):
    """(status, parsed JSON or text); status None when nothing answered."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (OSError, ValueError):  # refused, reset, timed out
        return None, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class Stop(Exception):
    """SIGTERM / SIGHUP: unwind like Ctrl-C so that every `finally` cleans up."""


def on_signal(signum, _frame):
    raise Stop(f"signal {signum}")


# ---------------------------------------------------------------- processes we start

class Work:
    """A temp dir reachable by the postgres user, the processes started in it, and the data
    dirs whose postmaster we stop if it outlives its parent (Patroni detaches its postmaster
    with setsid, so stopping Patroni is not enough when Patroni dies badly)."""

    def __init__(self, tag, keep):
        self.dir = tempfile.mkdtemp(prefix=f"pgpilot-p7-{tag}-", dir="/var/tmp")
        os.chmod(self.dir, 0o755)
        self.keep = keep
        self.procs = []       # (Popen, name), in start order
        self.data_dirs = []

    def path(self, *p):
        return os.path.join(self.dir, *p)

    def mkdir(self, *p, owner=PG_OS_USER):
        d = self.path(*p)
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
        if owner:
            shutil.chown(d, owner, owner)
        return d

    def spawn(self, name, cmd, as_pg=False, **kw):
        """Starts cmd in its own session (Ctrl-C reaches only us; we stop it in order), output to
        <dir>/<name>.log. as_pg: run it as the Postgres OS user."""
        f = open(self.path(f"{name}.log"), "ab")
        if as_pg and PG_OS_USER:
            kw.update(user=PG_OS_USER, group=PG_OS_USER, extra_groups=[])
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, **kw)
        f.close()
        self.procs.append((p, name))
        return p

    def stop_procs(self, names=None, timeout=60):
        """SIGTERM to all of them at once (newest first), wait, SIGKILL what is left."""
        chosen = [(p, n) for p, n in reversed(self.procs) if names is None or n in names]
        for p, _ in chosen:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = now() + timeout
        for p, n in chosen:
            try:
                p.wait(max(0.1, end - now()))
            except subprocess.TimeoutExpired:
                log(f"    {n} (pid {p.pid}) ignored SIGTERM for {timeout} s: SIGKILL")
                p.kill()
                p.wait()
            self.procs.remove((p, n))

    def kill_orphan_postmasters(self):
        for d in self.data_dirs:
            try:
                with open(os.path.join(d, "postmaster.pid")) as f:
                    pid = int(f.readline())
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (OSError, ValueError):
                continue
            if b"postgres" not in cmdline:
                continue  # a stale pid file, the pid reused by something else
            log(f"    postmaster {pid} of {d} outlived its parent: SIGQUIT")
            os.kill(pid, signal.SIGQUIT)
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    def close(self):
        try:
            self.stop_procs()
        finally:
            self.kill_orphan_postmasters()
            if self.keep:
                log(f"kept {self.dir}")
            else:
                shutil.rmtree(self.dir, ignore_errors=True)


class Node:
    """One member: its Postgres port and its REST API (Patroni's, or the agent's api_listen)."""

    def __init__(self, name, work):
        self.name = name
        self.dir = work.mkdir(name)
        self.data_dir = os.path.join(self.dir, "pg")
        work.data_dirs.append(self.data_dir)
        self.pg_port = free_port()
        self.api_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.proc = None

    def answers(self, path):
        return http("GET", self.api + path, timeout=0.5)[0] == 200


def wait_for(what, check, timeout, procs=()):
    """Polls check() until it is true; fails early when one of the (Popen, log) procs exits."""
    end = now() + timeout
    while now() < end:
        if check():
            return
        for p, logfile in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: process exited {p.returncode}:\n{tail(logfile)}")
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not after {timeout} s" +
                       "".join(f"\n--- {lf}\n{tail(lf)}" for _, lf in procs))


# ---------------------------------------------------------------- freezing a node (--failover)

def proc_parents():
    """{pid: parent pid} of every process, from /proc/*/stat."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # the command name may hold spaces and parentheses: the fields follow the last ')'
        out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(roots):
    """Every live descendant of the pids `roots` (not the roots themselves)."""
    children = {}
    for pid, ppid in proc_parents().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), list(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None  # gone


def postmaster_pid(node):
    """The pid in the node's postmaster.pid, when it is a live postgres of that data dir."""
    try:
        with open(os.path.join(node.data_dir, "postmaster.pid")) as f:
            pid = int(f.readline())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    return pid if node.data_dir.encode() in cmdline.split(b"\0") else None


def freeze(node, stopped):
    """SIGSTOP the whole node: its Patroni and the Patroni's descendants, its postmaster (which
    Patroni detached with setsid: not a descendant) and the postmaster's children (each in a
    session of its own, so no process group covers them). Rescans until a scan finds nothing new
    (a backend forked while we stopped), then waits until every one of them is stopped. Appends
    each pid to `stopped` as it goes, so that the caller thaws whatever was stopped."""
    pm = postmaster_pid(node)
    if pm is None:
        raise RuntimeError(f"{node.name}: no postmaster in {node.data_dir}/postmaster.pid")
    roots = [node.proc.pid, pm]
    for pid in roots:
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
    while True:
        new = descendants(roots) - set(stopped)
        if not new:
            break
        for pid in sorted(new):
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            stopped.append(pid)
    end = now() + 5
    while True:
        running = [p for p in stopped if proc_state(p) not in (None, "T", "t", "Z", "X")]
        if not running:
            return
        if now() > end:
            raise RuntimeError(f"{node.name}: pids {running} not stopped 5 s after SIGSTOP")
        time.sleep(0.01)


def thaw(stopped):
    """SIGCONT every pid `freeze` stopped, children first."""
    for pid in reversed(stopped):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- the peers

class Patroni:
    """etcd + 3 Patroni nodes (Patroni's default timings), etcd3 API (gRPC gateway)."""
    label = "Patroni"

    def __init__(self, work):
        self.work = work
        self.password = secrets.token_hex(16)
        self.nodes = [Node(n, work) for n in NAMES]
        self.etcd_port, self.etcd_peer = free_port(), free_port()

    def versions(self):
        return {"patroni": first_line([f"{PATRONI_VENV}/bin/patroni", "--version"]),
                "etcd": first_line(["etcd", "--version"])}

    def start(self):
        w = self.work
        etcd = w.spawn("etcd", [
            "etcd", "--name", "bench", "--data-dir", w.path("etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
            "--initial-cluster", f"bench=http://127.0.0.1:{self.etcd_peer}"])
        wait_for("etcd", lambda: http("GET", f"http://127.0.0.1:{self.etcd_port}/health")[0] == 200, 30,
                 [(etcd, w.path("etcd.log"))])
        for n in self.nodes:
            self.configure(n)
        # n1 first, so that it bootstraps and leads; n2 and n3 then clone it (pg_basebackup)
        self.launch(self.nodes[0])
        wait_for("patroni n1 leads", lambda: self.nodes[0].answers("/primary"), 120,
                 [(self.nodes[0].proc, w.path("n1.log"))])
        for n in self.nodes[1:]:
            self.launch(n)
        for n in self.nodes[1:]:
            wait_for(f"patroni {n.name} streams", lambda n=n: n.answers("/replica"), 180,
                     [(n.proc, w.path(f"{n.name}.log"))])

    def configure(self, n):
        hba = ["local all all trust",
               "host all all 127.0.0.1/32 scram-sha-256",
               "host replication replicator 127.0.0.1/32 scram-sha-256"]
        conf = {  # JSON is YAML
            "scope": "bench",
            "namespace": "/pgpilot-p7/",
            "name": n.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{n.api_port}", "connect_address": f"127.0.0.1:{n.api_port}"},
            "etcd3": {"hosts": [f"127.0.0.1:{self.etcd_port}"]},
            "bootstrap": {
                # ttl, loop_wait, retry_timeout, maximum_lag_on_failover: Patroni's defaults
                "dcs": {"postgresql": {"use_pg_rewind": True, "use_slots": True,
                                       "parameters": {"wal_level": "replica", "hot_standby": "on",
                                                      "max_wal_senders": 10, "max_replication_slots": 10}}},
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{n.pg_port}",
                "connect_address": f"127.0.0.1:{n.pg_port}",
                "data_dir": n.data_dir,
                "bin_dir": PGBIN,
                "pgpass": os.path.join(n.dir, "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": self.password},
                    "replication": {"username": "replicator", "password": self.password},
                },
                "parameters": {"unix_socket_directories": n.dir},
                "pg_hba": hba,
            },
        }
        path = os.path.join(n.dir, "patroni.yml")
        with open(path, "w") as f:
            json.dump(conf, f, indent=1)
        os.chmod(path, 0o600)
        if PG_OS_USER:
            shutil.chown(path, PG_OS_USER, PG_OS_USER)

    def launch(self, n):
        n.proc = self.work.spawn(n.name, [f"{PATRONI_VENV}/bin/patroni", os.path.join(n.dir, "patroni.yml")],
                                 as_pg=True, cwd=n.dir, env={"PATH": "/usr/bin:/bin", "HOME": n.dir,
                                                             "LANG": "C.UTF-8"})

    def switchover(self, leader, candidate):
        """POST /switchover to the leader's REST API; Patroni answers after polling the DCS."""
        return http("POST", leader.api + "/switchover", {"leader": leader.name, "candidate": candidate.name},
                    timeout=120)

    def stop(self):
        # Patroni nodes first (they need etcd to let go of the leader key), etcd last
        self.work.stop_procs(NAMES, timeout=90)


class Pgpilot:
    """3 pgpilot agents: n1 initdb's and is primary, n2 and n3 clone it."""
    label = "pgpilot"

    def __init__(self, work, agent_bin):
        self.work = work
        # Others rebuild target/ in this checkout: run a private copy of the binary
        self.agent = work.path("pgpilot-agent")
        shutil.copy(agent_bin, self.agent)
        os.chmod(self.agent, 0o755)
        # what was copied: the path, its build time and the checkout, read now (not after the run)
        built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.stat(agent_bin).st_mtime))
        rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], text=True,
                             capture_output=True).stdout.strip()
        self.agent_src = f"{agent_bin}, built {built}; checkout {rev} when copied"
        self.nodes = [Node(n, work) for n in NAMES]
        self.token = secrets.token_hex(24)
        self.password = secrets.token_hex(16)
        for name, value in (("token", self.token), ("su-pass", self.password),
                            ("repl-pass", secrets.token_hex(16))):
            fd = os.open(work.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, (value + "\n").encode())
            os.close(fd)
        work.mkdir("backups")
        for n in self.nodes:
            n.lo_port = free_port()

    def versions(self):
        return {"pgpilot": f"{first_line([self.agent, '--version'])} ({self.agent_src})"}

    def configure(self, n, primary):
        w = self.work
        lines = [
            f'data_dir = "{n.data_dir}"',
            f'state_dir = "{n.dir}"',
            f'pg_bin_dir = "{PGBIN}"',
            f"postgres_port = {n.pg_port}",
            f'api_listen = "127.0.0.1:{n.api_port}"',
            f'api_loopback_listen = "127.0.0.1:{n.lo_port}"',
            f'api_token_file = "{w.path("token")}"',
            f'superuser_password_file = "{w.path("su-pass")}"',
            f'replication_password_file = "{w.path("repl-pass")}"',
            'postgres_user = "postgres"',
            "[backup]",
            f'store = "file://{w.path("backups")}"',
            "[cluster]",
            'name = "bench"',
            'shard = "0"',
            "[replication]",
            f'name = "{n.name}"',
        ]
        if primary is not None:
            lines.append(f'primary = "{primary.api}"')
        with open(os.path.join(n.dir, "pgpilot.toml"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def launch(self, n):
        n.proc = self.work.spawn(n.name, [self.agent, "run", "--config", os.path.join(n.dir, "pgpilot.toml")],
                                 cwd=n.dir, env={**os.environ, "PGPILOT_LOG": os.environ.get("PGPILOT_LOG", "info")})

    def start(self):
        w = self.work
        first = self.nodes[0]
        self.configure(first, None)
        self.launch(first)
        wait_for("pgpilot n1 is primary", lambda: first.answers("/primary"), 180, [(first.proc, w.path("n1.log"))])
        for n in self.nodes[1:]:
            self.configure(n, first)
            self.launch(n)
        for n in self.nodes[1:]:
            wait_for(f"pgpilot {n.name} streams", lambda n=n: n.answers("/replica"), 300,
                     [(n.proc, w.path(f"{n.name}.log"))])

    def switchover(self, leader, candidate):
        """POST /v1/switchover to the primary's api_listen; the agent answers when it is done."""
        return http("POST", leader.api + "/v1/switchover", {"candidate": candidate.name},
                    headers={"Authorization": f"Bearer {self.token}"}, timeout=120)

    def stop(self):
        self.work.stop_procs(NAMES, timeout=120)


# ---------------------------------------------------------------- the client: writer and pgbench

def find_primary(cluster, stop):
    """The node answering /primary 200, polling every node until one does (None when stopped)."""
    while not stop.is_set():
        for n in cluster.nodes:
            if n.answers("/primary"):
                return n
        time.sleep(0.02)
    return None


def connect(cluster, node, timeout=2):
    # libpq's connect_timeout has a floor of 2 s; on 127.0.0.1 a down server refuses at once.
    # statement_timeout: an INSERT that hangs fails after 5 s rather than never.
    return psycopg2.connect(host="127.0.0.1", port=node.pg_port, user="postgres", password=cluster.password,
                            dbname="postgres", connect_timeout=timeout, application_name="p7-writer",
                            options="-c statement_timeout=5000")


class Writer(threading.Thread):
    """INSERTs ids 1, 2, 3… autocommit every `interval` seconds into whichever node /primary names.
    client_timeout (seconds, --failover): an INSERT not answered by then fails (a watchdog shuts
    its socket down): a frozen server keeps the connection open and never answers, and its own
    statement_timeout cannot fire."""

    def __init__(self, cluster, interval, client_timeout=None):
        super().__init__(daemon=True, name="writer")
        self.cluster, self.interval, self.client_timeout = cluster, interval, client_timeout
        self.stop = threading.Event()
        self.ok = []        # (time acknowledged, id, node name)
        self.failed = []    # (time, id or None for a failed connect, error)
        self.found = []     # (time, node name): discovery answered (the writer then connects)
        self.error = None
        self.lock = threading.Lock()
        self.pending = None  # (deadline, socket fd) of the INSERT in flight, for the watchdog
        self.timeouts = 0

    def run(self):
        if self.client_timeout:
            threading.Thread(target=self.watchdog, daemon=True, name="writer-watchdog").start()
        try:
            self.loop()
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def watchdog(self):
        while not self.stop.wait(0.02):
            with self.lock:  # held by the writer to clear `pending` before it closes the fd
                if self.pending is None or now() < self.pending[0]:
                    continue
                try:
                    s = socket.socket(fileno=os.dup(self.pending[1]))
                    try:
                        s.shutdown(socket.SHUT_RDWR)  # the blocked recv in libpq sees EOF
                    finally:
                        s.close()  # the dup only
                except OSError:
                    pass
                self.pending = None
                self.timeouts += 1

    def loop(self):
        conn, n = None, 0
        while not self.stop.is_set():
            if conn is None:
                node = find_primary(self.cluster, self.stop)
                if node is None:
                    break
                self.found.append((now(), node.name))
                try:
                    conn = connect(self.cluster, node)
                    conn.autocommit = True
                    cur = conn.cursor()
                except psycopg2.Error as e:
                    self.failed.append((now(), None, str(e).strip().splitlines()[0] if str(e).strip() else repr(e)))
                    conn = None
                    time.sleep(0.01)
                    continue
            n += 1
            t0 = now()
            if self.client_timeout:
                with self.lock:
                    self.pending = (t0 + self.client_timeout, conn.fileno())
            try:
                try:
                    cur.execute("INSERT INTO p7(id) VALUES (%s)", (n,))
                    t_ack = now()
                finally:
                    if self.client_timeout:
                        with self.lock:
                            self.pending = None
                self.ok.append((t_ack, n, node.name))
            except psycopg2.Error as e:
                # the commit may or may not have happened: the id is neither counted nor checked
                self.failed.append((now(), n, (str(e).strip().splitlines() or [repr(e)])[0]))
                try:
                    conn.close()
                except psycopg2.Error:
                    pass
                conn = None
                continue
            delay = t0 + self.interval - now()
            if delay > 0:
                time.sleep(delay)
        if conn is not None:
            conn.close()

    def last_ok(self):
        return self.ok[-1][0] if self.ok else None


class Pgbench(threading.Thread):
    """pgbench -c 2 against the current primary; restarted on the new one when it ends (its
    clients abort when their server shuts down)."""

    def __init__(self, cluster, work, clients, rate):
        super().__init__(daemon=True, name="pgbench")
        self.cluster, self.work, self.clients, self.rate = cluster, work, clients, rate
        self.stop = threading.Event()
        self.proc = None
        self.runs = 0

    def run(self):
        logf = self.work.path("pgbench.log")
        while not self.stop.is_set():
            node = find_primary(self.cluster, self.stop)
            if node is None:
                break
            cmd = [f"{PGBIN}/pgbench", "-n", "-c", str(self.clients), "-j", "1", "-T", "86400",
                   "-h", "127.0.0.1", "-p", str(node.pg_port), "-U", "postgres", "postgres"]
            if self.rate:
                cmd += ["-R", str(self.rate)]
            with open(logf, "ab") as f:
                self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env={**os.environ, "PGPASSWORD": self.cluster.password},
                                             start_new_session=True)
            self.runs += 1
            while self.proc.poll() is None and not self.stop.is_set():
                time.sleep(0.1)
            time.sleep(0.2)  # when it ended by itself: its server went away; rediscover

    def finish(self):
        self.stop.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.join(30)


# ---------------------------------------------------------------- one run

def healthy(cluster, primary):
    """The primary answers /primary 200, the others /replica 200, and both stream from the
    primary (pg_stat_replication by application_name: Patroni's replicas answer /replica while
    their replication slot does not exist yet and they stream nothing)."""
    others = [n for n in cluster.nodes if n is not primary]
    if not (primary.answers("/primary") and all(n.answers("/replica") for n in others)):
        return False
    try:
        conn = connect(cluster, primary)
        try:
            cur = conn.cursor()
            cur.execute("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")
            streaming = {r[0] for r in cur.fetchall()}
        finally:
            conn.close()
    except psycopg2.Error:
        return False
    return all(n.name in streaming for n in others)


def outages(writer, stall):
    """[(start, end, failed writes)]: gaps between consecutive acknowledged commits that hold a
    failed write, or that are longer than `stall` seconds."""
    ok, failed = writer.ok, writer.failed
    out, j = [], 0
    for (t_prev, *_), (t_next, *_) in zip(ok, ok[1:]):
        k = 0
        while j < len(failed) and failed[j][0] < t_next:
            if failed[j][0] > t_prev:
                k += 1
            j += 1
        if k or t_next - t_prev > stall:
            out.append((t_prev, t_next, k))
    return out


def breakdown(writer, gap):
    """Where the time of one outage went, in ms after its last commit: the first failed write
    (the old primary stopped taking writes) and the last discovery of a primary (what follows
    is connect + the first commit)."""
    t_prev, t_next, _ = gap
    out = {}
    times = [f[0] for f in writer.failed]
    k = bisect.bisect_right(times, t_prev)
    if k < len(times) and times[k] < t_next:
        out["first_failure_ms"] = round((times[k] - t_prev) * 1000, 1)
    found = [f[0] for f in writer.found]
    k = bisect.bisect_left(found, t_next) - 1
    if k >= 0 and found[k] > t_prev:
        out["found_ms"] = round((found[k] - t_prev) * 1000, 1)
    return out


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def check_commits(cluster, writer):
    """(final primary, acknowledged ids, those missing on the final primary, pgbench's commits)."""
    final = find_primary(cluster, threading.Event())
    conn = connect(cluster, final)
    try:
        cur = conn.cursor()
        cur.execute("SELECT id FROM p7")
        present = {r[0] for r in cur.fetchall()}
        cur.execute("SELECT count(*) FROM pgbench_history")
        pgbench_tx = cur.fetchone()[0]
    finally:
        conn.close()
    acked = [c[1] for c in writer.ok]
    return final, acked, sorted(set(acked) - present), pgbench_tx


def run_peer(peer, args):
    work = Work(peer, args.keep)
    cluster = Patroni(work) if peer == "patroni" else Pgpilot(work, args.agent_bin)
    writer = pgbench = None
    frozen = []  # --failover: the pids of the frozen primary, thawed by the `finally` whatever happens
    try:
        log(f"==> {cluster.label}: starting 3 nodes in {work.dir}")
        t = now()
        cluster.start()
        log(f"    up in {now() - t:.1f} s: " + ", ".join(f"{n.name} pg :{n.pg_port} api :{n.api_port}"
                                                   for n in cluster.nodes))
        primary = find_primary(cluster, threading.Event())
        conn = connect(cluster, primary)
        conn.autocommit = True
        conn.cursor().execute("CREATE TABLE p7 (id bigint PRIMARY KEY)")
        conn.close()
        log(f"    pgbench -i -s {args.scale} on {primary.name}")
        sh([f"{PGBIN}/pgbench", "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p", str(primary.pg_port),
            "-U", "postgres", "postgres"], env={**os.environ, "PGPASSWORD": cluster.password})
        wait_for("replicas after pgbench -i", lambda: healthy(cluster, primary), 120)

        writer = Writer(cluster, args.interval_ms / 1000, args.client_timeout if args.failover else None)
        pgbench = Pgbench(cluster, work, 2, args.pgbench_rate)
        writer.start()
        pgbench.start()
        time.sleep(args.pause)
        load_before = loadavg()
        t_bench = now()
        if args.failover:
            return run_failovers(cluster, writer, pgbench, primary, args, frozen, load_before, t_bench)
        windows = []  # (trigger, first commit after healthy, old primary, target, answer, to healthy, requests)
        for i in range(args.switchovers):
            target = cluster.nodes[(cluster.nodes.index(primary) + 1) % len(cluster.nodes)]
            t0 = now()
            answer, attempts = None, 0
            while True:
                attempts += 1
                status, body = cluster.switchover(primary, target)
                answer = f"{status} {body}".strip()[:300]
                if status == 200:
                    break
                # Not a plain success: it may still happen (an answer that came too early or timed
                # out); when after 10 s the old primary still leads and the target does not,
                # ask again (the outages of a failed attempt count towards this switchover).
                end = now() + 10
                while now() < end and not target.answers("/primary"):
                    time.sleep(0.2)
                if target.answers("/primary") or not healthy(cluster, primary) or attempts == 5:
                    break
                log(f"    switchover {i + 1}: {answer}; again")
            try:
                wait_for(f"switchover {i + 1} {primary.name} -> {target.name}: healthy again",
                         lambda: healthy(cluster, target), args.timeout)
            except RuntimeError as e:
                raise RuntimeError(f"{e}\nlast answer to the switchover request: {answer}") from None
            t_healthy = now()
            wait_for("a commit after the switchover", lambda: (writer.last_ok() or 0) > t_healthy, args.timeout)
            if writer.error:
                raise writer.error
            windows.append((t0, writer.last_ok(), primary.name, target.name, answer, t_healthy - t0, attempts))
            primary = target
            time.sleep(args.pause)
        bench_secs = now() - t_bench
        stop_load(writer, pgbench)

        # attribute each outage to the switchover whose window it touches
        gaps = outages(writer, args.stall_ms / 1000)
        results, used = [], set()
        for i, (t0, t1, old, new, answer, to_healthy, attempts) in enumerate(windows):
            mine = [g for g in gaps if g[1] > t0 and g[0] < t1]
            used.update(mine)
            ms = sum(g[1] - g[0] for g in mine) * 1000
            phases = breakdown(writer, mine[0]) if mine else {}
            results.append({"i": i + 1, "from": old, "to": new, "ms": round(ms, 1), "outages": len(mine),
                            "failed_writes": sum(g[2] for g in mine), **phases,
                            "to_healthy_s": round(to_healthy, 2), "requests": attempts, "answer": answer})
            nfail = sum(g[2] for g in mine)
            where = "".join(f", {label} +{phases[k]:.0f}" for k, label in
                            (("first_failure_ms", "first failure"), ("found_ms", "/primary found")) if k in phases)
            log(f"    switchover {i + 1:2}: {old} -> {new}: {ms:7.0f} ms unavailable "
                f"({len(mine)} outage{'s' if len(mine) != 1 else ''}, {nfail} failed write{'s' if nfail != 1 else ''}"
                f"{where}; healthy after {to_healthy:.1f} s{f', {attempts} requests' if attempts > 1 else ''})")
        stray = [g for g in gaps if g not in used]
        for g in stray:
            log(f"    outage outside any switchover: {(g[1] - g[0]) * 1000:.0f} ms ({g[2]} failed writes)")

        # every acknowledged commit must be on the final primary
        final, acked, lost, pgbench_tx = check_commits(cluster, writer)
        if lost:
            log(f"!!!!! {cluster.label}: {len(lost)} LOST COMMITS (acknowledged, not on the final primary "
                f"{final.name}): {lost[:50]}{' …' if len(lost) > 50 else ''}")
        ms = [r["ms"] for r in results]
        summary = {
            "peer": peer, "label": cluster.label, "n": len(ms),
            "p50_ms": round(pct(ms, 50), 1) if ms else None, "p99_ms": round(pct(ms, 99), 1) if ms else None,
            "max_ms": max(ms) if ms else None, "min_ms": min(ms) if ms else None,
            "stray_outages": len(stray),
            **run_facts(cluster, writer, pgbench, pgbench_tx / bench_secs, args, load_before, acked, lost),
            "switchovers": results,
        }
        log(f"==> {cluster.label}: n={summary['n']} p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
            f"max {summary['max_ms']} ms; {len(acked)} commits acknowledged, {len(lost)} lost; "
            f"pgbench {summary['pgbench_tps']} tx/s")
        print("P7 " + json.dumps({k: v for k, v in summary.items() if k != "switchovers"}), flush=True)
        return summary
    finally:
        if frozen:
            log(f"    thawing {len(frozen)} frozen processes")
            thaw(frozen)
        if writer:
            writer.stop.set()
        if pgbench:
            pgbench.finish()
        log(f"==> {cluster.label}: stopping")
        cluster.stop()
        work.close()


def rank_pct(xs, p):
    """Nearest-rank percentile, as agent/tests/kubernetes.rs's summary() (P8's pgpilot figure)."""
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(max(int(-(-p * len(xs) // 100)), 1), len(xs)) - 1]


def run_failovers(cluster, writer, pgbench, primary, args, frozen, load_before, t_bench):
    """P8 (--failover): args.trials unplanned failovers of a frozen primary, the writer and
    pgbench running. Returns the summary (times in seconds)."""
    by_name = {n.name: n for n in cluster.nodes}
    results = []
    for i in range(args.trials):
        old = primary
        k = [len(writer.ok)]  # scan position in writer.ok, mutable for the closure

        def commit_elsewhere():
            if writer.error:
                raise writer.error
            ok = writer.ok
            while k[0] < len(ok):
                if ok[k[0]][2] != old.name and ok[k[0]][0] > t0:
                    return True
                k[0] += 1
            return False

        t0 = now()
        freeze(old, frozen)
        freeze_ms = (now() - t0) * 1000
        wait_for(f"failover {i + 1}: a commit on another node after freezing {old.name}", commit_elsewhere,
                 args.timeout)
        t_commit, _, new_name = writer.ok[k[0]]
        new = by_name[new_name]
        took = t_commit - t0
        found = next((t for t, name in writer.found if t > t0 and name == new_name), None)
        nfail = sum(1 for f in writer.failed if t0 < f[0] < t_commit)
        t_thaw = now()
        nfrozen = len(frozen)
        thaw(frozen)
        frozen.clear()
        wait_for(f"failover {i + 1}: healthy again after thawing {old.name}", lambda: healthy(cluster, new),
                 args.timeout)
        t_healthy = now()
        wait_for("a commit after the failover", lambda: (writer.last_ok() or 0) > t_healthy, args.timeout)
        if writer.error:
            raise writer.error
        results.append({"i": i + 1, "from": old.name, "to": new.name, "s": round(took, 3),
                        "primary_found_s": round(found - t0, 3) if found else None, "failed_writes": nfail,
                        "frozen_processes": nfrozen, "freeze_ms": round(freeze_ms, 1),
                        "healthy_after_thaw_s": round(t_healthy - t_thaw, 2)})
        where = f"/primary found +{found - t0:.2f} s, " if found else ""
        log(f"    failover {i + 1:2}: {old.name} frozen -> first commit on {new.name}: {took:6.2f} s "
            f"({where}{nfail} failed write{'s' if nfail != 1 else ''}, {nfrozen} processes frozen in "
            f"{freeze_ms:.0f} ms; healthy {t_healthy - t_thaw:.1f} s after the thaw)")
        primary = new
        time.sleep(args.pause)
    bench_secs = now() - t_bench
    stop_load(writer, pgbench)

    # asynchronous replication: the commits acknowledged by a primary just before it froze may
    # not have reached the new one; they are counted, not a failure
    final, acked, lost, pgbench_tx = check_commits(cluster, writer)
    if lost:
        log(f"    {len(lost)} acknowledged commits missing on the final primary {final.name} "
            f"(asynchronous replication): {lost[:20]}{' …' if len(lost) > 20 else ''}")
    secs = [r["s"] for r in results]
    summary = {
        "peer": "patroni", "label": cluster.label, "unit": "s", "n": len(secs),
        "p50": rank_pct(secs, 50), "p99": rank_pct(secs, 99), "min": min(secs), "max": max(secs),
        "client_timeouts": writer.timeouts, "client_timeout_s": args.client_timeout,
        **run_facts(cluster, writer, pgbench, pgbench_tx / bench_secs, args, load_before, acked, lost),
        "trials": results,
    }
    log(f"==> {cluster.label} failover: n={summary['n']} p50 {summary['p50']:.2f} s, p99 {summary['p99']:.2f} s, "
        f"min {summary['min']:.2f} s, max {summary['max']:.2f} s; {len(acked)} commits acknowledged, "
        f"{len(lost)} missing on the final primary")
    print("P8 " + json.dumps({k: v for k, v in summary.items() if k != "trials"}), flush=True)
    return summary


def stop_load(writer, pgbench):
    """Stops the writer and pgbench at a run's end; raises the writer's error, if any."""
    writer.stop.set()
    writer.join(30)
    pgbench.finish()
    if writer.error:
        raise writer.error


def run_facts(cluster, writer, pgbench, tps, args, load_before, acked, lost):
    """The summary fields P7 and P8 share: commits, load, versions."""
    return {
        "lost_commits": len(lost), "acknowledged_commits": len(acked), "failed_writes": len(writer.failed),
        "pgbench_tps": round(tps, 1), "pgbench_restarts": pgbench.runs - 1,
        "writer_interval_ms": args.interval_ms, "load_before": load_before, "load_after": loadavg(),
        "versions": {**cluster.versions(), "postgres": first_line([f"{PGBIN}/postgres", "--version"])},
    }


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---------------------------------------------------------------- report

def report(summaries, args):
    def f(x):
        return "n/a" if x is None else f"{x:,.0f}"

    by = {s["peer"]: s for s in summaries}
    lines = ["### P7: write unavailability of a planned switchover (ms)", ""]
    with open("/proc/cpuinfo") as fh:
        cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "?")
    lines.append(f"Machine: {os.cpu_count()} cores, {cpu}, kernel {platform.release()}; "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
                 f"{args.switchovers} switchovers per peer, 3 nodes on 127.0.0.1, PostgreSQL 15, pgbench -c 2 "
                 f"(scale {args.scale}{', -R ' + str(args.pgbench_rate) if args.pgbench_rate else ', unthrottled'}) "
                 f"running, a writer committing every {args.interval_ms} ms and rediscovering through /primary.")
    lines.append("")
    for s in summaries:
        lines.append(f"- {s['label']}: " + "; ".join(f"{k} `{v}`" for k, v in s["versions"].items()) +
                     f"; load {s['load_before']} → {s['load_after']}")
    lines.append("")
    cols = ["peer", "n", "p50", "p99", "max", "min", "lost commits", "failed writes", "pgbench tx/s"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for s in summaries:
        lines.append(f"| {s['label']} | {s['n']} | {f(s['p50_ms'])} | {f(s['p99_ms'])} | {f(s['max_ms'])} | "
                     f"{f(s['min_ms'])} | {s['lost_commits']} | {s['failed_writes']} | {f(s['pgbench_tps'])} |")
    if "patroni" in by and "pgpilot" in by:
        a, b = by["pgpilot"], by["patroni"]

        def ratio(k):
            return "n/a" if not a[k] or not b[k] else f"{a[k] / b[k]:.2f}"
        lines.append(f"| pgpilot / Patroni | | {ratio('p50_ms')} | {ratio('p99_ms')} | {ratio('max_ms')} | "
                     f"{ratio('min_ms')} | | | |")
    for peer, err in getattr(args, "failures", {}).items():
        lines.append(f"\n{peer}: FAILED: {err}")
    lines.append("")
    lines.append("Target P7 (pgpilot): p50 < 1000 ms, p99 < 2000 ms. Unavailability = last acknowledged commit "
                 "before the first failed write → next acknowledged commit, as the writer saw it.")
    md = "\n".join(lines) + "\n"
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "p7.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(OUT, "p7.json"), "w") as fh:
        json.dump({"summaries": summaries, "failures": getattr(args, "failures", {})}, fh, indent=2)
    print(md, flush=True)


def report_failover(summaries, args):
    """target/bench/p8-patroni.{md,json}: the --failover run."""
    lines = ["### P8 (Patroni): write unavailability of an unplanned failover (s)", ""]
    with open("/proc/cpuinfo") as fh:
        cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "?")
    lines.append(f"Machine: {os.cpu_count()} cores, {cpu}, kernel {platform.release()}; "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. `benches/switchover.py --peer patroni "
                 f"--failover --trials {args.trials}`: 3 Patroni nodes on 127.0.0.1, PostgreSQL 15, Patroni's "
                 f"defaults (ttl 30, loop_wait 10, retry_timeout 10, asynchronous replication). Each trial "
                 f"freezes the primary (SIGSTOP of its Patroni and all its Postgres processes) and times from "
                 f"the freeze to the first acknowledged commit on another node; pgbench -c 2 (scale {args.scale}"
                 f"{', -R ' + str(args.pgbench_rate) if args.pgbench_rate else ', unthrottled'}) running, a "
                 f"writer committing every {args.interval_ms} ms (client timeout {args.client_timeout} s) and "
                 f"rediscovering through /primary.")
    lines.append("")
    for s in summaries:
        lines.append(f"- {s['label']}: " + "; ".join(f"{k} `{v}`" for k, v in s["versions"].items()) +
                     f"; load {s['load_before']} → {s['load_after']}")
    lines.append("")
    lines.append("| peer | trials | p50 s | p99 s | min s | max s | lost commits | acknowledged |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in summaries:
        lines.append(f"| {s['label']} | {s['n']} | {s['p50']:.2f} | {s['p99']:.2f} | {s['min']:.2f} | "
                     f"{s['max']:.2f} | {s['lost_commits']} | {s['acknowledged_commits']} |")
    for peer, err in getattr(args, "failures", {}).items():
        lines.append(f"\n{peer}: FAILED: {err}")
    lines.append("")
    for s in summaries:
        for r in s["trials"]:
            lines.append(f"- trial {r['i']}: {r['from']} frozen → first commit on {r['to']}: {r['s']:.2f} s "
                         f"(/primary found +{r['primary_found_s']} s, {r['failed_writes']} failed writes; "
                         f"healthy {r['healthy_after_thaw_s']} s after the thaw)")
    lines.append("")
    lines.append("p50/p99 by nearest rank, as `failover_trials`' summary. Lost commits: acknowledged writer "
                 "commits missing on the final primary; with asynchronous replication an unplanned failover "
                 "may lose the last commits of the frozen primary: counted, not a failure.")
    md = "\n".join(lines) + "\n"
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "p8-patroni.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(OUT, "p8-patroni.json"), "w") as fh:
        json.dump({"summaries": summaries, "failures": getattr(args, "failures", {})}, fh, indent=2)
    print(md, flush=True)


def default_agent():
    for kind in ("release", "debug"):
        p = os.path.join(ROOT, "target", kind, "pgpilot-agent")
        if os.access(p, os.X_OK):
            return p
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=["patroni", "pgpilot"])
    ap.add_argument("--both", action="store_true", help="Patroni, then pgpilot, and a side-by-side table")
    ap.add_argument("--agent-bin", default=os.environ.get("AGENT_BIN") or default_agent())
    ap.add_argument("--switchovers", type=int, default=None, help="default 20 (--failover: the trials)")
    ap.add_argument("--failover", action="store_true",
                    help="P8: unplanned failovers of a frozen primary instead of switchovers (--peer patroni)")
    ap.add_argument("--trials", type=int, default=None, help="--failover: trials (default --switchovers, else 10)")
    ap.add_argument("--client-timeout", type=float, default=5,
                    help="--failover: the writer fails an INSERT unanswered after this many seconds")
    ap.add_argument("--interval-ms", type=float, default=5, help="writer: one INSERT every this many ms")
    ap.add_argument("--stall-ms", type=float, default=200,
                    help="a gap between commits this long counts as an outage even without a failed write")
    ap.add_argument("--scale", type=int, default=10, help="pgbench scale")
    ap.add_argument("--pgbench-rate", type=int, default=0, help="pgbench -R (tx/s); 0: unthrottled")
    ap.add_argument("--pause", type=float, default=3, help="seconds between healthy and the next switchover")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds for a switchover to become healthy (default 120; --failover: 300 for each "
                         "of the failover and the recovery)")
    ap.add_argument("--keep", action="store_true", default=bool(os.environ.get("PGPILOT_BENCH_KEEP")),
                    help="keep the work directory (logs, data)")
    args = ap.parse_args()
    peers = ["patroni", "pgpilot"] if args.both else [args.peer] if args.peer else None
    if not peers:
        ap.error("--peer patroni|pgpilot or --both")
    if args.failover:
        if peers != ["patroni"]:
            ap.error("--failover: with --peer patroni only (pgpilot's P8 is make bench-failover)")
        args.trials = args.trials or args.switchovers or 10
        args.timeout = args.timeout or 300
    else:
        args.switchovers = args.switchovers or 20
        args.timeout = args.timeout or 120
    if os.geteuid() != 0:
        sys.exit("run as root (Postgres and Patroni run as the postgres user)")
    if "pgpilot" in peers and not (args.agent_bin and os.access(args.agent_bin, os.X_OK)):
        ap.error("pgpilot: --agent-bin PATH (or AGENT_BIN) to a built pgpilot-agent")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    summaries, args.failures = [], {}
    for peer in peers:
        try:
            summaries.append(run_peer(peer, args))
        except Stop:
            raise
        except Exception as e:  # noqa: BLE001 - with --both the other peer still runs
            if not isinstance(e, RuntimeError):  # our own failures explain themselves; a bug does not
                traceback.print_exc()
            log(f"!!!!! {peer} FAILED: {e}")
            args.failures[peer] = str(e).splitlines()[0] if str(e) else repr(e)
    if summaries:
        (report_failover if args.failover else report)(summaries, args)
    # --failover: lost commits are expected of asynchronous replication, reported, not a failure
    if args.failures or (not args.failover and any(s["lost_commits"] for s in summaries)):
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, Stop) as e:  # everything started was stopped by the `finally`s
        log(f"interrupted ({e or 'Ctrl-C'}); cleaned up")
        sys.exit(130)
