//! Which database system an archive belongs to. Two clusters configured with the same store,
//! cluster name and shard (a copied config, a data dir wiped and initialised again) would push
//! segments of the same names: the first name they share is refused as a conflict, but every
//! segment the second writes beyond the first's position lands in the first's archive, and the
//! first's own push of that name then fails for good. So the archive records its system
//! identifier (`<cluster>/<shard>/system-identifier.pgpilot`, written create-only by the first
//! push or backup), and every push and backup of another system identifier is refused before
//! anything is written, as pgBackRest refuses with its `archive.info`.

use crate::store::{PutMode, Store, StoreError};
use bytes::Bytes;
use pgpilot_common::layout::Layout;

/// Why a writer may not write into this archive.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    /// The archive belongs to another database system.
    #[error(
        "{store} holds the archive of database system {archive}, and this Postgres is database system {local}: is another cluster configured with the same store, cluster name and shard? Refusing to write into it"
    )]
    Foreign {
        store: String,
        archive: String,
        local: String,
    },
    #[error("checking which database system {key} belongs to: {cause}")]
    Store { key: String, cause: String },
}

/// The system identifier in the first eight bytes of `global/pg_control` (ControlFileData
/// starts with it, in the machine's byte order, in every supported major).
pub fn local_system_identifier(data_dir: &std::path::Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut buf = [0u8; 8];
    std::fs::File::open(data_dir.join("global/pg_control"))?.read_exact(&mut buf)?;
    Ok(u64::from_ne_bytes(buf))
}

/// Checks that the archive of `layout` in `store` belongs to `local` (a system identifier),
/// recording it when the archive has no owner yet.
pub async fn check(store: &Store, layout: &Layout, local: &str) -> Result<(), IdentityError> {
    let key = layout.identity_key();
    let failed = |e: StoreError| IdentityError::Store {
        key: key.clone(),
        cause: e.to_string(),
    };
    let recorded = match store.get_bytes(&key).await {
        Ok((bytes, _)) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(StoreError::NotFound { .. }) => {
            match store
                .put_bytes(&key, Bytes::from(format!("{local}\n")), PutMode::CreateOnly)
                .await
            {
                Ok(_) => {
                    tracing::info!(system_identifier = local, "recorded the archive's owner");
                    return Ok(());
                }
                // Another writer recorded it first (same content is success): read it.
                Err(StoreError::Conflict { .. } | StoreError::AlreadyExists { .. }) => {
                    let (bytes, _) = store.get_bytes(&key).await.map_err(failed)?;
                    String::from_utf8_lossy(&bytes).trim().to_string()
                }
                Err(e) => return Err(failed(e)),
            }
        }
        Err(e) => return Err(failed(e)),
    };
    if recorded == local {
        Ok(())
    } else {
        Err(IdentityError::Foreign {
            store: format!("{store} ({})", layout.wal_prefix().trim_end_matches("wal/")),
            archive: recorded,
            local: local.to_string(),
        })
    }
}
