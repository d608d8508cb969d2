//! Redacts connection addresses: removes them, or replaces them with a keyed hash so that
//! the same address still groups together without being readable.
//!
//! Config: `{"mode": "remove" | "hash", "fields": ["peer", "local"], "key": "secret"}`
//! (`fields` defaults to `["peer"]`). Hashing is FNV-1a over the key and the address: a
//! pseudonym, not a cryptographic guarantee; use `remove` when addresses must not be
//! recoverable at all. Publish it with `failure_policy = "fail_closed"`.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use edgeward_plugin_sdk::{Batch, Policy, Value, Verdicts, export_policy};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    mode: Mode,
    #[serde(default = "peer_only")]
    fields: Vec<Side>,
    #[serde(default)]
    key: String,
}

fn peer_only() -> Vec<Side> {
    vec![Side::Peer]
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Remove,
    Hash,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Side {
    Peer,
    Local,
}

/// The policy.
pub struct Redactor {
    mode: Mode,
    fields: Vec<Side>,
    key: String,
}

/// FNV-1a, 64 bits, over the key then the address bytes.
fn pseudonym(key: &str, ip: IpAddr) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    for b in key.as_bytes().iter().chain(octets.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("anon-{h:016x}")
}

impl Policy for Redactor {
    fn init(config: &str) -> Result<Self, String> {
        let config: Config =
            serde_json::from_str(config).map_err(|e| format!("redactor config: {e}"))?;
        if config.mode == Mode::Hash && config.key.is_empty() {
            return Err("redactor config: mode \"hash\" needs a non-empty \"key\"".into());
        }
        Ok(Self {
            mode: config.mode,
            fields: config.fields,
            key: config.key,
        })
    }

    fn on_batch(&mut self, batch: &Batch<'_>, out: &mut Verdicts) {
        for (i, event) in batch.iter().enumerate() {
            for side in &self.fields {
                let (key, ip) = match side {
                    Side::Peer => ("network.peer.address", event.peer_ip()),
                    Side::Local => ("network.local.address", event.local_ip()),
                };
                match self.mode {
                    Mode::Remove => out.remove(i, key),
                    Mode::Hash => out.set(i, key, Value::Text(pseudonym(&self.key, ip))),
                }
            }
        }
    }
}

export_policy!(Redactor);

#[cfg(test)]
mod tests {
    use edgeward_plugin_sdk::{Record, testing};

    use super::*;

    fn event(peer: &str) -> Record<'static> {
        Record {
            peer: peer.parse().unwrap(),
            local: "10.0.0.1:80".parse().unwrap(),
            ..Record::default()
        }
    }

    #[test]
    fn remove_takes_out_the_peer_address() {
        let mut p = Redactor::init("{}").unwrap();
        let v = testing::run(&mut p, &[event("1.2.3.4:5"), event("5.6.7.8:9")]);
        let edits: Vec<_> = v.edits().collect();
        assert_eq!(
            edits,
            vec![
                (0, "network.peer.address", None),
                (1, "network.peer.address", None)
            ]
        );
        assert_eq!(v.kept(), vec![0, 1]);
    }

    #[test]
    fn hash_is_stable_and_keyed() {
        let mut p =
            Redactor::init(r#"{"mode":"hash","key":"k1","fields":["peer","local"]}"#).unwrap();
        let v = testing::run(&mut p, &[event("1.2.3.4:5"), event("1.2.3.4:6")]);
        let edits: Vec<_> = v.edits().collect();
        assert_eq!(edits.len(), 4);
        assert_eq!(edits[0].2, edits[2].2, "same peer, same pseudonym");
        let Some(Value::Text(h)) = edits[0].2 else {
            panic!("not text")
        };
        assert!(h.starts_with("anon-") && !h.contains("1.2.3.4"), "{h}");
        assert_ne!(
            pseudonym("k1", "1.2.3.4".parse().unwrap()),
            pseudonym("k2", "1.2.3.4".parse().unwrap())
        );
    }

    #[test]
    fn hash_without_key_is_rejected() {
        assert!(
            Redactor::init(r#"{"mode":"hash"}"#)
                .err()
                .unwrap()
                .contains("key")
        );
    }
}
