//! The files the agent owns in the data dir: `pgpilot.conf` (included from postgresql.conf)
//! and `pg_hba.conf`. Rendered from the configuration at every start and reload; hand edits
//! to them are overwritten, which the files' headers say.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{ArchiveExes, Config};
use crate::files::{self, sh_quote};
use crate::replication::StandbyConf;

pub use crate::files::INCLUDE_FILE;
const INCLUDE_LINE: &str =
    "include_if_exists = 'pgpilot.conf'\t# added by pgpilot-agent; keep last";

/// Quotes a value for postgresql.conf.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// The agent-managed settings, then the user's parameters, as (name, value) in file order.
pub fn settings(
    cfg: &Config,
    user: &BTreeMap<String, String>,
    standby: Option<&StandbyConf>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![
        (
            "listen_addresses".into(),
            cfg.postgres_listen_addresses.clone(),
        ),
        ("port".into(), cfg.postgres_port.to_string()),
        (
            "unix_socket_directories".into(),
            cfg.socket_dir().display().to_string(),
        ),
        (
            "hba_file".into(),
            cfg.data_dir.join("pg_hba.conf").display().to_string(),
        ),
        // Postgres logs to stderr, which the agent reads and re-emits in its own log stream.
        ("logging_collector".into(), "off".into()),
        ("log_destination".into(), "stderr".into()),
        ("log_line_prefix".into(), "%m [%p] %q%u@%d ".into()),
        ("wal_level".into(), "replica".into()),
        ("wal_log_hints".into(), "on".into()),
        ("max_wal_senders".into(), "10".into()),
        ("max_replication_slots".into(), "10".into()),
        ("hot_standby".into(), "on".into()),
        // A standby whose WAL receiver just lost its primary (a switchover's stop) sleeps this
        // long before it looks again, and a promote arriving in that sleep waits it out: at
        // the default 5 s, a switchover held writes 5.2 s in 1 of 2 tries (docs/rollouts.md).
        ("wal_retrieve_retry_interval".into(), "500ms".into()),
        ("password_encryption".into(), "scram-sha-256".into()),
    ];
    out.extend(super::tls::settings(cfg));
    if cfg.backup.is_some() {
        // wal-push and wal-fetch find the agent and the store through the runtime file; no
        // secret is on these command lines. `pgpilot-wal` (when it ships next to the agent)
        // makes the loopback call and hands over to the agent binary when the agent is down.
        let exes = cfg.archive_exes.clone().unwrap_or_else(|| ArchiveExes {
            agent: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pgpilot-agent")),
            front: None,
        });
        let agent = sh_quote(&exes.agent.display().to_string());
        let program = match &exes.front {
            Some(front) => format!("{} {agent}", sh_quote(&front.display().to_string())),
            None => agent,
        };
        let runtime = sh_quote(&files::archive_runtime(&cfg.state_dir).display().to_string());
        out.push(("archive_mode".into(), "on".into()));
        out.push((
            "archive_command".into(),
            format!("{program} wal-push --runtime {runtime} %p"),
        ));
        out.push((
            "archive_timeout".into(),
            cfg.archive.archive_timeout_secs.to_string(),
        ));
        out.push((
            "restore_command".into(),
            format!("{program} wal-fetch --runtime {runtime} %f %p"),
        ));
    }
    if let Some(standby) = standby {
        out.extend(standby.settings());
    }
    for (k, v) in user {
        // A user value for an agent default (not a reserved one) wins: replace in place.
        if let Some(slot) = out.iter_mut().find(|(name, _)| name == k) {
            slot.1 = v.clone();
        } else {
            out.push((k.clone(), v.clone()));
        }
    }
    out
}

pub fn render_pgpilot_conf(
    cfg: &Config,
    user: &BTreeMap<String, String>,
    standby: Option<&StandbyConf>,
) -> String {
    let mut s = String::from(
        "# Rendered by pgpilot-agent at every start and reload: edits here are overwritten.\n\
         # Set parameters in the agent's config file under [postgres.parameters].\n",
    );
    for (name, value) in settings(cfg, user, standby) {
        s.push_str(&format!("{name} = {}\n", quote(&value)));
    }
    // Present only while a restore recovers towards its target (restore/mod.rs).
    s.push_str(&format!(
        "include_if_exists = {}\n",
        quote(files::RECOVERY_CONF)
    ));
    s
}

/// `restoring`: a restore is replaying a backup whose catalog holds another cluster's (or an
/// older) superuser password, so the agent's own superuser may connect over the Unix socket
/// without one until the agent has set its password, once Postgres is promoted.
///
/// `replicas`: where the registered replicas connect from (their API URLs' hosts). Replication
/// connections are taken from those addresses and loopback only; a registered replica whose
/// host is a name, not an address, widens replication to `allow_networks`.
pub fn render_pg_hba(cfg: &Config, restoring: bool, replicas: &[String]) -> String {
    let mut s = String::from(
        "# Rendered by pgpilot-agent at every start and reload: edits here are overwritten.\n\
         # TYPE  DATABASE     USER             ADDRESS          METHOD\n",
    );
    let su = &cfg.superuser;
    let repl = &cfg.replication_user;
    if restoring {
        s.push_str(
            "# During a restore only: removed once the agent has set the superuser's password.\n",
        );
        s.push_str(&format!(
            "local   all          {su:<16}                  trust\n"
        ));
    }
    s.push_str("local   all          all                               scram-sha-256\n");
    s.push_str(&format!(
        "local   replication  {repl:<16}                  scram-sha-256\n"
    ));
    s.push_str(&format!(
        "local   replication  {su:<16}                  scram-sha-256\n"
    ));
    // With Postgres' TLS ([tls]), every TCP connection must use it, loopback too.
    let host = if super::tls::enabled(cfg).is_some() {
        "hostssl"
    } else {
        "host   "
    };
    let loopback = ["127.0.0.1/32".to_string(), "::1/128".to_string()];
    for net in loopback.iter().chain(&cfg.allow_networks) {
        s.push_str(&format!(
            "{host} all          all              {net:<16} scram-sha-256\n"
        ));
    }
    let mut from: Vec<String> = loopback.to_vec();
    let mut named = false;
    for r in replicas {
        match r.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let net = format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 });
                if !from.contains(&net) {
                    from.push(net);
                }
            }
            Err(_) => named = true,
        }
    }
    if named {
        from.extend(cfg.allow_networks.iter().cloned());
    }
    for net in &from {
        s.push_str(&format!(
            "{host} replication  {repl:<16} {net:<16} scram-sha-256\n"
        ));
    }
    s
}

/// Removes `name` from `postgresql.auto.conf` (where `ALTER SYSTEM` writes), while Postgres is
/// stopped. Absent file or setting: nothing to do.
pub fn forget_auto_setting(data_dir: &Path, name: &str) -> std::io::Result<()> {
    let path = data_dir.join("postgresql.auto.conf");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| l.split('=').next().map(str::trim) != Some(name))
        .collect();
    if kept.len() == text.lines().count() {
        return Ok(());
    }
    let mut out = kept.join("\n");
    out.push('\n');
    files::rewrite_durably(&path, out.as_bytes())
}

/// Writes `content` to `path` through a temp file and rename, so Postgres never reads a
/// half-written file. Returns whether the content changed.
pub fn write_if_changed(
    path: &Path,
    content: &str,
    owner: Option<&super::OsUser>,
) -> std::io::Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let tmp = path.with_extension("pgpilot-tmp");
    std::fs::write(&tmp, content)?;
    if let Some(owner) = owner {
        owner.chown(&tmp)?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

/// Renders pgpilot.conf and pg_hba.conf into the data dir and makes sure postgresql.conf
/// includes pgpilot.conf (last, so its settings win). Returns the names of settings whose
/// value changed from what pgpilot.conf held.
pub fn render_all(
    cfg: &Config,
    user: &BTreeMap<String, String>,
    standby: Option<&StandbyConf>,
    owner: Option<&super::OsUser>,
    restoring: bool,
    replicas: &[String],
) -> std::io::Result<Vec<String>> {
    let conf_path = cfg.data_dir.join(INCLUDE_FILE);
    let before = std::fs::read_to_string(&conf_path)
        .map(|s| parse_rendered(&s))
        .unwrap_or_default();
    match super::tls::install(cfg, owner) {
        Ok(_) => {}
        // A rotation to files that do not go together: Postgres keeps the copy it has.
        Err(e) if super::tls::dir(cfg).join(super::tls::KEY_FILE).exists() => {
            tracing::warn!("Postgres keeps the TLS certificate it has: {e}")
        }
        Err(e) => return Err(std::io::Error::other(format!("Postgres' TLS: {e}"))),
    }
    let new = render_pgpilot_conf(cfg, user, standby);
    write_if_changed(&conf_path, &new, owner)?;
    write_if_changed(
        &cfg.data_dir.join("pg_hba.conf"),
        &render_pg_hba(cfg, restoring, replicas),
        owner,
    )?;
    ensure_include(&cfg.data_dir.join("postgresql.conf"), owner)?;
    let after = parse_rendered(&new);
    let mut changed: Vec<String> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .chain(before.keys().filter(|k| !after.contains_key(*k)).cloned())
        .collect();
    changed.sort();
    Ok(changed)
}

fn parse_rendered(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ensure_include(postgresql_conf: &PathBuf, owner: Option<&super::OsUser>) -> std::io::Result<()> {
    let text = std::fs::read_to_string(postgresql_conf)?;
    if text.lines().any(|l| {
        l.trim_start()
            .starts_with("include_if_exists = 'pgpilot.conf'")
    }) {
        return Ok(());
    }
    let mut new = text;
    if !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(INCLUDE_LINE);
    new.push('\n');
    write_if_changed(postgresql_conf, &new, owner).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, RunArgs};

    fn cfg(toml_text: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpilot.toml");
        std::fs::write(&path, toml_text).unwrap();
        let args = RunArgs {
            config: Some(path),
            data_dir: Some("/d/pg".into()),
            ..Default::default()
        };
        let _ = FileConfig::default();
        Config::load(&args).unwrap()
    }

    #[test]
    fn renders_quoted_values_and_user_overrides() {
        let c = cfg(
            "[postgres.parameters]\nwork_mem = \"8MB\"\nmax_wal_senders = 4\nsearch_path = \"'$user', public\"\n",
        );
        let text = render_pgpilot_conf(&c, &c.parameters, None);
        assert!(text.contains("port = '5432'\n"), "{text}");
        assert!(text.contains("work_mem = '8MB'\n"));
        assert!(text.contains("max_wal_senders = '4'\n"));
        assert!(!text.contains("max_wal_senders = '10'"));
        assert!(
            text.contains("search_path = '''$user'', public'\n"),
            "{text}"
        );
    }

    #[test]
    fn the_archive_commands_run_the_front_when_it_ships_and_quote_every_path() {
        let mut c = cfg("[backup]\nstore = \"file:///b\"\n");
        c.state_dir = "/s t/state".into();
        c.archive_exes = Some(ArchiveExes {
            agent: "/o'p/pgpilot-agent".into(),
            front: Some("/o'p/pgpilot-wal".into()),
        });
        let get = |c: &Config, name: &str| {
            settings(c, &BTreeMap::new(), None)
                .into_iter()
                .find(|(n, _)| n == name)
                .unwrap()
                .1
        };
        let runtime = "'/s t/state/run/archive-runtime.json'";
        let program = r#"'/o'\''p/pgpilot-wal' '/o'\''p/pgpilot-agent'"#;
        assert_eq!(
            get(&c, "archive_command"),
            format!("{program} wal-push --runtime {runtime} %p")
        );
        assert_eq!(
            get(&c, "restore_command"),
            format!("{program} wal-fetch --runtime {runtime} %f %p")
        );
        // No front next to the agent: the agent binary itself.
        c.archive_exes.as_mut().unwrap().front = None;
        assert_eq!(
            get(&c, "archive_command"),
            format!(r#"'/o'\''p/pgpilot-agent' wal-push --runtime {runtime} %p"#)
        );
    }

    #[test]
    fn reserved_parameters_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpilot.toml");
        std::fs::write(&path, "[postgres.parameters]\nport = 1\n").unwrap();
        let err = Config::load(&RunArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("port is managed by pgpilot-agent"),
            "{err}"
        );
    }

    #[test]
    fn forget_auto_setting_drops_only_that_line() {
        let dir = tempfile::tempdir().unwrap();
        let auto = dir.path().join("postgresql.auto.conf");
        forget_auto_setting(dir.path(), "synchronous_standby_names").unwrap();
        assert!(!auto.exists(), "no file: nothing written");
        std::fs::write(
            &auto,
            "# Do not edit this file manually!\nsynchronous_standby_names = '\"db-1\"'\nwork_mem = '8MB'\n",
        )
        .unwrap();
        // Postgres' file, as an agent running as root finds it: it stays Postgres' file.
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::fs::set_permissions(&auto, std::fs::Permissions::from_mode(0o600)).unwrap();
        let root = nix::unistd::geteuid().is_root();
        if root {
            std::os::unix::fs::chown(&auto, Some(65534), Some(65534)).unwrap();
        }
        forget_auto_setting(dir.path(), "synchronous_standby_names").unwrap();
        assert_eq!(
            std::fs::read_to_string(&auto).unwrap(),
            "# Do not edit this file manually!\nwork_mem = '8MB'\n"
        );
        let meta = std::fs::metadata(&auto).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        if root {
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "owner kept");
        }
    }

    #[test]
    fn render_all_reports_changes_and_includes_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg("");
        c.data_dir = dir.path().to_path_buf();
        std::fs::write(dir.path().join("postgresql.conf"), "shared_buffers = 128MB").unwrap();
        let first = render_all(&c, &BTreeMap::new(), None, None, false, &[]).unwrap();
        assert!(first.contains(&"port".to_string()));
        let mut user = BTreeMap::new();
        user.insert("work_mem".to_string(), "16MB".to_string());
        assert_eq!(
            render_all(&c, &user, None, None, false, &[]).unwrap(),
            vec!["work_mem".to_string()]
        );
        assert_eq!(
            render_all(&c, &BTreeMap::new(), None, None, false, &[]).unwrap(),
            vec!["work_mem".to_string()]
        );
        let main = std::fs::read_to_string(dir.path().join("postgresql.conf")).unwrap();
        assert_eq!(main.matches("pgpilot.conf").count(), 1, "{main}");
        let hba = std::fs::read_to_string(dir.path().join("pg_hba.conf")).unwrap();
        assert!(hba.contains("replication  replicator"));
        assert!(!hba.contains("trust"));
    }

    #[test]
    fn with_tls_postgres_serves_it_and_every_tcp_rule_wants_it() {
        let c = cfg(
            "[tls]\ncert_file = \"/t/tls.crt\"\nkey_file = \"/t/tls.key\"\nca_file = \"/t/ca.crt\"\nserver_name = \"orders.db.agents.pgpilot.internal\"\n",
        );
        let hba = render_pg_hba(&c, false, &[]);
        assert!(
            hba.contains("hostssl replication  replicator       127.0.0.1/32"),
            "{hba}"
        );
        assert!(!hba.lines().any(|l| l.starts_with("host ")), "{hba}");
        let set: BTreeMap<String, String> =
            settings(&c, &BTreeMap::new(), None).into_iter().collect();
        assert_eq!(set["ssl"], "on");
        assert!(set["ssl_key_file"].ends_with("/tls/server.key"), "{set:?}");
        assert!(set["ssl_ca_file"].ends_with("/tls/ca.crt"), "{set:?}");
        let by_ip = super::super::tls::peer_conninfo(&c, "10.1.2.3");
        assert!(
            by_ip.starts_with("host='orders.db.agents.pgpilot.internal' hostaddr='10.1.2.3' sslmode='verify-full' sslrootcert="),
            "{by_ip}"
        );
        let by_name = super::super::tls::peer_conninfo(&c, "db.example");
        assert!(
            by_name.starts_with("host='db.example' sslmode='verify-ca'"),
            "{by_name}"
        );
        // Off with `postgres = false`, and without [tls].
        let off = cfg("[tls]\ncert_file = \"/t/c\"\nkey_file = \"/t/k\"\npostgres = false\n");
        assert!(!render_pg_hba(&off, false, &[]).contains("hostssl"));
        assert_eq!(
            super::super::tls::peer_conninfo(&off, "10.1.2.3"),
            "host='10.1.2.3'"
        );
    }

    #[test]
    fn replication_is_taken_from_loopback_and_the_registered_replicas_only() {
        let c = cfg("[postgres]\nallow_networks = [\"10.0.0.0/8\"]\n");
        let hba = render_pg_hba(&c, false, &[]);
        let repl: Vec<&str> = hba
            .lines()
            .filter(|l| l.starts_with("host") && l.contains(" replication "))
            .collect();
        assert_eq!(repl.len(), 2, "{hba}");
        assert!(
            hba.contains("all          all              10.0.0.0/8"),
            "{hba}"
        );
        let hba = render_pg_hba(&c, false, &["10.1.2.3".into(), "fd00::7".into()]);
        assert!(
            hba.contains("replication  replicator       10.1.2.3/32"),
            "{hba}"
        );
        assert!(
            hba.contains("replication  replicator       fd00::7/128"),
            "{hba}"
        );
        assert!(
            !hba.contains("replication  replicator       10.0.0.0/8"),
            "{hba}"
        );
        // A replica known by name only: replication from allow_networks.
        let hba = render_pg_hba(&c, false, &["db-1.example".into()]);
        assert!(
            hba.contains("replication  replicator       10.0.0.0/8"),
            "{hba}"
        );
    }
}
