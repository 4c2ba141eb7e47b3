//! Where things live in the backup store, relative to the store's prefix (DESIGN.md):
//! `<cluster>/<shard>/wal/<file>.pgpilot` and `<cluster>/<shard>/backups/<id>/{manifest.json, data/…}`.
//! Every object is in the pgpilot archive format; the extension says so.

/// Extension of every archived object.
pub const EXT: &str = ".pgpilot";

/// The object layout of one shard of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    cluster: String,
    shard: String,
}

impl Layout {
    /// `cluster` and `shard` must be non-empty and use only `[a-z0-9._-]` (they become path
    /// components in every backend).
    pub fn new(cluster: &str, shard: &str) -> Result<Layout, String> {
        for (what, v) in [("cluster name", cluster), ("shard", shard)] {
            let ok = !v.is_empty()
                && v.len() <= 63
                && v != "."
                && v != ".."
                && v.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
                });
            if !ok {
                return Err(format!(
                    "{what} {v:?} must be 1 to 63 characters of a-z, 0-9, '.', '_' and '-'"
                ));
            }
        }
        Ok(Layout {
            cluster: cluster.into(),
            shard: shard.into(),
        })
    }

    fn base(&self) -> String {
        format!("{}/{}", self.cluster, self.shard)
    }

    /// Prefix of all WAL objects (with a trailing slash).
    pub fn wal_prefix(&self) -> String {
        format!("{}/wal/", self.base())
    }

    /// The object holding WAL file `name` (segment, history, partial or backup history file).
    pub fn wal_key(&self, name: &str) -> String {
        format!("{}{name}{EXT}", self.wal_prefix())
    }

    /// The WAL file name back from a key under [`Layout::wal_prefix`].
    pub fn wal_name<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.wal_prefix())?.strip_suffix(EXT)
    }

    /// The object recording which database system (its system identifier) this shard's archive
    /// belongs to; pushes and backups of another system are refused.
    pub fn identity_key(&self) -> String {
        format!("{}/system-identifier{EXT}", self.base())
    }

    /// Prefix of all backups (with a trailing slash).
    pub fn backups_prefix(&self) -> String {
        format!("{}/backups/", self.base())
    }

    pub fn backup_prefix(&self, id: &str) -> String {
        format!("{}{id}/", self.backups_prefix())
    }

    /// Written last: a backup exists only once this object does.
    pub fn manifest_key(&self, id: &str) -> String {
        format!("{}manifest.json{EXT}", self.backup_prefix(id))
    }

    /// A data-dir file of a backup (`rel` relative to the data dir, `/`-separated).
    pub fn backup_file_key(&self, id: &str, rel: &str) -> String {
        format!("{}data/{rel}{EXT}", self.backup_prefix(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_design() {
        let l = Layout::new("orders", "shard-0").unwrap();
        assert_eq!(
            l.wal_key("000000010000000000000001"),
            "orders/shard-0/wal/000000010000000000000001.pgpilot"
        );
        assert_eq!(
            l.wal_name("orders/shard-0/wal/00000002.history.pgpilot"),
            Some("00000002.history")
        );
        assert_eq!(
            l.manifest_key("20261123T101500Z"),
            "orders/shard-0/backups/20261123T101500Z/manifest.json.pgpilot"
        );
        assert_eq!(
            l.backup_file_key("b1", "base/1/1259"),
            "orders/shard-0/backups/b1/data/base/1/1259.pgpilot"
        );
        assert!(Layout::new("Orders", "0").is_err());
        assert!(Layout::new("a/b", "0").is_err());
        assert!(Layout::new("a", "..").is_err());
    }
}
