//! A network lab on one Linux machine, for tests and benchmarks that need
//! nodes with their own addresses and real, shaped links instead of loopback.
//!
//! Where it sits: below the end-to-end harness (`tests/`). The lab builds a
//! star: one *hub* namespace holds a Linux bridge; every host is a network
//! namespace of its own joined to the bridge by a veth pair, with an address
//! in 198.18.0.0/15 (RFC 2544's benchmark range, so nothing in the lab looks
//! like a real address and nothing is routed off the machine). Each host's
//! link is shaped in both directions with `tc tbf` (upload on the host's end,
//! download on the hub's end), as a home line's asymmetric rates.
//! Whatever runs in a host (a `p2pd`, a libtorrent peer) is started with
//! [`Lab::command`], i.e. `ip netns exec`.
//!
//! The kernel here has no `netem` (see `../shared/design/network-lab-facts.md`),
//! so a line with latency or loss runs through a delay line of the lab's own
//! ([`delay`]): a thread that forwards the host's frames between two veths
//! in a *wire* namespace, holding each for the line's delay.
//!
//! The kernel's ARP table is one table for all namespaces, and its default
//! hard limit (`gc_thresh3`, 1024 entries) is what a mesh of 32 hosts already
//! fills: beyond it new neighbours cannot be resolved and hosts that joined
//! later reach nobody (a 60-host swarm lost its last 27 downloaders that
//! way). The lab raises the limits to fit every pair of its hosts.
//!
//! Everything is made with iproute2 (`ip`, `tc`), as an operator would; the
//! lab removes its namespaces when dropped, and one that a killed run left
//! behind is swept by the next [`Lab::new`].

#![forbid(unsafe_code)]

pub mod delay;
pub mod outage;
pub mod router;
pub mod upnp;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use delay::DelayLine;
pub use delay::LineStats;
pub use router::{Nat, Router};

/// Why the lab could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab needs root (network namespaces, `tc`).
    #[error("the network lab needs root (it creates network namespaces); running as uid {uid}")]
    NotRoot {
        /// The effective user id.
        uid: u32,
    },
    /// A tool the lab runs is missing.
    #[error("the network lab needs `{tool}` (apt-get install {package})")]
    Missing {
        /// The command.
        tool: &'static str,
        /// The Debian package with it.
        package: &'static str,
    },
    /// A command the lab ran failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Starting a command failed.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A kernel setting could not be read or raised.
    #[error("the kernel setting {path}: {source}")]
    Sysctl {
        /// Its file under /proc/sys.
        path: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A counter read back from the kernel was not a number.
    #[error("unexpected output from `{command}`: {output:?}")]
    Parse {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
    /// The lab cannot build this.
    #[error("the network lab does not support {0}")]
    Unsupported(&'static str),
    /// The address range is used up.
    #[error("the lab holds at most {max} hosts")]
    Full {
        /// The most hosts a lab holds.
        max: usize,
    },
}

/// Result alias for the lab.
pub type Result<T> = std::result::Result<T, LabError>;

/// One host's line: its rates in bits per second (`None` is unshaped), and
/// the latency and loss it adds.
///
/// A frame between two hosts crosses both their lines, so the round trip
/// between them is `2 × (delay₁ + delay₂)`, and a frame is lost on the way
/// with probability about `loss₁ + loss₂`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Line {
    /// From the host to the lab.
    pub up_bps: Option<u64>,
    /// From the lab to the host.
    pub down_bps: Option<u64>,
    /// How long the line holds a frame, in each direction.
    pub delay: Duration,
    /// Frames lost per million crossing the line, in each direction.
    pub loss_ppm: u32,
}

impl Line {
    /// An unshaped line.
    pub const UNSHAPED: Line = Line {
        up_bps: None,
        down_bps: None,
        delay: Duration::ZERO,
        loss_ppm: 0,
    };

    /// A line of `up` and `down` megabits per second.
    pub fn mbit(up: f64, down: f64) -> Self {
        let bps = |m: f64| Some((m * 1e6) as u64);
        Line {
            up_bps: bps(up),
            down_bps: bps(down),
            ..Self::UNSHAPED
        }
    }

    /// The same line holding every frame for `delay` in each direction
    /// (a round trip over it adds twice that).
    pub fn with_delay(self, delay: Duration) -> Self {
        Line { delay, ..self }
    }

    /// The same line losing `percent` % of the frames crossing it, in each
    /// direction.
    pub fn with_loss_percent(self, percent: f64) -> Self {
        Line {
            loss_ppm: (percent * 10_000.0).round().clamp(0.0, 1e6) as u32,
            ..self
        }
    }

    /// Whether the line needs a delay line (latency or loss).
    pub fn delayed(&self) -> bool {
        !self.delay.is_zero() || self.loss_ppm > 0
    }
}

/// One host of the lab: a network namespace with one interface (`eth0`)
/// and one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The namespace's name (for `ip netns exec`).
    pub netns: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its line.
    pub line: Line,
    /// Its veth's name at the lab's end of the line: where the download is
    /// shaped and the line's traffic is counted.
    hub_end: String,
    /// The namespace holding `hub_end`: the hub, or the wire namespace for a
    /// delayed line.
    line_ns: String,
}

/// Bytes a host's interface sent and received, as the kernel counts them
/// (payload and every header: what the line carried).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes sent by the host.
    pub sent: u64,
    /// Bytes received by the host.
    pub received: u64,
}

/// The lab: a hub namespace with a bridge, and the hosts on it.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    hub: String,
    /// The namespace of the delay lines, made with the first delayed host.
    wire: Option<String>,
    hosts: Vec<Host>,
    /// Delay lines by host index.
    lines: Vec<(usize, DelayLine)>,
    /// Hosts behind each router, by router index.
    lan_hosts: Vec<usize>,
    /// Daemons running in lab namespaces (miniupnpd).
    daemons: Vec<upnp::Daemon>,
    /// Hosts given a new address so far ([`Lab::renumber`]).
    renumbered: u32,
}

/// All lab namespaces start with this, then the owning process's id.
const PREFIX: &str = "p2plab";
/// The bridge's own address; hosts follow it.
const HUB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PREFIX_LEN: u8 = 15;
/// Hosts fit in the /15 after the hub, leaving the broadcast address.
const MAX_HOSTS: usize = (1 << (32 - PREFIX_LEN)) - 3;
/// Token bucket for the shaper: at least one full-size burst of a few
/// packets, and a queue of up to 200 ms before tail drop (a home router's
/// buffer, roughly).
const TBF_BURST: &str = "64kb";
const TBF_LATENCY: &str = "200ms";
/// The ARP table's limits, shared by every namespace (writable from the
/// first one only).
const NEIGH_SOFT: &str = "/proc/sys/net/ipv4/neigh/default/gc_thresh2";
const NEIGH_HARD: &str = "/proc/sys/net/ipv4/neigh/default/gc_thresh3";
/// Entries left for the rest of the machine: a lab of up to 27 hosts fits
/// the default limit, and is built without touching it (where `/proc/sys`
/// is read-only, say).
const NEIGH_HEADROOM: u64 = 256;

/// The ARP table size a lab of `hosts` needs: every host may hold an entry
/// for every other and for the hub, and the hub one for every host, on top
/// of what the machine uses outside the lab.
pub fn neighbour_entries(hosts: usize) -> u64 {
    let n = hosts as u64;
    n * n + n + NEIGH_HEADROOM
}

/// Raises the shared ARP table's limits to at least `entries` (never lowers
/// them: another lab, or the operator, may need more).
fn make_neighbour_room(entries: u64) -> Result<()> {
    // Above the soft limit for 5 s the kernel collects entries at once,
    // churning the ones a lab in full use still needs: both move together.
    for path in [NEIGH_HARD, NEIGH_SOFT] {
        if read_number(path)? < entries {
            std::fs::write(path, entries.to_string())
                .map_err(|source| LabError::Sysctl { path, source })?;
        }
    }
    Ok(())
}

fn read_number(path: &'static str) -> Result<u64> {
    let text = std::fs::read_to_string(path).map_err(|source| LabError::Sysctl { path, source })?;
    text.trim().parse().map_err(|_| LabError::Parse {
        command: format!("read {path}"),
        output: text,
    })
}

/// The shared ARP table's hard limit now.
pub fn neighbour_limit() -> Result<u64> {
    read_number(NEIGH_HARD)
}

impl Lab {
    /// Whether this machine can run the lab: root, `ip` and `tc`.
    pub fn check() -> Result<()> {
        let uid = nix::unistd::geteuid();
        if !uid.is_root() {
            return Err(LabError::NotRoot { uid: uid.as_raw() });
        }
        for (tool, package) in [("ip", "iproute2"), ("tc", "iproute2")] {
            if which(tool).is_none() {
                return Err(LabError::Missing { tool, package });
            }
        }
        Ok(())
    }

    /// An empty lab: the hub namespace with its bridge up. Namespaces that a
    /// lab of a process no longer running left behind are removed first.
    pub fn new() -> Result<Self> {
        Self::check()?;
        sweep_stale()?;
        let prefix = format!("{PREFIX}{}-", std::process::id());
        // Two labs in one process (two tests) need names of their own.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let prefix = format!(
            "{prefix}{}-",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let hub = format!("{prefix}hub");
        run("ip", &["netns", "add", &hub])?;
        let lab = Lab {
            prefix,
            hub,
            wire: None,
            hosts: Vec::new(),
            lines: Vec::new(),
            lan_hosts: Vec::new(),
            daemons: Vec::new(),
            renumbered: 0,
        };
        let hub = lab.hub.as_str();
        let addr = format!("{HUB_IP}/{PREFIX_LEN}");
        run("ip", &["-n", hub, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", hub, "addr", "add", &addr, "dev", "br0"])?;
        run("ip", &["-n", hub, "link", "set", "br0", "up"])?;
        run("ip", &["-n", hub, "link", "set", "lo", "up"])?;
        Ok(lab)
    }

    /// The hub's address: a service every host reaches (a tracker, say) runs
    /// there, in [`Lab::hub_command`].
    pub fn hub_ip(&self) -> Ipv4Addr {
        HUB_IP
    }

    /// The hosts, in the order they were added (routers' WAN ends too).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Adds a host on a line of `line`'s rates.
    pub fn add_host(&mut self, line: Line) -> Result<Host> {
        let i = self.hosts.len();
        // Renumbered hosts take addresses from the top of the range.
        if i + self.renumbered as usize >= MAX_HOSTS {
            return Err(LabError::Full { max: MAX_HOSTS });
        }
        let ip = Ipv4Addr::from(u32::from(HUB_IP) + 1 + i as u32);
        let netns = format!("{}{i}", self.prefix);
        let line_ns = if line.delayed() {
            self.wire_ns()?
        } else {
            self.hub.clone()
        };
        run("ip", &["netns", "add", &netns])?;
        let host = Host {
            netns,
            ip,
            line,
            hub_end: format!("h{i}"),
            line_ns,
        };
        // Pushed before it is complete, so a failure below still removes it.
        self.hosts.push(host.clone());
        make_neighbour_room(neighbour_entries(self.hosts.len()))?;
        let (ns, hub) = (host.netns.as_str(), self.hub.as_str());
        if line.delayed() {
            self.wire_up(i, &host)?;
        } else {
            veth_pair(hub, &host.hub_end, ns, "eth0", false)?;
            run(
                "ip",
                &["-n", hub, "link", "set", &host.hub_end, "master", "br0"],
            )?;
            run("ip", &["-n", hub, "link", "set", &host.hub_end, "up"])?;
        }
        let addr = format!("{ip}/{PREFIX_LEN}");
        run("ip", &["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        if let Some(bps) = line.up_bps {
            shape(ns, "eth0", bps)?;
        }
        if let Some(bps) = line.down_bps {
            shape(&host.line_ns, &host.hub_end, bps)?;
        }
        if line.delayed() {
            self.start_delay_line(i, &host)?;
        }
        Ok(host)
    }

    /// A host on a point-to-point link of its own to `upstream` (as a VM
    /// on its host's TAP): `upstream` gets interface `dev` with
    /// `upstream_ip`, the new host `eth0` with `ip`, both in a `/prefix`
    /// network, and a default route through `upstream_ip`. No shaping, no
    /// translation: what `upstream` does with the traffic is the test's.
    pub fn add_host_linked(
        &mut self,
        upstream: &Host,
        dev: &str,
        (upstream_ip, ip, prefix): (Ipv4Addr, Ipv4Addr, u8),
    ) -> Result<Host> {
        let i = self.hosts.len();
        let netns = format!("{}{i}", self.prefix);
        run("ip", &["netns", "add", &netns])?;
        let host = Host {
            netns,
            ip,
            line: Line::UNSHAPED,
            hub_end: dev.to_owned(),
            line_ns: upstream.netns.clone(),
        };
        // Pushed before it is complete, so a failure below still removes it.
        self.hosts.push(host.clone());
        let (ns, up) = (host.netns.as_str(), upstream.netns.as_str());
        veth_pair(up, dev, ns, "eth0", false)?;
        let (up_addr, addr) = (format!("{upstream_ip}/{prefix}"), format!("{ip}/{prefix}"));
        run("ip", &["-n", up, "addr", "add", &up_addr, "dev", dev])?;
        run("ip", &["-n", up, "link", "set", dev, "up"])?;
        run("ip", &["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        let gw = upstream_ip.to_string();
        run("ip", &["-n", ns, "route", "add", "default", "via", &gw])?;
        Ok(host)
    }

    /// The wire namespace, made on first use. It holds no address, so its
    /// kernel answers nothing and routes nothing (IPv6 off: no router
    /// solicitations of its own on the lines).
    fn wire_ns(&mut self) -> Result<String> {
        if let Some(w) = &self.wire {
            return Ok(w.clone());
        }
        let wire = format!("{}wire", self.prefix);
        run("ip", &["netns", "add", &wire])?;
        self.wire = Some(wire.clone());
        run(
            "ip",
            &[
                "netns",
                "exec",
                &wire,
                "sh",
                "-c",
                "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 \
                 /proc/sys/net/ipv6/conf/default/disable_ipv6; do \
                 [ -w $f ] && echo 1 > $f; done; true",
            ],
        )?;
        Ok(wire)
    }

    /// Host `i`'s delayed line: `eth0` to `h<i>` in the wire namespace, and
    /// `d<i>` there to `b<i>` on the bridge; frames carry one segment each
    /// (see [`delay`]).
    fn wire_up(&self, i: usize, host: &Host) -> Result<()> {
        let (wire, hub) = (host.line_ns.as_str(), self.hub.as_str());
        let (lab_side, bridge_port) = (format!("d{i}"), format!("b{i}"));
        veth_pair(wire, &host.hub_end, &host.netns, "eth0", true)?;
        veth_pair(wire, &lab_side, hub, &bridge_port, true)?;
        run(
            "ip",
            &["-n", hub, "link", "set", &bridge_port, "master", "br0"],
        )?;
        run("ip", &["-n", hub, "link", "set", &bridge_port, "up"])?;
        run("ip", &["-n", wire, "link", "set", &host.hub_end, "up"])?;
        run("ip", &["-n", wire, "link", "set", &lab_side, "up"])?;
        Ok(())
    }

    fn start_delay_line(&mut self, i: usize, host: &Host) -> Result<()> {
        let line = DelayLine::start(
            &host.line_ns,
            &host.hub_end,
            &format!("d{i}"),
            host.line.delay,
            host.line.loss_ppm,
            0x6c61_6200 + i as u64,
        )?;
        self.lines.push((i, line));
        Ok(())
    }

    /// What `host`'s delay line did so far (`None` for a line without one).
    pub fn line_stats(&self, host: &Host) -> Option<LineStats> {
        let i = self.hosts.iter().position(|h| h == host)?;
        self.lines
            .iter()
            .find(|(j, _)| *j == i)
            .map(|(_, l)| l.stats())
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(&self, host: &Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_netns(&host.netns, program)
    }

    /// A command that runs `program` in the hub namespace (on the bridge's
    /// address, [`Lab::hub_ip`]).
    pub fn hub_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_netns(&self.hub, program)
    }

    /// What `host`'s line has carried so far.
    pub fn traffic(&self, host: &Host) -> Result<Traffic> {
        // The hub's end counts the same frames the other way round, and is
        // readable without entering the host's namespace.
        let counter = |name: &str| -> Result<u64> {
            let path = format!("/sys/class/net/{}/statistics/{name}", host.hub_end);
            let args = ["netns", "exec", host.line_ns.as_str(), "cat", path.as_str()];
            let out = run("ip", &args)?;
            out.trim().parse().map_err(|_| LabError::Parse {
                command: format!("ip {}", args.join(" ")),
                output: out,
            })
        };
        Ok(Traffic {
            sent: counter("rx_bytes")?,
            received: counter("tx_bytes")?,
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The delay lines stop first: their sockets hold the wire's veths.
        self.lines.clear();
        self.daemons.clear();
        // A host's veth goes with its namespace; processes still inside keep
        // theirs alive until they exit.
        for h in &self.hosts {
            let _ = run("ip", &["netns", "del", &h.netns]);
        }
        if let Some(wire) = &self.wire {
            let _ = run("ip", &["netns", "del", wire]);
        }
        let _ = run("ip", &["netns", "del", &self.hub]);
    }
}

fn in_netns(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).arg(program);
    c
}

/// A veth pair: `name` in `netns`, its peer `peer` in `peer_ns`. A pair on a
/// delay line carries one segment per frame (no segmentation offload).
fn veth_pair(netns: &str, name: &str, peer_ns: &str, peer: &str, one_segment: bool) -> Result<()> {
    let segs: &[&str] = if one_segment {
        &["gso_max_segs", "1"]
    } else {
        &[]
    };
    let mut args = vec!["-n", netns, "link", "add", name];
    args.extend_from_slice(segs);
    args.extend_from_slice(&["type", "veth", "peer", "name", peer, "netns", peer_ns]);
    args.extend_from_slice(segs);
    run("ip", &args).map(drop)
}

fn shape(netns: &str, dev: &str, bps: u64) -> Result<()> {
    let rate = format!("{bps}bit");
    run(
        "tc",
        &[
            "-n",
            netns,
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            &rate,
            "burst",
            TBF_BURST,
            "latency",
            TBF_LATENCY,
        ],
    )
    .map(drop)
}

/// Removes lab namespaces whose owning process is gone.
fn sweep_stale() -> Result<()> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            run("ip", &["netns", "del", &name])?;
        }
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let command = || format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| LabError::Spawn {
            command: command(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: command(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_convert_megabits() {
        let l = Line::mbit(2.0, 10.5);
        assert_eq!(l.up_bps, Some(2_000_000));
        assert_eq!(l.down_bps, Some(10_500_000));
        assert!(!l.delayed());
    }

    #[test]
    fn latency_or_loss_makes_a_delayed_line() {
        let l = Line::mbit(2.0, 10.0).with_delay(Duration::from_millis(30));
        assert!(l.delayed());
        assert_eq!(l.up_bps, Some(2_000_000));
        let lossy = Line::UNSHAPED.with_loss_percent(0.25);
        assert_eq!(lossy.loss_ppm, 2_500);
        assert!(lossy.delayed());
        assert_eq!(Line::UNSHAPED.with_loss_percent(250.0).loss_ppm, 1_000_000);
    }
}
