//! Locating the PostgreSQL server binaries and detecting their major version.

use std::path::{Path, PathBuf};

/// Majors this agent supports (version differences such as `pg_backup_start` are handled).
pub const SUPPORTED_MAJORS: std::ops::RangeInclusive<u32> = 14..=18;

/// A set of PostgreSQL server binaries.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub bin_dir: PathBuf,
    /// e.g. 17
    pub major: u32,
    /// What `postgres --version` printed, e.g. "postgres (PostgreSQL) 17.6".
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    #[error(
        "PostgreSQL server binaries not found: {0}. Pass --pg-bin-dir (e.g. /usr/lib/postgresql/17/bin) \
         or put pg_config or initdb on PATH"
    )]
    NotFound(String),
    #[error("{path} is missing; {dir} does not hold a complete PostgreSQL server installation")]
    Missing { path: PathBuf, dir: PathBuf },
    #[error("cannot run {path} --version: {message}")]
    Version { path: PathBuf, message: String },
    #[error("PostgreSQL {major} ({dir}) is not supported; supported majors are 14 to 18")]
    Unsupported { major: u32, dir: PathBuf },
}

impl PgBinaries {
    pub fn path(&self, tool: &str) -> PathBuf {
        self.bin_dir.join(tool)
    }

    /// Finds the binaries: `explicit`, else `pg_config --bindir`, else the directory of
    /// `initdb` on PATH (symlinks resolved), else the newest /usr/lib/postgresql/*/bin.
    pub fn discover(explicit: Option<&Path>) -> Result<PgBinaries, BinariesError> {
        let dir = match explicit {
            Some(dir) => dir.to_path_buf(),
            None => find_bin_dir().ok_or_else(|| {
                BinariesError::NotFound(
                    "no --pg-bin-dir, pg_config, initdb on PATH or /usr/lib/postgresql".into(),
                )
            })?,
        };
        Self::at(&dir)
    }

    /// The binaries in `dir`, checked and versioned.
    pub fn at(dir: &Path) -> Result<PgBinaries, BinariesError> {
        if !dir.is_dir() {
            return Err(BinariesError::NotFound(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        for tool in ["postgres", "initdb"] {
            let path = dir.join(tool);
            if !path.is_file() {
                return Err(BinariesError::Missing {
                    path,
                    dir: dir.to_path_buf(),
                });
            }
        }
        let postgres = dir.join("postgres");
        let out = std::process::Command::new(&postgres)
            .arg("--version")
            .output()
            .map_err(|e| BinariesError::Version {
                path: postgres.clone(),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(BinariesError::Version {
                path: postgres,
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let major = parse_major(&version).ok_or_else(|| BinariesError::Version {
            path: postgres.clone(),
            message: format!("unrecognised version string {version:?}"),
        })?;
        if !SUPPORTED_MAJORS.contains(&major) {
            return Err(BinariesError::Unsupported {
                major,
                dir: dir.to_path_buf(),
            });
        }
        Ok(PgBinaries {
            bin_dir: dir.to_path_buf(),
            major,
            version,
        })
    }
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("postgres").is_file() {
            return Some(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for entry in std::env::split_paths(&path) {
            let initdb = entry.join("initdb");
            if let Ok(real) = initdb.canonicalize()
                && let Some(dir) = real.parent()
                && dir.join("postgres").is_file()
            {
                return Some(dir.to_path_buf());
            }
        }
    }
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors.pop().map(|(_, dir)| dir)
}

/// "postgres (PostgreSQL) 17.6 (Debian 17.6-1)" → 17; "postgres (PostgreSQL) 9.6.1" → 9.
pub fn parse_major(version: &str) -> Option<u32> {
    let number = version
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    number.split(['.', 'b', 'r', 'd']).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_majors() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 17.6"), Some(17));
        assert_eq!(parse_major("postgres (PostgreSQL) 18beta1"), Some(18));
        assert_eq!(parse_major("postgres (PostgreSQL) 18devel"), Some(18));
        assert_eq!(parse_major("nonsense"), None);
    }

    #[test]
    fn explicit_dir_without_postgres_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = PgBinaries::at(dir.path()).unwrap_err();
        assert!(matches!(err, BinariesError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("postgres"));
    }
}
