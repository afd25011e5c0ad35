//! The output directory, replaced whole or not at all.
//!
//! Everything is written into a staging directory created next to the output (same filesystem,
//! so the final step is a rename). Creating it first is also the writability check, so a bad
//! `--out` fails before any work. The [`Staging`] value owns the staging directory: dropped on an
//! error, it removes it; [`Staging::publish`] swaps it with an existing output atomically
//! (renameat2 RENAME_EXCHANGE) and then removes the old image, or renames it into place.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
use nix::unistd::{AccessFlags, access};
use tempfile::TempDir;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum OutputError {
    #[error("output directory {path}: {reason}")]
    Unusable { path: PathBuf, reason: String },
    #[error("output directory {path}: cannot create {parent} or a staging directory in it (is it writable?)")]
    Staging {
        path: PathBuf,
        parent: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("moving the finished image into {path}")]
    Publish {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug)]
pub struct Staging {
    dir: TempDir,
    out: PathBuf,
}

impl Staging {
    /// Checks `out` can be replaced and creates the staging directory beside it.
    pub fn prepare(out: &Path) -> Result<Self, OutputError> {
        let unusable = |reason: String| OutputError::Unusable { path: out.to_owned(), reason };
        let resolved = match fs::symlink_metadata(out) {
            Ok(_) => {
                let real = fs::canonicalize(out).map_err(|e| unusable(e.to_string()))?;
                if !real.is_dir() {
                    return Err(unusable("exists and is not a directory".into()));
                }
                // Replacing it means renaming it away and removing what is in it.
                access(&real, AccessFlags::W_OK | AccessFlags::X_OK)
                    .map_err(|e| unusable(format!("not writable: {}", e.desc())))?;
                real
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::path::absolute(out).map_err(|e| unusable(e.to_string()))?
            }
            Err(e) => return Err(unusable(e.to_string())),
        };
        let (Some(parent), Some(name)) = (resolved.parent(), resolved.file_name()) else {
            return Err(unusable("names no directory that can be replaced".into()));
        };
        let staging_err =
            |source| OutputError::Staging { path: out.to_owned(), parent: parent.to_owned(), source };
        fs::create_dir_all(parent).map_err(staging_err)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{}.tmp-", name.to_string_lossy()))
            .tempdir_in(parent)
            .map_err(staging_err)?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).map_err(staging_err)?;
        Ok(Staging { dir, out: resolved })
    }

    pub fn create(&self, name: &str) -> Result<(File, PathBuf), OutputError> {
        let path = self.dir.path().join(name);
        let file = File::create(&path).map_err(|source| OutputError::Write { path: path.clone(), source })?;
        Ok((file, path))
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), OutputError> {
        let (mut file, path) = self.create(name)?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|source| OutputError::Write { path, source })
    }

    /// Puts the staged files at the output path, replacing a previous image in one step where
    /// the filesystem allows it.
    pub fn publish(self) -> Result<PathBuf, OutputError> {
        let publish_err = |source| OutputError::Publish { path: self.out.clone(), source };
        File::open(self.dir.path()).and_then(|d| d.sync_all()).map_err(publish_err)?;
        if fs::symlink_metadata(&self.out).is_err() {
            fs::rename(self.dir.path(), &self.out).map_err(publish_err)?;
            // The staging directory is the output now: nothing left to clean up.
            let _ = self.dir.keep();
            return Ok(self.out);
        }
        match renameat2(AT_FDCWD, self.dir.path(), AT_FDCWD, &self.out, RenameFlags::RENAME_EXCHANGE) {
            // The staging path now holds the old image; dropping `dir` removes it.
            Ok(()) => Ok(self.out),
            Err(Errno::EINVAL | Errno::ENOSYS) => self.publish_in_two_steps(),
            Err(e) => Err(publish_err(io::Error::from(e))),
        }
    }

    /// For filesystems without RENAME_EXCHANGE: the old image moves aside, the new one in.
    fn publish_in_two_steps(self) -> Result<PathBuf, OutputError> {
        let publish_err = |source| OutputError::Publish { path: self.out.clone(), source };
        let parent = self.out.parent().expect("checked in prepare");
        let old = tempfile::Builder::new().prefix(".old-image-").tempdir_in(parent).map_err(publish_err)?;
        fs::rename(&self.out, old.path()).map_err(publish_err)?;
        if let Err(e) = fs::rename(self.dir.path(), &self.out) {
            let _ = fs::rename(old.path(), &self.out);
            return Err(publish_err(e));
        }
        let _ = self.dir.keep();
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_image_replaces_the_previous_one_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("image");
        let s = Staging::prepare(&out).unwrap();
        s.write("a", b"first").unwrap();
        s.write("stale", b"x").unwrap();
        assert_eq!(s.publish().unwrap(), out);
        assert_eq!(entries(&out), ["a", "stale"]);

        let s = Staging::prepare(&out).unwrap();
        s.write("a", b"second").unwrap();
        s.publish().unwrap();
        assert_eq!(entries(&out), ["a"]);
        assert_eq!(fs::read(out.join("a")).unwrap(), b"second");
        assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(entries(tmp.path()), ["image"], "no staging or old directories left");
    }

    #[test]
    fn a_failed_build_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("image");
        let s = Staging::prepare(&out).unwrap();
        s.write("a", b"half").unwrap();
        drop(s);
        assert!(entries(tmp.path()).is_empty());
    }

    #[test]
    fn unusable_outputs_fail_up_front() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        let err = Staging::prepare(&file).unwrap_err();
        assert!(err.to_string().contains("exists and is not a directory"), "{err}");
        let err = Staging::prepare(&file.join("image")).unwrap_err();
        assert!(err.to_string().contains("Not a directory"), "{err}");
        assert_eq!(entries(tmp.path()), ["file"]);
        // Not writable even for root.
        let err = Staging::prepare(Path::new("/proc/image-builder-test")).unwrap_err();
        assert!(matches!(err, OutputError::Staging { .. }), "{err}");
        assert!(err.to_string().contains("(is it writable?)"), "{err}");
    }
}
