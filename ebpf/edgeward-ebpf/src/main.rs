//! edgeward's kernel programs.
//!
//! Built for `bpfel-unknown-none` by the agent's build script (aya-build) and embedded in the
//! agent binary. Programs attach to stable kernel tracepoints only: many edge kernels are built
//! without kprobes.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::PerCpuArray,
    programs::TracePointContext,
};
use edgeward_common::counter;

/// Per-CPU event counters, indexed by [`edgeward_common::counter`].
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Offset of `protocol` in the `sock:inet_sock_set_state` record (after the 8-byte common header,
/// `skaddr` pointer, `oldstate`, `newstate`, `sport`, `dport`, `family`), as given by
/// /sys/kernel/tracing/events/sock/inet_sock_set_state/format. The tracepoint's layout is ABI.
const PROTOCOL_OFFSET: usize = 30;
const IPPROTO_TCP: u16 = 6;

/// Counts TCP state changes. The floor of any design on this tracepoint, and the first
/// program the agent loads.
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY: the offset is inside the tracepoint record; read_at bounds-checks via the helper.
    let protocol: u16 = match unsafe { ctx.read_at(PROTOCOL_OFFSET) } {
        Ok(p) => p,
        Err(_) => return 0,
    };
    if protocol != IPPROTO_TCP {
        return 0;
    }
    if let Some(slot) = COUNTERS.get_ptr_mut(counter::STATE_CHANGES) {
        // SAFETY: the pointer comes from the map lookup for this CPU and is valid for the
        // duration of the program; per-CPU slots are never written concurrently.
        unsafe { *slot += 1 };
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible so the programs may call GPL-only helpers (`bpf_probe_read_kernel`, …).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
