//! Host measurements for `Register.resources` and heartbeats: CPUs and
//! memory from sysinfo, disk total/free of the filesystem holding dockerd's
//! data root (statvfs, so it is the right filesystem even when the data root
//! sits on a mount of its own).

use std::path::{Path, PathBuf};

use berth_proto::v1::Resources;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// Load figures at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub disk_free_bytes: u64,
}

/// Samples the machine; keeps sysinfo state between samples because CPU
/// usage is the difference between two readings.
pub struct Sampler {
    system: System,
    disk_path: PathBuf,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("disk_path", &self.disk_path)
            .finish()
    }
}

impl Sampler {
    /// `disk_path`: a path on the filesystem to report (the data root).
    pub fn new(disk_path: &Path) -> Self {
        let kind = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
            .with_memory(MemoryRefreshKind::nothing().with_ram());
        Sampler {
            system: System::new_with_specifics(kind),
            disk_path: disk_path.to_owned(),
        }
    }

    /// What the host offers.
    pub fn resources(&mut self) -> Resources {
        self.system.refresh_memory();
        let (disk_bytes, disk_free_bytes) = disk(&self.disk_path);
        Resources {
            cpus: u32::try_from(self.system.cpus().len()).unwrap_or(u32::MAX),
            memory_bytes: self.system.total_memory(),
            disk_bytes,
            disk_free_bytes,
        }
    }

    /// Current load; CPU usage is averaged since the previous call.
    pub fn load(&mut self) -> Load {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        Load {
            cpu_percent: self.system.global_cpu_usage(),
            memory_used_bytes: self.system.used_memory(),
            disk_free_bytes: disk(&self.disk_path).1,
        }
    }
}

/// (total, available to unprivileged users) bytes of the filesystem holding
/// `path`; zeros if it cannot be read (a missing figure must not break a
/// heartbeat).
pub fn disk(path: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let frag = s.fragment_size();
            (
                s.blocks().saturating_mul(frag),
                s.blocks_available().saturating_mul(frag),
            )
        }
        Err(_) => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_this_machine() {
        let mut s = Sampler::new(Path::new("/"));
        let r = s.resources();
        assert!(r.cpus >= 1);
        assert!(r.memory_bytes > 0);
        assert!(
            r.disk_bytes > 0 && r.disk_free_bytes <= r.disk_bytes,
            "{r:?}"
        );
        let l = s.load();
        assert!(l.memory_used_bytes > 0 && l.memory_used_bytes <= r.memory_bytes);
        assert!((0.0..=100.0 * r.cpus as f32).contains(&l.cpu_percent));
        assert_eq!(disk(Path::new("/nonexistent/berth")), (0, 0));
    }
}
