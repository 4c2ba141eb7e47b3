//! What the kubelet applies to a container's process between fork and exec, when it runs as
//! root: the pod's cgroup (see `peers.rs`), a read-only root filesystem
//! (`securityContext.readOnlyRootFilesystem`) and the container's user.
//!
//! The read-only root is real, not assumed: the process gets a mount namespace of its own in
//! which every host mount but `/proc`, `/sys` and `/dev` (so `/dev/shm` stays writable, as in
//! a pod) is remounted read-only, after the container's volume directories were bind-mounted
//! onto themselves so they stay writable. A write anywhere else fails with `EROFS`, as it does
//! in a container whose image is read-only. The kubelet's other containers and the host keep
//! their view.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};

/// Prepared in the kubelet, applied in the child: everything is allocated before the fork.
#[derive(Debug, Clone, Default)]
pub(crate) struct Isolation {
    /// `Some`: read-only root; the directories that stay writable.
    read_only: Option<ReadOnly>,
    user: Option<(u32, u32)>,
    /// The pod cgroup's `cgroup.procs`, which the process joins.
    cgroup: Option<CString>,
}

#[derive(Debug, Clone)]
struct ReadOnly {
    writable: Vec<CString>,
    /// The host's mount points to remount read-only, `/` first.
    mounts: Vec<CString>,
}

impl Isolation {
    /// `writable`: the host directories of the container's volumes. A read-only root needs
    /// root (mount namespaces); without it the container runs with the host's view, which
    /// [`Isolation::enforced`] reports.
    pub fn new(
        read_only_root: bool,
        writable: &[PathBuf],
        user: Option<(u32, u32)>,
        cgroup: Option<&Path>,
    ) -> Self {
        let root = nix::unistd::geteuid().is_root();
        let read_only = (read_only_root && root).then(|| ReadOnly {
            writable: writable.iter().filter_map(|p| c_path(p)).collect(),
            mounts: host_mounts().iter().filter_map(|p| c_path(p)).collect(),
        });
        Self {
            read_only,
            user,
            cgroup: cgroup.and_then(c_path),
        }
    }

    /// Whether anything is applied in the child.
    pub fn is_empty(&self) -> bool {
        self.read_only.is_none() && self.user.is_none() && self.cgroup.is_none()
    }

    /// Whether the root filesystem is really read-only for the process.
    pub fn enforced(&self) -> bool {
        self.read_only.is_some()
    }

    /// Runs in the child between fork and exec: only system calls, no allocation.
    pub fn apply(&self) -> std::io::Result<()> {
        if let Some(procs) = &self.cgroup {
            // "0" moves the writing process; its children are born in the cgroup.
            let fd = nix::fcntl::open(
                procs.as_c_str(),
                nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )?;
            nix::unistd::write(&fd, b"0")?;
        }
        if let Some(ro) = &self.read_only {
            unshare(CloneFlags::CLONE_NEWNS)?;
            // Nothing done here propagates back to the host.
            mount(
                None::<&std::ffi::CStr>,
                c"/",
                None::<&std::ffi::CStr>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&std::ffi::CStr>,
            )?;
            for dir in &ro.writable {
                mount(
                    Some(dir.as_c_str()),
                    dir.as_c_str(),
                    None::<&std::ffi::CStr>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&std::ffi::CStr>,
                )?;
            }
            for (i, m) in ro.mounts.iter().enumerate() {
                let done = mount(
                    None::<&std::ffi::CStr>,
                    m.as_c_str(),
                    None::<&std::ffi::CStr>,
                    MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                    None::<&std::ffi::CStr>,
                );
                // `/` must be read-only; another mount that refuses (a locked one) stays as is.
                if i == 0 {
                    done?;
                }
            }
        }
        if let Some((uid, gid)) = self.user {
            setgroups(&[])?;
            setgid(Gid::from_raw(gid))?;
            setuid(Uid::from_raw(uid))?;
        }
        Ok(())
    }
}

fn c_path(p: &Path) -> Option<CString> {
    CString::new(p.as_os_str().as_bytes()).ok()
}

/// The host's mount points but `/proc`, `/sys`, `/dev` and below, `/` first.
fn host_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = vec![PathBuf::from("/")];
    for line in text.lines() {
        // id parent major:minor root mount-point options ...
        let Some(mp) = line.split(' ').nth(4) else {
            continue;
        };
        let mp = unescape(mp);
        let special = ["/proc", "/sys", "/dev"]
            .iter()
            .any(|s| mp == Path::new(s) || mp.starts_with(s));
        if !special && mp != Path::new("/") && !out.contains(&mp) {
            out.push(mp);
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped_and_root_comes_first() {
        assert_eq!(unescape(r"/a\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape(r"/plain"), PathBuf::from("/plain"));
        let m = host_mounts();
        assert_eq!(m[0], PathBuf::from("/"));
        assert!(!m.iter().any(|p| p.starts_with("/proc")));
    }
}
