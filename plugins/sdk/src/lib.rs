//! The Rust SDK for edgeward policy plugins.
//!
//! A policy is a type implementing [`Policy`], exported with [`export_policy!`]:
//!
//! ```
//! use edgeward_plugin_sdk::{export_policy, Batch, Policy, Verdicts};
//!
//! struct DenySsh;
//!
//! impl Policy for DenySsh {
//!     fn init(_config: &str) -> Result<Self, String> {
//!         Ok(DenySsh)
//!     }
//!     fn on_batch(&mut self, batch: &Batch<'_>, out: &mut Verdicts) {
//!         for (i, event) in batch.iter().enumerate() {
//!             if event.peer_port() == 22 {
//!                 out.drop(i);
//!             }
//!         }
//!     }
//! }
//!
//! export_policy!(DenySsh);
//!
//! // Natively, the same policy runs in unit tests:
//! use edgeward_plugin_sdk::{Record, testing};
//! let mut policy = DenySsh::init("null").unwrap();
//! let ssh = Record { peer: "10.0.0.9:22".parse().unwrap(), ..Record::default() };
//! let web = Record { peer: "10.0.0.9:443".parse().unwrap(), ..Record::default() };
//! assert_eq!(testing::run(&mut policy, &[ssh, web]).kept(), vec![1]);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`); the
//! result is a component for the world `edgeward:policy/plugin`. The same policy runs natively
//! in `cargo test` through [`testing`].
//!
//! Unsafe code: only inside the bindings that `wit-bindgen` generates (the canonical ABI glue),
//! allowed on that module alone.
#![deny(unsafe_code)]

pub use edgeward_plugin_abi::{
    BatchView as Batch, CloseReason, Direction, EventView as Event, Kind, LayoutError, Record,
};

/// The generated bindings of the WIT world (used by [`export_policy!`]).
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "edgeward:policy/plugin",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "edgeward_plugin_sdk::bindings",
        additional_derives: [PartialEq],
    });
}

use bindings::exports::edgeward::policy::policy as wit;

/// A value of an attribute a policy sets.
pub use wit::AttrValue as Value;

/// A policy plugin.
pub trait Policy: Sized + 'static {
    /// Builds the policy from its configuration (JSON text by convention, `null` if the
    /// manifest has none). An `Err` rejects the configuration; the agent keeps its last good
    /// chain and reports the message.
    fn init(config: &str) -> Result<Self, String>;

    /// Judges one batch. `out` starts as "keep every event, no edits".
    fn on_batch(&mut self, batch: &Batch<'_>, out: &mut Verdicts);
}

/// The verdicts on one batch, built by a policy.
#[derive(Debug, Default, Clone)]
pub struct Verdicts {
    codes: Vec<u8>,
    edits: Vec<wit::AttrEdit>,
}

impl Verdicts {
    /// "Keep all" for a batch of `len` events.
    pub fn keep_all(len: usize) -> Self {
        let mut v = Self::default();
        v.reset(len);
        v
    }

    fn reset(&mut self, len: usize) {
        self.codes.clear();
        self.codes.resize(len, edgeward_plugin_abi::KEEP);
        self.edits.clear();
    }

    /// Drops event `index`.
    pub fn drop(&mut self, index: usize) {
        if let Some(c) = self.codes.get_mut(index) {
            *c = edgeward_plugin_abi::DROP;
        }
    }

    /// Keeps event `index` (the default).
    pub fn keep(&mut self, index: usize) {
        if let Some(c) = self.codes.get_mut(index) {
            *c = edgeward_plugin_abi::KEEP;
        }
    }

    /// Whether event `index` is dropped so far.
    pub fn is_dropped(&self, index: usize) -> bool {
        self.codes.get(index) == Some(&edgeward_plugin_abi::DROP)
    }

    /// Sets attribute `key` of event `index`.
    pub fn set(&mut self, index: usize, key: impl Into<String>, value: Value) {
        self.edits.push(wit::AttrEdit {
            event: index as u32,
            key: key.into(),
            value: Some(value),
        });
    }

    /// Removes attribute `key` of event `index` (standard ones included, such as
    /// `network.peer.address`).
    pub fn remove(&mut self, index: usize, key: impl Into<String>) {
        self.edits.push(wit::AttrEdit {
            event: index as u32,
            key: key.into(),
            value: None,
        });
    }

    /// One code per event: [`KEEP`](edgeward_plugin_abi::KEEP) or
    /// [`DROP`](edgeward_plugin_abi::DROP).
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The edits, in order: (event index, key, value or `None` for removal).
    pub fn edits(&self) -> impl Iterator<Item = (usize, &str, Option<&Value>)> {
        self.edits
            .iter()
            .map(|e| (e.event as usize, e.key.as_str(), e.value.as_ref()))
    }

    /// Indices of the kept events.
    pub fn kept(&self) -> Vec<usize> {
        (0..self.codes.len())
            .filter(|&i| !self.is_dropped(i))
            .collect()
    }

    #[doc(hidden)]
    pub fn into_wit(self) -> wit::Verdicts {
        wit::Verdicts {
            codes: self.codes,
            edits: self.edits,
        }
    }
}

/// Log levels for [`log`].
pub use bindings::edgeward::policy::host::Level;

/// Writes a line to the agent's log, tagged with the plugin's name. Natively (tests) it goes
/// to stderr.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    bindings::edgeward::policy::host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{level:?}] {message}");
}

/// Adds `delta` to the plugin's counter `name` (metric
/// `edgeward_plugin_custom_total{plugin,counter}`). Natively (tests) it adds to
/// [`testing::counter`].
pub fn counter_add(name: &str, delta: u64) {
    #[cfg(target_arch = "wasm32")]
    bindings::edgeward::policy::host::counter_add(name, delta);
    #[cfg(not(target_arch = "wasm32"))]
    testing::add_to_counter(name, delta);
}

/// Wall-clock time, ns since the Unix epoch.
pub fn now_unix_nanos() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return bindings::edgeward::policy::host::now_unix_nanos();
    #[cfg(not(target_arch = "wasm32"))]
    return std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
}

#[doc(hidden)]
pub mod runtime {
    use std::cell::RefCell;

    use super::{Batch, Policy, Verdicts, wit};

    /// The instance's policy and its reusable verdict buffer.
    pub struct Slot<P> {
        policy: Option<P>,
        verdicts: Verdicts,
    }

    impl<P> Slot<P> {
        /// Empty: `init` not called yet.
        pub const fn new() -> Self {
            Self {
                policy: None,
                verdicts: Verdicts {
                    codes: Vec::new(),
                    edits: Vec::new(),
                },
            }
        }
    }

    impl<P> Default for Slot<P> {
        fn default() -> Self {
            Self::new()
        }
    }

    /// `init` of the exported interface.
    pub fn init<P: Policy>(slot: &RefCell<Slot<P>>, config: &str) -> Result<(), String> {
        let policy = P::init(config)?;
        slot.borrow_mut().policy = Some(policy);
        Ok(())
    }

    /// `on-batch` of the exported interface. A batch the SDK cannot read, or a call before
    /// `init`, is a bug of the host: the plugin traps.
    pub fn on_batch<P: Policy>(slot: &RefCell<Slot<P>>, bytes: &[u8]) -> wit::Verdicts {
        let batch = match Batch::parse(bytes) {
            Ok(b) => b,
            Err(e) => panic!("edgeward plugin SDK: {e}"),
        };
        let mut slot = slot.borrow_mut();
        let Slot { policy, verdicts } = &mut *slot;
        let Some(policy) = policy.as_mut() else {
            panic!("edgeward plugin SDK: on-batch called before init");
        };
        verdicts.reset(batch.len());
        policy.on_batch(&batch, verdicts);
        let out = std::mem::take(verdicts);
        out.into_wit()
    }
}

/// Exports a [`Policy`] type as the plugin's `edgeward:policy/policy` interface.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        // Only the wasm build exports anything: a native build (unit tests) links the crate as a
        // shared library too, and the component's export names are not native symbol names.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __EdgewardExport;

            ::std::thread_local! {
                static __EDGEWARD_SLOT: ::std::cell::RefCell<$crate::runtime::Slot<$policy>> =
                    const { ::std::cell::RefCell::new($crate::runtime::Slot::new()) };
            }

            impl $crate::bindings::exports::edgeward::policy::policy::Guest for __EdgewardExport {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    __EDGEWARD_SLOT.with(|slot| $crate::runtime::init::<$policy>(slot, &config))
                }

                fn on_batch(
                    batch: ::std::vec::Vec<u8>,
                ) -> $crate::bindings::exports::edgeward::policy::policy::Verdicts {
                    __EDGEWARD_SLOT.with(|slot| $crate::runtime::on_batch::<$policy>(slot, &batch))
                }
            }

    $crate::bindings::export!(__EdgewardExport with_types_in $crate::bindings);
        };
    };
}

/// Running a policy natively, for unit tests of plugins.
pub mod testing {
    use std::{cell::RefCell, collections::BTreeMap};

    use edgeward_plugin_abi::Encoder;

    use super::{Batch, Policy, Record, Verdicts};

    thread_local! {
        static COUNTERS: RefCell<BTreeMap<String, u64>> = const { RefCell::new(BTreeMap::new()) };
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn add_to_counter(name: &str, delta: u64) {
        COUNTERS.with(|c| *c.borrow_mut().entry(name.to_owned()).or_default() += delta);
    }

    /// The value of counter `name` on this thread (natively).
    pub fn counter(name: &str) -> u64 {
        COUNTERS.with(|c| c.borrow().get(name).copied().unwrap_or(0))
    }

    /// Encodes `records` exactly as the agent does and runs `policy` on them.
    pub fn run<P: Policy>(policy: &mut P, records: &[Record<'_>]) -> Verdicts {
        let mut enc = Encoder::new();
        for r in records {
            enc.push(r);
        }
        let bytes = enc.finish().to_vec();
        let batch = match Batch::parse(&bytes) {
            Ok(b) => b,
            Err(e) => panic!("encoder produced a bad batch: {e}"),
        };
        let mut out = Verdicts::keep_all(batch.len());
        policy.on_batch(&batch, &mut out);
        out
    }
}
