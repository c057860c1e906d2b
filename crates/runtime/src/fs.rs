//! Files written whole or not at all: the data goes to a temporary file
//! beside the target, which is then renamed over it, so a reader (or a
//! successor process after a crash) sees the old content or the new, never
//! half of either. [`Durability`] says whether the data must also survive
//! a power loss (fsync of the file and its directory) or only a crash of
//! the process (the page cache keeps it).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// How far a write must get before [`write_atomic`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Survives the process, not the machine (no fsync): for files that
    /// only serve this boot, such as an address file or a pid file.
    Process,
    /// Survives a power loss: the file and its directory are fsynced.
    Disk,
}

/// Writes `data` to `path` by way of a temporary file and a rename, with
/// `mode` (the umask does not narrow it).
pub fn write_atomic(
    path: &Path,
    data: &[u8],
    mode: u32,
    durability: Durability,
) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        if durability == Durability::Disk {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp, path)?;
        if durability == Durability::Disk
            && let Some(dir) = path.parent()
        {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_file_is_replaced_whole_with_its_mode_and_no_temporary_is_left() {
        let dir = std::env::temp_dir().join(format!("berth-runtime-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("state.json");
        for (data, durability) in [
            (&b"first"[..], Durability::Process),
            (b"second", Durability::Disk),
        ] {
            write_atomic(&f, data, 0o640, durability).unwrap();
            assert_eq!(std::fs::read(&f).unwrap(), data);
        }
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = std::env::temp_dir().join(format!("berth-runtime-fs2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x");
        write_atomic(&f, b"old", 0o600, Durability::Process).unwrap();
        // A directory where the file should go: the rename fails.
        let bad = dir.join("sub");
        std::fs::create_dir_all(bad.join("inner")).unwrap();
        assert!(write_atomic(&bad, b"new", 0o600, Durability::Process).is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"old");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
