//! Allow or deny connections by peer address range (CIDR) and peer port.
//!
//! Config: `{"mode": "deny" | "allow", "cidrs": ["10.0.0.0/8", "::1/128"], "ports": [22]}`.
//! An event matches when its peer is in one of `cidrs` (or `cidrs` is empty) and its peer
//! port is one of `ports` (or `ports` is empty). `deny` drops matching events; `allow` keeps
//! only matching events.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use edgeward_plugin_sdk::{Batch, Policy, Verdicts, export_policy};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    cidrs: Vec<String>,
    #[serde(default)]
    ports: Vec<u16>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Deny,
    Allow,
}

/// A network: address bits and prefix length, IPv4 kept as IPv4.
#[derive(Debug, Clone, Copy)]
struct Cidr {
    net: u128,
    mask: u128,
    v4: bool,
}

impl Cidr {
    fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) = text.split_once('/').unwrap_or((text, ""));
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("cidr {text:?}: {addr:?} is not an IP address"))?;
        let (bits, width, v4) = match ip {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32, true),
            IpAddr::V6(v6) => (u128::from(v6), 128, false),
        };
        let len: u32 = if len.is_empty() {
            width
        } else {
            len.parse()
                .ok()
                .filter(|l| *l <= width)
                .ok_or_else(|| format!("cidr {text:?}: prefix length must be 0..={width}"))?
        };
        let mask = if len == 0 {
            0
        } else {
            (u128::MAX << (width - len)) & (u128::MAX >> (128 - width))
        };
        Ok(Self {
            net: bits & mask,
            mask,
            v4,
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (ip, self.v4) {
            (IpAddr::V4(v4), true) => u128::from(u32::from(v4)) & self.mask == self.net,
            (IpAddr::V6(v6), false) => u128::from(v6) & self.mask == self.net,
            _ => false,
        }
    }
}

/// The policy.
pub struct Allowlist {
    mode: Mode,
    cidrs: Vec<Cidr>,
    ports: Vec<u16>,
}

impl Policy for Allowlist {
    fn init(config: &str) -> Result<Self, String> {
        let config: Config =
            serde_json::from_str(config).map_err(|e| format!("allowlist config: {e}"))?;
        let cidrs = config
            .cidrs
            .iter()
            .map(|c| Cidr::parse(c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            mode: config.mode,
            cidrs,
            ports: config.ports,
        })
    }

    fn on_batch(&mut self, batch: &Batch<'_>, out: &mut Verdicts) {
        for (i, event) in batch.iter().enumerate() {
            let ip_ok = self.cidrs.is_empty() || {
                let ip = event.peer_ip();
                self.cidrs.iter().any(|c| c.contains(ip))
            };
            let matches =
                ip_ok && (self.ports.is_empty() || self.ports.contains(&event.peer_port()));
            if matches == (self.mode == Mode::Deny) {
                out.drop(i);
            }
        }
    }
}

export_policy!(Allowlist);

#[cfg(test)]
mod tests {
    use edgeward_plugin_sdk::{Record, testing};

    use super::*;

    fn to(peer: &str) -> Record<'static> {
        Record {
            peer: peer.parse().unwrap(),
            ..Record::default()
        }
    }

    #[test]
    fn deny_drops_matching_peers() {
        let mut p =
            Allowlist::init(r#"{"mode":"deny","cidrs":["10.0.0.0/8"],"ports":[22]}"#).unwrap();
        let v = testing::run(
            &mut p,
            &[to("10.1.2.3:22"), to("10.1.2.3:443"), to("192.168.1.1:22")],
        );
        assert_eq!(v.kept(), vec![1, 2]);
    }

    #[test]
    fn allow_keeps_only_matching_peers() {
        let mut p =
            Allowlist::init(r#"{"mode":"allow","cidrs":["2001:db8::/32","127.0.0.1"]}"#).unwrap();
        let v = testing::run(
            &mut p,
            &[
                to("[2001:db8::9]:80"),
                to("[2001:db9::9]:80"),
                to("127.0.0.1:1"),
                to("127.0.0.2:1"),
            ],
        );
        assert_eq!(v.kept(), vec![0, 2]);
    }

    #[test]
    fn bad_config_is_rejected_with_the_value() {
        let e = Allowlist::init(r#"{"cidrs":["10.0.0.0/33"]}"#)
            .err()
            .unwrap();
        assert!(e.contains("10.0.0.0/33"), "{e}");
        let e = Allowlist::init(r#"{"mode":"maybe"}"#).err().unwrap();
        assert!(e.contains("maybe"), "{e}");
    }
}
