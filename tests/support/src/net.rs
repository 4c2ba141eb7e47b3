//! Free ports on 127.0.0.1 and waiting for a server to listen.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A port that was free on 127.0.0.1 a moment ago, and never handed out before by this process
/// (so the agents of one cluster fixture never share one). The kernel hands out ephemeral ports
/// round-robin, so a just-released one is not reused soon by another process's bind(0) either.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        if given.insert(port) {
            return port;
        }
    }
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
