//! Initramfs images, described as a [`Layout`] (path -> item), written to a
//! given file ([`Layout::write`]) or cached by content ([`Layout::build`]): the
//! cache key is a BLAKE3 hash over every path, mode, inline text and the bytes of every host
//! file, so an unchanged scenario reuses `<cache>/images/<name>-<key>.cpio` and any change
//! of input (a rebuilt `p2pvmm`, another script) builds a new one. Files that need work
//! before archiving (stripping, decompressing a module) are keyed by their source and
//! processed only when the image is actually built. The most recently used images are kept.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::cpio::{Archive, Content};
use crate::error::{ImageError, IoContext, Result};
use crate::libs::shared_libraries;
use crate::util::{Cache, find_tool, run_captured};

/// Images kept in the cache besides the ones used in the last hour.
const KEEP_IMAGES: usize = 8;

/// A change made to a host file when it is put into an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transform {
    /// `strip` (copied as is when `strip` is not installed).
    Strip,
    /// `xz -dc` (modules shipped as `.ko.xz`).
    Unxz,
    /// `zstd -dc` (modules shipped as `.ko.zst`).
    Unzstd,
}

#[derive(Debug, Clone)]
enum Item {
    Dir(u32),
    Text(Vec<u8>, u32),
    Host(PathBuf, u32),
    Transformed(PathBuf, u32, Transform),
    Symlink(String),
}

/// The planned content of an image.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    items: BTreeMap<String, Item>,
}

impl Layout {
    /// An empty layout.
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.items.insert(path.to_string(), Item::Dir(mode));
    }

    /// A file with the given bytes.
    pub fn text(&mut self, path: &str, mode: u32, bytes: impl Into<Vec<u8>>) {
        self.items
            .insert(path.to_string(), Item::Text(bytes.into(), mode));
    }

    /// A copy of a host file (`0755` if the host file is executable, else `0644`).
    pub fn host_file(&mut self, path: &str, host: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(host).ctx(|| format!("cannot read {}", host.display()))?;
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            0o755
        } else {
            0o644
        };
        self.items
            .insert(path.to_string(), Item::Host(host.to_path_buf(), mode));
        Ok(())
    }

    /// A host program, stripped if `strip` is set, plus the shared libraries and loader it
    /// needs at their host paths (libraries already present are kept).
    pub fn host_binary(&mut self, path: &str, host: &Path, strip: bool) -> Result<()> {
        let item = if strip {
            Item::Transformed(host.to_path_buf(), 0o755, Transform::Strip)
        } else {
            Item::Host(host.to_path_buf(), 0o755)
        };
        self.items.insert(path.to_string(), item);
        for lib in shared_libraries(host)? {
            let key = lib.to_string_lossy().into_owned();
            self.items.entry(key).or_insert(Item::Host(lib, 0o755));
        }
        Ok(())
    }

    /// A kernel module, decompressed if the host file is `.ko.xz` or `.ko.zst`.
    pub fn module(&mut self, path: &str, host: &Path) {
        let name = host.to_string_lossy();
        let item = if name.ends_with(".xz") {
            Item::Transformed(host.to_path_buf(), 0o644, Transform::Unxz)
        } else if name.ends_with(".zst") {
            Item::Transformed(host.to_path_buf(), 0o644, Transform::Unzstd)
        } else {
            Item::Host(host.to_path_buf(), 0o644)
        };
        self.items.insert(path.to_string(), item);
    }

    /// A symlink.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.items
            .insert(path.to_string(), Item::Symlink(target.to_string()));
    }

    /// The static busybox at `/bin/busybox` with a `/bin/<applet>` symlink per applet.
    pub fn busybox(&mut self, busybox: &Path) -> Result<()> {
        self.host_file("/bin/busybox", busybox)?;
        let out = run_captured(Command::new(busybox).arg("--list"))?;
        for applet in String::from_utf8_lossy(&out.stdout).lines().map(str::trim) {
            if !applet.is_empty() && !applet.contains('/') && applet != "busybox" {
                self.symlink(&format!("/bin/{applet}"), "busybox");
            }
        }
        Ok(())
    }

    /// The content key (hex BLAKE3 over paths, modes, texts and host file bytes).
    pub fn key(&self) -> Result<String> {
        let mut hasher = blake3::Hasher::new();
        for (path, item) in &self.items {
            hasher.update(path.as_bytes()).update(&[0]);
            match item {
                Item::Dir(mode) => {
                    hasher.update(format!("dir {mode:o}").as_bytes());
                }
                Item::Symlink(target) => {
                    hasher.update(format!("symlink {target}").as_bytes());
                }
                Item::Text(bytes, mode) => {
                    hasher
                        .update(format!("text {mode:o} {}", bytes.len()).as_bytes())
                        .update(bytes);
                }
                Item::Host(host, mode) => {
                    hash_file(hasher.update(format!("file {mode:o}").as_bytes()), host)?;
                }
                Item::Transformed(host, mode, t) => {
                    hash_file(
                        hasher.update(format!("file {mode:o} {t:?}").as_bytes()),
                        host,
                    )?;
                }
            }
            hasher.update(&[0]);
        }
        Ok(hasher.finalize().to_hex()[..24].to_string())
    }

    /// The image file for this layout, built unless the cache has it.
    pub fn build(&self, cache: &Cache, name: &str) -> Result<PathBuf> {
        let key = self.key()?;
        let dir = cache.subdir("images")?;
        let path = dir.join(format!("{name}-{key}.cpio"));
        let _guard = cache.lock()?;
        if path.exists() {
            tracing::debug!("image {} is cached", path.display());
            // Marks it recently used, for pruning.
            File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()))
                .ctx(|| format!("cannot touch {}", path.display()))?;
            return Ok(path);
        }
        let started = std::time::Instant::now();
        self.write(&path)?;
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        tracing::info!(
            "built image {} ({:.1} MiB) in {:.1} s",
            path.display(),
            size as f64 / (1 << 20) as f64,
            started.elapsed().as_secs_f64()
        );
        prune(&dir, &path);
        Ok(path)
    }

    /// Writes the image to `path` (through a temporary file beside it and a
    /// rename, so a reader never sees half an image).
    pub fn write(&self, path: &Path) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let in_dir = || format!("cannot write in {}", dir.display());
        let work = tempfile::tempdir_in(dir).ctx(in_dir)?;
        let archive = self.materialize(work.path())?;
        let tmp = tempfile::NamedTempFile::new_in(dir).ctx(in_dir)?;
        let out = archive.write_to(BufWriter::new(tmp.as_file()))?;
        out.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .ctx(in_dir)?;
        tmp.persist(path).map_err(|e| e.error).ctx(in_dir)?;
        Ok(())
    }

    /// Whether the layout has an entry at `path`.
    pub fn has(&self, path: &str) -> bool {
        self.items.contains_key(path)
    }

    /// The bytes of an inline file of the layout.
    pub fn text_of(&self, path: &str) -> Option<&[u8]> {
        match self.items.get(path)? {
            Item::Text(bytes, _) => Some(bytes),
            _ => None,
        }
    }

    fn materialize(&self, work: &Path) -> Result<Archive> {
        let mut archive = Archive::new();
        for (n, (path, item)) in self.items.iter().enumerate() {
            match item {
                Item::Dir(mode) => archive.dir(path, *mode)?,
                Item::Symlink(target) => archive.symlink(path, target)?,
                Item::Text(bytes, mode) => {
                    archive.file(path, *mode, Content::Bytes(bytes.clone()))?
                }
                Item::Host(host, mode) => archive.file(path, *mode, Content::File(host.clone()))?,
                Item::Transformed(host, mode, transform) => {
                    let out = work.join(n.to_string());
                    let content = match apply(*transform, host, &out)? {
                        true => out,
                        false => host.clone(),
                    };
                    archive.file(path, *mode, Content::File(content))?
                }
            }
        }
        Ok(archive)
    }
}

/// Writes the transformed `host` to `out`; `false` when the file should be used as is.
fn apply(transform: Transform, host: &Path, out: &Path) -> Result<bool> {
    let (tool, package) = match transform {
        Transform::Strip => ("strip", "binutils"),
        Transform::Unxz => ("xz", "xz-utils"),
        Transform::Unzstd => ("zstd", "zstd"),
    };
    let Some(tool) = find_tool(tool) else {
        if transform == Transform::Strip {
            tracing::warn!(
                "`strip` not found (package binutils): {} is copied unstripped",
                host.display()
            );
            return Ok(false);
        }
        return Err(ImageError::MissingTool {
            tool: tool.to_string(),
            package: package.to_string(),
        });
    };
    match transform {
        Transform::Strip => {
            run_captured(Command::new(tool).arg("-o").arg(out).arg(host))?;
        }
        Transform::Unxz | Transform::Unzstd => {
            let output = run_captured(Command::new(tool).arg("-dc").arg(host))?;
            fs::write(out, output.stdout).ctx(|| format!("cannot write {}", out.display()))?;
        }
    }
    Ok(true)
}

fn hash_file(hasher: &mut blake3::Hasher, path: &Path) -> Result<()> {
    crate::util::for_each_chunk(path, |chunk| {
        hasher.update(chunk);
    })
}

/// Deletes old images: keeps the [`KEEP_IMAGES`] newest and any used in the last hour.
fn prune(dir: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut images: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cpio") && p != keep)
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    images.sort_by_key(|image| std::cmp::Reverse(image.0));
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for (modified, path) in images.into_iter().skip(KEEP_IMAGES) {
        if modified < hour_ago {
            tracing::debug!("pruning {}", path.display());
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_follows_content() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("f");
        fs::write(&host, "one").unwrap();
        let mut layout = Layout::new();
        layout.text("/init", 0o755, "#!/bin/sh\n");
        layout.host_file("/data", &host).unwrap();
        let k1 = layout.key().unwrap();
        assert_eq!(k1, layout.key().unwrap());
        fs::write(&host, "two").unwrap();
        let k2 = layout.key().unwrap();
        assert_ne!(k1, k2);
        layout.text("/init", 0o755, "#!/bin/sh\necho\n");
        assert_ne!(k2, layout.key().unwrap());
    }

    #[test]
    fn build_is_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path().to_path_buf()).unwrap();
        let mut layout = Layout::new();
        layout.dir("/proc", 0o555);
        layout.text("/init", 0o755, "#!/bin/sh\n");
        let a = layout.build(&cache, "t").unwrap();
        let modified = fs::metadata(&a).unwrap().len();
        let b = layout.build(&cache, "t").unwrap();
        assert_eq!(a, b);
        assert_eq!(modified, fs::metadata(&b).unwrap().len());
        assert!(a.file_name().unwrap().to_str().unwrap().starts_with("t-"));
    }
}
