//! Writing beneath a directory without ever leaving it. Every path is
//! resolved from a descriptor of the destination with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, one component at a time, and
//! every change is made relative to the descriptor of its parent: neither
//! `..`, an absolute path nor a symlink (sent earlier in the same archive, or
//! already on disk) can lead a file, a directory or a link outside, and
//! nothing is created before the path to it is known to be beneath.
//!
//! This is what `berth sync --from` writes with: the archive comes from the
//! leased host, whose root user is the lease holder, so its bytes are
//! hostile input. Modes lose their setuid and setgid bits.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, fchmod, futimens, mkdirat};
use nix::sys::time::TimeSpec;
use nix::unistd::{UnlinkatFlags, linkat, symlinkat, unlinkat};

/// The mode bits kept: permissions and the sticky bit, never setuid or setgid.
pub const KEPT_MODE_BITS: u32 = 0o1777;

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS
}

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A directory that writes stay beneath.
#[derive(Debug)]
pub struct Beneath {
    root: OwnedFd,
}

/// The single name a relative path ends in, and the path of its parent.
fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    Ok((rel.parent().unwrap_or(Path::new("")), name))
}

impl Beneath {
    /// Opens `dest`, which must be a directory (a symlink to one is refused).
    pub fn open(dest: &Path) -> io::Result<Self> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW);
        let root = openat2(nix::fcntl::AT_FDCWD, dest, how).map_err(io_err)?;
        Ok(Self { root })
    }

    fn open_dir_in(parent: impl AsFd, name: &OsStr) -> Result<OwnedFd, Errno> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(beneath());
        openat2(parent, name, how)
    }

    /// The directory `rel` (relative, plain components only), created with
    /// mode 0700 where missing. A symlink or a non-directory in the way is
    /// an error, never followed or replaced.
    pub fn dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        let mut cur = self.root.try_clone()?;
        for c in rel.components() {
            let name = match c {
                Component::Normal(n) => n,
                Component::CurDir => continue,
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} is not a plain relative path", rel.display()),
                    ));
                }
            };
            cur = match Self::open_dir_in(&cur, name) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match mkdirat(&cur, name, Mode::from_bits_truncate(0o700)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(io_err(e)),
                    }
                    Self::open_dir_in(&cur, name).map_err(io_err)?
                }
                Err(Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: a symlink or a file stands where a directory should be (not followed)",
                            rel.display()
                        ),
                    ));
                }
                Err(e) => return Err(io_err(e)),
            };
        }
        Ok(cur)
    }

    /// Removes whatever is at `name` in `parent` (a file, a link, or a
    /// whole directory tree, never following a link); nothing there is fine.
    fn clear(parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
        match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::EISDIR) | Err(Errno::EPERM) => {
                let dir = Self::open_dir_in(parent, name).map_err(io_err)?;
                Self::clear_tree(&dir)?;
                unlinkat(parent, name, UnlinkatFlags::RemoveDir).map_err(io_err)
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// Empties the directory `dir` (its descriptor, so no path is followed).
    fn clear_tree(dir: &OwnedFd) -> io::Result<()> {
        let listing = nix::dir::Dir::from_fd(dir.try_clone()?).map_err(io_err)?;
        let mut names = Vec::new();
        for entry in listing {
            let entry = entry.map_err(io_err)?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(<OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name).to_owned());
            }
        }
        for name in names {
            Self::clear(dir, &name)?;
        }
        Ok(())
    }

    /// Creates the file `rel` afresh (whatever was there is removed) and
    /// returns it open for writing; set its mode and time with [`finish`].
    pub fn create_file(&self, rel: &Path) -> io::Result<File> {
        let (parent, name) = split(rel)?;
        let parent = self.dir(parent)?;
        Self::clear(&parent, name)?;
        let how = OpenHow::new()
            .flags(
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
            )
            .mode(Mode::from_bits_truncate(0o600))
            .resolve(beneath());
        let fd = openat2(&parent, name, how).map_err(io_err)?;
        Ok(File::from(fd))
    }

    /// Makes `rel` a symlink to `target` (the target is stored, never followed).
    pub fn symlink(&self, rel: &Path, target: &Path) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        let parent = self.dir(parent)?;
        Self::clear(&parent, name)?;
        symlinkat(target, &parent, name).map_err(io_err)
    }

    /// Makes `rel` a hard link to `source`, which must be beneath as well.
    pub fn hard_link(&self, rel: &Path, source: &Path) -> io::Result<()> {
        let (src_parent, src_name) = split(source)?;
        let src_parent = self.dir(src_parent)?;
        let (parent, name) = split(rel)?;
        let parent = self.dir(parent)?;
        Self::clear(&parent, name)?;
        linkat(&src_parent, src_name, &parent, name, AtFlags::empty()).map_err(io_err)
    }

    /// Makes sure `rel` is a directory: a file or link in its place is replaced.
    pub fn ensure_dir(&self, rel: &Path) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        let parent = self.dir(parent)?;
        match Self::open_dir_in(&parent, name) {
            Ok(_) => Ok(()),
            Err(Errno::ENOENT) => {
                mkdirat(&parent, name, Mode::from_bits_truncate(0o700)).map_err(io_err)
            }
            Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => {
                Self::clear(&parent, name)?;
                mkdirat(&parent, name, Mode::from_bits_truncate(0o700)).map_err(io_err)
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// Sets the mode (without setuid/setgid) and mtime of the directory `rel`.
    pub fn finish_dir(&self, rel: &Path, mode: u32, mtime: SystemTime) -> io::Result<()> {
        let dir = self.dir(rel)?;
        finish(&dir, mode, mtime)
    }
}

/// Sets an open file's mode (without setuid/setgid) and mtime.
pub fn finish(fd: impl AsFd, mode: u32, mtime: SystemTime) -> io::Result<()> {
    fchmod(&fd, Mode::from_bits_truncate(mode & KEPT_MODE_BITS)).map_err(io_err)?;
    let since = mtime
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let t = TimeSpec::from_duration(since);
    futimens(&fd, &t, &t).map_err(io_err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn nothing_is_written_through_a_symlink_or_above_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        let dest = tmp.path().join("dest");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(&dest).unwrap();
        let b = Beneath::open(&dest).unwrap();
        b.symlink(Path::new("evil"), &outside).unwrap();
        b.symlink(Path::new("rel"), Path::new("../outside"))
            .unwrap();
        for path in ["evil/x", "evil/deep/er/x", "rel/x", "rel/y/z"] {
            assert!(b.create_file(Path::new(path)).is_err(), "{path}");
            assert!(b.dir(Path::new(path)).is_err(), "{path}");
        }
        assert!(b.dir(Path::new("../outside")).is_err());
        assert!(
            b.hard_link(Path::new("h"), Path::new("evil/secret"))
                .is_err()
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // Links are kept as links.
        assert_eq!(std::fs::read_link(dest.join("evil")).unwrap(), outside);
    }

    #[test]
    fn files_replace_what_was_there_and_lose_setuid_and_setgid() {
        let tmp = tempfile::tempdir().unwrap();
        let b = Beneath::open(tmp.path()).unwrap();
        b.ensure_dir(Path::new("d")).unwrap();
        std::fs::write(tmp.path().join("d/f"), "old").unwrap();
        let mut f = b.create_file(Path::new("d/f")).unwrap();
        f.write_all(b"new").unwrap();
        finish(&f, 0o6755, SystemTime::UNIX_EPOCH).unwrap();
        drop(f);
        let m = std::fs::metadata(tmp.path().join("d/f")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::read(tmp.path().join("d/f")).unwrap(), b"new");
        // A directory where a file goes, and a file where a directory goes.
        std::fs::create_dir_all(tmp.path().join("x/inner")).unwrap();
        b.create_file(Path::new("x")).unwrap();
        assert!(tmp.path().join("x").is_file());
        b.ensure_dir(Path::new("x")).unwrap();
        assert!(tmp.path().join("x").is_dir());
        b.finish_dir(Path::new("x"), 0o2775, SystemTime::UNIX_EPOCH)
            .unwrap();
        let m = std::fs::metadata(tmp.path().join("x")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o775);
    }
}
