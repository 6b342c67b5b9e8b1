//! The service VM's way to the internet through its host: NAT on the
//! host's side of the service VM's TAP, set up by `p2pvmm up` when it runs
//! as root and removed when it stops.
//!
//! ```text
//!   internet ── host (its own address) ──TAP p2pvm0 10.99.0.1── service VM 10.99.0.2
//!                 masquerade out, port 4001 forwarded in
//! ```
//!
//! The forward also applies to connections the host itself makes to its own
//! addresses (hairpin), so that a program on the host, or a peer asked to
//! dial the node back at the host's address from the host, reaches it too.
//!
//! The VM is then where a home user's node is: behind a NAT that maps its
//! connections out (nftables `masquerade`, which keeps a connection's source
//! port where it can, so its mappings are the kind hole punching gets
//! through) and that forwards the node's port from the host's own
//! addresses, so peers reach the node directly and AutoNAT confirms the
//! host's address for it.
//!
//! Everything lives in one nftables table of our own, named after the TAP:
//! made whole (replacing a table a killed `up` left behind), deleted whole,
//! and no other rule of the host is read or touched. IPv4 forwarding is
//! switched on if it was off, and back off when the table goes.
//!
//! Where the host's own firewall drops forwarded packets (a `FORWARD`
//! policy of `DROP`, as Docker sets), that drop still applies: nftables
//! runs every table's chains, and an accept in ours does not override it.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// Why the host's NAT for the service VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    /// `nft` is not installed.
    #[error("`nft` not found (apt-get install nftables): the service VM needs it for NAT")]
    NoNft,
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it said.
        stderr: String,
    },
    /// A command could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// The forwarding switch could not be read or set.
    #[error("IPv4 forwarding ({path}): {source}")]
    Forwarding {
        /// Its file.
        path: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// What to set up: the TAP, the VM's network and address, and the ports
/// forwarded to it from the host's own addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatPlan {
    /// The host's TAP to the service VM.
    pub tap: String,
    /// The VM's network (its TAP's link) and its prefix length.
    pub network: Ipv4Addr,
    /// Prefix length of that network.
    pub prefix: u8,
    /// The VM's address.
    pub guest: Ipv4Addr,
    /// Ports (TCP and UDP) forwarded from the host to the VM.
    pub forward: Vec<u16>,
}

impl NatPlan {
    /// The plan for a service VM on `net`, forwarding `forward`.
    pub fn new(net: &crate::platform::ServiceNet, forward: Vec<u16>) -> Self {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(net.prefix))
            .unwrap_or(0);
        Self {
            tap: net.tap.clone(),
            network: Ipv4Addr::from(u32::from(net.guest) & mask),
            prefix: net.prefix,
            guest: net.guest,
            forward,
        }
    }

    /// Our table's name: the TAP's, in the characters nft takes unquoted.
    pub fn table(&self) -> String {
        let tap: String = self
            .tap
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("p2pvm_{tap}")
    }

    /// The ruleset, as `nft -f` reads it: the table made whole (an empty
    /// declaration first, so that deleting works whether or not it exists).
    pub fn ruleset(&self) -> String {
        let (table, tap) = (self.table(), &self.tap);
        let (net, guest) = (format!("{}/{}", self.network, self.prefix), self.guest);
        let (mut dnat, mut hairpin) = (String::new(), String::new());
        for port in &self.forward {
            for proto in ["tcp", "udp"] {
                dnat.push_str(&format!(
                    "    iifname != \"{tap}\" fib daddr type local {proto} dport {port} \
                     dnat to {guest}:{port}\n"
                ));
                hairpin.push_str(&format!(
                    "    fib daddr type local ip daddr != 127.0.0.0/8 {proto} dport {port} \
                     dnat to {guest}:{port}\n"
                ));
            }
        }
        format!(
            "table ip {table} {{}}\n\
             delete table ip {table}\n\
             table ip {table} {{\n\
             \x20 chain postrouting {{\n\
             \x20   type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   ip saddr {net} oifname != \"{tap}\" masquerade\n\
             \x20 }}\n\
             \x20 chain prerouting {{\n\
             \x20   type nat hook prerouting priority dstnat; policy accept;\n\
             {dnat}\
             \x20 }}\n\
             \x20 chain output {{\n\
             \x20   type nat hook output priority -100; policy accept;\n\
             {hairpin}\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             \x20   iifname \"{tap}\" ip saddr {net} accept\n\
             \x20   iifname \"{tap}\" drop\n\
             \x20   oifname \"{tap}\" ct state established,related accept\n\
             \x20   oifname \"{tap}\" ct status dnat accept\n\
             \x20   oifname \"{tap}\" drop\n\
             \x20 }}\n\
             }}\n"
        )
    }
}

/// The NAT in place; removed (table and forwarding switch) when dropped.
#[derive(Debug)]
pub struct HostNat {
    table: String,
    netns: Option<String>,
    /// Forwarding was off before: switched back off at the end.
    restore_forwarding: bool,
}

const FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";

/// A command run on this host, or in network namespace `netns`.
fn command(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

fn run(mut c: Command, input: Option<&str>) -> Result<String, HostNetError> {
    use std::io::Write;
    let line = format!("{c:?}");
    c.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let is_nft = c.get_program() == "nft";
    let mut child = c.spawn().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound if is_nft => HostNetError::NoNft,
        _ => HostNetError::Spawn {
            command: line.clone(),
            source,
        },
    })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|source| HostNetError::Spawn {
                command: line.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| HostNetError::Spawn {
            command: line.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(HostNetError::Command {
            command: line,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads or writes the forwarding switch (in `netns`, through `sh`: the
/// file is per namespace).
fn forwarding(netns: Option<&str>, set: Option<bool>) -> Result<bool, HostNetError> {
    if netns.is_none() {
        let io = |source| HostNetError::Forwarding {
            path: FORWARDING,
            source,
        };
        if let Some(on) = set {
            std::fs::write(FORWARDING, if on { "1" } else { "0" }).map_err(io)?;
        }
        return Ok(std::fs::read_to_string(FORWARDING).map_err(io)?.trim() == "1");
    }
    let mut c = command(netns, "sh");
    let script = match set {
        Some(on) => format!("echo {} > {FORWARDING}; cat {FORWARDING}", u8::from(on)),
        None => format!("cat {FORWARDING}"),
    };
    c.args(["-c", &script]);
    Ok(run(c, None)?.trim() == "1")
}

impl HostNat {
    /// Sets up `plan` on this host (`netns`: in that network namespace
    /// instead; the tests use a lab's).
    pub fn install(plan: &NatPlan, netns: Option<&str>) -> Result<Self, HostNetError> {
        let mut nft = command(netns, "nft");
        nft.args(["-f", "-"]);
        run(nft, Some(&plan.ruleset()))?;
        let mut nat = Self {
            table: plan.table(),
            netns: netns.map(str::to_owned),
            restore_forwarding: false,
        };
        // Dropped on error from here: the table goes again.
        if !forwarding(netns, None)? {
            forwarding(netns, Some(true))?;
            nat.restore_forwarding = true;
        }
        Ok(nat)
    }

    /// Our table's name.
    pub fn table(&self) -> &str {
        &self.table
    }
}

impl Drop for HostNat {
    fn drop(&mut self) {
        let ns = self.netns.as_deref();
        let mut nft = command(ns, "nft");
        nft.args(["delete", "table", "ip", &self.table]);
        if let Err(e) = run(nft, None) {
            tracing::warn!(table = %self.table, error = %e, "cannot remove the service VM's NAT");
        }
        if self.restore_forwarding
            && let Err(e) = forwarding(ns, Some(false))
        {
            tracing::warn!(error = %e, "cannot switch IPv4 forwarding back off");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_names_the_vm_network_and_forwards_both_protocols() {
        let net = crate::platform::ServiceNet::standard();
        let plan = NatPlan::new(&net, vec![4001]);
        assert_eq!(plan.network, Ipv4Addr::new(10, 99, 0, 0));
        assert_eq!(plan.table(), "p2pvm_p2pvm0");
        let rules = plan.ruleset();
        assert!(rules.contains("ip saddr 10.99.0.0/24 oifname != \"p2pvm0\" masquerade"));
        for proto in ["tcp", "udp"] {
            let dnat = format!("{proto} dport 4001 dnat to 10.99.0.2:4001");
            assert!(rules.contains(&dnat), "{rules}");
        }
        // Made whole: declared, deleted, then written.
        let first = rules.lines().take(2).collect::<Vec<_>>();
        assert_eq!(
            first,
            ["table ip p2pvm_p2pvm0 {}", "delete table ip p2pvm_p2pvm0"]
        );
        let none = NatPlan::new(&net, Vec::new()).ruleset();
        assert!(!none.contains("dnat to"));
        // The host itself reaches the VM at its own addresses (not loopback:
        // the kernel drops what is translated from there).
        assert!(rules.contains("chain output"));
        assert!(rules.contains("ip daddr != 127.0.0.0/8 tcp dport 4001 dnat to 10.99.0.2:4001"));
    }

    #[test]
    fn odd_tap_names_make_a_table_name_nft_reads() {
        let net = crate::platform::ServiceNet {
            tap: "vm-tap.0".into(),
            ..crate::platform::ServiceNet::standard()
        };
        assert_eq!(NatPlan::new(&net, vec![]).table(), "p2pvm_vm_tap_0");
    }
}
