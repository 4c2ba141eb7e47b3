//! Errors of the store layer. Each names the object (`<store url>/<key>`) and says what failed;
//! [`StoreError::is_transient`] is the one place that decides what is worth retrying.

use pgpilot_common::archive::ArchiveError;

use super::config::ConfigError;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// The object does not exist.
    #[error("{object}: not found")]
    NotFound { object: String },

    /// A create-only put found an object already there.
    #[error("{object}: already exists")]
    AlreadyExists { object: String },

    /// A create-only put of a WAL file found an object with different content: two clusters are
    /// probably archiving into the same place.
    #[error(
        "{object}: already exists with different content (stored SHA-256 {stored}, local {local}); is another cluster writing to this archive?"
    )]
    Conflict {
        object: String,
        stored: String,
        local: String,
    },

    /// The object is damaged, encrypted with an unknown or wrong key, or not an archive.
    #[error(transparent)]
    Archive(ArchiveError),

    /// The backend refused or failed an operation.
    #[error("{object}: {operation} failed: {source}")]
    Backend {
        object: String,
        operation: &'static str,
        transient: bool,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A local file (the source of an upload, the target of a download) failed.
    #[error("{path}: {source}")]
    LocalIo {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// The key is not a valid object key.
    #[error("invalid object key {key:?}: {problem}")]
    InvalidKey { key: String, problem: &'static str },
}

impl StoreError {
    /// True when the same operation may succeed if tried again: network trouble, throttling,
    /// server errors. Missing objects, damage, wrong keys and refused credentials are permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Backend { transient, .. } => *transient,
            StoreError::Archive(ArchiveError::Io { source, .. }) => io_transient(source),
            _ => false,
        }
    }

    /// The object this error is about.
    pub fn object(&self) -> Option<&str> {
        match self {
            StoreError::NotFound { object }
            | StoreError::AlreadyExists { object }
            | StoreError::Conflict { object, .. }
            | StoreError::Backend { object, .. } => Some(object),
            StoreError::Archive(e) => e.object(),
            StoreError::LocalIo { path, .. } => Some(path),
            StoreError::InvalidKey { key, .. } => Some(key),
            StoreError::Config(_) => None,
        }
    }

    /// Maps an object_store error.
    pub(crate) fn from_object_store(
        object: &str,
        operation: &'static str,
        e: object_store::Error,
    ) -> StoreError {
        use object_store::Error as E;
        match e {
            E::NotFound { .. } => StoreError::NotFound {
                object: object.to_owned(),
            },
            E::AlreadyExists { .. } | E::Precondition { .. } => StoreError::AlreadyExists {
                object: object.to_owned(),
            },
            other => {
                // object_store already retried transient HTTP failures per request; what comes
                // back as Generic is a server or network failure that may clear up, everything
                // else (bad path, not supported, credentials) will not.
                let transient = matches!(other, E::Generic { .. } | E::JoinError { .. })
                    && !is_permanent_refusal(&other);
                StoreError::Backend {
                    object: object.to_owned(),
                    operation,
                    transient,
                    source: Box::new(other),
                }
            }
        }
    }

    /// Maps an I/O error of the local (file://) backend.
    pub(crate) fn from_local_io(
        object: &str,
        operation: &'static str,
        e: std::io::Error,
    ) -> StoreError {
        match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound {
                object: object.to_owned(),
            },
            std::io::ErrorKind::AlreadyExists => StoreError::AlreadyExists {
                object: object.to_owned(),
            },
            _ => StoreError::Backend {
                object: object.to_owned(),
                operation,
                transient: io_transient(&e),
                source: Box::new(e),
            },
        }
    }

    /// Maps an archive error, turning I/O failures of the backend's stream into backend errors.
    pub(crate) fn from_archive(e: ArchiveError) -> StoreError {
        match e {
            ArchiveError::NotFound { object } => StoreError::NotFound { object },
            ArchiveError::Io { object, source } => StoreError::Backend {
                object,
                operation: "stream",
                transient: io_transient(&source),
                source: Box::new(source),
            },
            other => StoreError::Archive(other),
        }
    }
}

/// Whether a Generic object_store error is a refusal that retrying cannot fix. object_store maps
/// 401/403/404/409/412 to their own variants, but other 4xx statuses (400 on a bad request,
/// 405, 411, …) reach us as Generic, with the status only in the message: "Server returned
/// non-2xx status code: 400 Bad Request: …". 408 (timeout) and 429 (throttling) are transient.
fn is_permanent_refusal(e: &object_store::Error) -> bool {
    let text = e.to_string();
    if let Some(status) = http_status(&text) {
        return (400..500).contains(&status) && status != 408 && status != 429;
    }
    [
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

fn http_status(text: &str) -> Option<u16> {
    let rest = &text[text.find("status code: ")? + "status code: ".len()..];
    rest.get(..3)?.parse().ok()
}

fn io_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::Interrupted
            | K::TimedOut
            | K::WouldBlock
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::ConnectionRefused
            | K::BrokenPipe
            | K::UnexpectedEof
            | K::Other
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(message: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: Box::new(std::io::Error::other(message.to_owned())),
        }
    }

    #[test]
    fn object_store_errors_are_classified() {
        let classify = |e| StoreError::from_object_store("s3://b/k", "put", e);
        for (message, transient) in [
            (
                "Server returned non-2xx status code: 503 Service Unavailable: slow down",
                true,
            ),
            (
                "Server returned non-2xx status code: 429 Too Many Requests: ",
                true,
            ),
            (
                "Server returned non-2xx status code: 400 Bad Request: bad digest",
                false,
            ),
            (
                "error sending request for url (http://127.0.0.1:1/b/k): connection refused",
                true,
            ),
            ("<Code>SignatureDoesNotMatch</Code>", false),
        ] {
            let e = classify(generic(message));
            assert_eq!(e.is_transient(), transient, "{message}");
            assert_eq!(e.object(), Some("s3://b/k"));
        }
        let denied = object_store::Error::PermissionDenied {
            path: "k".into(),
            source: Box::new(std::io::Error::other("403")),
        };
        assert!(!classify(denied).is_transient());
        let missing = object_store::Error::NotFound {
            path: "k".into(),
            source: Box::new(std::io::Error::other("404")),
        };
        assert!(matches!(classify(missing), StoreError::NotFound { .. }));
        let exists = object_store::Error::Precondition {
            path: "k".into(),
            source: Box::new(std::io::Error::other("412")),
        };
        assert!(matches!(classify(exists), StoreError::AlreadyExists { .. }));
    }
}
