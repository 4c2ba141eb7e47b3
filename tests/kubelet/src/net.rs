//! The pod network on loopback and each pod's way to the API server.
//!
//! Linux routes all of 127.0.0.0/8 to `lo`, so a process can bind `127.0.N.M` with no setup.
//! Each kubelet leases one `/24` (`127.0.N.0`, N in 10..=250) through a lock file under
//! the system temp dir holding its pid, so concurrent tests (nextest runs each in its own
//! process) never hand out the same pod IP; a lease whose pid is gone is taken over.
//!
//! Each pod reaches the API server through its own TCP proxy on 127.0.0.1, so a test can cut
//! one pod off the API server ([`ApiFault`]) while the others and the kubelet keep talking.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One `127.0.N.0/24` held for the life of a kubelet.
pub(crate) struct Subnet {
    pub third: u8,
    lock: PathBuf,
}

impl Subnet {
    pub fn lease() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join("pgpilot-kubelet-subnets");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let start: u8 = rand::random_range(10..=250);
        for i in 0..241u16 {
            let third = (10 + (u16::from(start) - 10 + i) % 241) as u8;
            let lock = dir.join(third.to_string());
            if take_pid_lock(&lock) {
                return Ok(Self { third, lock });
            }
        }
        anyhow::bail!(
            "every 127.0.N.0/24 subnet under {} is leased",
            dir.display()
        )
    }

    pub fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, self.third, host)
    }
}

impl Drop for Subnet {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// How a pod's connection to the API server behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFault {
    /// Traffic flows.
    None,
    /// Open connections are reset and new ones closed at once: the process sees errors fast.
    Refuse,
    /// Connections stay open but nothing gets through: the process sees timeouts.
    Blackhole,
}

/// Takes the lock file `lock` for this process (it holds our pid), or takes over one whose
/// process is gone. Tests under nextest are processes, so a lock lives as long as its test.
pub fn take_pid_lock(lock: &Path) -> bool {
    let take = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(lock)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, std::process::id().to_string().as_bytes())
            })
            .is_ok()
    };
    if take() {
        return true;
    }
    let holder = std::fs::read_to_string(lock).unwrap_or_default();
    let alive = holder
        .trim()
        .parse::<u32>()
        .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
    !alive && std::fs::remove_file(lock).is_ok() && take()
}

/// A per-pod TCP proxy to the API server.
pub(crate) struct ApiProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<ApiFault>,
    task: JoinHandle<()>,
}

impl ApiProxy {
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a pod's API proxy")?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(ApiFault::None);
        let modes = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(relay(conn, upstream, modes.subscribe()));
            }
        });
        Ok(Self { addr, mode, task })
    }

    pub fn set(&self, fault: ApiFault) {
        self.mode.send_replace(fault);
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(mut conn: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<ApiFault>) {
    let now = *mode.borrow_and_update();
    match now {
        ApiFault::Refuse => return,
        // Hold the connection silently until the fault changes, then drop it.
        ApiFault::Blackhole => {
            let _ = mode.changed().await;
            return;
        }
        ApiFault::None => {}
    }
    let Ok(mut up) = TcpStream::connect(upstream).await else {
        return;
    };
    let fault = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => return,
        f = mode.wait_for(|m| *m != ApiFault::None) => f.map(|f| *f).unwrap_or(ApiFault::Refuse),
    };
    drop(up);
    if fault == ApiFault::Blackhole {
        let _ = mode.wait_for(|m| *m != ApiFault::Blackhole).await;
    }
    let _ = conn.shutdown().await;
}
