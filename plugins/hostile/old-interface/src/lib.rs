//! Targets `edgeward:policy@0.0.9`, an interface version the host does not speak.
// No crate-level `unsafe_code` lint: `export!` expands the canonical ABI glue (unsafe) here.

#[allow(missing_docs, unsafe_code, clippy::all)]
mod bindings {
    wit_bindgen::generate!({ path: "wit", world: "edgeward:policy/plugin" });
}

use bindings::exports::edgeward::policy::policy::Guest;

struct Old;

impl Guest for Old {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn on_batch(ports: Vec<u16>) -> Vec<bool> {
        ports.iter().map(|p| *p != 22).collect()
    }
}

bindings::export!(Old with_types_in bindings);
