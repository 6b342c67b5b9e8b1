//! Lines that go down and come back, and addresses that change: what a home
//! line does when the cable is pulled, or when the ISP hands the router a
//! new address on reconnecting. A router whose WAN address changes forgets
//! its translations (the kernel drops masquerade's connection-tracking
//! entries with the address), so every connection through it breaks, as
//! on a real line.

use std::net::Ipv4Addr;

use crate::{Host, Lab, LabError, MAX_HOSTS, PREFIX_LEN, Result, run};

/// The last host address of the lab's range (the one before the broadcast
/// address): renumbered hosts count down from here, far from the hosts
/// numbered up from the hub.
const LAST_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 254);

impl Lab {
    /// Takes `host`'s line down: its interface, as a pulled cable. What
    /// it sends meanwhile goes nowhere.
    pub fn cut(&self, host: &Host) -> Result<()> {
        run("ip", &["-n", &host.netns, "link", "set", "eth0", "down"]).map(drop)
    }

    /// Brings `host`'s line back up, with the default route a host behind
    /// a router had (taking the interface down removed it).
    pub fn restore(&self, host: &Host) -> Result<()> {
        run("ip", &["-n", &host.netns, "link", "set", "eth0", "up"])?;
        if let Some(gateway) = lan_gateway(host.ip) {
            let gw = gateway.to_string();
            run(
                "ip",
                &["-n", &host.netns, "route", "replace", "default", "via", &gw],
            )?;
        }
        Ok(())
    }

    /// Gives `host`, a host on the hub (a router's WAN end, say), a new
    /// address, as an ISP does when the line reconnects; returns the host
    /// as it is now.
    pub fn renumber(&mut self, host: &Host) -> Result<Host> {
        if lan_gateway(host.ip).is_some() {
            return Err(LabError::Unsupported(
                "a new address for a host behind a router (renumber the router's WAN end)",
            ));
        }
        if self.hosts.len() + self.renumbered as usize >= MAX_HOSTS {
            return Err(LabError::Full { max: MAX_HOSTS });
        }
        let ip = Ipv4Addr::from(u32::from(LAST_IP) - self.renumbered);
        self.renumbered += 1;
        let (old, new) = (
            format!("{}/{PREFIX_LEN}", host.ip),
            format!("{ip}/{PREFIX_LEN}"),
        );
        let ns = host.netns.as_str();
        // The old one goes first: both are in the lab's prefix, so the new
        // one would be its secondary, and deleting a primary address takes
        // its secondaries with it.
        run("ip", &["-n", ns, "addr", "del", &old, "dev", "eth0"])?;
        run("ip", &["-n", ns, "addr", "add", &new, "dev", "eth0"])?;
        let mut now = host.clone();
        now.ip = ip;
        if let Some(h) = self.hosts.iter_mut().find(|h| h.netns == host.netns) {
            h.ip = ip;
        }
        Ok(now)
    }
}

/// The gateway of a host on a router's LAN (10.k.0.0/24, gateway .1); `None`
/// for a host on the hub.
fn lan_gateway(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    let [a, b, c, _] = ip.octets();
    (a == 10).then(|| Ipv4Addr::new(a, b, c, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_behind_routers_route_through_their_gateway() {
        assert_eq!(
            lan_gateway(Ipv4Addr::new(10, 3, 0, 7)),
            Some(Ipv4Addr::new(10, 3, 0, 1))
        );
        assert_eq!(lan_gateway(Ipv4Addr::new(198, 18, 0, 7)), None);
    }
}
