//! The whole build: the kernel (fetched, unpacked, `vmlinux` cut out), both
//! initramfs images, `images.lock`. Output directory:
//! `vmlinux`, `service.cpio`, `client.cpio`, `images.lock`.
//!
//! Reproducibility: the same kernel package and the same host files give the
//! same bytes (archives are sorted, with zero times and owners; modules are
//! decompressed and programs stripped by the same tools). What varies is
//! what the inputs are: the kernel `linux-image-6.12-amd64` points to on the day
//! (pin it to hold it), and the host's clamd, its libraries and busybox.

use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::guests::{self, Programs, Role};
use crate::kernel::{Kernel, KernelOptions};
use crate::lock::{FileEntry, ImagesLock, KernelEntry};
use crate::util::Cache;

/// Kernel file name in the output directory.
pub const VMLINUX: &str = "vmlinux";
/// Service VM initramfs file name.
pub const SERVICE_IMAGE: &str = "service.cpio";
/// Client VM initramfs file name.
pub const CLIENT_IMAGE: &str = "client.cpio";

/// What to build and where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The output directory.
    pub out: PathBuf,
    /// Which kernel.
    pub kernel: KernelOptions,
    /// Our programs and the host's.
    pub programs: Programs,
}

/// The built files.
#[derive(Debug, Clone)]
pub struct Built {
    /// The output directory.
    pub dir: PathBuf,
    /// What went in.
    pub lock: ImagesLock,
}

impl Built {
    /// `dir/vmlinux`.
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join(VMLINUX)
    }
    /// `dir/service.cpio`.
    pub fn service(&self) -> PathBuf {
        self.dir.join(SERVICE_IMAGE)
    }
    /// `dir/client.cpio`.
    pub fn client(&self) -> PathBuf {
        self.dir.join(CLIENT_IMAGE)
    }
}

/// Builds the images into `opts.out`, with downloads and unpacked kernels
/// kept in `cache`.
pub fn build(cache: &Cache, opts: &BuildOptions) -> Result<Built> {
    let out = &opts.out;
    std::fs::create_dir_all(out).ctx(|| format!("cannot create {}", out.display()))?;
    let kernel = Kernel::prepare(cache, &opts.kernel)?;
    let modules = kernel.modules()?;
    let channel_module = crate::guest_module::build(cache, &kernel.version)?;
    tracing::info!("kernel {} (sha256 {})", kernel.version, kernel.deb_sha256);
    copy_if_changed(&kernel.vmlinux, &out.join(VMLINUX))?;
    for (role, file) in [(Role::Service, SERVICE_IMAGE), (Role::Client, CLIENT_IMAGE)] {
        let started = std::time::Instant::now();
        guests::layout(role, &opts.programs, &modules, &channel_module)?.write(&out.join(file))?;
        tracing::info!(
            "{file}: {:.1} MiB in {:.1} s",
            std::fs::metadata(out.join(file)).map_or(0, |m| m.len()) as f64 / f64::from(1 << 20),
            started.elapsed().as_secs_f64()
        );
    }
    let lock = ImagesLock {
        kernel: KernelEntry {
            version: kernel.version.clone(),
            package: kernel
                .deb
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: kernel.deb_sha256.clone(),
        },
        images: [VMLINUX, SERVICE_IMAGE, CLIENT_IMAGE]
            .iter()
            .map(|f| FileEntry::of(out, f))
            .collect::<Result<_>>()?,
    };
    lock.write(out)?;
    Ok(Built {
        dir: out.clone(),
        lock,
    })
}

/// Copies `from` to `to` unless `to` has the same size and bytes already.
fn copy_if_changed(from: &Path, to: &Path) -> Result<()> {
    let same = match (std::fs::metadata(from), std::fs::metadata(to)) {
        (Ok(a), Ok(b)) if a.len() == b.len() => {
            crate::kernel::sha256_file(from)? == crate::kernel::sha256_file(to)?
        }
        _ => false,
    };
    if !same {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp)
            .and_then(|_| std::fs::rename(&tmp, to))
            .ctx(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}
