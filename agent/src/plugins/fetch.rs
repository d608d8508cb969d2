//! Module bytes: from the snapshot's etcd blobs or an https URL, checked against the
//! manifest's sha256 before anything compiles them.

use std::{io::Read as _, sync::Arc};

use super::{ModuleLocation, PluginError, PluginManifest, PluginsConfig, engine::sha256_hex};
use crate::sync::DesiredState;

/// The verified bytes of `manifest`'s module.
pub(crate) fn module_bytes(
    desired: &DesiredState,
    manifest: &PluginManifest,
    config: &PluginsConfig,
) -> Result<Arc<[u8]>, PluginError> {
    let max = u64::from(config.max_module_mib) << 20;
    let bytes = match &manifest.module {
        ModuleLocation::Etcd { .. } => {
            desired
                .module(&manifest.sha256)
                .ok_or_else(|| PluginError::MissingModule {
                    plugin: manifest.name.clone(),
                    sha256: manifest.sha256.clone(),
                })?
        }
        ModuleLocation::Url(url) => Arc::from(fetch_https(&manifest.name, url, max, config)?),
    };
    verify(&manifest.name, &manifest.sha256, &bytes)?;
    Ok(bytes)
}

/// Checks that `bytes` hash to `expected`.
pub(crate) fn verify(plugin: &str, expected: &str, bytes: &[u8]) -> Result<(), PluginError> {
    let actual = sha256_hex(bytes);
    if actual != expected {
        return Err(PluginError::Sha256Mismatch {
            plugin: plugin.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

fn fetch_https(
    plugin: &str,
    url: &str,
    max: u64,
    config: &PluginsConfig,
) -> Result<Vec<u8>, PluginError> {
    let fail = |reason: String| PluginError::Fetch {
        plugin: plugin.to_owned(),
        url: url.to_owned(),
        reason,
    };
    if !url.starts_with("https://") {
        return Err(fail("only https:// URLs are fetched".to_owned()));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(config.fetch_timeout))
        .https_only(true)
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    let mut bytes = Vec::new();
    response
        .body_mut()
        .as_reader()
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    if bytes.len() as u64 > max {
        return Err(fail(format!(
            "module is larger than plugins.max_module_mib ({} MiB)",
            max >> 20
        )));
    }
    Ok(bytes)
}
