//! A hostile plugin for the host's tests. Its config is one word naming how to misbehave in
//! `on-batch` (or, for `reject`, in `init`):
//!
//! - `ok`: keep everything (the control)
//! - `loop`: never return
//! - `grow`: allocate memory without bound
//! - `recurse`: recurse without bound
//! - `trap`: panic
//! - `wrong-count`: return one verdict more than events
//! - `bad-code`: return verdict code 7
//! - `reject`: reject its config in `init`
//! - `slow-init-until=T`: spin in `init` until the host's clock reads T (nanoseconds since
//!   the Unix epoch), then keep everything: an `init` that runs out of time until T, as on a
//!   node too busy to give it its time
//!
//! It implements the WIT exports directly (not through the SDK's `Policy` trait) so that it
//! can break the contract the SDK keeps.
#![forbid(unsafe_code)]

use std::cell::Cell;

use edgeward_plugin_sdk::bindings::exports::edgeward::policy::policy::{Guest, Verdicts};

#[derive(Clone, Copy)]
enum Mode {
    Ok,
    Loop,
    Grow,
    Recurse,
    Trap,
    WrongCount,
    BadCode,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Ok) };
}

struct Misbehave;

fn count(batch: &[u8]) -> usize {
    edgeward_plugin_sdk::Batch::parse(batch)
        .map(|b| b.len())
        .unwrap_or(0)
}

#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    std::hint::black_box(recurse(std::hint::black_box(depth + 1))) + depth
}

impl Guest for Misbehave {
    fn init(config: String) -> Result<(), String> {
        let word = config.trim().trim_matches('"');
        if let Some(until) = word.strip_prefix("slow-init-until=") {
            let until: u64 = until
                .parse()
                .map_err(|e| format!("slow-init-until={until:?}: {e}"))?;
            while edgeward_plugin_sdk::now_unix_nanos() < until {
                std::hint::spin_loop();
            }
            MODE.with(|m| m.set(Mode::Ok));
            return Ok(());
        }
        let mode = match word {
            "ok" => Mode::Ok,
            "loop" => Mode::Loop,
            "grow" => Mode::Grow,
            "recurse" => Mode::Recurse,
            "trap" => Mode::Trap,
            "wrong-count" => Mode::WrongCount,
            "bad-code" => Mode::BadCode,
            "reject" => return Err(format!("misbehave rejects config {config:?} on purpose")),
            other => return Err(format!("unknown mode {other:?}")),
        };
        MODE.with(|m| m.set(mode));
        Ok(())
    }

    fn on_batch(batch: Vec<u8>) -> Verdicts {
        let n = count(&batch);
        let keep = |len| Verdicts {
            codes: vec![0; len],
            edits: Vec::new(),
        };
        match MODE.with(Cell::get) {
            Mode::Ok => keep(n),
            Mode::Loop => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            Mode::Grow => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Reserve without touching: the memory limit, not the deadline, stops it.
                    let mut block = Vec::<u8>::with_capacity(1 << 20);
                    block.push(1);
                    hoard.push(block);
                    std::hint::black_box(&hoard);
                }
            }
            Mode::Recurse => {
                let v = recurse(0);
                keep(v as usize)
            }
            Mode::Trap => panic!("misbehave traps on purpose"),
            Mode::WrongCount => keep(n + 1),
            Mode::BadCode => Verdicts {
                codes: vec![7; n],
                edits: Vec::new(),
            },
        }
    }
}

edgeward_plugin_sdk::bindings::export!(Misbehave with_types_in edgeward_plugin_sdk::bindings);
