//! `p2pvmm`: brings the split platform up, runs single VMs, and opens
//! consoles.

// No mimalloc here (p2pd and the front-end use it for their streaming
// paths): p2pvmm moves no bulk data through its heap, and mimalloc's eager
// arena commit alone made 6 MiB of a VM process's resident memory.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use vmm::config::{ChannelConfig, ChannelSide, DEFAULT_CMDLINE, DiskConfig, NetConfig, VmConfig};
use vmm::instance::{self, OnReboot, RunOptions};
use vmm::isolation::{self, HostVirt, Isolation};
use vmm::lifecycle::ExitReason;
use vmm::sandbox::{self, Home};
use vmm::vm_dir::VmDir;

/// The p2pvm VMM and supervisor: one P2P node for the machine, kept apart from the user's OS.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// State directory (default: ~/.local/share/p2pvmm).
    #[arg(long, global = true, env = "P2PVMM_HOME")]
    home: Option<PathBuf>,
    /// Log filter.
    #[arg(long, global = true, env = "P2PVMM_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the platform: the channel, the service side, the front-end.
    Up(UpArgs),
    /// Run one KVM virtual machine in this process until it powers off.
    Run(RunArgs),
    /// Attach to a VM's serial console (`Ctrl-]` detaches), or for `service`
    /// under the sandbox backend open the operator's shell, or run COMMAND there.
    Console {
        /// VM name (or `service`).
        name: String,
        /// With stdin from a pipe: how long to keep printing after its end
        /// once the guest is quiet.
        #[arg(long, default_value_t = 1000)]
        linger_ms: u64,
        /// Command to run instead of a shell (sandbox backend only).
        #[arg(last = true)]
        command: Vec<OsString>,
    },
}

/// `p2pvmm up`'s arguments.
#[derive(Debug, Args)]
struct UpArgs {
    /// Isolation backend.
    #[arg(long, value_enum, default_value_t = Isolation::Auto)]
    isolation: Isolation,
    /// p2pd config file for the service side.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The VMs to run with `--isolation vm`: a TOML file of `[[vm]]`
    /// tables (the fields of `p2pvmm run`; see docs/vmm.md), instead of
    /// the platform's two VMs from the images.
    #[arg(long)]
    vms: Option<PathBuf>,
    /// Serve the VMs' figures (Prometheus `GET /metrics`, `GET
    /// /vms.json`) on this loopback or private address (VM mode: by default
    /// the TAP's host side, where the service VM's dashboard reads them;
    /// the sandbox backend: both sides' states and the front-end's channel
    /// figures; docs/dashboard.md).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    platform: PlatformArgs,
    /// Extra p2pd arguments, after `--` (e.g. `-- --listen /ip4/0.0.0.0/tcp/4001`).
    #[arg(last = true)]
    service_args: Vec<OsString>,
}

/// The platform's VMs (`--isolation vm` without `--vms`).
#[derive(Debug, Args)]
struct PlatformArgs {
    /// Directory with vmlinux, service.cpio, client.cpio (default:
    /// $P2PVM_IMAGES, then HOME/images — where `p2pvm-images build` writes).
    #[arg(long)]
    images: Option<PathBuf>,
    /// The service VM's TAP interface (created with the host side at
    /// 10.99.0.1/24 when missing and p2pvmm runs as root).
    #[arg(long, default_value = "p2pvm0")]
    tap: String,
    /// No network device for the service VM.
    #[arg(long)]
    no_net: bool,
    /// Leave the service VM's way out to the host's operator: no NAT set
    /// up on the TAP, no port forwarded (docs/network.md).
    #[arg(long)]
    no_nat: bool,
    /// Ports (TCP and UDP) forwarded from the host's own addresses to the
    /// service VM's node (repeatable).
    #[arg(long = "forward-port", default_values_t = [4001u16])]
    forward_ports: Vec<u16>,
    /// Service VM RAM, MiB.
    #[arg(long, default_value_t = 1024)]
    service_mem_mib: u64,
    /// Client VM RAM, MiB.
    #[arg(long, default_value_t = 256)]
    client_mem_mib: u64,
    /// Size of a new store disk, MiB.
    #[arg(long, default_value_t = p2pvm_images::store::DEFAULT_STORE_MIB)]
    store_mib: u64,
    /// Appended to both VMs' kernel command lines (e.g. `p2pvm.log=console`).
    #[arg(long, default_value = "")]
    cmdline_extra: String,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The whole VM as a TOML `[[vm]]` table's fields (instead of the flags below).
    #[arg(long, conflicts_with_all = ["name", "kernel"])]
    config: Option<PathBuf>,
    /// VM name; its console is `p2pvmm console NAME`.
    #[arg(long, required_unless_present = "config")]
    name: Option<String>,
    /// Kernel: ELF vmlinux (PVH entry) or bzImage.
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// A virtio-blk disk: PATH or PATH,ro (repeatable; /dev/vda, /dev/vdb, ...).
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// A virtio-net interface on a TAP: NAME, with options after commas:
    /// mac=02:..:.., moderation=off (repeatable; moderation: docs/vmm.md).
    #[arg(long = "net")]
    nets: Vec<String>,
    /// Add a virtio-rng device.
    #[arg(long)]
    rng: bool,
    /// Give the VM the inter-VM channel device: SIDE,BROKER — `device` (the
    /// service VM) or `driver` (the client VM), and the broker socket that
    /// hands out the shared region and the event channels.
    #[arg(long, value_parser = parse_channel)]
    channel: Option<ChannelConfig>,
    /// Copy the guest's console to stdout.
    #[arg(long)]
    console_stdout: bool,
    /// What a guest reset does.
    #[arg(long, value_enum, default_value_t = RebootPolicy::Restart)]
    on_reboot: RebootPolicy,
    /// Write a JSON report (exit reason, boot times, memory overhead) here at exit.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Per-thread seccomp filters of the vCPU and device threads.
    #[arg(long, value_enum, default_value_t = SeccompMode::Enforce)]
    seccomp: SeccompMode,
    /// Run even where /dev/kvm has no hardware virtualization (PVM): only
    /// tiny guests work there.
    #[arg(long, hide = true)]
    allow_software_kvm: bool,
    /// Supervisor's pid: this VM stops when that process dies.
    #[arg(long, hide = true)]
    parent_pid: Option<i32>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SeccompMode {
    /// A syscall outside a thread's list kills the VMM.
    Enforce,
    /// Violations are let through and logged by the kernel (audit).
    Log,
    /// No filters.
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RebootPolicy {
    Restart,
    Exit,
}

/// Exit status of `p2pvmm run` when the guest panicked.
const EXIT_GUEST_PANIC: i32 = 3;

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).context("invalid --log filter")?)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let home = Home::new(cli.home.clone().unwrap_or_else(Home::default_root));
    match cli.cmd {
        Cmd::Up(args) => up(home, args, &cli.log),
        Cmd::Run(args) => run(&home, args, started),
        Cmd::Console {
            name,
            linger_ms,
            command,
        } => console(&home, &name, Duration::from_millis(linger_ms), &command),
    }
}

fn vm_config(a: &RunArgs) -> anyhow::Result<VmConfig> {
    if let Some(path) = &a.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: VmConfig = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        c.validate()?;
        return Ok(c);
    }
    let disks = a
        .disks
        .iter()
        .map(|d| match d.strip_suffix(",ro") {
            Some(path) => DiskConfig {
                path: path.into(),
                read_only: true,
            },
            None => DiskConfig {
                path: d.into(),
                read_only: false,
            },
        })
        .collect();
    let nets = a
        .nets
        .iter()
        .map(|n| NetConfig::parse(n))
        .collect::<Result<_, _>>()?;
    let c = VmConfig {
        name: a.name.clone().unwrap_or_default(),
        kernel: a.kernel.clone().unwrap_or_default(),
        initrd: a.initrd.clone(),
        cmdline: a.cmdline.clone(),
        mem_mib: a.mem_mib,
        vcpus: a.vcpus,
        disks,
        nets,
        rng: a.rng,
        channel: a.channel.clone(),
        restart: Default::default(),
    };
    c.validate()?;
    Ok(c)
}

fn parse_channel(text: &str) -> Result<ChannelConfig, String> {
    let (side, broker) = text
        .split_once(',')
        .ok_or("expected SIDE,BROKER (e.g. device,/run/p2pvmm/broker.sock)")?;
    let side = ChannelSide::from_str(side, true)?;
    Ok(ChannelConfig {
        side,
        broker: Some(broker.into()),
    })
}

extern "C" fn request_stop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    vmm::runner::STOP_REQUESTED.store(true, Ordering::Relaxed);
}

fn run(home: &Home, args: RunArgs, started: Instant) -> anyhow::Result<()> {
    let host = HostVirt::probe();
    if !host.hardware() && !args.allow_software_kvm {
        let why = isolation::why_not_vm(&host);
        bail!("cannot run a Linux guest here: {why}");
    }
    if let Some(parent) = args.parent_pid {
        // Die with the supervisor; if it is already gone, do not start.
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
        if nix::unistd::getppid().as_raw() != parent {
            bail!("the supervisor (pid {parent}) is gone");
        }
    }
    let config = vm_config(&args)?;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, request_stop)
            .map_err(|e| anyhow::anyhow!("installing a signal handler: {e}"))?;
    }
    let opts = RunOptions {
        home: home.root().to_path_buf(),
        console_stdout: args.console_stdout,
        on_reboot: match args.on_reboot {
            RebootPolicy::Restart => OnReboot::Restart,
            RebootPolicy::Exit => OnReboot::Exit,
        },
        setup: Arc::new(vmm::seccomp::Filters::new(match args.seccomp {
            SeccompMode::Enforce => vmm::seccomp::Mode::Enforce,
            SeccompMode::Log => vmm::seccomp::Mode::Log,
            SeccompMode::Off => vmm::seccomp::Mode::Off,
        })?),
        started,
    };
    let (reason, report) = instance::run(&config, &opts)?;
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.0} ms", v));
    eprintln!(
        "p2pvmm: {} ended ({}) after {:.2} s; first output {}, /init {}; VMM overhead {:.1} MiB",
        config.name,
        report.exit,
        report.ran_s,
        ms(report.first_output_ms),
        ms(report.init_ms),
        report.vmm_overhead_kib as f64 / 1024.0
    );
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    match reason {
        ExitReason::PowerOff | ExitReason::Reset | ExitReason::Stopped => Ok(()),
        ExitReason::Panic => {
            eprintln!("p2pvmm: {}: the guest kernel panicked", config.name);
            std::process::exit(EXIT_GUEST_PANIC)
        }
        ExitReason::Error(e) => bail!("{}: {e}", config.name),
    }
}

fn up(home: Home, args: UpArgs, log: &str) -> anyhow::Result<()> {
    let UpArgs {
        isolation: requested,
        config,
        vms,
        metrics,
        platform,
        service_args,
    } = args;
    let images = match &vms {
        Some(_) => None,
        None => vmm::platform::find_images(platform.images.as_deref(), home.root()),
    };
    if let (Some(dir), None) = (&platform.images, &images)
        && vms.is_none()
    {
        bail!(
            "{} does not hold {} (build them: cargo run --release -p p2pvm-images -- build --out {0})",
            dir.display(),
            vmm::platform::IMAGE_FILES.join(", ")
        );
    }
    let choice = isolation::choose(
        requested,
        &HostVirt::probe(),
        vms.is_some() || images.is_some(),
    )?;
    println!("p2pvmm: isolation {} ({})", choice.backend, choice.reason);
    if choice.backend == Isolation::Vm {
        let own_set = vms.is_none();
        let set = match (vms, images) {
            (Some(path), _) => vmm::vm_supervisor::load(&path)?,
            (None, Some(images)) => platform_vms(&home, images, &platform)?,
            (None, None) => unreachable!("choose() picks vm only with VMs to run"),
        };
        // Held while the VMs run; dropping it removes the NAT.
        let _nat = (own_set && !platform.no_net && !platform.no_nat)
            .then(|| host_nat(&platform))
            .flatten();
        // The platform's own VMs: the figures on the TAP's host side, where
        // the service VM's dashboard reads them.
        let by_default = metrics.is_none();
        let metrics = metrics.or_else(|| {
            (own_set && !platform.no_net).then(|| {
                let host = vmm::platform::ServiceNet::standard().host;
                std::net::SocketAddr::from((host, vmm::platform::FIGURES_PORT))
            })
        });
        return up_vms(&home, &set, metrics, by_default, log);
    }
    println!(
        "p2pvmm: service side: p2pd in a sandbox (user, mount, pid, ipc, uts namespaces; Landlock; seccomp); its data: {}",
        home.service_dir().display()
    );
    println!(
        "p2pvmm: apps connect to {}  (export P2PVM_API_SOCKET={0})",
        home.api_socket().display()
    );
    println!(
        "p2pvmm: admin token {} — operator console: p2pvmm --home {} console service",
        home.admin_token().display(),
        home.root().display()
    );
    let config = config
        .map(|c| std::path::absolute(&c))
        .transpose()
        .context("config path")?;
    let opts = vmm::supervisor::UpOptions {
        home,
        config,
        service_args,
        layout: p2pvm_channel::Layout::standard(),
        metrics,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let shutdown = p2pvm_signals::shutdown_on_signals();
        vmm::supervisor::up(opts, shutdown).await
    })?;
    Ok(())
}

/// The platform's two VMs from the images: the store disk made when missing,
/// the TAP when missing (as root), the set written to HOME/vms.toml.
fn platform_vms(
    home: &Home,
    images: PathBuf,
    args: &PlatformArgs,
) -> anyhow::Result<vmm::config::VmSet> {
    let images = std::path::absolute(&images)?;
    let mut opts = vmm::platform::PlatformOptions::new(images.clone(), home.root());
    opts.service_mem_mib = args.service_mem_mib;
    opts.client_mem_mib = args.client_mem_mib;
    opts.extra_cmdline = args.cmdline_extra.clone();
    opts.net = (!args.no_net).then(|| vmm::platform::ServiceNet {
        tap: args.tap.clone(),
        ..vmm::platform::ServiceNet::standard()
    });
    std::fs::create_dir_all(home.root())?;
    let state = p2pvm_images::store::ensure(&opts.store, args.store_mib)?;
    println!(
        "p2pvmm: images {}; store {} ({})",
        images.display(),
        opts.store.display(),
        match state {
            p2pvm_images::store::StoreState::Created => "new",
            p2pvm_images::store::StoreState::Reused => "kept",
        }
    );
    if let Some(net) = &opts.net {
        ensure_tap(net)?;
        println!(
            "p2pvmm: service VM at {} on {} (host side {}); the node listens on TCP and QUIC port 4001",
            net.guest, net.tap, net.host
        );
    }
    let set = vmm::platform::vm_set(&opts);
    let file = home.root().join("vms.toml");
    std::fs::write(&file, toml::to_string(&set)?)
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(set)
}

/// The service VM's way out through this host (`vmm::hostnet`): set up when
/// we run as root; otherwise the error says what to run. A failure leaves
/// the VMs running without it (local apps still work) and says so.
fn host_nat(args: &PlatformArgs) -> Option<vmm::hostnet::HostNat> {
    let net = vmm::platform::ServiceNet {
        tap: args.tap.clone(),
        ..vmm::platform::ServiceNet::standard()
    };
    let plan = vmm::hostnet::NatPlan::new(&net, args.forward_ports.clone());
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "p2pvmm: WARNING: not root, so the service VM has no way out unless this host \
             routes for it; as root, once: echo 1 > /proc/sys/net/ipv4/ip_forward && \
             nft -f - <<'END'\n{}END\n(or run up as root, or --no-nat to silence this)",
            plan.ruleset()
        );
        return None;
    }
    match vmm::hostnet::HostNat::install(&plan, None) {
        Ok(nat) => {
            println!(
                "p2pvmm: the service VM reaches out through this host's NAT (nftables table ip {}, \
                 removed at stop); ports {:?} forwarded to it",
                nat.table(),
                args.forward_ports
            );
            Some(nat)
        }
        Err(e) => {
            eprintln!("p2pvmm: WARNING: no NAT for the service VM, so it reaches no one: {e}");
            None
        }
    }
}

/// Makes sure the service VM's TAP exists: an existing one is used as the
/// operator set it up; a missing one is created (persistent, host side
/// addressed) when we may, else the error says how.
fn ensure_tap(net: &vmm::platform::ServiceNet) -> anyhow::Result<()> {
    if std::path::Path::new("/sys/class/net")
        .join(&net.tap)
        .exists()
    {
        return Ok(());
    }
    let host = format!("{}/{}", net.host, net.prefix);
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the TAP {tap} does not exist; create it once as root: \
             ip tuntap add dev {tap} mode tap user $USER && ip addr add {host} dev {tap} && ip link set {tap} up \
             (or run with --no-net)",
            tap = net.tap
        );
    }
    for args in [
        vec!["tuntap", "add", "dev", &net.tap, "mode", "tap"],
        vec!["addr", "add", &host, "dev", &net.tap],
        vec!["link", "set", &net.tap, "up"],
    ] {
        let status = std::process::Command::new("ip")
            .args(&args)
            .status()
            .context("running ip (iproute2)")?;
        if !status.success() {
            bail!("ip {} failed ({status})", args.join(" "));
        }
    }
    println!("p2pvmm: created TAP {} ({host})", net.tap);
    Ok(())
}

fn up_vms(
    home: &Home,
    set: &vmm::config::VmSet,
    metrics: Option<std::net::SocketAddr>,
    metrics_by_default: bool,
    log: &str,
) -> anyhow::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, request_stop)
            .map_err(|e| anyhow::anyhow!("installing a signal handler: {e}"))?;
    }
    std::fs::create_dir_all(home.root())?;
    for vm in &set.vm {
        println!(
            "p2pvmm: VM {} in its own process — console: p2pvmm --home {} console {0}",
            vm.name,
            home.root().display()
        );
    }
    let launch = vmm::vm_supervisor::Launch {
        exe: std::env::current_exe().context("locating p2pvmm")?,
        home: home.root().to_path_buf(),
        log: log.to_owned(),
        run_args: Vec::new(),
        metrics,
        metrics_by_default,
    };
    vmm::vm_supervisor::up(set, &launch, &vmm::runner::STOP_REQUESTED)?;
    Ok(())
}

fn console(home: &Home, name: &str, linger: Duration, command: &[OsString]) -> anyhow::Result<()> {
    let socket = VmDir::new(home.root(), name).console_socket();
    if socket.exists() {
        if !command.is_empty() {
            bail!("a VM console takes no command; type it into the console");
        }
        vmm::console::client::attach(&socket, linger)?;
        return Ok(());
    }
    if name != "service" {
        bail!(
            "no VM named {name:?} is running under {}",
            home.root().display()
        );
    }
    sandbox_console(home, command)
}

fn sandbox_console(home: &Home, command: &[OsString]) -> anyhow::Result<()> {
    let pid: u32 = std::fs::read_to_string(home.service_pid())
        .with_context(|| {
            format!(
                "no running service side under {} (is `p2pvmm up` running?)",
                home.root().display()
            )
        })?
        .trim()
        .parse()
        .context("service.pid")?;
    let base: Vec<OsString> = std::fs::read_to_string(home.service_args_file())
        .context("service.args")?
        .lines()
        .map(OsString::from)
        .collect();
    if base.is_empty() {
        bail!("service.args is empty");
    }
    let (program, args) = sandbox::console_command(pid, &base, command);
    let err = std::process::Command::new(&program).args(&args).exec();
    Err(anyhow::Error::new(err).context(format!("running {}", program.display())))
}
