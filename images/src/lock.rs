//! `images.lock`, written beside the images: which kernel package went in
//! (version, file, SHA-256 as apt fetched it) and the SHA-256 of every image
//! file, so that a build can be checked and repeated.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext, Result};

/// The file name.
pub const LOCK_FILE: &str = "images.lock";

/// The content of `images.lock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesLock {
    /// The kernel package.
    pub kernel: KernelEntry,
    /// The image files, by name.
    #[serde(rename = "image")]
    pub images: Vec<FileEntry>,
}

/// The kernel package used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEntry {
    /// The kernel release, e.g. `6.1.0-57-amd64`.
    pub version: String,
    /// The package file apt-get downloaded.
    pub package: String,
    /// Its SHA-256.
    pub sha256: String,
}

/// One output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name in the image directory.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256.
    pub sha256: String,
}

impl FileEntry {
    /// Describes `dir/file`.
    pub fn of(dir: &Path, file: &str) -> Result<Self> {
        let path = dir.join(file);
        let bytes = std::fs::metadata(&path)
            .ctx(|| format!("cannot read {}", path.display()))?
            .len();
        Ok(Self {
            file: file.to_string(),
            bytes,
            sha256: crate::kernel::sha256_file(&path)?,
        })
    }
}

impl ImagesLock {
    /// Reads `dir/images.lock`; `None` if there is none.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(LOCK_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx(|| format!("cannot read {}", path.display())),
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| ImageError::Input(format!("{}: {e}", path.display())))
    }

    /// Writes `dir/images.lock`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let body = toml::to_string(self)
            .map_err(|e| ImageError::Input(format!("cannot encode {LOCK_FILE}: {e}")))?;
        let text =
            format!("# Written by `p2pvm-images build`: what these images are made of.\n{body}");
        crate::util::write_atomic(&dir.join(LOCK_FILE), text.as_bytes())
    }

    /// The entry of an image file.
    pub fn image(&self, file: &str) -> Option<&FileEntry> {
        self.images.iter().find(|e| e.file == file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_file_entries() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ImagesLock::read(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join("client.cpio"), b"abc").unwrap();
        let lock = ImagesLock {
            kernel: KernelEntry {
                version: "6.1.0-57-amd64".into(),
                package: "linux-image-6.1.0-57-amd64_6.1.158-1_amd64.deb".into(),
                sha256: "00".into(),
            },
            images: vec![FileEntry::of(dir.path(), "client.cpio").unwrap()],
        };
        assert_eq!(lock.images[0].bytes, 3);
        assert_eq!(
            lock.images[0].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        lock.write(dir.path()).unwrap();
        let back = ImagesLock::read(dir.path()).unwrap().unwrap();
        assert_eq!(back, lock);
        assert!(back.image("client.cpio").is_some());
        std::fs::write(dir.path().join(LOCK_FILE), "kernel = 3").unwrap();
        assert!(ImagesLock::read(dir.path()).is_err());
    }
}
