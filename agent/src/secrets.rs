//! Secrets (API token, Postgres passwords) read from files. A default path the user did not
//! name is created with a random value (mode 0600); a path the user named must exist. Values
//! never reach logs: [`Secret`]'s Debug and Display print `<redacted>`.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rand::RngCore;

use crate::config::SecretFile;

/// A secret value. Not printable.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{what} file {path} cannot be read: {cause}")]
    Unreadable {
        what: &'static str,
        path: String,
        cause: std::io::Error,
    },
    #[error("{what} file {path} is empty")]
    Empty { what: &'static str, path: String },
    #[error("cannot create {what} file {path}: {cause}")]
    Create {
        what: &'static str,
        path: String,
        cause: std::io::Error,
    },
}

/// Reads the secret, generating it first when allowed and absent. Trailing newlines are
/// stripped (files written by `echo` or Kubernetes Secrets often end with one).
pub fn load(what: &'static str, file: &SecretFile) -> Result<Secret, SecretError> {
    let path_s = file.path.display().to_string();
    if file.generate_if_missing && !file.path.exists() {
        generate(&file.path).map_err(|cause| SecretError::Create {
            what,
            path: path_s.clone(),
            cause,
        })?;
        tracing::info!(path = %path_s, "generated {what}");
    }
    read(what, &file.path)
}

pub fn read(what: &'static str, path: &Path) -> Result<Secret, SecretError> {
    let path_s = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|cause| SecretError::Unreadable {
        what,
        path: path_s.clone(),
        cause,
    })?;
    let value = text.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err(SecretError::Empty { what, path: path_s });
    }
    Ok(Secret(value))
}

fn generate(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let value: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(value.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_redacts() {
        let dir = tempfile::tempdir().unwrap();
        let file = SecretFile {
            path: dir.path().join("tok"),
            generate_if_missing: true,
        };
        let a = load("API token", &file).unwrap();
        let b = load("API token", &file).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.expose().len(), 48);
        assert_eq!(format!("{a:?} {a}"), "<redacted> <redacted>");
    }

    #[test]
    fn named_missing_file_is_an_error_naming_it() {
        let file = SecretFile {
            path: "/nonexistent/tok".into(),
            generate_if_missing: false,
        };
        let err = load("API token", &file).unwrap_err().to_string();
        assert!(
            err.contains("API token file /nonexistent/tok cannot be read"),
            "{err}"
        );
    }
}
