//! [`TestHost`]: the prepared kernel, tools and runner, which builds a scenario's images and
//! runs it.
//!
//! Images: the L2 guest initramfs (busybox, the virtio/pvpanic module closure, the
//! scenario's `/init` body) and, for the nested runner, the L1 test-host initramfs (busybox,
//! the kvm-amd/kvm-intel/tun closure, `/guest/vmlinux`, `/guest/initrd.cpio`, the scenario's
//! L1 script and extra files, optionally QEMU). Both are cached by content (see
//! [`crate::image`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::bundle::{QEMU_GUEST_PATH, QemuBundle};
use crate::console::Outcome;
use crate::image::Layout;
use crate::kernel::{Kernel, KernelOptions};
use crate::modules::{ModuleDb, canonical};
use crate::run::{RunnerKind, nested_command, supervise};
use crate::scenario::{P2PVMM_GUEST_PATH, Scenario};
use crate::scripts::{self, L1_SCRIPT_PATH, LIB_PATH, LIB_SH, LOAD_ORDER_PATH};
use crate::util::{Cache, find_tool, require_tool};

/// Modules every L2 guest loads (with their dependencies).
pub const L2_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio-rng",
    "pvpanic-mmio",
];
/// Modules the L1 test host must load.
pub const L1_MODULES: &[&str] = &["kvm-amd", "tun"];
/// Modules the L1 test host tries to load (kvm-intel fails under emulated SVM).
pub const L1_OPTIONAL_MODULES: &[&str] = &["kvm-intel"];

/// How to prepare a [`TestHost`]; [`Options::from_env`] reads the environment.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The cache directory (default: `$P2PVM_TESTHOST_CACHE` or `~/.cache/p2pvm-testhost`).
    pub cache_dir: Option<PathBuf>,
    /// Which kernel.
    pub kernel: KernelOptions,
    /// Force a runner (default: detected, see [`RunnerKind::detect`]).
    pub runner: Option<RunnerKind>,
}

impl Options {
    /// Options from `P2PVM_TESTHOST_KERNEL` and `P2PVM_TESTHOST_REFRESH`.
    pub fn from_env() -> Self {
        Self {
            cache_dir: None,
            kernel: KernelOptions::from_env(),
            runner: None,
        }
    }
}

/// The image files of a scenario.
#[derive(Debug, Clone)]
pub struct Images {
    /// The L2 guest initramfs.
    pub l2_initrd: PathBuf,
    /// The L1 test-host initramfs (nested runner only).
    pub l1_initrd: Option<PathBuf>,
}

/// A ready test host: kernel, modules, tools and the runner to use.
#[derive(Debug)]
pub struct TestHost {
    cache: Cache,
    kernel: Kernel,
    modules: ModuleDb,
    runner: RunnerKind,
    runner_reason: String,
    busybox: PathBuf,
    qemu: Option<PathBuf>,
}

impl TestHost {
    /// Prepares with [`Options::from_env`]: checks the tools, downloads and unpacks the
    /// kernel if the cache lacks it, and chooses the runner.
    pub fn prepare() -> Result<Self> {
        Self::prepare_with(Options::from_env())
    }

    /// Prepares with explicit options.
    pub fn prepare_with(opts: Options) -> Result<Self> {
        let (runner, runner_reason) = match opts.runner {
            Some(runner) => (runner, "chosen by the caller".to_string()),
            None => RunnerKind::detect()?,
        };
        let busybox = static_busybox()?;
        let qemu = match runner {
            RunnerKind::Nested => Some(require_tool("qemu-system-x86_64", "qemu-system-x86")?),
            RunnerKind::Direct => find_tool("qemu-system-x86_64"),
        };
        let cache = match opts.cache_dir {
            Some(dir) => Cache::at(dir)?,
            None => Cache::from_env()?,
        };
        let kernel = Kernel::prepare(&cache, &opts.kernel)?;
        let modules = kernel.modules()?;
        for name in L2_MODULES.iter().chain(L1_MODULES) {
            ensure!(
                modules.knows(name),
                "kernel {} has no module {name}",
                kernel.version
            );
        }
        eprintln!("p2pvm-testhost: using the {runner} runner: {runner_reason}");
        tracing::info!(
            "kernel {} ({}), cache {}",
            kernel.version,
            kernel.deb_sha256,
            cache.root().display()
        );
        Ok(Self {
            cache,
            kernel,
            modules,
            runner,
            runner_reason,
            busybox,
            qemu,
        })
    }

    /// The kernel (version, .deb SHA-256, `vmlinux`, modules).
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The runner scenarios will use.
    pub fn runner(&self) -> RunnerKind {
        self.runner
    }

    /// Why that runner was chosen.
    pub fn runner_reason(&self) -> &str {
        &self.runner_reason
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        self.cache.root()
    }

    /// Builds (or finds in the cache) the images of `scenario`.
    pub fn images(&self, scenario: &Scenario) -> Result<Images> {
        let l2_initrd = self.l2_layout(scenario)?.build(&self.cache, "l2")?;
        let l1_initrd = match self.runner {
            RunnerKind::Nested => Some(
                self.l1_layout(scenario, &l2_initrd)?
                    .build(&self.cache, "l1")?,
            ),
            RunnerKind::Direct => None,
        };
        Ok(Images {
            l2_initrd,
            l1_initrd,
        })
    }

    /// Runs `scenario` and returns its outcome. A script that exits non-zero still gives an
    /// `Ok` outcome (see [`Outcome::ensure_success`]); a watchdog kill is an `Err` holding a
    /// [`crate::WatchdogError`].
    pub fn run(&self, scenario: &Scenario) -> Result<Outcome> {
        let images = self.images(scenario)?;
        tracing::info!("scenario `{}`: {} runner", scenario.name, self.runner);
        match self.runner {
            RunnerKind::Nested => {
                let qemu = self.qemu.as_deref().context("no QEMU")?;
                let l1 = images.l1_initrd.as_deref().context("no L1 image")?;
                let cmd = nested_command(
                    qemu,
                    &self.kernel.vmlinux,
                    l1,
                    scenario.smp,
                    scenario.mem_mib,
                );
                supervise(
                    cmd,
                    false,
                    RunnerKind::Nested,
                    &scenario.name,
                    scenario.limits(),
                )
            }
            RunnerKind::Direct => {
                let dir = tempfile::Builder::new()
                    .prefix("p2pvm-testhost-")
                    .tempdir()?;
                let wrapper = self.direct_tree(scenario, &images, dir.path())?;
                let mut cmd = Command::new("sh");
                cmd.arg(wrapper).current_dir(dir.path());
                supervise(
                    cmd,
                    true,
                    RunnerKind::Direct,
                    &scenario.name,
                    scenario.limits(),
                )
            }
        }
    }

    fn base_layout(&self) -> Result<Layout> {
        let mut layout = Layout::new();
        for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/root"] {
            layout.dir(dir, 0o755);
        }
        layout.busybox(&self.busybox)?;
        layout.text(LIB_PATH, 0o644, LIB_SH);
        Ok(layout)
    }

    fn add_modules(
        &self,
        layout: &mut Layout,
        required: &[String],
        optional: &[String],
    ) -> Result<()> {
        let required = self.modules.closure(required)?;
        let optional: Vec<_> = self
            .modules
            .closure(optional)?
            .into_iter()
            .filter(|m| !required.iter().any(|r| r.name == m.name))
            .collect();
        for module in required.iter().chain(&optional) {
            layout.module(
                &format!("/lib/modules/{}.ko", module.name),
                &self.modules.path(module),
            );
        }
        let names = |mods: &[crate::modules::Module]| {
            mods.iter().map(|m| m.name.clone()).collect::<Vec<_>>()
        };
        layout.text(
            LOAD_ORDER_PATH,
            0o644,
            scripts::load_order(&names(&required), &names(&optional)),
        );
        Ok(())
    }

    fn l2_layout(&self, scenario: &Scenario) -> Result<Layout> {
        let mut layout = self.base_layout()?;
        let wanted: Vec<String> = L2_MODULES
            .iter()
            .map(|m| canonical(m))
            .chain(scenario.l2_modules.iter().map(|m| canonical(m)))
            .collect();
        self.add_modules(&mut layout, &wanted, &[])?;
        let body = scenario
            .l2_init
            .as_deref()
            .unwrap_or(scripts::DEFAULT_L2_BODY);
        layout.text("/init", 0o755, scripts::l2_init(body));
        for file in &scenario.l2_files {
            if file.binary {
                layout.host_binary(&file.guest, &file.host, true)?;
            } else {
                layout.host_file(&file.guest, &file.host)?;
            }
        }
        Ok(layout)
    }

    fn l1_layout(&self, scenario: &Scenario, l2_initrd: &Path) -> Result<Layout> {
        let mut layout = self.base_layout()?;
        let strings = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let required: Vec<String> = strings(L1_MODULES)
            .into_iter()
            .chain(scenario.l1_modules.iter().map(|m| canonical(m)))
            .collect();
        self.add_modules(&mut layout, &required, &strings(L1_OPTIONAL_MODULES))?;
        layout.host_file("/guest/vmlinux", &self.kernel.vmlinux)?;
        layout.host_file("/guest/initrd.cpio", l2_initrd)?;
        if scenario.bundle_qemu {
            let qemu = QemuBundle::locate()?;
            layout.host_binary(QEMU_GUEST_PATH, &qemu.binary, false)?;
            for file in &qemu.firmware {
                layout.host_file(&file.to_string_lossy(), file)?;
            }
        }
        for file in &scenario.extra_files {
            if file.binary {
                layout.host_binary(&file.guest, &file.host, true)?;
            } else {
                layout.host_file(&file.guest, &file.host)?;
            }
        }
        let mut env = vec![
            ("ROOT", String::new()),
            ("GUEST_KERNEL", "/guest/vmlinux".to_string()),
            ("GUEST_INITRD", "/guest/initrd.cpio".to_string()),
            ("WORK", "/tmp/work".to_string()),
            ("TESTHOST_LIB", LIB_PATH.to_string()),
        ];
        if scenario.bundle_qemu {
            env.push(("QEMU", QEMU_GUEST_PATH.to_string()));
        }
        let launcher = scripts::launcher(&self.env(scenario, env, RunnerKind::Nested));
        layout.text(
            L1_SCRIPT_PATH,
            0o644,
            scripts::l1_script(&scenario.l1_script),
        );
        layout.text(
            "/init",
            0o755,
            scripts::l1_init(&launcher, scenario.holds_kvm(), scenario.heartbeat),
        );
        Ok(layout)
    }

    fn env(
        &self,
        scenario: &Scenario,
        base: Vec<(&str, String)>,
        runner: RunnerKind,
    ) -> Vec<(String, String)> {
        let root = base
            .iter()
            .find(|(k, _)| *k == "ROOT")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let mut env: Vec<(String, String)> =
            base.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        env.push(("TESTHOST_RUNNER".to_string(), runner.to_string()));
        if scenario.has_p2pvmm() {
            env.push(("P2PVMM".to_string(), format!("{root}{P2PVMM_GUEST_PATH}")));
        }
        env.extend(scenario.env.iter().cloned());
        env
    }

    /// Lays out the direct runner's `$ROOT` in `root`; returns the wrapper script's path.
    fn direct_tree(&self, scenario: &Scenario, images: &Images, root: &Path) -> Result<PathBuf> {
        let put = |guest: &str, host: &Path, link: bool| -> Result<()> {
            let dest = root.join(guest.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().context("no parent")?)?;
            if link {
                std::os::unix::fs::symlink(host, &dest)?;
            } else {
                fs::copy(host, &dest).with_context(|| format!("cannot copy {}", host.display()))?;
            }
            Ok(())
        };
        put("/guest/vmlinux", &self.kernel.vmlinux, true)?;
        put("/guest/initrd.cpio", &images.l2_initrd, true)?;
        for file in &scenario.extra_files {
            put(&file.guest, &file.host, false)?;
        }
        fs::create_dir_all(root.join("testhost"))?;
        fs::write(root.join(LIB_PATH.trim_start_matches('/')), LIB_SH)?;
        fs::write(
            root.join(L1_SCRIPT_PATH.trim_start_matches('/')),
            scripts::l1_script(&scenario.l1_script),
        )?;
        let root_text = root
            .to_str()
            .context("temporary directory path is not UTF-8")?
            .to_string();
        let mut env = vec![
            ("ROOT", root_text.clone()),
            ("GUEST_KERNEL", format!("{root_text}/guest/vmlinux")),
            ("GUEST_INITRD", format!("{root_text}/guest/initrd.cpio")),
            ("WORK", format!("{root_text}/work")),
            ("TESTHOST_LIB", format!("{root_text}{LIB_PATH}")),
        ];
        if scenario.bundle_qemu {
            let qemu = self
                .qemu
                .as_ref()
                .context("`qemu-system-x86_64` not found: install `qemu-system-x86`")?;
            env.push(("QEMU", qemu.to_string_lossy().into_owned()));
        }
        let wrapper = root.join("testhost/run.sh");
        fs::write(
            &wrapper,
            scripts::direct_wrapper(&scripts::launcher(&self.env(
                scenario,
                env,
                RunnerKind::Direct,
            ))),
        )?;
        Ok(wrapper)
    }
}

/// The static busybox of Debian's `busybox-static`.
fn static_busybox() -> Result<PathBuf> {
    const HINT: &str =
        "install the Debian package `busybox-static` (apt-get install busybox-static)";
    let path = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| find_tool("busybox"))
        .with_context(|| format!("busybox was not found: {HINT}"))?;
    let info = crate::elf::inspect(&path)?
        .with_context(|| format!("{} is not an ELF program: {HINT}", path.display()))?;
    ensure!(
        info.interp.is_none(),
        "{} is dynamically linked: {HINT}",
        path.display()
    );
    Ok(path)
}
