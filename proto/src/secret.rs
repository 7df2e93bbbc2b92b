//! The shared secret on disk and in the environment: generating it, the private state directory
//! it lives in, writing it (mode 0600 from the first byte, whole or not at all) and finding it
//! for a client (`KORMLM_TOKEN`, a token file, or `STATE_DIR/token`). The secret never travels
//! on a command line: `--token` still works but is deprecated with a warning.

use crate::durable;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The environment variable that carries the token to workers and clients.
pub const TOKEN_ENV: &str = "KORMLM_TOKEN";

/// The token file's name in the coordinator's state directory.
pub const TOKEN_FILE: &str = "token";

/// Random bytes in a generated token (256 bits, printed as 64 hex digits).
const TOKEN_BYTES: usize = 32;

/// What `--token` prints when it is used.
pub const TOKEN_FLAG_DEPRECATED: &str = "--token is deprecated: a secret on a command line is visible to every \
     local user in `ps`; set KORMLM_TOKEN in the environment or read it from a file (--token-file, --state-dir)";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{}: {message}", path.display())]
    Path { path: PathBuf, message: String },
    #[error(transparent)]
    Write(#[from] durable::WriteError),
    #[error("cannot read random bytes from /dev/urandom: {0}")]
    Random(std::io::Error),
}

fn path_error(path: &Path, message: impl Into<String>) -> SecretError {
    SecretError::Path {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A new random token: 256 bits from the kernel's generator, as hex.
pub fn generate_token() -> Result<String, SecretError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(SecretError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Makes `dir` (mode 0700 when it is new) and checks that only this user can change it: a
/// directory another user owns or may write to lets them replace the token file or the job
/// records, so it is refused.
pub fn ensure_private_dir(dir: &Path) -> Result<(), SecretError> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| path_error(dir, format!("cannot create the state directory: {e}")))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| path_error(dir, e.to_string()))?;
    if !meta.is_dir() {
        return Err(path_error(dir, "is not a directory"));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(path_error(
            dir,
            format!(
                "the state directory belongs to uid {}, not to this user (uid {me}); use a directory of your own",
                meta.uid()
            ),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(path_error(
            dir,
            format!(
                "the state directory is writable by other users (mode {mode:o}), who could replace its token; \
                 `chmod go-w {}` (or chmod 700) first",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Writes `contents` to `path` durably, readable by this user only: the temporary file is
/// created with mode 0600 (never a moment with wider permissions, whatever the umask or an
/// earlier file's mode), flushed and renamed over `path`.
pub fn write_private(path: &Path, contents: &str) -> Result<(), SecretError> {
    let tmp = durable::temp_path(path);
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(durable::WriteError {
            path: path.to_path_buf(),
            error,
        }
        .into());
    }
    durable::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(())
}

/// Reads a token file (one line). `private`: refuse a file other users may read or one that is
/// not a regular file of this user (the coordinator's own token file must not have leaked).
pub fn read_token_file(path: &Path, private: bool) -> Result<String, SecretError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| path_error(path, format!("cannot read the token: {e}")))?;
    if private {
        if !meta.is_file() {
            return Err(path_error(
                path,
                "is not a regular file; remove it (a new token is generated)",
            ));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 || meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(path_error(
                path,
                format!(
                    "the token file is not private to this user (mode {mode:o}, uid {}): the token may have \
                     leaked; remove the file (a new token is generated) or `chmod 600` it",
                    meta.uid()
                ),
            ));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| path_error(path, format!("cannot read the token: {e}")))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(path_error(path, "the token file is empty"));
    }
    Ok(token.to_string())
}

/// The token on the first line of `input` (a pipe from the launcher); `source` names it in errors.
pub fn read_token_line(mut input: impl std::io::BufRead, source: &str) -> Result<String, SecretError> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| path_error(Path::new(source), format!("cannot read the token: {e}")))?;
    let token = line.trim();
    if token.is_empty() {
        return Err(path_error(Path::new(source), "no token on the first line"));
    }
    Ok(token.to_string())
}

/// Where a client's token came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientToken {
    pub token: String,
    pub source: String,
}

/// The token a client presents: `--token` (deprecated, with a warning on stderr), then
/// `KORMLM_TOKEN`, then `--token-file`, then `STATE_DIR/token` when that file exists. `None`:
/// no token anywhere (the coordinator then refuses guarded calls with a message saying where to
/// find it).
pub fn client_token(
    flag: Option<&str>,
    token_file: Option<&Path>,
    state_dir: Option<&Path>,
) -> Result<Option<ClientToken>, SecretError> {
    if let Some(token) = flag {
        eprintln!("warning: {TOKEN_FLAG_DEPRECATED}");
        return Ok(Some(ClientToken {
            token: token.to_string(),
            source: "--token".into(),
        }));
    }
    if let Some(token) = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()) {
        return Ok(Some(ClientToken {
            token,
            source: TOKEN_ENV.into(),
        }));
    }
    if let Some(path) = token_file {
        return Ok(Some(ClientToken {
            token: read_token_file(path, false)?,
            source: format!("--token-file {}", path.display()),
        }));
    }
    if let Some(dir) = state_dir {
        let path = dir.join(TOKEN_FILE);
        if path.exists() {
            return Ok(Some(ClientToken {
                token: read_token_file(&path, false)?,
                source: path.display().to_string(),
            }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_line_is_read_from_a_pipe() {
        assert_eq!(read_token_line(&b"abc123\nrest"[..], "stdin").unwrap(), "abc123");
        let empty = read_token_line(&b""[..], "--token-stdin (stdin)")
            .unwrap_err()
            .to_string();
        assert_eq!(empty, "--token-stdin (stdin): no token on the first line");
    }

    #[test]
    fn generated_tokens_are_long_and_differ() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_private_file_is_0600_even_over_a_world_readable_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE);
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_token_file(&path, true)
            .unwrap_err()
            .to_string()
            .contains("not private"));
        write_private(&path, "new\n").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_token_file(&path, true).unwrap(), "new");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file stays"
        );
    }

    #[test]
    fn a_state_dir_others_may_write_to_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a/state");
        ensure_private_dir(&fresh).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o777)).unwrap();
        let refused = ensure_private_dir(&fresh).unwrap_err().to_string();
        assert!(refused.contains("writable by other users (mode 777)"), "{refused}");
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&fresh).unwrap();
    }
}
