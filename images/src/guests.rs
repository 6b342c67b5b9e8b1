//! What each VM's initramfs holds. Both: `p2pvm-init` as `/init`,
//! busybox-static (the console shell and its tools), the kernel modules the
//! VM needs in load order (`/lib/modules/NAME.ko`, listed in
//! [`MODULE_LIST_PATH`]) and `/etc/p2pvm/role`. The service VM adds `p2pd`
//! (the node and the channel's back-end) with its configuration, `clamd`
//! with its libraries and the project's signature database, and `p2pctl`
//! for the operator. The client VM adds the front-end, `p2pctl` and the
//! example apps.
//!
//! Paths inside the images are constants here; `p2pvm-init` uses the same
//! ones (see `images/init`).

use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext, Result};
use crate::image::Layout;
use crate::modules::ModuleDb;

/// Modules of the service VM: virtio transport, disk, network, entropy, the
/// panic device, uio for the channel device, ext4 for the store (with
/// crc32c, which ext4 asks for by a soft dependency `modules.dep` omits).
pub const SERVICE_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio-rng",
    "pvpanic-mmio",
    "uio_pci_generic",
    "crc32c_generic",
    "ext4",
];
/// Modules of the client VM: no disk, no network.
pub const CLIENT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio-rng",
    "pvpanic-mmio",
    "uio_pci_generic",
];

/// The module names, one per line, in load order.
pub const MODULE_LIST_PATH: &str = "/etc/p2pvm/modules";
/// `service` or `client`.
pub const ROLE_PATH: &str = "/etc/p2pvm/role";
/// p2pd's configuration in the service VM.
pub const P2PD_CONFIG_PATH: &str = "/etc/p2pd.toml";
/// clamd's configuration in the service VM.
pub const CLAMD_CONFIG_PATH: &str = "/etc/clamav/clamd.conf";
/// Where the signature database goes.
pub const SIGNATURES_DIR: &str = "/usr/share/p2pvm/clamav";

/// Which VM an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The P2P service VM.
    Service,
    /// The client VM.
    Client,
}

impl Role {
    /// `service` or `client`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Service => "service",
            Role::Client => "client",
        }
    }

    /// The modules this VM loads.
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            Role::Service => SERVICE_MODULES,
            Role::Client => CLIENT_MODULES,
        }
    }
}

/// The host files that go into the images.
#[derive(Debug, Clone)]
pub struct Programs {
    /// `p2pvm-init`.
    pub init: PathBuf,
    /// `p2pd`.
    pub p2pd: PathBuf,
    /// `p2p-frontend`.
    pub frontend: PathBuf,
    /// `p2pctl`.
    pub p2pctl: PathBuf,
    /// Example apps for the client VM (installed as `/usr/bin/p2pvm-<file name>`).
    pub examples: Vec<PathBuf>,
    /// A static busybox.
    pub busybox: PathBuf,
    /// The host's `clamd`.
    pub clamd: PathBuf,
    /// A directory holding the signature database (`*.ndb`, `*.hdb`, ...).
    pub signatures: PathBuf,
}

/// p2pd in the service VM: its store on the disk, the channel device, fixed
/// ports (so that a host can forward them), no mDNS (the VM's one link is the
/// TAP), clamd on its socket.
pub const P2PD_TOML: &str = r#"# p2pd in the P2P service VM (written by p2pvm-images).
data_dir = "/var/lib/p2pd"
channel_device = "auto"
listen = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
mdns = false

[virus]
clamd_socket = "/run/clamd.sock"
database_dir = "/usr/share/p2pvm/clamav"

# The figures and the operator's dashboard: p2pvm-init passes --metrics with
# the VM's TAP address, a link only the host is on.
[metrics]
dashboard = true
"#;

/// clamd in the service VM: in the foreground under p2pvm-init, logging to
/// its stderr, whole items scanned (as `scripts/clamd.sh` does on a host).
/// A scanned stream is spooled to a file: on the store disk, not in the
/// VM's RAM (a 1 GiB item would otherwise take 1 GiB of tmpfs).
pub const CLAMD_CONF: &str = r#"# clamd in the P2P service VM (written by p2pvm-images).
LocalSocket /run/clamd.sock
LocalSocketMode 660
DatabaseDirectory /usr/share/p2pvm/clamav
TemporaryDirectory /var/lib/p2pd/tmp
Foreground yes
LogFile /dev/stderr
LogTime yes
StreamMaxLength 4000M
MaxFileSize 4000M
MaxScanSize 4000M
MaxThreads 2
"#;

/// The layout of one VM's initramfs; `channel_module` is our
/// `p2pvm_channel.ko` for this kernel ([`crate::guest_module`]).
pub fn layout(
    role: Role,
    programs: &Programs,
    modules: &ModuleDb,
    channel_module: &Path,
) -> Result<Layout> {
    let mut l = Layout::new();
    for (dir, mode) in [
        ("/dev", 0o755),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/run", 0o755),
        ("/tmp", 0o1777),
        ("/root", 0o700),
        ("/var/log", 0o755),
    ] {
        l.dir(dir, mode);
    }
    l.host_binary("/init", &programs.init, true)?;
    l.busybox(&programs.busybox)?;
    l.text(ROLE_PATH, 0o644, format!("{}\n", role.name()));
    l.text("/etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n");
    l.text("/etc/group", 0o644, "root:x:0:\n");
    l.text("/etc/hostname", 0o644, format!("p2pvm-{}\n", role.name()));
    add_modules(&mut l, modules, role.modules(), channel_module)?;
    l.host_binary("/usr/bin/p2pctl", &programs.p2pctl, true)?;
    match role {
        Role::Service => {
            l.dir("/var/lib/p2pd", 0o700);
            l.host_binary("/usr/bin/p2pd", &programs.p2pd, true)?;
            l.text(P2PD_CONFIG_PATH, 0o644, P2PD_TOML);
            l.host_binary("/usr/sbin/clamd", &programs.clamd, false)?;
            l.text(CLAMD_CONFIG_PATH, 0o644, CLAMD_CONF);
            for sig in signature_files(&programs.signatures)? {
                let name = sig.file_name().unwrap_or_default().to_string_lossy();
                l.host_file(&format!("{SIGNATURES_DIR}/{name}"), &sig)?;
            }
        }
        Role::Client => {
            l.host_binary("/usr/bin/p2p-frontend", &programs.frontend, true)?;
            for example in &programs.examples {
                let name = example.file_name().unwrap_or_default().to_string_lossy();
                // Prefixed: the example `echo` must not shadow busybox's.
                l.host_binary(&format!("/usr/bin/p2pvm-{name}"), example, true)?;
            }
        }
    }
    Ok(l)
}

/// Adds the closure of `names` as `/lib/modules/NAME.ko`, then our channel
/// module (it needs `uio`, in the closure through `uio_pci_generic`), and
/// the load list. Loaded last, ours binds the channel device at once
/// (`uio_pci_generic` binds nothing until told an id).
fn add_modules(l: &mut Layout, db: &ModuleDb, names: &[&str], channel: &Path) -> Result<()> {
    let closure = db.closure(names)?;
    let mut list = String::new();
    for m in &closure {
        l.module(&format!("/lib/modules/{}.ko", m.name), &db.path(m));
        list.push_str(&m.name);
        list.push('\n');
    }
    let ours = crate::guest_module::NAME;
    l.module(&format!("/lib/modules/{ours}.ko"), channel);
    list.push_str(ours);
    list.push('\n');
    l.text(MODULE_LIST_PATH, 0o644, list);
    Ok(())
}

/// The signature files of a ClamAV database directory, sorted.
fn signature_files(dir: &Path) -> Result<Vec<PathBuf>> {
    const KINDS: &[&str] = &[
        "ndb", "hdb", "hsb", "ldb", "cvd", "cld", "cdb", "ign2", "fp",
    ];
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ctx(|| format!("cannot list the signature database {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| KINDS.iter().any(|k| x == *k)))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ImageError::Input(format!(
            "no signature files (*.ndb, *.hdb, ...) in {}",
            dir.display()
        )));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> ModuleDb {
        let dep = "kernel/a/virtio_pci.ko.xz: kernel/a/virtio.ko.xz\n\
                   kernel/a/virtio.ko.xz:\n\
                   kernel/a/virtio-rng.ko.xz: kernel/a/virtio.ko.xz\n\
                   kernel/a/pvpanic-mmio.ko.xz: kernel/a/pvpanic.ko.xz\n\
                   kernel/a/pvpanic.ko.xz:\n\
                   kernel/a/uio_pci_generic.ko.xz: kernel/a/uio.ko.xz\n\
                   kernel/a/uio.ko.xz:\n";
        ModuleDb::parse(dep, "").unwrap()
    }

    #[test]
    fn client_image_lists_modules_in_load_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, name).unwrap();
            p
        };
        let sh = std::fs::canonicalize(crate::util::find_tool("sh").unwrap()).unwrap();
        let programs = Programs {
            init: sh.clone(),
            p2pd: sh.clone(),
            frontend: sh.clone(),
            p2pctl: sh.clone(),
            examples: vec![],
            busybox: file("busybox"),
            clamd: sh.clone(),
            signatures: dir.path().to_path_buf(),
        };
        // busybox --list is needed; use the host's when present.
        let Some(busybox) = crate::util::find_tool("busybox") else {
            eprintln!("SKIPPED: no busybox on this host (apt-get install busybox-static)");
            return;
        };
        let programs = Programs {
            busybox,
            ..programs
        };
        let layout = layout(Role::Client, &programs, &db(), &file("ours.ko")).unwrap();
        let list = layout.text_of(MODULE_LIST_PATH).unwrap();
        assert_eq!(
            String::from_utf8_lossy(list),
            "virtio\nvirtio_pci\nvirtio_rng\npvpanic\npvpanic_mmio\nuio\nuio_pci_generic\np2pvm_channel\n"
        );
        assert!(layout.has("/lib/modules/p2pvm_channel.ko"));
        assert!(layout.has("/usr/bin/p2p-frontend"));
        assert!(!layout.has("/usr/sbin/clamd"));
        assert_eq!(layout.text_of(ROLE_PATH).unwrap(), b"client\n");
    }

    #[test]
    fn service_image_needs_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let err = signature_files(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no signature files"), "{err}");
        std::fs::write(dir.path().join("b.hdb"), "x").unwrap();
        std::fs::write(dir.path().join("a.ndb"), "x").unwrap();
        std::fs::write(dir.path().join("README.md"), "x").unwrap();
        let files = signature_files(dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        assert!(files[0].ends_with("a.ndb"));
    }
}
