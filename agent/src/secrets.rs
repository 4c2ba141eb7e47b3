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
    /// Readable by every user of the machine.
    #[error("{0}")]
    Exposed(String),
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
    generate_if_missing(what, file)?;
    read(what, &file.path)
}

fn generate_if_missing(what: &'static str, file: &SecretFile) -> Result<(), SecretError> {
    if file.generate_if_missing && !file.path.exists() {
        let path = file.path.display().to_string();
        generate(&file.path).map_err(|cause| SecretError::Create {
            what,
            path: path.clone(),
            cause,
        })?;
        tracing::info!(path = %path, "generated {what}");
    }
    Ok(())
}

pub fn read(what: &'static str, path: &Path) -> Result<Secret, SecretError> {
    let text = read_text(what, path)?;
    let value = text.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err(empty(what, path));
    }
    Ok(Secret(value))
}

/// A secret file's text, refused when every user can read it.
fn read_text(what: &'static str, path: &Path) -> Result<String, SecretError> {
    pgpilot_common::secret_file::check_not_world_readable(what, path)
        .map_err(SecretError::Exposed)?;
    std::fs::read_to_string(path).map_err(|cause| SecretError::Unreadable {
        what,
        path: path.display().to_string(),
        cause,
    })
}

fn empty(what: &'static str, path: &Path) -> SecretError {
    SecretError::Empty {
        what,
        path: path.display().to_string(),
    }
}

/// Compares digests of the presented and expected tokens in constant time, so neither the
/// content nor the length of the token leaks through timing.
pub fn token_matches(presented: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.ct_eq(&b).into()
}

/// The API tokens the agent accepts, from one file: each non-empty line is a token. The first
/// is the current one, which the agent presents to its peers and writes for `wal-push`; the
/// others stay accepted while they are in the file (a rotation: write `new` above `old`, move
/// every client to `new`, then remove `old`). [`Tokens::reload`] re-reads the file, so a
/// rotation needs no restart.
pub struct Tokens {
    what: &'static str,
    path: std::path::PathBuf,
    set: std::sync::RwLock<Vec<Secret>>,
}

impl Tokens {
    pub fn load(what: &'static str, file: &SecretFile) -> Result<Tokens, SecretError> {
        generate_if_missing(what, file)?;
        let tokens = Tokens {
            what,
            path: file.path.clone(),
            set: std::sync::RwLock::new(Vec::new()),
        };
        tokens.reload()?;
        Ok(tokens)
    }

    /// The token this agent presents.
    pub fn current(&self) -> Secret {
        self.set.read().expect("tokens")[0].clone()
    }

    /// How many tokens are accepted now.
    pub fn count(&self) -> usize {
        self.set.read().expect("tokens").len()
    }

    /// Whether `presented` is one of the accepted tokens (each compared in constant time).
    pub fn accepts(&self, presented: &str) -> bool {
        let set = self.set.read().expect("tokens");
        set.iter()
            .fold(false, |ok, t| token_matches(presented, t.expose()) | ok)
    }

    /// Re-reads the file. `Ok(true)` when the accepted tokens changed. On an error (the file
    /// gone or empty mid-rotation) the tokens stay as they were, and the error says why.
    pub fn reload(&self) -> Result<bool, SecretError> {
        let text = read_text(self.what, &self.path)?;
        let fresh: Vec<Secret> = pgpilot_common::client::api_tokens(&text)
            .into_iter()
            .map(|l| Secret(l.to_string()))
            .collect();
        if fresh.is_empty() {
            return Err(empty(self.what, &self.path));
        }
        let mut set = self.set.write().expect("tokens");
        if *set == fresh {
            return Ok(false);
        }
        *set = fresh;
        Ok(true)
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tokens({} from {}, <redacted>)",
            self.count(),
            self.path.display()
        )
    }
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
    fn tokens_rotate_through_the_file_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok");
        std::fs::write(&path, "old-token\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let file = SecretFile {
            path: path.clone(),
            generate_if_missing: false,
        };
        let t = Tokens::load("API token", &file).unwrap();
        assert!(t.accepts("old-token") && !t.accepts("new-token"));
        // The window: both accepted, the new one presented.
        std::fs::write(&path, "new-token\n  old-token  \n\n").unwrap();
        assert!(t.reload().unwrap());
        assert!(t.accepts("old-token") && t.accepts("new-token"));
        assert_eq!(t.current().expose(), "new-token");
        assert!(!t.reload().unwrap(), "unchanged");
        // The window closes.
        std::fs::write(&path, "new-token\n").unwrap();
        assert!(t.reload().unwrap());
        assert!(!t.accepts("old-token") && t.accepts("new-token"));
        assert!(!t.accepts("") && !t.accepts("new-toke"));
        // Made readable by every user: refused, tokens unchanged.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = t.reload().unwrap_err().to_string();
        assert!(err.contains("readable by every user"), "{err}");
        assert!(t.accepts("new-token"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Emptied or removed mid-rotation: refused with the file named, tokens unchanged.
        std::fs::write(&path, "\n").unwrap();
        let err = t.reload().unwrap_err().to_string();
        assert!(err.contains("is empty") && err.contains("tok"), "{err}");
        std::fs::remove_file(&path).unwrap();
        assert!(
            t.reload()
                .unwrap_err()
                .to_string()
                .contains("cannot be read")
        );
        assert!(t.accepts("new-token"));
        assert!(!format!("{t:?}").contains("new-token"));
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
