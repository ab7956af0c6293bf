//! Writing state files safely, and checking that a private directory is.
//!
//! ```text
//! write_atomically(path):  .NAME.PID.RAND.tmp (O_CREAT|O_EXCL, mode) -> write -> fsync
//!                          -> rename over path -> fsync the directory
//! ```
//! The temporary name is unique (process id and random), created with
//! `O_EXCL`, which never follows a symbolic link, so another user cannot
//! aim the write elsewhere by planting a link at a guessable name; `rename`
//! replaces a link at `path` itself rather than writing through it. The
//! fsyncs make a crash leave the old file or the new one, never an empty
//! one: an identity pin or an address file lost to a crash is a silent
//! failure later.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `bytes` to `path` atomically with permission bits `mode` (see the
/// module docs).
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace(path, bytes, mode, true)
}

/// [`write_atomically`] without the fsyncs, for caches (the module cache,
/// resumption tickets): readers still see the old file or the new one, and
/// a crash may lose the entry, which costs only a slower next connection.
/// Syncing took milliseconds on the setup path of a first connection.
pub fn write_cache(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace(path, bytes, mode, false)
}

fn replace(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut rand = [0u8; 8];
    getrandom::fill(&mut rand).map_err(|e| io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        u64::from_le_bytes(rand)
    ));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    if !sync {
        return Ok(());
    }
    // The rename itself must survive a crash too.
    fs::File::open(dir).and_then(|d| d.sync_all())
}

/// Why a directory that must be private is not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotPrivate {
    /// It belongs to another user.
    #[error("{path} belongs to user {owner}, not to this user ({me})")]
    Owner {
        /// The directory.
        path: String,
        /// Its owner's uid.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Group or others may read, write or enter it.
    #[error("{path} is open to other users (mode {mode:03o}); run: chmod 700 {path}")]
    Mode {
        /// The directory.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// It could not be inspected.
    #[error("cannot inspect {path}: {source}")]
    Io {
        /// The directory.
        path: String,
        /// What the OS said.
        source: io::Error,
    },
}

/// This process's effective user id.
fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Checks that the file or directory at `path`, whose metadata is `meta`,
/// belongs to this user.
pub fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), NotPrivate> {
    let me = euid();
    if meta.uid() != me {
        return Err(NotPrivate::Owner {
            path: path.display().to_string(),
            owner: meta.uid(),
            me,
        });
    }
    Ok(())
}

/// Checks that `dir` belongs to this user and is closed to everyone else
/// (it holds an identity key or control sockets).
///
/// `dir` may be a symbolic link owned by root or by this user, which is
/// then followed: systemd gives a service with `DynamicUser=yes` its
/// `StateDirectory` as `/var/lib/NAME`, a link of root's to
/// `/var/lib/private/NAME`, and the service's user (a new uid each start)
/// owns the directory. A link of anyone else's is refused, like a
/// directory of theirs.
pub fn check_private_dir(dir: &Path) -> Result<(), NotPrivate> {
    let path = dir.display().to_string();
    let inspect = |source| NotPrivate::Io {
        path: path.clone(),
        source,
    };
    let mut meta = fs::symlink_metadata(dir).map_err(inspect)?;
    if meta.file_type().is_symlink() {
        if meta.uid() != 0 {
            check_owner(dir, &meta)?;
        }
        meta = fs::metadata(dir).map_err(inspect)?;
    }
    check_owner(dir, &meta)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(NotPrivate::Mode { path, mode });
    }
    Ok(())
}

/// Creates `dir` (and its parents) if need be, makes it private (0700) when
/// this process created it, and checks it is private.
pub fn private_dir(dir: &Path) -> Result<(), NotPrivate> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|source| NotPrivate::Io {
            path: dir.display().to_string(),
            source,
        })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            NotPrivate::Io {
                path: dir.display().to_string(),
                source,
            }
        })?;
    }
    check_private_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_a_planted_link_instead_of_following_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").expect("write");
        let path = dir.path().join("addr.txt");
        std::os::unix::fs::symlink(&victim, &path).expect("plant a link");
        write_atomically(&path, b"new content\n", 0o644).expect("write");
        assert_eq!(fs::read_to_string(&victim).expect("read"), "precious");
        assert_eq!(fs::read_to_string(&path).expect("read"), "new content\n");
        assert!(!fs::symlink_metadata(&path).expect("meta").is_symlink());
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode & !0o644, 0, "no more permissions than asked: {mode:o}");
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_link_of_roots_or_this_users_is_followed_to_a_private_directory() {
        // As systemd lays out a DynamicUser's StateDirectory: a link to the
        // service's own directory (here this user's link; root's alike).
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("private-state");
        private_dir(&target).expect("created private");
        let link = dir.path().join("state");
        std::os::unix::fs::symlink(&target, &link).expect("link");
        check_private_dir(&link).expect("a link of this user's to a private dir");
        // The directory it leads to must still be private.
        fs::set_permissions(&target, fs::Permissions::from_mode(0o750)).expect("chmod");
        let err = check_private_dir(&link).expect_err("open to others");
        assert!(matches!(err, NotPrivate::Mode { mode: 0o750, .. }), "{err}");
        // A link of another user's is refused (only root can make one as
        // another user; the test runs as root in CI, elsewhere it skips
        // that half).
        if euid() == 0 {
            fs::set_permissions(&target, fs::Permissions::from_mode(0o700)).expect("chmod");
            std::os::unix::fs::lchown(&link, Some(4242), None).expect("chown the link");
            let err = check_private_dir(&link).expect_err("another user's link");
            assert!(
                matches!(err, NotPrivate::Owner { owner: 4242, .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn a_directory_open_to_others_is_not_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("state");
        private_dir(&d).expect("created private");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = check_private_dir(&d).expect_err("open to others");
        assert!(matches!(err, NotPrivate::Mode { mode: 0o755, .. }), "{err}");
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }
}
