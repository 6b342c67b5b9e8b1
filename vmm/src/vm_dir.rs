//! Where a VM keeps its runtime files, read by the process that runs it, the
//! supervisor that starts it, the figures server and `p2pvmm console`:
//!
//! ```text
//! $home/vms/NAME/console.sock   p2pvmm console NAME attaches here
//! $home/vms/NAME/console.log    everything the guest printed, this run
//! $home/vms/NAME/memory.json    the guest memory layout
//! $home/vms/NAME/figures.json   the VM process's figures
//! $home/vms/NAME/pid            the VM process
//! ```

use std::path::{Path, PathBuf};

/// Where a VM keeps its runtime files.
#[derive(Debug, Clone)]
pub struct VmDir(PathBuf);

impl VmDir {
    /// `root/vms/name`.
    pub fn new(root: &Path, name: &str) -> Self {
        Self(root.join("vms").join(name))
    }
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// The console socket.
    pub fn console_socket(&self) -> PathBuf {
        self.0.join("console.sock")
    }
    /// The console log.
    pub fn console_log(&self) -> PathBuf {
        self.0.join("console.log")
    }
    /// The guest memory layout report (see [`crate::vstate::slots`]).
    pub fn memory_report(&self) -> PathBuf {
        self.0.join("memory.json")
    }
    /// The VM process's figures (`crate::metrics`).
    pub fn figures(&self) -> PathBuf {
        self.0.join("figures.json")
    }
    /// The pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("pid")
    }
}
