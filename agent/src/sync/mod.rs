//! Desired state: where it comes from and how it reaches the rest of the agent.
//!
//! With etcd endpoints configured, the [`etcd`] source lists and watches the prefix; without
//! them the agent runs standalone from a local directory ([`mod@file`]). Either way the
//! applied snapshot is kept in the offline [`cache`], and the rest of the agent receives it as
//! one [`DesiredState`] value.

pub mod cache;
pub mod etcd;
pub mod file;
pub mod state;

pub use cache::CacheConfig;
pub use etcd::EtcdConfig;
pub use file::StandaloneConfig;
pub use state::{DesiredState, DesiredStateRx};
