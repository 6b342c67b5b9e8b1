//! Release builds of our programs for the images and the test host, made by
//! one cargo invocation. One invocation matters: cargo unifies dependency
//! features over the packages it builds together, so building the same
//! programs in differently grouped invocations compiles libp2p, tokio and
//! the rest again for each grouping.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ImageError, IoContext, Result};
use crate::guests::Programs;
use crate::util::{find_tool, require_tool};

/// `(package, binary)` of every program the images and the test host use.
pub const BINARIES: &[(&str, &str)] = &[
    ("vmm", "p2pvmm"),
    // Not in the images: the nested test host holds a VM open with it.
    ("vmm", "p2pvm-kvm-hold"),
    ("p2pvm-init", "p2pvm-init"),
    ("p2p-service-vm", "p2pd"),
    ("guest-frontend", "p2p-frontend"),
    ("p2pctl", "p2pctl"),
];
/// The example apps (package `guest-api`) put into the client VM.
pub const EXAMPLES: &[&str] = &["chat", "echo", "apibench"];

/// The workspace root: the nearest directory holding `Cargo.lock` above the
/// package cargo is running (a test's or this crate's). `cargo` tells us where
/// that package is now; the path baked in at compile time is only the
/// fallback, because a build cache shared between clones (CI's fixed
/// `CARGO_TARGET_DIR`) may hold a binary compiled in another, since deleted,
/// clone.
pub fn workspace() -> PathBuf {
    let here = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    here.ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.join(".."))
}

/// `cargo build --release` of [`BINARIES`] and [`EXAMPLES`] (a no-op when
/// current); returns the release directory. Uses `$CARGO` and
/// `$CARGO_TARGET_DIR` like the cargo that runs us.
pub fn build() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--locked"]);
    for (package, _) in BINARIES {
        cmd.args(["-p", package]);
    }
    for (_, bin) in BINARIES {
        cmd.args(["--bin", bin]);
    }
    cmd.args(["-p", "guest-api"]);
    for example in EXAMPLES {
        cmd.args(["--example", example]);
    }
    let shown = format!("{cmd:?}");
    let status = cmd
        .current_dir(workspace())
        .status()
        .ctx(|| format!("cannot run {shown}"))?;
    if !status.success() {
        return Err(ImageError::Command {
            command: shown,
            status,
            stderr: "(on the terminal above)".into(),
        });
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    Ok(target.join("release"))
}

/// A program of `dir`, which must exist.
pub fn program(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(ImageError::Input(format!("{} is missing", p.display())))
    }
}

/// Our programs from a release directory, with this host's busybox-static
/// and clamd, and the signature database (default: the project's).
pub fn programs(dir: &Path, signatures: Option<PathBuf>) -> Result<Programs> {
    Ok(Programs {
        init: program(dir, "p2pvm-init")?,
        p2pd: program(dir, "p2pd")?,
        frontend: program(dir, "p2p-frontend")?,
        p2pctl: program(dir, "p2pctl")?,
        examples: EXAMPLES
            .iter()
            .map(|e| program(&dir.join("examples"), e))
            .collect::<Result<_>>()?,
        busybox: static_busybox()?,
        clamd: require_tool("clamd", "clamav-daemon")?,
        signatures: signatures.unwrap_or_else(|| workspace().join("security/clamav")),
    })
}

/// Debian's busybox-static, checked to be static.
pub fn static_busybox() -> Result<PathBuf> {
    let busybox = find_tool("busybox").ok_or_else(|| ImageError::MissingTool {
        tool: "busybox".into(),
        package: "busybox-static".into(),
    })?;
    match crate::elf::inspect(&busybox)? {
        Some(info) if info.interp.is_none() => Ok(busybox),
        _ => Err(ImageError::Input(format!(
            "{} is not a static binary: apt-get install busybox-static",
            busybox.display()
        ))),
    }
}
