//! Small helpers shared by the other modules: finding host tools (with the Debian package
//! to install when one is missing), running commands with readable errors, the cache
//! directory with its inter-process lock, and atomic file writes.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::error::{ImageError, IoContext, Result};

/// Environment variable naming the cache directory.
pub const CACHE_ENV: &str = "P2PVM_TESTHOST_CACHE";

/// Directories searched for tools besides `$PATH` (sbin is often missing from a user's PATH).
const EXTRA_TOOL_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Finds an executable by name in `$PATH` and the usual system directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(EXTRA_TOOL_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Like [`find_tool`], but a missing tool is an error naming the package that provides it.
pub fn require_tool(name: &str, package: &str) -> Result<PathBuf> {
    find_tool(name).ok_or_else(|| ImageError::MissingTool {
        tool: name.to_string(),
        package: package.to_string(),
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs a command to completion with captured output; a non-zero exit is an error that
/// quotes the command and the end of its stderr.
pub fn run_captured(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("cannot start {shown}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(ImageError::Command {
            command: shown,
            status: output.status,
            stderr: tail.join("\n"),
        });
    }
    Ok(output)
}

/// The harness's cache directory (`$P2PVM_TESTHOST_CACHE`, else
/// `$HOME/.cache/p2pvm-testhost`).
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens (creating if needed) the cache directory named by the environment.
    pub fn from_env() -> Result<Self> {
        let root = match std::env::var_os(CACHE_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => {
                let home = std::env::var_os("HOME").ok_or_else(|| {
                    ImageError::Input(format!("neither {CACHE_ENV} nor HOME is set"))
                })?;
                PathBuf::from(home).join(".cache/p2pvm-testhost")
            }
        };
        Self::at(root)
    }

    /// Opens (creating if needed) a cache directory at `root`.
    pub fn at(root: PathBuf) -> Result<Self> {
        fs::create_dir_all(&root).ctx(|| format!("cannot create cache dir {}", root.display()))?;
        Ok(Self { root })
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A subdirectory of the cache, created if needed.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// Takes the cache's exclusive lock (released when the returned file is dropped), so
    /// that concurrent tests and processes do not build the same thing twice at once.
    pub fn lock(&self) -> Result<File> {
        let path = self.root.join(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("cannot open {}", path.display()))?;
        file.lock()
            .ctx(|| format!("cannot lock {}", path.display()))?;
        Ok(file)
    }
}

/// Feeds the file at `path` to `each`, a megabyte at a time (hashing files
/// of any size without holding them).
pub fn for_each_chunk(path: &Path, mut each: impl FnMut(&[u8])) -> Result<()> {
    use std::io::Read;
    let mut file = File::open(path).ctx(|| format!("cannot open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .ctx(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        each(&buf[..n]);
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| ImageError::Input(format!("{} has no parent", path.display())))?;
    let write = || -> std::io::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(bytes)?;
        tmp.persist(path)?;
        Ok(())
    };
    write().ctx(|| format!("cannot write {}", path.display()))
}

/// Quotes a string for a POSIX shell (single quotes).
pub fn shell_quote(value: &str) -> String {
    if !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b))
    {
        return value.to_string();
    }
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/guest/vmlinux"), "/guest/vmlinux");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn finds_sh() {
        assert!(find_tool("sh").is_some());
        let err = require_tool("no-such-tool-p2pvm", "some-package").unwrap_err();
        assert!(err.to_string().contains("apt-get install some-package"));
    }
}
