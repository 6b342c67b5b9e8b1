//! Home routers and carrier-grade NATs: namespaces that forward between a
//! WAN side and a LAN bridge of their own, translating with nftables
//! `masquerade` and dropping what arrives unasked from the WAN, as a home
//! router's firewall does.
//!
//! ```text
//!   hub bridge (198.18.0.0/15, "the internet")
//!      │ eth0 = the router's WAN (a lab host: shaped, delayed)
//!   router ── lan0 bridge 10.<k>.0.1/24 ── l<j> ─ eth0 of a host behind it
//!                                        └─ l<j> ─ eth0 of a router behind it (double NAT)
//! ```
//!
//! Linux's masquerade keeps a connection's source port where it is free and
//! maps a local address and port to one public port whatever the
//! destination (endpoint-independent mapping: the kind hole punching gets
//! through). With `random,fully-random` every connection gets a port of its
//! own (the symmetric kind it does not).

use std::net::Ipv4Addr;

use crate::{Host, Lab, LabError, Line, Result, run, shape, veth_pair};

/// How a router translates addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Endpoint-independent, port-preserving where it can (Linux masquerade).
    Cone,
    /// A fresh random port per connection (`masquerade random,fully-random`).
    Symmetric,
}

/// A router of the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Router {
    /// Its WAN end: a host of the lab (on the hub, or behind another router).
    pub wan: Host,
    /// Its address on its own LAN, the gateway of the hosts behind it.
    pub gateway: Ipv4Addr,
    /// How it translates.
    pub nat: Nat,
    /// Its index among the lab's routers (its LAN is 10.<index + 1>.0.0/24).
    index: usize,
}

/// The most routers and hosts behind one router a lab holds.
const MAX_ROUTERS: usize = 250;
const MAX_BEHIND: usize = 250;

impl Lab {
    /// A router whose WAN side is a new host on the hub with `line`'s rates,
    /// latency and loss.
    pub fn add_router(&mut self, line: Line, nat: Nat) -> Result<Router> {
        let wan = self.add_host(line)?;
        self.make_router(wan, nat)
    }

    /// A router behind `upstream` (a home router behind a carrier-grade NAT):
    /// its WAN side is on `upstream`'s LAN.
    pub fn add_router_behind(&mut self, upstream: &Router, nat: Nat) -> Result<Router> {
        let wan = self.add_host_behind(upstream, Line::UNSHAPED)?;
        self.make_router(wan, nat)
    }

    /// A host on `router`'s LAN, its line shaped to `line`'s rates. Lines
    /// behind a router have no delay line of their own: put the latency on
    /// the router's WAN line.
    pub fn add_host_behind(&mut self, router: &Router, line: Line) -> Result<Host> {
        if line.delayed() {
            return Err(LabError::Unsupported(
                "latency or loss on a line behind a router (put it on the router's WAN line)",
            ));
        }
        let j = self.lan_hosts[router.index];
        if j >= MAX_BEHIND {
            return Err(LabError::Full { max: MAX_BEHIND });
        }
        self.lan_hosts[router.index] += 1;
        let i = self.hosts.len();
        let netns = format!("{}{i}", self.prefix);
        let octets = router.gateway.octets();
        let ip = Ipv4Addr::new(octets[0], octets[1], octets[2], 2 + j as u8);
        run("ip", &["netns", "add", &netns])?;
        let host = Host {
            netns,
            ip,
            line,
            hub_end: format!("l{j}"),
            line_ns: router.wan.netns.clone(),
        };
        // Pushed before it is complete, so a failure below still removes it.
        self.hosts.push(host.clone());
        let (ns, rns) = (host.netns.as_str(), host.line_ns.as_str());
        veth_pair(rns, &host.hub_end, ns, "eth0", false)?;
        run(
            "ip",
            &["-n", rns, "link", "set", &host.hub_end, "master", "lan0"],
        )?;
        run("ip", &["-n", rns, "link", "set", &host.hub_end, "up"])?;
        run(
            "ip",
            &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        let gw = router.gateway.to_string();
        run("ip", &["-n", ns, "route", "add", "default", "via", &gw])?;
        if let Some(bps) = line.up_bps {
            shape(ns, "eth0", bps)?;
        }
        if let Some(bps) = line.down_bps {
            shape(rns, &host.hub_end, bps)?;
        }
        Ok(host)
    }

    /// Turns the host `wan` into a router: a LAN bridge, forwarding, the
    /// translation and the firewall.
    fn make_router(&mut self, wan: Host, nat: Nat) -> Result<Router> {
        if crate::which("nft").is_none() {
            return Err(LabError::Missing {
                tool: "nft",
                package: "nftables",
            });
        }
        let index = self.lan_hosts.len();
        if index >= MAX_ROUTERS {
            return Err(LabError::Full { max: MAX_ROUTERS });
        }
        self.lan_hosts.push(0);
        let gateway = Ipv4Addr::new(10, 1 + index as u8, 0, 1);
        let ns = wan.netns.as_str();
        run("ip", &["-n", ns, "link", "add", "lan0", "type", "bridge"])?;
        run(
            "ip",
            &[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{gateway}/24"),
                "dev",
                "lan0",
            ],
        )?;
        run("ip", &["-n", ns, "link", "set", "lan0", "up"])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward",
            ],
        )?;
        let masquerade = match nat {
            Nat::Cone => "masquerade",
            Nat::Symmetric => "masquerade random,fully-random",
        };
        // What arrives on the WAN unasked is dropped, not refused: a refusal
        // would end the other side's half of a simultaneous TCP open.
        let rules = format!(
            "table ip lab {{
               chain post {{ type nat hook postrouting priority 100; oifname \"eth0\" {masquerade}; }}
               chain input {{ type filter hook input priority 0; policy accept;
                 iifname \"eth0\" ct state established,related accept; iifname \"eth0\" drop; }}
               chain forward {{ type filter hook forward priority 0; policy accept;
                 iifname \"eth0\" ct state established,related accept;
                 iifname \"eth0\" ct status dnat accept; iifname \"eth0\" drop; }}
             }}"
        );
        nft(ns, &rules)?;
        Ok(Router {
            wan,
            gateway,
            nat,
            index,
        })
    }
}

/// Loads an nftables ruleset into `netns`.
pub(crate) fn nft(netns: &str, rules: &str) -> Result<()> {
    use std::io::Write;
    let command = format!("ip netns exec {netns} nft -f -");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    let out = child.wait_with_output().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
