//! Files that hold secrets (API tokens, passwords, store credentials, encryption keys): the
//! agent refuses one that every user of the machine can read (docs/security.md).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Refuses `path` when every user may read it (mode o+r), naming the file, its mode and the
/// fix. Follows symlinks (a Kubernetes Secret volume's files are links into `..data`). A file
/// that cannot be examined is left to the read that follows, which names the error.
pub fn check_not_world_readable(what: &str, path: &Path) -> Result<(), String> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o004 != 0 {
        return Err(format!(
            "{what} file {} is readable by every user (mode {mode:04o}): let only its owner \
             (chmod 600) or a group (chmod 640) read it; on a Kubernetes Secret volume, set \
             defaultMode: 0400",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_readable_file_is_refused_with_its_name_mode_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "x").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o640, true),
            (0o440, true),
            (0o644, false),
            (0o604, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = check_not_world_readable("encryption key", &path);
            assert_eq!(r.is_ok(), ok, "{mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.contains(&path.display().to_string()), "{e}");
                assert!(e.contains(&format!("mode {mode:04o}")), "{e}");
                assert!(e.contains("chmod 600"), "{e}");
            }
        }
        // Through a symlink, as a Secret volume's files are: the target's mode counts.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(check_not_world_readable("encryption key", &link).is_err());
        assert!(check_not_world_readable("encryption key", &dir.path().join("none")).is_ok());
    }
}
