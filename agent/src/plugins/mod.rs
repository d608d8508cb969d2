//! WASM policy plugins: manifests, and (with the plugin host) the chain that runs them.

pub mod manifest;

pub use manifest::{FailurePolicy, ModuleLocation, NodeSelector, PluginLimits, PluginManifest};
