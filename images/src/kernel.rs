//! The Debian kernel used for both the test host (L1) and its guests (L2).
//!
//! The version is the current dependency of the `linux-image-6.12-amd64` metapackage (asked
//! of apt: Debian 12's 6.12 LTS series, see [`SERIES`]), unless `P2PVM_TESTHOST_KERNEL` pins
//! one (e.g. `6.1.0-57-amd64`, the series `linux-image-amd64` means on Debian 12). The package
//! `linux-image-<version>` is fetched with `apt-get download` (apt checks the archive's
//! signatures and hashes) into `<cache>/debs`, unpacked with `dpkg-deb -x`, indexed with
//! `depmod -b`, and the uncompressed ELF `vmlinux` (which carries the PVH entry note) is cut
//! out of `vmlinuz` (the xz or zstd payload its setup header points to, decompressed by `xz` or `zstd`).
//!
//! Layout: `<cache>/kernels/<version>/{root/, vmlinux, kernel.info}`; `<cache>/kernel.lock`
//! records the version in use and the SHA-256 of its .deb. A prepared version is reused
//! without touching the network; `P2PVM_TESTHOST_REFRESH=1` asks apt for the current one.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{ImageError, IoContext, Result};
use sha2::{Digest, Sha256};

use crate::modules::ModuleDb;
use crate::util::{Cache, require_tool, run_captured, write_atomic};

/// Environment variable pinning the kernel version (`6.1.0-57-amd64`).
pub const KERNEL_PIN_ENV: &str = "P2PVM_TESTHOST_KERNEL";
/// Environment variable (`1`) asking apt for the current version even when one is cached.
pub const REFRESH_ENV: &str = "P2PVM_TESTHOST_REFRESH";

const XZ_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0x00];
/// The kernel series used unless one is pinned. 6.12 rather than Debian 12's default 6.1:
/// under QEMU's emulated AMD-V, a test host running 6.1 froze in ~1 run in 10 while it ran
/// our VMM's vCPUs, and 6.12 did not (docs/vm-mode.md, "How reliable the nested tests are").
pub const SERIES: &str = "6.12";
/// The metapackage that names the current kernel of [`SERIES`].
pub const METAPACKAGE: &str = "linux-image-6.12-amd64";

/// How to choose the kernel.
#[derive(Debug, Clone, Default)]
pub struct KernelOptions {
    /// A version like `6.1.0-57-amd64`; `None` means the cached one, else the current one.
    pub pin: Option<String>,
    /// Ask apt for the current version even if one is cached.
    pub refresh: bool,
}

impl KernelOptions {
    /// Options from `P2PVM_TESTHOST_KERNEL` and `P2PVM_TESTHOST_REFRESH`.
    pub fn from_env() -> Self {
        let pin = std::env::var(KERNEL_PIN_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty());
        let refresh = std::env::var(REFRESH_ENV).is_ok_and(|v| v == "1" || v == "true");
        Self {
            pin: pin.map(|p| p.trim().trim_start_matches("linux-image-").to_string()),
            refresh,
        }
    }
}

/// A prepared kernel: the unpacked package, its module index and the ELF `vmlinux`.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Kernel release, e.g. `6.1.0-57-amd64`.
    pub version: String,
    /// The downloaded package file.
    pub deb: PathBuf,
    /// SHA-256 (hex) of the package file.
    pub deb_sha256: String,
    /// `lib/modules/<version>` of the unpacked package (with `modules.dep`).
    pub modules_dir: PathBuf,
    /// The uncompressed ELF kernel with the PVH entry note.
    pub vmlinux: PathBuf,
}

impl Kernel {
    /// The package's compressed bzImage (`/boot/vmlinuz-<version>`), for
    /// tests of the Linux boot protocol.
    pub fn bzimage(&self) -> PathBuf {
        self.vmlinux
            .with_file_name("root")
            .join("boot")
            .join(format!("vmlinuz-{}", self.version))
    }
}

/// `key=value` lines: the content of `kernel.lock` and of each `kernel.info`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Info {
    version: String,
    deb: String,
    sha256: String,
}

impl Info {
    fn read(path: &Path) -> Result<Option<Self>> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx(|| format!("cannot read {}", path.display())),
        };
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
                .ok_or_else(|| ImageError::Kernel(format!("{}: no `{key}=` line", path.display())))
        };
        Ok(Some(Self {
            version: field("version")?,
            deb: field("deb")?,
            sha256: field("sha256")?,
        }))
    }

    fn write(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# p2pvm-testhost kernel (see tests/vm/README.md)\nversion={}\ndeb={}\nsha256={}\n",
            self.version, self.deb, self.sha256
        );
        write_atomic(path, text.as_bytes())
    }
}

impl Kernel {
    /// Finds or builds the kernel in the cache (see the module docs).
    pub fn prepare(cache: &Cache, opts: &KernelOptions) -> Result<Self> {
        let _guard = cache.lock()?;
        let lock_path = cache.root().join("kernel.lock");
        let lock = Info::read(&lock_path)?;
        let version = match (&opts.pin, &lock) {
            (Some(pin), _) => pin.clone(),
            // A cache filled for another series (before the default moved) is not reused.
            (None, Some(lock)) if !opts.refresh && in_series(&lock.version) => lock.version.clone(),
            _ => resolve_current(cache)?,
        };
        if version.is_empty()
            || !version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-+~".contains(&b))
        {
            return Err(ImageError::Kernel(format!(
                "implausible kernel version {version:?}"
            )));
        }
        let kernels = cache.subdir("kernels")?;
        let dir = kernels.join(&version);
        let info = match Info::read(&dir.join("kernel.info"))? {
            Some(info) => {
                tracing::debug!("kernel {version} found in {}", dir.display());
                info
            }
            None => match build(cache, &version, &dir) {
                Err(ImageError::Download { .. }) if opts.pin.is_some() => {
                    // Tell the user what to pin instead, if the archive answers at all.
                    let current = resolve_current(cache)?;
                    return Err(ImageError::PinnedKernelGone {
                        pinned: version,
                        meta: METAPACKAGE,
                        current,
                    });
                }
                other => other?,
            },
        };
        if lock.as_ref() != Some(&info) {
            info.write(&lock_path)?;
        }
        Ok(Self::from_info(cache, &dir, info))
    }

    fn from_info(cache: &Cache, dir: &Path, info: Info) -> Self {
        Self {
            modules_dir: dir.join("root/lib/modules").join(&info.version),
            vmlinux: dir.join("vmlinux"),
            deb: cache.root().join("debs").join(&info.deb),
            deb_sha256: info.sha256,
            version: info.version,
        }
    }

    /// The module index of this kernel.
    pub fn modules(&self) -> Result<ModuleDb> {
        ModuleDb::load(&self.modules_dir)
    }
}

/// Whether a kernel release (`6.12.118+deb12-amd64`) belongs to [`SERIES`].
fn in_series(version: &str) -> bool {
    version
        .strip_prefix(SERIES)
        .is_some_and(|rest| rest.starts_with('.'))
}

/// Asks apt which kernel [`METAPACKAGE`] currently depends on.
fn resolve_current(cache: &Cache) -> Result<String> {
    let debs = cache.subdir("debs")?;
    let tmp = tempfile::tempdir_in(&debs)
        .ctx(|| format!("cannot create a directory in {}", debs.display()))?;
    let deb = apt_download(METAPACKAGE, tmp.path())?;
    let dpkg_deb = require_tool("dpkg-deb", "dpkg")?;
    let out = run_captured(Command::new(dpkg_deb).arg("-f").arg(&deb).arg("Depends"))?;
    let depends = String::from_utf8_lossy(&out.stdout);
    let version = depends
        .split([',', '|', ' '])
        .find_map(|item| item.trim().strip_prefix("linux-image-"))
        .ok_or_else(|| {
            ImageError::Kernel(format!(
                "{METAPACKAGE} depends on no linux-image-*: {depends:?}"
            ))
        })?;
    tracing::info!("{METAPACKAGE} currently means linux-image-{version}");
    Ok(version.to_string())
}

/// `apt-get download PACKAGE` in `dir`; returns the newest matching .deb there.
pub(crate) fn apt_download(package: &str, dir: &Path) -> Result<PathBuf> {
    let apt = require_tool("apt-get", "apt")?;
    tracing::info!("apt-get download {package} (into {})", dir.display());
    let out = Command::new(apt)
        .args(["-q", "download", package])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .ctx(|| "cannot run apt-get".into())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(ImageError::Download {
            package: package.to_string(),
            status: out.status,
            said: stderr.trim().to_string(),
        });
    }
    for line in stderr.lines() {
        // As root apt warns that it downloads unsandboxed: harmless.
        if !line.contains("unsandboxed") && !line.trim().is_empty() {
            tracing::warn!("apt-get: {line}");
        }
    }
    let prefix = format!("{package}_");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(dir)
        .ctx(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        ImageError::Kernel(format!(
            "apt-get download left no {prefix}*.deb in {}",
            dir.display()
        ))
    })
}

/// An empty `<version>.partial` beside `dir` with a `root/` in it, where a
/// tree is unpacked before it is renamed into place (a half-done one left by
/// an interrupted run is thrown away); returns (staging, root).
pub(crate) fn fresh_staging(dir: &Path, version: &str) -> Result<(PathBuf, PathBuf)> {
    let staging = dir.with_file_name(format!("{version}.partial"));
    let in_staging = || format!("preparing {}", staging.display());
    if staging.exists() {
        fs::remove_dir_all(&staging).ctx(in_staging)?;
    }
    let root = staging.join("root");
    fs::create_dir_all(&root).ctx(in_staging)?;
    Ok((staging, root))
}

/// Moves a finished staging tree from [`fresh_staging`] into place as `dir`,
/// replacing what was there.
pub(crate) fn install_staging(staging: &Path, dir: &Path) -> Result<()> {
    let installing = || format!("installing {}", dir.display());
    if dir.exists() {
        fs::remove_dir_all(dir).ctx(installing)?;
    }
    fs::create_dir_all(dir.parent().unwrap_or(dir)).ctx(installing)?;
    fs::rename(staging, dir).ctx(installing)
}

/// Downloads, unpacks and indexes `linux-image-<version>` into `dir`.
fn build(cache: &Cache, version: &str, dir: &Path) -> Result<Info> {
    let dpkg_deb = require_tool("dpkg-deb", "dpkg")?;
    let depmod = require_tool("depmod", "kmod")?;
    let xz = require_tool("xz", "xz-utils")?;
    let deb = apt_download(&format!("linux-image-{version}"), &cache.subdir("debs")?)?;
    let sha256 = sha256_file(&deb)?;
    tracing::info!("unpacking {} (sha256 {sha256})", deb.display());

    let (staging, root) = fresh_staging(dir, version)?;
    let in_staging = || format!("preparing {}", staging.display());
    run_captured(Command::new(dpkg_deb).arg("-x").arg(&deb).arg(&root))?;
    // Newer packages put modules under usr/lib only; depmod -b looks in lib/modules.
    if !root.join("lib/modules").exists() && root.join("usr/lib/modules").exists() {
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).ctx(in_staging)?;
    }
    if !root.join("lib/modules").join(version).is_dir() {
        return Err(ImageError::Kernel(format!(
            "linux-image-{version} has no lib/modules/{version}"
        )));
    }
    run_captured(Command::new(depmod).arg("-b").arg(&root).arg(version))?;

    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    extract_vmlinux(&xz, &vmlinuz, &staging.join("vmlinux"))?;

    let info = Info {
        version: version.to_string(),
        deb: deb
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sha256,
    };
    info.write(&staging.join("kernel.info"))?;
    install_staging(&staging, dir)?;
    Ok(info)
}

/// The zstd frame's magic number.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A bzImage's compressed payload, from its setup header (the x86 boot
/// protocol: `setup_sects` at 0x1f1, `payload_offset` and `payload_length`
/// at 0x248 and 0x24c, from the start of the protected-mode code).
fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
    let u32_at = |o: usize| Some(u32::from_le_bytes(image.get(o..o + 4)?.try_into().ok()?));
    let sects = match *image.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (sects + 1) * 512 + u32_at(0x248)? as usize;
    image.get(start..start.checked_add(u32_at(0x24c)? as usize)?)
}

/// Cuts the compressed kernel out of a bzImage and decompresses it to the
/// ELF `vmlinux`: xz (Debian's 6.1 kernels) with `xz`, zstd (6.12) with
/// `zstd`.
pub fn extract_vmlinux(xz: &Path, vmlinuz: &Path, out: &Path) -> Result<()> {
    let image = fs::read(vmlinuz).ctx(|| format!("cannot read {}", vmlinuz.display()))?;
    let tmp = out.with_extension("tmp");
    let xz_at = image.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC);
    let (tool, status, stderr) = match (xz_at, bzimage_payload(&image)) {
        (Some(offset), _) => {
            let (status, stderr) = unpack(xz, &["-dc", "--single-stream"], &image[offset..], &tmp)
                .ctx(|| format!("decompressing {} with xz", vmlinuz.display()))?;
            ("xz", status, stderr)
        }
        (None, Some(payload)) if payload.starts_with(&ZSTD_MAGIC) && payload.len() > 4 => {
            let zstd = require_tool("zstd", "zstd")?;
            // The payload ends with the decompressed size (4 bytes), which
            // is no part of the zstd frame.
            let frame = &payload[..payload.len() - 4];
            let (status, stderr) = unpack(&zstd, &["-dc"], frame, &tmp)
                .ctx(|| format!("decompressing {} with zstd", vmlinuz.display()))?;
            ("zstd", status, stderr)
        }
        _ => {
            return Err(ImageError::Kernel(format!(
                "{}: neither an xz stream nor a zstd payload (only those are supported)",
                vmlinuz.display()
            )));
        }
    };
    if !status.success() {
        return Err(ImageError::Command {
            command: format!("{tool} -dc < {}", vmlinuz.display()),
            status,
            stderr,
        });
    }
    let elf = crate::elf::inspect(&tmp)?;
    if !elf.is_some_and(|e| e.pvh_entry) {
        return Err(ImageError::Kernel(format!(
            "{}: the decompressed kernel is not an ELF vmlinux with a PVH entry note",
            vmlinuz.display()
        )));
    }
    fs::rename(&tmp, out).ctx(|| format!("cannot write {}", out.display()))
}

/// Feeds `stream` to `tool args` (a decompressor) writing `out`.
fn unpack(
    tool: &Path,
    args: &[&str],
    stream: &[u8],
    out: &Path,
) -> std::io::Result<(std::process::ExitStatus, String)> {
    let stream = stream.to_vec();
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(File::create(out)?)
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = std::thread::spawn(move || {
        // xz stops reading at the end of the stream: a broken pipe then is expected.
        let _ = stdin.write_all(&stream);
    });
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)?;
    let status = child.wait()?;
    writer.join().ok();
    Ok((status, stderr))
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    crate::util::for_each_chunk(path, |chunk| hasher.update(chunk))?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel.lock");
        assert_eq!(Info::read(&path).unwrap(), None);
        let info = Info {
            version: "6.1.0-57-amd64".into(),
            deb: "x.deb".into(),
            sha256: "ab".into(),
        };
        info.write(&path).unwrap();
        assert_eq!(Info::read(&path).unwrap(), Some(info));
    }

    #[test]
    fn a_cached_kernel_counts_only_in_the_default_series() {
        assert!(METAPACKAGE.contains(SERIES));
        assert!(in_series("6.12.118+deb12-amd64"));
        assert!(!in_series("6.1.0-57-amd64"));
        assert!(!in_series("6.120.1-amd64"));
        assert!(!in_series("6.12"));
    }

    #[test]
    fn sha256_of_known_bytes() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), b"abc").unwrap();
        assert_eq!(
            sha256_file(tmp.path()).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
