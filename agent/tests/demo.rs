//! `make demo` keeps working: run scripts/demo.sh (backup → DROP TABLE → restore to the noted
//! time) against the built agent on free ports in a temp dir.

use std::process::Command;

use pgpilot_test_support::net::free_port;

#[test]
fn make_demo_restores_the_dropped_table() {
    let dir = pgpilot_test_support::postgres::temp_dir().unwrap();
    let root = pgpilot_test_support::tools::workspace_root();
    let out = Command::new(root.join("scripts/demo.sh"))
        .env("BIN", env!("CARGO_BIN_EXE_pgpilot-agent"))
        .env("DATA_DIR", dir.path())
        .env("DEMO_PGPORT", free_port().to_string())
        .env("DEMO_API_PORT", free_port().to_string())
        .env("DEMO_LOOPBACK_PORT", free_port().to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(dir.path().join("demo/agent.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{stdout}\n{}\n--- agent log ---\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.contains("PASS") && last.contains("15000 rows"),
        "{stdout}"
    );
}
