//! A home router that offers port mappings: a real `miniupnpd` (UPnP IGD
//! and NAT-PMP, Debian's `miniupnpd-nftables`) in a lab router's namespace.
//!
//! miniupnpd refuses a reserved WAN address ("not public routable"), and the
//! lab's "internet" is in the reserved benchmark range. So the router also
//! holds a *public* address on its WAN interface, which it reports to its LAN
//! as its external address and which exists only inside the lab: nothing
//! routes it off the machine, and a lab host reaches it only after
//! [`Lab::route_on_link`] (the hub is one Ethernet segment, and the router
//! answers ARP for its addresses there).

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};

use crate::router::{Nat, Router};
use crate::{Host, Lab, LabError, Line, Result, run, which};

/// miniupnpd's nftables backend adds its rules to these chains and expects
/// them to exist; the hooked chains jump to them. Its NAT rules go to table
/// `inet filter` unless `upnp_nat_table_name` says otherwise (a rule in a
/// table without the chain fails "ENOENT", seen as UPnP error 501).
const MINIUPNPD_TABLES: &str = "
table inet filter {
  chain miniupnpd { }
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
}
table inet nat {
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }
}
";

/// A running miniupnpd, stopped with the lab.
#[derive(Debug)]
pub(crate) struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Lab {
    /// A cone-NAT home router on the hub that maps ports for its LAN through
    /// a real miniupnpd, reporting `public` (an address outside the reserved
    /// ranges, e.g. in 11.0.0.0/8) as its external address.
    pub fn add_upnp_router(&mut self, line: Line, public: Ipv4Addr) -> Result<Router> {
        if which("miniupnpd").is_none() {
            return Err(LabError::Missing {
                tool: "miniupnpd",
                package: "miniupnpd-nftables",
            });
        }
        let router = self.add_router(line, Nat::Cone)?;
        let ns = router.wan.netns.clone();
        let wan_public = format!("{public}/32");
        run(
            "ip",
            &["-n", &ns, "addr", "add", &wan_public, "dev", "eth0"],
        )?;
        crate::router::nft(&ns, MINIUPNPD_TABLES)?;
        let dir = std::env::temp_dir().join(format!("{ns}-miniupnpd"));
        std::fs::create_dir_all(&dir).map_err(|source| LabError::Spawn {
            command: format!("mkdir {}", dir.display()),
            source,
        })?;
        let lan = format!("{}/24", router.gateway);
        let conf = format!(
            "ext_ifname=eth0\nlistening_ip=lan0\next_ip={public}\nport=0\n\
             enable_natpmp=yes\nenable_upnp=yes\nsecure_mode=yes\nsystem_uptime=yes\n\
             uuid=3d5ab2a8-93a1-4c6f-9b41-{:012x}\n\
             upnp_nat_table_name=nat\n\
             allow 1024-65535 {lan} 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
            u32::from(public)
        );
        let conf_path = dir.join("miniupnpd.conf");
        let pid_path = dir.join("miniupnpd.pid");
        std::fs::write(&conf_path, conf).map_err(|source| LabError::Spawn {
            command: format!("write {}", conf_path.display()),
            source,
        })?;
        let command = format!("ip netns exec {ns} miniupnpd -d -f {}", conf_path.display());
        // -d keeps it in the foreground (a child the lab can stop); its own
        // pid file, or a second one in the machine says "already running".
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "miniupnpd", "-d", "-f"])
            .arg(&conf_path)
            .arg("-P")
            .arg(&pid_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| LabError::Spawn { command, source })?;
        self.daemons.push(Daemon(child));
        Ok(router)
    }

    /// Lets `host` (on the hub) reach `net` directly on the hub's segment:
    /// how lab hosts reach a UPnP router's public address.
    pub fn route_on_link(&self, host: &Host, net: &str) -> Result<()> {
        run(
            "ip",
            &["-n", &host.netns, "route", "add", net, "dev", "eth0"],
        )
        .map(drop)
    }
}
