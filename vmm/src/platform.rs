//! The platform's two VMs, made from the images `p2pvm-images build` writes:
//! what `p2pvmm up --isolation vm` runs when no `--vms` file is given.
//!
//! * **service** — `service.cpio`, the store disk (`<home>/store.ext4`,
//!   created when missing) as `/dev/vda`, virtio-net on a TAP with a static
//!   address from the command line (`p2pvm.ip=`), virtio-rng, the channel's
//!   device end; restarted whenever it ends (the client relies on it).
//! * **client** — `client.cpio`, virtio-rng, the channel's driver end, no
//!   network device: it reaches the world only through the service VM's API.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::config::{
    ChannelConfig, ChannelSide, DEFAULT_CMDLINE, DiskConfig, NetConfig, RestartPolicy, VmConfig,
    VmSet,
};

/// Environment variable naming the image directory.
pub const IMAGES_ENV: &str = "P2PVM_IMAGES";
/// The image files.
pub const IMAGE_FILES: [&str; 3] = ["vmlinux", "service.cpio", "client.cpio"];

/// Where `p2pvmm up` serves the VMs' figures on the TAP's host side by
/// default (the service VM's dashboard asks there: its init passes
/// `--vms-url http://<gateway>:9101/vms.json`).
pub const FIGURES_PORT: u16 = 9101;

/// The service VM's link to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNet {
    /// The host's TAP interface.
    pub tap: String,
    /// The host side's address on it (the VM's gateway).
    pub host: Ipv4Addr,
    /// The VM's address.
    pub guest: Ipv4Addr,
    /// Prefix length of the link.
    pub prefix: u8,
}

impl ServiceNet {
    /// `p2pvm0`, host 10.99.0.1/24, VM 10.99.0.2.
    pub fn standard() -> Self {
        Self {
            tap: "p2pvm0".into(),
            host: Ipv4Addr::new(10, 99, 0, 1),
            guest: Ipv4Addr::new(10, 99, 0, 2),
            prefix: 24,
        }
    }
}

/// How to make the two VMs.
#[derive(Debug, Clone)]
pub struct PlatformOptions {
    /// Directory holding `vmlinux`, `service.cpio`, `client.cpio`.
    pub images: PathBuf,
    /// The service VM's store disk.
    pub store: PathBuf,
    /// The service VM's network (`None`: no network device).
    pub net: Option<ServiceNet>,
    /// Guest RAM of the service VM (MiB).
    pub service_mem_mib: u64,
    /// Guest RAM of the client VM (MiB).
    pub client_mem_mib: u64,
    /// Appended to both command lines (e.g. `p2pvm.log=console`).
    pub extra_cmdline: String,
}

impl PlatformOptions {
    /// The defaults for `images` and `home`.
    pub fn new(images: PathBuf, home: &Path) -> Self {
        Self {
            images,
            store: home.join("store.ext4"),
            net: Some(ServiceNet::standard()),
            service_mem_mib: 1024,
            client_mem_mib: 256,
            extra_cmdline: String::new(),
        }
    }
}

/// The first directory holding all image files among: `explicit`,
/// `$P2PVM_IMAGES`, `<home>/images`.
pub fn find_images(explicit: Option<&Path>, home: &Path) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(dir) => vec![dir.to_path_buf()],
        None => std::env::var_os(IMAGES_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .into_iter()
            .chain([home.join("images")])
            .collect(),
    };
    candidates
        .into_iter()
        .find(|dir| IMAGE_FILES.iter().all(|f| dir.join(f).is_file()))
}

/// The two VMs.
pub fn vm_set(opts: &PlatformOptions) -> VmSet {
    let kernel = opts.images.join("vmlinux");
    let cmdline = |role: &str, more: String| {
        let mut c = format!("{DEFAULT_CMDLINE} quiet p2pvm.role={role}{more}");
        if !opts.extra_cmdline.is_empty() {
            c.push(' ');
            c.push_str(&opts.extra_cmdline);
        }
        c
    };
    let net = opts.net.as_ref().map_or(String::new(), |n| {
        format!(" p2pvm.ip={}/{} p2pvm.gw={}", n.guest, n.prefix, n.host)
    });
    let service = VmConfig {
        name: "service".into(),
        kernel: kernel.clone(),
        initrd: Some(opts.images.join("service.cpio")),
        cmdline: cmdline("service", net),
        mem_mib: opts.service_mem_mib,
        vcpus: 1,
        disks: vec![DiskConfig {
            path: opts.store.clone(),
            read_only: false,
        }],
        nets: opts
            .net
            .iter()
            .map(|n| NetConfig::on_tap(n.tap.clone()))
            .collect(),
        rng: true,
        channel: Some(ChannelConfig {
            side: ChannelSide::Device,
            broker: None,
        }),
        restart: RestartPolicy::Always,
    };
    let client = VmConfig {
        name: "client".into(),
        kernel,
        initrd: Some(opts.images.join("client.cpio")),
        cmdline: cmdline("client", String::new()),
        mem_mib: opts.client_mem_mib,
        vcpus: 1,
        disks: vec![],
        nets: vec![],
        rng: true,
        channel: Some(ChannelConfig {
            side: ChannelSide::Driver,
            broker: None,
        }),
        restart: RestartPolicy::OnFailure,
    };
    VmSet {
        vm: vec![service, client],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_vms_one_channel_only_the_service_vm_has_disk_and_network() {
        let opts = PlatformOptions::new("/img".into(), Path::new("/home/x"));
        let set = vm_set(&opts);
        let [service, client] = &set.vm[..] else {
            panic!("two VMs")
        };
        assert_eq!(service.name, "service");
        assert_eq!(service.channel.as_ref().unwrap().side, ChannelSide::Device);
        assert_eq!(client.channel.as_ref().unwrap().side, ChannelSide::Driver);
        assert_eq!(service.disks[0].path, Path::new("/home/x/store.ext4"));
        assert_eq!(service.nets[0].tap, "p2pvm0");
        assert!(client.disks.is_empty() && client.nets.is_empty());
        assert!(
            service
                .cmdline
                .contains("p2pvm.ip=10.99.0.2/24 p2pvm.gw=10.99.0.1")
        );
        assert!(client.cmdline.contains("p2pvm.role=client"));
        assert!(!client.cmdline.contains("p2pvm.ip"));
        assert_eq!(service.restart, RestartPolicy::Always);
        for vm in &set.vm {
            vm.validate().unwrap();
        }
    }

    #[test]
    fn images_are_found_only_when_complete() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let images = home.join("images");
        std::fs::create_dir_all(&images).unwrap();
        for f in &IMAGE_FILES[..2] {
            std::fs::write(images.join(f), b"x").unwrap();
        }
        assert_eq!(find_images(None, &home), None);
        std::fs::write(images.join("client.cpio"), b"x").unwrap();
        assert_eq!(find_images(None, &home), Some(images.clone()));
        assert_eq!(find_images(Some(&dir.path().join("nope")), &home), None);
    }
}
