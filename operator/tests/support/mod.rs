//! What the operator's end-to-end test binaries share.

use std::path::PathBuf;

/// Test logs through the test writer, filtered by `PGPILOT_LOG` (default `warn`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGPILOT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A binary of this workspace's build, next to this test's own directory (the agent, which
/// this package's tests do not build themselves: `make test` builds it first).
pub fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p pgpilot-agent; make test does)",
        bin.display()
    );
    bin
}
