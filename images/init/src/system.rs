//! Bringing the guest up: pseudo file systems, the boot marker, kernel
//! modules, host name, the service VM's network and store.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::kmod::{ModuleInitFlags, finit_module};
use nix::mount::{MsFlags, mount};

use crate::boot::Boot;
use crate::say;

/// The module list written by p2pvm-images.
const MODULE_LIST: &str = "/etc/p2pvm/modules";
/// Where the service VM's store is mounted (p2pd's data directory).
pub const STORE_MOUNT: &str = "/var/lib/p2pd";
/// The store disk.
const STORE_DEVICE: &str = "/dev/vda";
/// p2pvmm's boot-marker port: writing 0x7b there timestamps "init reached".
const BOOT_MARKER_PORT: u64 = 0x440;

/// Mounts proc, sysfs, devtmpfs, devpts and the tmpfs directories.
pub fn mount_pseudo_filesystems() {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for (source, target, fstype, flags, data) in [
        ("proc", "/proc", "proc", nodev, None),
        ("sysfs", "/sys", "sysfs", nodev, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ] {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(source), target, Some(fstype), flags, data) {
            say!("mounting {fstype} on {target}: {e}");
        }
    }
}

/// Tells p2pvmm that init runs (for its boot-time report). Other VMMs ignore
/// the port; a kernel without /dev/port just skips it.
pub fn boot_marker() {
    if let Ok(port) = File::options().write(true).open("/dev/port") {
        let _ = port.write_at(&[0x7b], BOOT_MARKER_PORT);
    }
}

/// Loads the image's modules in their listed order.
pub fn load_modules() {
    let list = std::fs::read_to_string(MODULE_LIST).unwrap_or_default();
    for name in list.lines().map(str::trim).filter(|n| !n.is_empty()) {
        let path = format!("/lib/modules/{name}.ko");
        let result = File::open(&path)
            .map_err(|e| {
                e.raw_os_error()
                    .map_or(nix::Error::EIO, nix::Error::from_raw)
            })
            .and_then(|f| finit_module(&f, c"", ModuleInitFlags::empty()));
        match result {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => say!("module {name}: {e}"),
        }
    }
}

/// Sets the host name from `/etc/hostname`.
pub fn set_hostname() {
    if let Ok(name) = std::fs::read_to_string("/etc/hostname") {
        let _ = nix::unistd::sethostname(name.trim());
    }
}

/// `lo` always; `eth0` with the command line's static address and route.
/// Brings up loopback and, with `p2pvm.ip`, `eth0`; whether `eth0` is up.
pub fn configure_network(boot: &Boot) -> bool {
    ip(&["link", "set", "lo", "up"]);
    let Some(cidr) = boot.ip else {
        return false;
    };
    // virtio-net may still be probing.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !Path::new("/sys/class/net/eth0").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !Path::new("/sys/class/net/eth0").exists() {
        say!("p2pvm.ip is set but there is no eth0: no network");
        return false;
    }
    ip(&[
        "addr",
        "add",
        &format!("{}/{}", cidr.addr, cidr.prefix),
        "dev",
        "eth0",
    ]);
    ip(&["link", "set", "eth0", "up"]);
    if let Some(gw) = boot.gateway {
        ip(&["route", "add", "default", "via", &gw.to_string()]);
    }
    if let Some(dns) = boot.dns {
        let _ = std::fs::write("/etc/resolv.conf", format!("nameserver {dns}\n"));
    }
    say!(
        "eth0 {}/{}{}",
        cidr.addr,
        cidr.prefix,
        boot.gateway
            .map(|g| format!(" via {g}"))
            .unwrap_or_default()
    );
    true
}

fn ip(args: &[&str]) {
    match Command::new("/bin/ip").args(args).status() {
        Ok(s) if s.success() => {}
        Ok(s) => say!("ip {}: {s}", args.join(" ")),
        Err(e) => say!("ip {}: {e}", args.join(" ")),
    }
}

/// Mounts the store disk on p2pd's data directory. Without a disk (or when
/// it cannot be mounted) p2pd keeps its data in RAM, which is said loudly:
/// identity and content are then lost at power-off.
pub fn mount_store() -> bool {
    let _ = std::fs::create_dir_all(STORE_MOUNT);
    if !Path::new(STORE_DEVICE).exists() {
        say!(
            "WARNING: no store disk ({STORE_DEVICE}): the node's identity and content live in RAM only"
        );
        return false;
    }
    match mount(
        Some(STORE_DEVICE),
        STORE_MOUNT,
        Some("ext4"),
        MsFlags::MS_NOATIME | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    ) {
        Ok(()) => {
            say!("store {STORE_DEVICE} mounted on {STORE_MOUNT}");
            // clamd spools scanned streams here (on disk, not in RAM).
            let _ = std::fs::create_dir_all(format!("{STORE_MOUNT}/tmp"));
            true
        }
        Err(e) => {
            say!(
                "WARNING: cannot mount the store {STORE_DEVICE} ({e}): the node's data live in RAM only"
            );
            let _ = std::fs::create_dir_all(format!("{STORE_MOUNT}/tmp"));
            false
        }
    }
}

/// Seconds since boot, from `/proc/uptime`.
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
