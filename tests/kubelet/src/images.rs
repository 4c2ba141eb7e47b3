//! Container images as local binaries. A test maps image references (exact, or a prefix ending
//! in `*`) to an entrypoint and the directories its `command` names are looked up in, so a pod
//! spec written for a cluster (`image: postgres:15`, `command: [postgres]`) runs here unchanged.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
struct Image {
    pattern: String,
    /// What runs when the container has no `command` (the image's ENTRYPOINT).
    entrypoint: Option<PathBuf>,
    /// Where `command[0]` is looked up when it is not an existing absolute path (the image's PATH).
    path: Vec<PathBuf>,
}

/// Image reference → local binaries, and the images' user ids → local users.
#[derive(Debug, Clone, Default)]
pub struct ImageTable(Vec<Image>, Vec<(u32, u32, u32)>);

impl ImageTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// `pattern` (e.g. `pgpilot/agent:*`) runs `binary` as its entrypoint; commands are also
    /// looked up next to it.
    pub fn binary(mut self, pattern: &str, binary: impl Into<PathBuf>) -> Self {
        let binary = binary.into();
        let dir = binary.parent().map(Path::to_path_buf).into_iter().collect();
        self.0.push(Image {
            pattern: pattern.into(),
            entrypoint: Some(binary),
            path: dir,
        });
        self
    }

    /// `pattern` (e.g. `postgres:15*`) provides the binaries in `dir`; its entrypoint is
    /// `dir/entrypoint` when given.
    pub fn directory(
        mut self,
        pattern: &str,
        dir: impl Into<PathBuf>,
        entrypoint: Option<&str>,
    ) -> Self {
        let dir = dir.into();
        self.0.push(Image {
            pattern: pattern.into(),
            entrypoint: entrypoint.map(|e| dir.join(e)),
            path: vec![dir],
        });
        self
    }

    /// `uid` (and the group of the same number) in the images is the local user `name`, as
    /// upstream `postgres` images run Postgres as uid 999 and this machine has its own
    /// `postgres` user. Ids without an entry run as themselves.
    pub fn user(mut self, uid: u32, name: &str) -> Self {
        let local = nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("local user {name:?} does not exist"));
        self.1.push((uid, local.uid.as_raw(), local.gid.as_raw()));
        self
    }

    /// "Pulls" every binary image into `dir` (the kubelet's own, readable by every user): a
    /// copy (or a hard link) of its entrypoint, 0755, which its commands are then looked up
    /// next to. A pod that runs as another user can then execute it wherever it was built (a
    /// clone under `/root`, a 0700 temp dir), as a real node runs an image from its own storage.
    pub(crate) fn pull_into(&mut self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        for (i, img) in self.0.iter_mut().enumerate() {
            let Some(entry) = img.entrypoint.clone() else {
                continue;
            };
            // Directory images (a Postgres install) stay where they are: system paths.
            if img.path.first() != entry.parent().map(Path::to_path_buf).as_ref() {
                continue;
            }
            let layer = dir.join(i.to_string());
            std::fs::create_dir_all(&layer)?;
            std::fs::set_permissions(&layer, std::fs::Permissions::from_mode(0o755))?;
            let name = entry.file_name().unwrap_or_default();
            let copy = layer.join(name);
            // A debug build's binary is hundreds of MB and every test's kubelet pulls it: link
            // it when it is already 0755 on this file system, as the agent's own install does.
            let executable = std::fs::metadata(&entry)?.permissions().mode() & 0o7777 == 0o755;
            if !(executable && std::fs::hard_link(&entry, &copy).is_ok()) {
                std::fs::copy(&entry, &copy)?;
                std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
            }
            img.entrypoint = Some(copy);
            img.path = vec![layer];
        }
        Ok(())
    }

    /// The local `(uid, gid)` for an image's `runAsUser`/`runAsGroup`.
    pub(crate) fn local_user(&self, uid: u32, gid: u32) -> (u32, u32) {
        let uid = self.1.iter().find(|m| m.0 == uid).map_or(uid, |m| m.1);
        (uid, self.local_group(gid))
    }

    /// The local gid for an image's group id (`runAsGroup`, `fsGroup`).
    pub(crate) fn local_group(&self, gid: u32) -> u32 {
        self.1.iter().find(|m| m.0 == gid).map_or(gid, |m| m.2)
    }

    fn find(&self, image: &str) -> Option<&Image> {
        self.0.iter().find(|i| match i.pattern.strip_suffix('*') {
            Some(prefix) => image.starts_with(prefix),
            None => image == i.pattern,
        })
    }

    /// The program for a container: `command[0]` resolved in the image, else its entrypoint.
    /// Returns the program and the arguments that precede the container's `args`.
    pub(crate) fn resolve(
        &self,
        image: &str,
        command: &[String],
    ) -> Result<(PathBuf, Vec<String>), String> {
        let img = self
            .find(image)
            .ok_or_else(|| format!("image {image:?} is not in the kubelet's image table"))?;
        let Some((first, rest)) = command.split_first() else {
            let e = img.entrypoint.clone().ok_or_else(|| {
                format!("image {image:?} has no entrypoint and the container no command")
            })?;
            return Ok((e, Vec::new()));
        };
        let p = Path::new(first);
        if p.is_absolute() && p.exists() {
            return Ok((p.to_path_buf(), rest.to_vec()));
        }
        let name = p.file_name().map(Path::new).unwrap_or(p);
        img.path
            .iter()
            .map(|d| d.join(name))
            .chain(
                std::env::var_os("PATH")
                    .iter()
                    .flat_map(std::env::split_paths)
                    .map(|d| d.join(name)),
            )
            .find(|c| c.is_file())
            .map(|c| (c, rest.to_vec()))
            .ok_or_else(|| format!("image {image:?} has no executable {first:?}"))
    }

    /// The image's directories, first on the container's PATH.
    pub(crate) fn path_of(&self, image: &str) -> Vec<PathBuf> {
        self.find(image).map(|i| i.path.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_entrypoint_commands_and_host_tools() {
        let t = ImageTable::new()
            .binary("app:*", "/bin/true")
            .directory("shell:1", "/bin", None);
        assert_eq!(
            t.resolve("app:v1", &[]).unwrap().0,
            PathBuf::from("/bin/true")
        );
        let (p, rest) = t.resolve("shell:1", &["sh".into(), "-c".into()]).unwrap();
        assert!(p.ends_with("sh"));
        assert_eq!(rest, vec!["-c".to_string()]);
        assert!(
            t.resolve("shell:1", &[])
                .unwrap_err()
                .contains("no entrypoint")
        );
        assert!(
            t.resolve("other", &[])
                .unwrap_err()
                .contains("not in the kubelet's image table")
        );
        assert!(t.resolve("app:v1", &["no-such-tool-xyz".into()]).is_err());
    }
}
