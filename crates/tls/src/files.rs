//! Private files (0600) and directories (0700), written so readers never see
//! half a file: a temporary file created with the final mode, then a rename.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::TlsError;

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_owned();
    move |source| TlsError::Io {
        action,
        path,
        source,
    }
}

/// Writes `data` to `path` with mode `mode`, atomically and durably (a
/// credential that vanished in a power loss would lock the pool out).
pub fn write_with_mode(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    berth_runtime::fs::write_atomic(path, data, mode, berth_runtime::fs::Durability::Disk)
        .map_err(io("cannot write", path))
}

/// Writes a secret: mode 0600.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    write_with_mode(path, data, 0o600)
}

/// Creates `path` (and missing parents) with mode 0700, or tightens an
/// existing directory to 0700.
pub fn create_private_dir(path: &Path) -> Result<(), TlsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io("cannot create", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(io("cannot chmod", path))
}

/// Reads a one-line secret (a token), trimmed; empty is an error.
pub fn read_secret(path: &Path) -> Result<String, TlsError> {
    let s = std::fs::read_to_string(path).map_err(io("cannot read", path))?;
    let s = s.trim();
    if s.is_empty() {
        return Err(TlsError::BadFile {
            path: path.to_owned(),
            reason: "is empty".into(),
        });
    }
    Ok(s.to_owned())
}

/// [`read_secret`] for a file only its owner may read: one readable by
/// its group or by others is refused (on a host, builds run as root anyway;
/// the mode keeps the secret from every other account and from tools that
/// copy files with their modes).
pub fn read_private_secret(path: &Path) -> Result<String, TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(io("cannot read", path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::BadFile {
            path: path.to_owned(),
            reason: format!(
                "is readable by others (mode {:03o}); it must be 0600 (chmod 600)",
                mode & 0o777
            ),
        });
    }
    read_secret(path)
}

/// Reads a PEM file.
pub fn read_pem(path: &Path) -> Result<String, TlsError> {
    let s = std::fs::read_to_string(path).map_err(io("cannot read", path))?;
    if !s.contains("-----BEGIN ") {
        return Err(TlsError::BadFile {
            path: path.to_owned(),
            reason: "holds no PEM block".into(),
        });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_secret_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("join-token");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_private_secret(&p).unwrap_err().to_string();
        assert!(e.contains("0600") && e.contains("644"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_private_secret(&p).unwrap(), "s3cret");
    }

    #[test]
    fn private_files_and_dirs_get_their_modes() {
        let dir = std::env::temp_dir().join(format!("berth-tls-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        create_private_dir(&dir.join("a/b")).unwrap();
        assert_eq!(
            std::fs::metadata(dir.join("a/b")).unwrap().mode() & 0o777,
            0o700
        );
        let f = dir.join("a/b/secret");
        write_private(&f, b"  tok\n").unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read_secret(&f).unwrap(), "tok");
        write_private(&f, b"\n").unwrap();
        assert!(read_secret(&f).is_err());
        assert!(read_pem(&f).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
