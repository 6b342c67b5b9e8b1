//! What a VM is made of, as plain data: from `p2pvmm run`'s flags or from
//! a `[[vm]]` table in the file `p2pvmm up --vms` reads.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Kernel command line when none is given: the serial console, one UART
/// probed (each probe of an absent one costs exits), reboot on panic, and no
/// early PCI quirks — on AMD family 0xf CPUs (what QEMU's `qemu64` model
/// reports, so every nested test host) Linux looks for a GART aperture by
/// reading all 256 buses twice before the console is up: 33,000 port exits,
/// 1.2 s of a nested boot, for a chipset this machine does not have.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 8250.nr_uarts=1 panic=-1 pci=noearly";

/// One VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Name: the console is `p2pvmm console NAME`.
    pub name: String,
    /// Kernel: an ELF `vmlinux` (PVH entry preferred) or a bzImage.
    pub kernel: PathBuf,
    /// Initramfs.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Guest RAM in MiB.
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// virtio-blk disks, in order (`/dev/vda`, `/dev/vdb`, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, each on a TAP.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// A virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// This VM's end of the inter-VM channel.
    #[serde(default)]
    pub channel: Option<ChannelConfig>,
    /// What `p2pvmm up` does when the VM ends (ignored by `p2pvmm run`).
    #[serde(default)]
    pub restart: RestartPolicy,
}

/// When `p2pvmm up` starts a VM again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After a crash, a panic or a kill; a guest that powered off stays off.
    #[default]
    OnFailure,
    /// Whenever it ends, powered off or not (the service VM: the client
    /// relies on it).
    Always,
}

/// Which end of the inter-VM channel a VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ChannelSide {
    /// The P2P service VM (the channel's back-end, the virtio device side).
    Device,
    /// The client VM (the front-end, the virtio driver side).
    Driver,
}

impl From<ChannelSide> for p2pvm_channel::Side {
    fn from(s: ChannelSide) -> Self {
        match s {
            ChannelSide::Device => Self::Device,
            ChannelSide::Driver => Self::Driver,
        }
    }
}

/// A VM's channel device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Its end.
    pub side: ChannelSide,
    /// The broker socket that hands out the region and the event channels.
    /// `p2pvmm up` fills it in with its own broker when absent.
    #[serde(default)]
    pub broker: Option<PathBuf>,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_owned()
}
fn default_mem_mib() -> u64 {
    256
}
fn default_vcpus() -> u8 {
    1
}

/// A raw disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Host TAP interface name.
    pub tap: String,
    /// Guest MAC (`02:xx:...`); derived from the VM and TAP names if absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// Adaptive interrupt moderation under load (on unless `false`; see
    /// `devices/virtio/net/moderation.rs`).
    #[serde(default = "yes")]
    pub moderation: bool,
}

fn yes() -> bool {
    true
}

impl NetConfig {
    /// An interface on `tap` with a derived MAC and moderation on.
    pub fn on_tap(tap: impl Into<String>) -> Self {
        Self {
            tap: tap.into(),
            mac: None,
            moderation: true,
        }
    }

    /// Parses the command line's `NAME[,mac=02:..][,moderation=on|off]`.
    pub fn parse(arg: &str) -> Result<Self, ConfigError> {
        let mut parts = arg.split(',');
        let mut net = Self::on_tap(parts.next().unwrap_or_default());
        for opt in parts {
            match opt.split_once('=') {
                Some(("mac", mac)) => net.mac = Some(mac.into()),
                Some(("moderation", "on")) => net.moderation = true,
                Some(("moderation", "off")) => net.moderation = false,
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "--net {arg}: unknown option {opt:?} (mac=02:..:.., moderation=on|off)"
                    )));
                }
            }
        }
        Ok(net)
    }
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A field is out of range.
    #[error("{0}")]
    Invalid(String),
}

impl VmConfig {
    /// Checks ranges and names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "VM name {:?}: use 1-64 letters, digits, '-' or '_'",
                self.name
            ));
        }
        if !(16..=1 << 20).contains(&self.mem_mib) {
            return bad(format!("mem_mib {} is outside 16..=1048576", self.mem_mib));
        }
        if !(1..=64).contains(&self.vcpus) {
            return bad(format!("vcpus {} is outside 1..=64", self.vcpus));
        }
        // One PCI slot each, 31 slots.
        let functions = self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.channel.is_some());
        if functions > 31 {
            return bad("more than 31 PCI devices".into());
        }
        for n in &self.nets {
            if let Some(m) = &n.mac {
                parse_mac(m)?;
            }
        }
        Ok(())
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(ConfigError::Invalid(format!(
            "MAC {s:?} is not six hex bytes"
        )));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)
            .map_err(|_| ConfigError::Invalid(format!("MAC {s:?} is not six hex bytes")))?;
    }
    Ok(mac)
}

/// A stable, locally administered MAC from a VM and interface name.
pub fn derived_mac(vm: &str, tap: &str) -> [u8; 6] {
    // FNV-1a: stable across runs and builds, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm.bytes().chain([0]).chain(tap.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// The VMs `p2pvmm up --vms FILE` supervises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSet {
    /// One table per VM.
    pub vm: Vec<VmConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse_and_unknown_ones_are_refused() {
        assert_eq!(NetConfig::parse("tap0").unwrap(), NetConfig::on_tap("tap0"));
        let n = NetConfig::parse("tap1,mac=02:00:00:00:00:09,moderation=off").unwrap();
        assert_eq!(n.tap, "tap1");
        assert_eq!(n.mac.as_deref(), Some("02:00:00:00:00:09"));
        assert!(!n.moderation);
        assert!(NetConfig::parse("tap1,moderation=maybe").is_err());
        assert!(NetConfig::parse("tap1,speed=fast").is_err());
        let t: NetConfig = toml::from_str("tap = 't'").unwrap();
        assert!(t.moderation, "on unless turned off");
        let t: NetConfig = toml::from_str("tap = 't'\nmoderation = false").unwrap();
        assert!(!t.moderation);
    }

    #[test]
    fn toml_with_defaults() {
        let set: VmSet = toml::from_str(
            r#"
            [[vm]]
            name = "service"
            kernel = "/k"
            disks = [{ path = "/d.img" }]
            nets = [{ tap = "tap0", mac = "02:00:00:00:00:01" }]
            [[vm]]
            name = "client"
            kernel = "/k"
            rng = true
            "#,
        )
        .unwrap();
        assert_eq!(set.vm.len(), 2);
        assert_eq!(set.vm[0].cmdline, DEFAULT_CMDLINE);
        assert_eq!((set.vm[0].mem_mib, set.vm[0].vcpus), (256, 1));
        assert!(!set.vm[0].disks[0].read_only);
        assert!(set.vm.iter().all(|v| v.validate().is_ok()));
        assert!(toml::from_str::<VmSet>("[[vm]]\nname='a'\nkernel='/k'\ntypo=1").is_err());
    }

    #[test]
    fn validation() {
        let ok = VmConfig {
            name: "a".into(),
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: 256,
            vcpus: 1,
            disks: vec![],
            nets: vec![],
            rng: false,
            channel: None,
            restart: RestartPolicy::OnFailure,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            VmConfig {
                name: "../x".into(),
                ..ok.clone()
            },
            VmConfig {
                mem_mib: 8,
                ..ok.clone()
            },
            VmConfig {
                vcpus: 0,
                ..ok.clone()
            },
            VmConfig {
                nets: vec![NetConfig {
                    mac: Some("zz".into()),
                    ..NetConfig::on_tap("t")
                }],
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_mac("02:0a:0B:ff:00:01").unwrap(),
            [2, 10, 11, 255, 0, 1]
        );
        assert_eq!(derived_mac("a", "t"), derived_mac("a", "t"));
        assert_ne!(derived_mac("a", "t"), derived_mac("b", "t"));
        assert_eq!(derived_mac("a", "t")[0], 0x02);
    }
}
