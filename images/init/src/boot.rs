//! What this boot is to do, from `/etc/p2pvm/role` (written into each image)
//! and the kernel command line (written by `p2pvmm up`):
//!
//! * `p2pvm.role=service|client` overrides the image's role;
//! * `p2pvm.ip=ADDR/PREFIX`, `p2pvm.gw=ADDR`, `p2pvm.dns=ADDR`: the service
//!   VM's static network on `eth0`;
//! * `p2pvm.log=console` copies the services' logs to the console (they
//!   always go to `/var/log/NAME.log`);
//! * `p2pvm.loglevel=FILTER`: p2pd's and the front-end's log filter;
//! * `p2pvm.mapping=auto|devmem|sysfs`: how both map the channel region
//!   (default `auto`: write-back through `/dev/mem`, else uncached sysfs).

use std::net::Ipv4Addr;

/// Which VM this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The P2P service VM.
    Service,
    /// The client VM.
    Client,
}

/// A static IPv4 address with its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

/// The boot's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// The role.
    pub role: Role,
    /// `eth0`'s address.
    pub ip: Option<Cidr>,
    /// The default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// The name server for `/etc/resolv.conf`.
    pub dns: Option<Ipv4Addr>,
    /// Copy service logs to the console.
    pub log_to_console: bool,
    /// The log filter of our programs.
    pub log_level: String,
    /// How the channel region is mapped.
    pub mapping: String,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootError {
    /// No role anywhere.
    #[error("no role: the image has no /etc/p2pvm/role and the command line no p2pvm.role=")]
    NoRole,
    /// A value does not parse.
    #[error("bad {key}={value:?} on the kernel command line")]
    Bad {
        /// The parameter.
        key: &'static str,
        /// Its value.
        value: String,
    },
}

impl Boot {
    /// Parses the command line, with the image's role as the default.
    pub fn parse(cmdline: &str, image_role: Option<&str>) -> Result<Self, BootError> {
        let param = |key: &str| {
            cmdline
                .split_whitespace()
                .filter_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .next_back()
        };
        let role = match param("p2pvm.role").or(image_role.map(str::trim)) {
            Some("service") => Role::Service,
            Some("client") => Role::Client,
            Some(other) => {
                return Err(BootError::Bad {
                    key: "p2pvm.role",
                    value: other.to_string(),
                });
            }
            None => return Err(BootError::NoRole),
        };
        let addr = |key: &'static str| -> Result<Option<Ipv4Addr>, BootError> {
            param(key)
                .map(|v| {
                    v.parse().map_err(|_| BootError::Bad {
                        key,
                        value: v.to_string(),
                    })
                })
                .transpose()
        };
        let ip = param("p2pvm.ip")
            .map(|v| {
                parse_cidr(v).ok_or_else(|| BootError::Bad {
                    key: "p2pvm.ip",
                    value: v.to_string(),
                })
            })
            .transpose()?;
        Ok(Self {
            role,
            ip,
            gateway: addr("p2pvm.gw")?,
            dns: addr("p2pvm.dns")?,
            log_to_console: param("p2pvm.log") == Some("console"),
            log_level: param("p2pvm.loglevel").unwrap_or("info").to_string(),
            mapping: match param("p2pvm.mapping").unwrap_or("auto") {
                m @ ("auto" | "devmem" | "sysfs") => m.to_string(),
                other => {
                    return Err(BootError::Bad {
                        key: "p2pvm.mapping",
                        value: other.to_string(),
                    });
                }
            },
        })
    }
}

fn parse_cidr(v: &str) -> Option<Cidr> {
    let (addr, prefix) = v.split_once('/')?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some(Cidr {
        addr: addr.parse().ok()?,
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_with_network() {
        let b = Boot::parse(
            "console=ttyS0 quiet p2pvm.ip=10.99.0.2/24 p2pvm.gw=10.99.0.1 p2pvm.log=console",
            Some("service\n"),
        )
        .unwrap();
        assert_eq!(b.role, Role::Service);
        assert_eq!(
            b.ip,
            Some(Cidr {
                addr: Ipv4Addr::new(10, 99, 0, 2),
                prefix: 24
            })
        );
        assert_eq!(b.gateway, Some(Ipv4Addr::new(10, 99, 0, 1)));
        assert_eq!(b.dns, None);
        assert!(b.log_to_console);
        assert_eq!(b.log_level, "info");
        assert_eq!(b.mapping, "auto");
        let b = Boot::parse("p2pvm.mapping=sysfs", Some("client")).unwrap();
        assert_eq!(b.mapping, "sysfs");
        assert!(Boot::parse("p2pvm.mapping=wc", Some("client")).is_err());
    }

    #[test]
    fn command_line_overrides_the_image_and_bad_values_are_named() {
        let b = Boot::parse("p2pvm.role=client", Some("service")).unwrap();
        assert_eq!(b.role, Role::Client);
        assert_eq!(Boot::parse("quiet", None), Err(BootError::NoRole));
        let e = Boot::parse("p2pvm.ip=10.0.0.1/40", Some("service")).unwrap_err();
        assert_eq!(
            e,
            BootError::Bad {
                key: "p2pvm.ip",
                value: "10.0.0.1/40".into()
            }
        );
        assert!(Boot::parse("p2pvm.gw=nope", Some("service")).is_err());
        assert!(Boot::parse("p2pvm.role=admin", None).is_err());
    }
}
