//! Adds attributes from its configuration to every kept event, or only to events whose peer
//! port is listed.
//!
//! Config: `{"attributes": {"deployment.environment": "prod", "team.id": 7}, "ports": [443]}`.
//! Values may be strings, integers, floats or booleans.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use edgeward_plugin_sdk::{Batch, Policy, Value, Verdicts, export_policy};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    attributes: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    ports: Vec<u16>,
}

/// The policy.
pub struct Tagger {
    attributes: Vec<(String, Value)>,
    ports: Vec<u16>,
}

impl Policy for Tagger {
    fn init(config: &str) -> Result<Self, String> {
        let config: Config =
            serde_json::from_str(config).map_err(|e| format!("tagger config: {e}"))?;
        let mut attributes = Vec::new();
        for (key, value) in config.attributes {
            let value = match value {
                serde_json::Value::String(s) => Value::Text(s),
                serde_json::Value::Bool(b) => Value::Boolean(b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => Value::Integer(i),
                    None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
                },
                other => {
                    return Err(format!(
                        "tagger config: attribute {key:?} = {other}: must be a string, number or boolean"
                    ));
                }
            };
            attributes.push((key, value));
        }
        Ok(Self {
            attributes,
            ports: config.ports,
        })
    }

    fn on_batch(&mut self, batch: &Batch<'_>, out: &mut Verdicts) {
        for (i, event) in batch.iter().enumerate() {
            if self.ports.is_empty() || self.ports.contains(&event.peer_port()) {
                for (key, value) in &self.attributes {
                    out.set(i, key.as_str(), value.clone());
                }
            }
        }
    }
}

export_policy!(Tagger);

#[cfg(test)]
mod tests {
    use edgeward_plugin_sdk::{Record, testing};

    use super::*;

    #[test]
    fn tags_selected_ports() {
        let mut p =
            Tagger::init(r#"{"attributes":{"env":"prod","tier":2,"edge":true},"ports":[443]}"#)
                .unwrap();
        let a = Record {
            peer: "1.1.1.1:443".parse().unwrap(),
            ..Record::default()
        };
        let b = Record {
            peer: "1.1.1.1:80".parse().unwrap(),
            ..Record::default()
        };
        let v = testing::run(&mut p, &[a, b]);
        let edits: Vec<_> = v
            .edits()
            .map(|(i, k, v)| (i, k.to_owned(), v.cloned()))
            .collect();
        assert_eq!(
            edits,
            vec![
                (0, "edge".to_owned(), Some(Value::Boolean(true))),
                (0, "env".to_owned(), Some(Value::Text("prod".into()))),
                (0, "tier".to_owned(), Some(Value::Integer(2))),
            ]
        );
    }

    #[test]
    fn nested_values_are_rejected() {
        let e = Tagger::init(r#"{"attributes":{"x":[1]}}"#).err().unwrap();
        assert!(e.contains("\"x\""), "{e}");
    }
}
