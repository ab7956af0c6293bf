//! Loading and creating a node's identity key in its state directory.
//!
//! The key lives in `STATE_DIR/identity.key` as the hex-encoded ed25519 seed,
//! mode 0600, in a directory of mode 0700. It is created on first use; creation is
//! atomic (written to a temporary file, then hard-linked into place), so two
//! processes starting at once agree on one key. A key file that others can read
//! is refused: a leaked key is a stolen identity.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use data_encoding::HEXLOWER;
use reach_proto::SecretKey;

/// File name of the identity key inside the state directory.
pub const KEY_FILE: &str = "identity.key";

const HEADER: &str =
    "# reach node identity: ed25519 secret key seed (hex). Keep this file private.\n";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyStoreError {
    /// The key file can be read by group or others.
    #[error("identity key {path} is readable by others (mode {mode:03o}); run: chmod 600 {path}")]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file's content is not a key.
    #[error("identity key {path} is corrupt: {reason}")]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The OS refused a file operation.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What we tried.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// No state directory could be determined.
    #[error("no state directory: set --state-dir, XDG_STATE_HOME or HOME")]
    NoStateDir,
    /// The state directory holding the key is not private: another user
    /// could replace the key, or read it.
    #[error("state directory is not private: {0}")]
    NotPrivate(#[from] crate::files::NotPrivate),
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> KeyStoreError + 'a {
    move |source| KeyStoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The default state directory: `$XDG_STATE_HOME/reach`, else `~/.local/state/reach`.
pub fn default_state_dir() -> Result<PathBuf, KeyStoreError> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("reach"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or(KeyStoreError::NoStateDir)?;
    Ok(PathBuf::from(home).join(".local/state/reach"))
}

/// A new random identity that is not stored anywhere (for tests, examples and
/// short-lived nodes).
pub fn generate() -> Result<SecretKey, KeyStoreError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyStoreError::Io {
        action: "draw randomness for",
        path: PathBuf::from("a new key"),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(SecretKey::from_seed(seed))
}

/// Loads the identity from `state_dir`, creating the directory and a new key on
/// first use.
pub fn load_or_create(state_dir: &Path) -> Result<SecretKey, KeyStoreError> {
    let path = state_dir.join(KEY_FILE);
    if path.exists() {
        crate::files::check_private_dir(state_dir)?;
    }
    match load(&path) {
        Err(KeyStoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            create(state_dir, &path)
        }
        other => other,
    }
}

/// Loads an existing key file, checking its permissions first.
pub fn load(path: &Path) -> Result<SecretKey, KeyStoreError> {
    let meta = fs::metadata(path).map_err(io_err("read", path))?;
    crate::files::check_owner(path, &meta)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyStoreError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io_err("read", path))?;
    parse(&text).map_err(|reason| KeyStoreError::Corrupt {
        path: path.to_path_buf(),
        reason,
    })
}

fn parse(text: &str) -> Result<SecretKey, &'static str> {
    let hex = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or("no key line")?;
    let bytes = HEXLOWER
        .decode(hex.to_ascii_lowercase().as_bytes())
        .map_err(|_| "key line is not hex")?;
    let seed: [u8; 32] = bytes.try_into().map_err(|_| "key is not 32 bytes")?;
    Ok(SecretKey::from_seed(seed))
}

fn create(state_dir: &Path, path: &Path) -> Result<SecretKey, KeyStoreError> {
    fs::create_dir_all(state_dir).map_err(io_err("create directory", state_dir))?;
    fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err("set permissions of", state_dir))?;
    let seed = generate()?.seed();
    let tmp = state_dir.join(format!(".{KEY_FILE}.{}.tmp", std::process::id()));
    let result = write_private(&tmp, &seed).and_then(|()| match fs::hard_link(&tmp, path) {
        Ok(()) => Ok(SecretKey::from_seed(seed)),
        // Another process created the key first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load(path),
        Err(e) => Err(io_err("create", path)(e)),
    });
    let _ = fs::remove_file(&tmp);
    // The new link must survive a crash: a lost identity is a new node.
    if result.is_ok() {
        fs::File::open(state_dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync", state_dir))?;
    }
    result
}

fn write_private(path: &Path, seed: &[u8; 32]) -> Result<(), KeyStoreError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))?;
    let text = format!("{HEADER}{}\n", HEXLOWER.encode(seed));
    f.write_all(text.as_bytes())
        .map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("sync", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_use_creates_a_private_key_and_later_uses_load_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let a = load_or_create(&state).expect("create");
        let mode = fs::metadata(state.join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create(&state).expect("load");
        assert_eq!(a.node_id(), b.node_id());
    }

    #[test]
    fn a_key_in_a_state_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        load_or_create(&state).expect("create");
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = load_or_create(&state).expect_err("open directory");
        assert!(matches!(err, KeyStoreError::NotPrivate(_)), "{err}");
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        load_or_create(dir.path()).expect("create");
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create(dir.path()).expect_err("must refuse");
        assert!(matches!(err, KeyStoreError::TooOpen { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn key_file_text_round_trips() {
        let key = SecretKey::from_seed([9; 32]);
        let text = format!("{HEADER}{}\n", HEXLOWER.encode(&key.seed()));
        assert_eq!(parse(&text).map(|k| k.node_id()), Ok(key.node_id()));
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_key_files_never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn parsing_hexish_key_lines_never_panics(line in "[0-9a-fA-F#\\s]{0,80}") {
            let _ = parse(&line);
        }
    }

    #[test]
    fn a_corrupt_key_is_reported_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEY_FILE);
        write_private(&path, &[1; 32]).expect("write");
        fs::write(&path, "# header\nnot-hex\n").expect("overwrite");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        let err = load_or_create(dir.path()).expect_err("corrupt");
        assert!(matches!(
            err,
            KeyStoreError::Corrupt {
                reason: "key line is not hex",
                ..
            }
        ));
    }
}
