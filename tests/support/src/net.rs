//! Free ports on 127.0.0.1 and waiting for a server to listen.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A free port on 127.0.0.1 for a server a fixture starts, and keeps across restarts.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`), never from
/// bind(0): an outgoing connection of any process may take an ephemeral port the moment a
/// stopped server let it go, and the restarted server then fails with EADDRINUSE (seen when an
/// agent respawned on its old API port while other tests ran). Below the range only other
/// fixtures compete, and they take turns through a lock file per port under the system temp dir
/// holding the owner's pid; a lock whose process is gone (every nextest test is a process) is
/// free again. Within a process a port is never handed out twice.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    let (low, high) = reserved_range();
    let span = u32::from(high - low);
    let start: u32 = rand::random_range(0..span);
    for i in 0..span {
        let port = low + ((start + i) % span) as u16;
        if given.contains(&port) || !reserve(port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port in {low}..{high} on 127.0.0.1");
}

/// `[low, high)`: the 12k ports below the ephemeral range (32768 by default on Linux).
fn reserved_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = ephemeral_low.max(2048);
    (high.saturating_sub(12288).max(1024), high)
}

/// Takes the cross-process lock of `port`, or takes over one whose owner is gone.
fn reserve(port: u16) -> bool {
    let dir = std::env::temp_dir().join("pgpilot-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    pgpilot_test_kubelet::take_pid_lock(&dir.join(port.to_string()))
}

/// `N` distinct free ports.
pub fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}

/// Waits until something accepts TCP connections on `addr`, or fails after `timeout`.
pub fn wait_for_listen(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("nothing listened on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The HTTP status a server answers to `POST path` declaring a `Content-Length` of `len` bytes,
/// of which only the first KiB is sent: a server that refuses large bodies answers before
/// reading them (and may close the connection at once, which a client still writing the body
/// would see as a broken pipe).
pub async fn status_of_declared_body(
    addr: SocketAddr,
    path: &str,
    token: &str,
    len: usize,
) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await?;
    let _ = conn.write_all(&vec![b' '; len.min(1024)]).await;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await??;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status line in {line:?}"))
}
