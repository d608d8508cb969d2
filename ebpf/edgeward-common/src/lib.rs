//! Types shared by edgeward's eBPF programs and the agent that loads them.
//!
//! Everything here is `#[repr(C)]` plain data so that the kernel side can write it into BPF maps
//! and the user side can read it back byte for byte. With the `user` feature the types implement
//! [`aya::Pod`], which aya requires to read them out of maps.
#![no_std]

/// Indexes into the per-CPU `COUNTERS` array map that every kernel program updates.
///
/// The agent sums each slot over all CPUs and exports it as a metric.
pub mod counter {
    /// `sock:inet_sock_set_state` events seen for TCP sockets.
    pub const STATE_CHANGES: u32 = 0;
    /// Number of slots in the `COUNTERS` map.
    pub const LEN: u32 = 1;
}
