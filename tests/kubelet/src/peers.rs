//! Cutting a pod off its peers: per-pod cgroups and iptables rules that match them.
//!
//! Every pod shares the host's network namespace, and a connection to another pod's IP leaves
//! from 127.0.0.1 whoever makes it, so addresses cannot tell one pod's traffic from another's
//! (or from the test's). What does tell them apart is the process: each pod's processes run in a
//! cgroup v2 of their own (`<cgroup2 mount>/pgpilot-kubelet-<N>/<pod uid>`, joined between fork
//! and exec, inherited by everything they start: Postgres, its backends, `pg_basebackup`), and
//! netfilter's `cgroup` match (`-m cgroup --path`, which also matches descendants) filters the
//! packets their sockets send. A cut pod gets three rules in the kubelet's own chain (jumped to
//! from `OUTPUT`):
//!
//! 1. from the pod's cgroup to its own IP: let through (its agent talks to its Postgres);
//! 2. from the pod's cgroup to the kubelet's `/24`: refused or dropped (the pod cannot reach a
//!    peer);
//! 3. from any pod's cgroup (the kubelet's, matching every pod below it) to the pod's IP:
//!    refused or dropped (no peer reaches it).
//!
//! The test itself, the kubelet (probes) and the API server are in no pod's cgroup, so they
//! still reach the pod, and the pod still reaches the API server through its proxy on
//! 127.0.0.1. A per-pod proxy would have needed every peer connection to go through it (other
//! ports, rewritten addresses), which the agent's conninfo and Postgres' `hostaddr` would show.
//!
//! Needs root, a cgroup v2 hierarchy (unified or hybrid) and `iptables` with the `cgroup` match
//! (`scripts/install-test-deps.sh` installs it). Without them pods run as before and
//! [`crate::Kubelet::set_peer_fault`] says what is missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// How a pod's connections with the other pods behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerFault {
    /// Traffic flows.
    None,
    /// Every packet between the pod and its peers is answered with a TCP reset: connections
    /// fail at once.
    Refuse,
    /// Every packet between the pod and its peers is dropped: connections hang and time out,
    /// as in a network partition.
    Blackhole,
}

/// The kubelet's cgroup and iptables chain.
pub(crate) struct PeerFirewall {
    /// The kubelet's cgroup directory, and its path under the cgroup v2 root.
    dir: PathBuf,
    rel: String,
    chain: String,
    subnet: String,
    /// The rules in force for each cut pod (by uid).
    cuts: Mutex<HashMap<String, Vec<Vec<String>>>>,
}

impl PeerFirewall {
    /// Sets up the cgroup and the chain for the kubelet that leased `127.0.<third>.0/24`, or
    /// says why it cannot.
    pub fn new(third: u8) -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("the kubelet does not run as root".into());
        }
        let mount = cgroup2_mount().ok_or("no cgroup v2 hierarchy is mounted")?;
        let rel = format!("pgpilot-kubelet-{third}");
        let dir = mount.join(&rel);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // Pods' cgroups left by a kubelet that died with this subnet (empty once their
        // processes are gone).
        for stale in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if stale.path().is_dir() {
                let _ = std::fs::remove_dir(stale.path());
            }
        }
        let chain = format!("PGPILOT-KUBELET-{third}");
        // A chain left by a kubelet that died with this subnet is emptied and reused.
        if iptables(&["-N", &chain]).is_err() {
            iptables(&["-F", &chain])?;
        }
        if iptables(&["-C", "OUTPUT", "-j", &chain]).is_err() {
            iptables(&["-I", "OUTPUT", "-j", &chain])?;
        }
        Ok(Self {
            dir,
            rel,
            chain,
            subnet: format!("127.0.{third}.0/24"),
            cuts: Mutex::new(HashMap::new()),
        })
    }

    /// Creates the pod's cgroup; its `cgroup.procs`, which the pod's processes join.
    pub fn add_pod(&self, uid: &str) -> std::io::Result<PathBuf> {
        let dir = self.dir.join(uid);
        std::fs::create_dir_all(&dir)?;
        Ok(dir.join("cgroup.procs"))
    }

    /// Lifts the pod's cut and removes its cgroup (once its processes are gone).
    pub fn remove_pod(&self, uid: &str) {
        let _ = self.set(uid, std::net::Ipv4Addr::UNSPECIFIED, PeerFault::None);
        let _ = std::fs::remove_dir(self.dir.join(uid));
    }

    /// Applies `fault` to the pod with `uid` and `ip`, replacing the one in force.
    pub fn set(&self, uid: &str, ip: std::net::Ipv4Addr, fault: PeerFault) -> Result<(), String> {
        let mut cuts = self.cuts.lock().unwrap_or_else(|p| p.into_inner());
        for rule in cuts.remove(uid).unwrap_or_default() {
            self.rule("-D", &rule)?;
        }
        let target: &[&str] = match fault {
            PeerFault::None => return Ok(()),
            PeerFault::Refuse => &["REJECT", "--reject-with", "tcp-reset"],
            PeerFault::Blackhole => &["DROP"],
        };
        let pod = format!("{}/{uid}", self.rel);
        let own = format!("{ip}/32");
        let rule = |path: &str, dest: &str, target: &[&str]| -> Vec<String> {
            let mut r: Vec<String> = [
                "-p", "tcp", "-m", "cgroup", "--path", path, "-d", dest, "-j",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            r.extend(target.iter().map(|s| s.to_string()));
            r
        };
        let rules = vec![
            rule(&pod, &own, &["RETURN"]),
            rule(&pod, &self.subnet, target),
            rule(&self.rel, &own, target),
        ];
        let mut added: Vec<Vec<String>> = Vec::new();
        for r in rules {
            if let Err(e) = self.rule("-A", &r) {
                // Leave nothing half applied.
                for done in &added {
                    let _ = self.rule("-D", done);
                }
                return Err(e);
            }
            added.push(r);
        }
        cuts.insert(uid.to_string(), added);
        Ok(())
    }

    /// `iptables <op> <chain> <rule...>`: appends (`-A`) or deletes (`-D`) a rule.
    fn rule(&self, op: &str, rule: &[String]) -> Result<(), String> {
        let mut args = vec![op, self.chain.as_str()];
        args.extend(rule.iter().map(String::as_str));
        iptables(&args)
    }
}

impl Drop for PeerFirewall {
    fn drop(&mut self) {
        let _ = iptables(&["-D", "OUTPUT", "-j", &self.chain]);
        let _ = iptables(&["-F", &self.chain]);
        let _ = iptables(&["-X", &self.chain]);
        for pod in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if pod.path().is_dir() {
                let _ = std::fs::remove_dir(pod.path());
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Runs `iptables -w` with `args`; its stderr when it fails.
fn iptables(args: &[&str]) -> Result<(), String> {
    // root's PATH has /usr/sbin on Debian, but a CI runner's may not.
    let bin = ["/usr/sbin/iptables", "/sbin/iptables"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("iptables");
    let out = Command::new(bin)
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| format!("running iptables (apt-get install iptables): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` (unified) or
/// `/sys/fs/cgroup/unified` (hybrid), from `/proc/self/mountinfo`.
fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        // id parent major:minor root mount-point options [optional...] - fstype source ...
        let (head, tail) = line.split_once(" - ")?;
        let mut fields = head.split(' ');
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        if tail.split(' ').next()? == "cgroup2" && root == "/" {
            Some(Path::new(mount_point).to_path_buf())
        } else {
            None
        }
    })
}
