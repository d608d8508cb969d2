//! The ordered chain of plugin instances, as the pipeline sees it.

use std::sync::Arc;

use super::instance::PluginInstance;
use crate::{pipeline::BatchPolicy, probe::event::ConnectionEvent};

/// Plugins in order (lower `order` first, ties by name). A batch goes through each in turn;
/// what one drops the next does not see.
#[derive(Debug, Default, Clone)]
pub struct Chain {
    plugins: Vec<Arc<PluginInstance>>,
}

impl Chain {
    /// A chain of these instances, in this order.
    pub fn new(plugins: Vec<Arc<PluginInstance>>) -> Self {
        Self { plugins }
    }

    /// The instances, in order.
    pub fn plugins(&self) -> &[Arc<PluginInstance>] {
        &self.plugins
    }
}

impl BatchPolicy for Chain {
    fn apply(&self, batch: &mut Vec<ConnectionEvent>) {
        for plugin in &self.plugins {
            if batch.is_empty() {
                return;
            }
            plugin.run(batch);
        }
    }
}
