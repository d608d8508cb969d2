//! Keeps 1 in N healthy connections and every failed one (reset, refused, timed out).
//!
//! Config: `{"keep_one_in": 10}`. The choice is made per connection (from its id), so the
//! open, update and close events of a kept connection are all kept. Counts what it drops in
//! the counter `sampled_out`.
#![forbid(unsafe_code)]

use edgeward_plugin_sdk::{Batch, Policy, Verdicts, counter_add, export_policy};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    keep_one_in: u64,
}

/// The policy.
pub struct Sampler {
    keep_one_in: u64,
}

/// A 64-bit mix (splitmix64 finaliser) so that sequential ids spread evenly.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Policy for Sampler {
    fn init(config: &str) -> Result<Self, String> {
        let config: Config =
            serde_json::from_str(config).map_err(|e| format!("sampler config: {e}"))?;
        if config.keep_one_in == 0 {
            return Err("sampler config: keep_one_in = 0, must be 1 or more".into());
        }
        Ok(Self {
            keep_one_in: config.keep_one_in,
        })
    }

    fn on_batch(&mut self, batch: &Batch<'_>, out: &mut Verdicts) {
        let mut dropped = 0;
        for (i, event) in batch.iter().enumerate() {
            let failed = event.close_reason().is_error();
            if !failed && !mix(event.conn_id()).is_multiple_of(self.keep_one_in) {
                out.drop(i);
                dropped += 1;
            }
        }
        if dropped > 0 {
            counter_add("sampled_out", dropped);
        }
    }
}

export_policy!(Sampler);

#[cfg(test)]
mod tests {
    use edgeward_plugin_sdk::{CloseReason, Record, testing};

    use super::*;

    #[test]
    fn keeps_about_one_in_n_and_all_failures() {
        let mut p = Sampler::init(r#"{"keep_one_in":10}"#).unwrap();
        let healthy: Vec<Record> = (0..10_000)
            .map(|i| Record {
                conn_id: i,
                ..Record::default()
            })
            .collect();
        let kept = testing::run(&mut p, &healthy).kept().len();
        assert!((800..1200).contains(&kept), "kept {kept} of 10000");
        assert_eq!(testing::counter("sampled_out"), 10_000 - kept as u64);

        let failed: Vec<Record> = (0..100)
            .map(|i| Record {
                conn_id: i,
                close_reason: CloseReason::Refused,
                ..Record::default()
            })
            .collect();
        assert_eq!(testing::run(&mut p, &failed).kept().len(), 100);
    }

    #[test]
    fn a_connection_is_kept_or_dropped_whole() {
        let mut p = Sampler::init(r#"{"keep_one_in":3}"#).unwrap();
        let events: Vec<Record> = (0..300)
            .map(|i| Record {
                conn_id: i % 100,
                ..Record::default()
            })
            .collect();
        let v = testing::run(&mut p, &events);
        for i in 0..100 {
            assert_eq!(v.is_dropped(i), v.is_dropped(i + 100));
            assert_eq!(v.is_dropped(i), v.is_dropped(i + 200));
        }
    }

    #[test]
    fn zero_is_rejected() {
        assert!(
            Sampler::init(r#"{"keep_one_in":0}"#)
                .err()
                .unwrap()
                .contains("keep_one_in = 0")
        );
    }
}
