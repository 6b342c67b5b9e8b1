//! Deterministic newc (`070701`) cpio archives, the format the kernel unpacks as an
//! initramfs. An [`Archive`] is a sorted tree of directories, regular files (bytes in memory
//! or streamed from a host file) and symlinks; missing parent directories are added
//! implicitly. Every entry gets mtime 0, uid/gid 0 and a sequential inode number, so the
//! same tree always produces the same bytes. Headers are written by the `cpio` crate.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

use crate::error::{ImageError, IoContext, Result};
use cpio::newc::{Builder, ModeFileType, trailer};

/// The bytes of a regular file in the archive.
#[derive(Debug, Clone)]
pub enum Content {
    /// Bytes held in memory.
    Bytes(Vec<u8>),
    /// A host file, streamed when the archive is written.
    File(PathBuf),
}

#[derive(Debug, Clone)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, content: Content },
    Symlink { target: String },
}

/// A tree of entries, written as a newc archive in path order (parents first).
#[derive(Debug, Clone, Default)]
pub struct Archive {
    nodes: BTreeMap<String, Node>,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and its parents); an existing directory gets the new mode.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        match self.nodes.get(&path) {
            Some(Node::Dir { .. }) | None => {
                self.nodes.insert(
                    path,
                    Node::Dir {
                        mode: mode & 0o7777,
                    },
                );
                Ok(())
            }
            Some(_) => Err(ImageError::Archive(format!(
                "{path} already exists and is not a directory"
            ))),
        }
    }

    /// Adds a regular file (replacing a file or symlink at the same path).
    pub fn file(&mut self, path: &str, mode: u32, content: Content) -> Result<()> {
        let mode = mode & 0o7777;
        self.leaf(path, Node::File { mode, content })
    }

    /// Adds a symlink `path -> target` (replacing a file or symlink at the same path).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        if target.is_empty() {
            return Err(ImageError::Archive(format!(
                "empty symlink target for {path}"
            )));
        }
        self.leaf(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// Whether an entry exists at `path`.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|p| self.nodes.contains_key(&p))
    }

    /// The entry paths, in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    fn leaf(&mut self, path: &str, node: Node) -> Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        if let Some(Node::Dir { .. }) = self.nodes.get(&path) {
            return Err(ImageError::Archive(format!("{path} is a directory")));
        }
        self.nodes.insert(path, node);
        Ok(())
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        let mut end = 0;
        while let Some(slash) = path[end..].find('/') {
            let parent = &path[..end + slash];
            match self.nodes.get(parent) {
                None => {
                    self.nodes
                        .insert(parent.to_string(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => {
                    return Err(ImageError::Archive(format!(
                        "parent {parent} of {path} is not a directory"
                    )));
                }
            }
            end += slash + 1;
        }
        Ok(())
    }

    /// Writes the archive (entries in path order, then the trailer) and returns the writer.
    pub fn write_to<W: Write>(&self, mut out: W) -> Result<W> {
        for (ino, (path, node)) in (1u32..).zip(&self.nodes) {
            let entry = Builder::new(path).ino(ino).uid(0).gid(0).mtime(0);
            out = match node {
                Node::Dir { mode } => {
                    let entry = entry
                        .mode(*mode)
                        .set_mode_file_type(ModeFileType::Directory)
                        .nlink(2);
                    entry
                        .write(out, 0)
                        .finish()
                        .ctx(|| format!("cpio: writing {path}"))?
                }
                Node::Symlink { target } => {
                    let entry = entry.mode(0o777).set_mode_file_type(ModeFileType::Symlink);
                    write_bytes(entry, out, target.as_bytes())
                        .ctx(|| format!("cpio: writing {path}"))?
                }
                Node::File { mode, content } => {
                    let entry = entry.mode(*mode).set_mode_file_type(ModeFileType::Regular);
                    match content {
                        Content::Bytes(bytes) => write_bytes(entry, out, bytes)
                            .ctx(|| format!("cpio: writing {path}"))?,
                        Content::File(host) => write_host_file(entry, out, host)
                            .ctx(|| format!("cpio: archiving {} as {path}", host.display()))?,
                    }
                }
            };
        }
        trailer(out).ctx(|| "cpio: writing the trailer".into())
    }
}

fn too_large() -> io::Error {
    io::Error::new(io::ErrorKind::FileTooLarge, "entry larger than 4 GiB")
}

fn write_bytes<W: Write>(entry: Builder, out: W, bytes: &[u8]) -> io::Result<W> {
    let size = u32::try_from(bytes.len()).map_err(|_| too_large())?;
    let mut writer = entry.write(out, size);
    writer.write_all(bytes)?;
    writer.finish()
}

fn write_host_file<W: Write>(entry: Builder, out: W, host: &PathBuf) -> io::Result<W> {
    let mut file = File::open(host)?;
    let len = file.metadata()?.len();
    let size = u32::try_from(len).map_err(|_| too_large())?;
    let mut writer = entry.write(out, size);
    // A file that grew makes the entry writer fail; one that shrank is caught here.
    let copied = io::copy(&mut file, &mut writer)?;
    if copied != len {
        return Err(io::Error::other("file changed size while being archived"));
    }
    writer.finish()
}

/// Strips leading `/` and `./`, rejects empty, `.` and `..` components.
fn normalize(path: &str) -> Result<String> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() {
        return Err(ImageError::Archive(format!("empty path {path:?}")));
    }
    if parts.contains(&"..") {
        return Err(ImageError::Archive(format!("path with '..': {path:?}")));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.file("/bin/busybox", 0o755, Content::Bytes(b"#!fake\n".to_vec()))
            .unwrap();
        a.symlink("/bin/sh", "busybox").unwrap();
        a.dir("/proc", 0o555).unwrap();
        a.file("etc/motd", 0o644, Content::Bytes(b"hello\n".to_vec()))
            .unwrap();
        a.file("/empty", 0o600, Content::Bytes(Vec::new())).unwrap();
        a
    }

    #[test]
    fn sorted_with_implicit_parents() {
        let a = sample();
        let paths: Vec<&str> = a.paths().collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "empty",
                "etc",
                "etc/motd",
                "proc"
            ]
        );
        assert!(a.contains("/bin/sh"));
    }

    #[test]
    fn rejects_bad_paths_and_conflicts() {
        let mut a = sample();
        assert!(a.file("/", 0o644, Content::Bytes(vec![])).is_err());
        assert!(a.file("/a/../b", 0o644, Content::Bytes(vec![])).is_err());
        assert!(a.file("/bin", 0o644, Content::Bytes(vec![])).is_err());
        assert!(
            a.file("/etc/motd/x", 0o644, Content::Bytes(vec![]))
                .is_err()
        );
        assert!(a.dir("/bin/sh", 0o755).is_err());
        // Replacing a symlink by a file is allowed (extra files win over applet links).
        a.file("/bin/sh", 0o755, Content::Bytes(vec![1])).unwrap();
    }

    #[test]
    fn deterministic_and_readable_by_the_crate() {
        let one = sample().write_to(Vec::new()).unwrap();
        let two = sample().write_to(Vec::new()).unwrap();
        assert_eq!(one, two);
        assert_eq!(one.len() % 4, 0);
        let mut reader = cpio::newc::Reader::new(&one[..]).unwrap();
        assert_eq!(reader.entry().name(), "bin");
        assert_eq!(reader.entry().mode() & 0o170000, 0o040000);
        reader = cpio::newc::Reader::new(reader.finish().unwrap()).unwrap();
        let e = reader.entry();
        assert_eq!(
            (e.name(), e.mode(), e.mtime(), e.uid(), e.file_size()),
            ("bin/busybox", 0o100755, 0, 0, 7)
        );
    }

    /// The system `cpio` lists and extracts what we write (modes, symlinks, contents).
    #[test]
    fn system_cpio_extracts_it() {
        let Some(cpio_tool) = crate::util::find_tool("cpio") else {
            panic!("`cpio` not found: install the Debian package `cpio`");
        };
        let mut a = sample();
        let host = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(host.path(), vec![7u8; 100_003]).unwrap();
        a.file("/data/big", 0o640, Content::File(host.path().to_path_buf()))
            .unwrap();
        let bytes = a.write_to(Vec::new()).unwrap();

        let list = run_cpio(&cpio_tool, &["-t", "--quiet"], &bytes, None);
        let names: Vec<&str> = list.lines().collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "data",
                "data/big",
                "empty",
                "etc",
                "etc/motd",
                "proc"
            ]
        );

        let dir = tempfile::tempdir().unwrap();
        run_cpio(
            &cpio_tool,
            &["-i", "--quiet", "--no-absolute-filenames"],
            &bytes,
            Some(dir.path()),
        );
        use std::os::unix::fs::PermissionsExt;
        let root = dir.path();
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap().to_str(),
            Some("busybox")
        );
        assert_eq!(std::fs::read(root.join("etc/motd")).unwrap(), b"hello\n");
        assert_eq!(
            std::fs::read(root.join("data/big")).unwrap(),
            vec![7u8; 100_003]
        );
        let mode = |p: &str| {
            std::fs::metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("bin/busybox"), 0o755);
        assert_eq!(mode("data/big"), 0o640);
        assert_eq!(mode("proc"), 0o555);
    }

    fn run_cpio(
        tool: &std::path::Path,
        args: &[&str],
        input: &[u8],
        cwd: Option<&std::path::Path>,
    ) -> String {
        let mut cmd = Command::new(tool);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cpio {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}
