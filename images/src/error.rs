//! The one error type of the image builder: what went wrong, with the file or
//! command it concerns and the underlying cause kept as the source.

use std::path::PathBuf;
use std::process::ExitStatus;

/// Why an image, a kernel or a disk could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file or directory could not be read, written or created.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The operating system's answer.
        #[source]
        source: std::io::Error,
    },
    /// A host tool is not installed.
    #[error(
        "`{tool}` was not found: install the Debian package `{package}` (apt-get install {package})"
    )]
    MissingTool {
        /// The program.
        tool: String,
        /// The Debian package that provides it.
        package: String,
    },
    /// A host tool ran and failed.
    #[error("{command} failed ({status}):\n{stderr}")]
    Command {
        /// The command line, as run.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// The end of what it wrote to stderr.
        stderr: String,
    },
    /// `apt-get download` failed.
    #[error(
        "apt-get could not download {package} ({status}). Is the package in apt's lists \
         (`apt-get update`), and is the archive reachable? apt said:\n{said}"
    )]
    Download {
        /// The package asked for.
        package: String,
        /// apt-get's exit status.
        status: ExitStatus,
        /// What apt-get wrote to stderr.
        said: String,
    },
    /// A pinned kernel version the archive does not serve.
    #[error(
        "the pinned kernel linux-image-{pinned} is not in the archive (any more); \
         {meta} currently means linux-image-{current}: pin that, or remove the pin"
    )]
    PinnedKernelGone {
        /// The pin.
        pinned: String,
        /// The metapackage that names the current kernel.
        meta: &'static str,
        /// What the archive serves now.
        current: String,
    },
    /// The kernel package is not what the builder can use.
    #[error("kernel: {0}")]
    Kernel(String),
    /// `modules.dep` is malformed or a module is unknown.
    #[error("modules: {0}")]
    Module(String),
    /// An archive entry is not representable or changed while being archived.
    #[error("cpio: {0}")]
    Archive(String),
    /// An ELF file is malformed.
    #[error("{path}: {reason}")]
    Elf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A program needs a shared library this host does not have.
    #[error("{binary} needs a shared library this host does not have")]
    Library {
        /// The program.
        binary: PathBuf,
        /// `ldd`'s complaint.
        #[source]
        source: MissingLibrary,
    },
    /// The build's inputs are inconsistent (a missing program, a bad option).
    #[error("{0}")]
    Input(String),
}

/// Results of this crate.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Attaches a description (naming the path) to an I/O error.
pub(crate) trait IoContext<T> {
    /// Converts the error, describing the operation with `context()`.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| ImageError::Io {
            context: context(),
            source,
        })
    }
}

/// A library `ldd` could not find: its line of `ldd`'s output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("missing shared library: {0}")]
pub struct MissingLibrary(pub String);
