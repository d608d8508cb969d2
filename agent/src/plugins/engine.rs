//! One wasmtime [`Engine`] per process, the [`Linker`] with the host imports, and the on-disk
//! cache of compiled modules.

use std::{
    hash::{Hash as _, Hasher as _},
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use sha2::{Digest as _, Sha256};
use wasmtime::{
    Config, Engine, ResourceLimiter, Store,
    component::{Component, HasSelf, Linker},
};

use super::{Capability, PluginError, PluginMetrics};

#[allow(missing_docs, clippy::all)]
mod wit {
    wasmtime::component::bindgen!({
        path: "../plugins/wit",
        world: "edgeward:policy/plugin",
    });
}

use wit::edgeward::policy::host;
pub(crate) use wit::{Plugin, PluginPre, exports::edgeward::policy::policy as exports};

/// The interface a plugin must export (package version included).
pub const INTERFACE: &str = "edgeward:policy/policy@0.1.0";
/// The host interface plugins may import.
const HOST_INTERFACE: &str = "edgeward:policy/host@0.1.0";
/// How often the epoch advances: the granularity of call deadlines.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Log lines a plugin instance may write per second; more are counted, not written.
const LOG_LINES_PER_SECOND: u32 = 20;
/// Distinct custom counter names per plugin instance.
const MAX_CUSTOM_COUNTERS: usize = 32;

/// What a store holds for one plugin instance.
pub(crate) struct HostState {
    plugin: Arc<str>,
    memory_limit: usize,
    pub(crate) memory_limit_hit: bool,
    metrics: Arc<PluginMetrics>,
    counters: Vec<String>,
    log_window: Instant,
    log_lines: u32,
}

impl HostState {
    pub(crate) fn new(plugin: Arc<str>, memory_mib: u32, metrics: Arc<PluginMetrics>) -> Self {
        Self {
            plugin,
            memory_limit: (memory_mib as usize) << 20,
            memory_limit_hit: false,
            metrics,
            counters: Vec::new(),
            log_window: Instant::now(),
            log_lines: 0,
        }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_limit_hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        16
    }
}

impl host::Host for HostState {
    fn log(&mut self, level: host::Level, message: String) {
        let now = Instant::now();
        if now.duration_since(self.log_window) >= Duration::from_secs(1) {
            self.log_window = now;
            self.log_lines = 0;
        }
        self.log_lines += 1;
        if self.log_lines > LOG_LINES_PER_SECOND {
            self.metrics.log_suppressed(&self.plugin);
            return;
        }
        let message: String = message.chars().take(1024).collect();
        let plugin = &*self.plugin;
        match level {
            host::Level::Trace => tracing::trace!(plugin, message, "plugin log"),
            host::Level::Debug => tracing::debug!(plugin, message, "plugin log"),
            host::Level::Info => tracing::info!(plugin, message, "plugin log"),
            host::Level::Warn => tracing::warn!(plugin, message, "plugin log"),
            host::Level::Error => tracing::error!(plugin, message, "plugin log"),
        }
    }

    fn counter_add(&mut self, name: String, delta: u64) {
        if !self.counters.contains(&name) {
            let ok_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !ok_name || self.counters.len() >= MAX_CUSTOM_COUNTERS {
                self.metrics.error(&self.plugin, "counter_rejected");
                return;
            }
            self.counters.push(name.clone());
        }
        self.metrics.custom(&self.plugin, &name, delta);
    }

    fn now_unix_nanos(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

/// What a component is, as `edgeward plugin check` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// sha256 of the bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: usize,
    /// Names of the component's imports.
    pub imports: Vec<String>,
    /// Names of the component's exports.
    pub exports: Vec<String>,
}

/// The process's wasmtime engine and linker, with the compile cache.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    compat: String,
    metrics: Arc<PluginMetrics>,
    ticker: Arc<EpochTicker>,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime")
            .field("cache_dir", &self.cache_dir)
            .field("compat", &self.compat)
            .finish_non_exhaustive()
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`], but only while a plugin call is in
/// flight. A ticker that ran all the time would wake a thread a thousand times a second on
/// every node, plugins or not: on a busy two-core box that was a third of the agent's CPU
/// and a preemption of the workload each millisecond. Deadlines are relative to the epoch
/// when a call starts, and the epoch stands still only while nothing runs, so a parked
/// ticker never cuts a call short and never lets one run past its deadline by more than
/// the tick it takes to wake.
struct EpochTicker {
    /// Plugin calls in flight. The thread holds it weakly: when the runtime goes, so does
    /// the thread.
    in_flight: Arc<AtomicUsize>,
    thread: std::thread::Thread,
}

impl EpochTicker {
    fn start(engine: &Engine) -> std::io::Result<Arc<Self>> {
        let engine = engine.weak();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let calls = Arc::downgrade(&in_flight);
        let handle = std::thread::Builder::new()
            .name("edgeward-epoch".to_owned())
            .spawn(move || {
                while let Some(calls) = calls.upgrade() {
                    let idle = calls.load(Ordering::Acquire) == 0;
                    drop(calls);
                    if idle {
                        // `busy` unparks; the timeout only bounds how long a dropped runtime
                        // keeps this thread.
                        std::thread::park_timeout(Duration::from_secs(1));
                        continue;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    match engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })?;
        Ok(Arc::new(Self {
            in_flight,
            thread: handle.thread().clone(),
        }))
    }

    fn busy(self: &Arc<Self>) -> TickGuard {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        TickGuard(self.clone())
    }
}

/// While one exists, the epoch advances (see [`PluginRuntime::ticking`]).
pub(crate) struct TickGuard(Arc<EpochTicker>);

impl Drop for TickGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

impl PluginRuntime {
    /// Creates the engine (with epoch interruption), starts its epoch ticker thread (which
    /// stops when the engine is dropped) and the linker with the host imports.
    /// `cache_dir`: where compiled modules are kept; `None` keeps nothing on disk.
    pub fn new(
        cache_dir: Option<PathBuf>,
        metrics: Arc<PluginMetrics>,
    ) -> Result<Arc<Self>, PluginError> {
        let engine_error = |e: wasmtime::Error| PluginError::Compile {
            plugin: "(engine)".to_owned(),
            reason: format!("{e:#}"),
        };
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        config.max_wasm_stack(512 * 1024);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config).map_err(engine_error)?;

        let ticker = EpochTicker::start(&engine).map_err(|e| PluginError::Compile {
            plugin: "(engine)".to_owned(),
            reason: format!("starting the epoch thread: {e}"),
        })?;

        let mut linker = Linker::new(&engine);
        host::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(engine_error)?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = format!("{:016x}", hasher.finish());

        if let Some(dir) = &cache_dir
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "module cache dir unusable; compiling without cache");
        }
        Ok(Arc::new(Self {
            engine,
            linker,
            cache_dir,
            compat,
            metrics,
            ticker,
        }))
    }

    /// Keeps the epoch advancing until the guard is dropped: take one around every call
    /// into a plugin (instantiation included) that has an epoch deadline.
    pub(crate) fn ticking(&self) -> TickGuard {
        self.ticker.busy()
    }

    /// The metrics this runtime reports to.
    pub fn metrics(&self) -> &Arc<PluginMetrics> {
        &self.metrics
    }

    fn cache_path(&self, sha256: &str) -> Option<PathBuf> {
        self.cache_dir
            .as_ref()
            .map(|d| d.join(format!("{sha256}-{}.cwasm", self.compat)))
    }

    /// A compiled component for `sha256` from the disk cache, if there is one.
    pub(crate) fn cached(&self, plugin: &str, sha256: &str) -> Option<Component> {
        let path = self.cache_path(sha256)?;
        let bytes = std::fs::read(&path).ok()?;
        match deserialize(&self.engine, &bytes) {
            Ok(c) => {
                self.metrics.module_loaded("cache");
                tracing::info!(plugin, sha256, path = %path.display(), "module loaded from compile cache");
                Some(c)
            }
            Err(e) => {
                tracing::warn!(plugin, path = %path.display(), error = %e, "compile cache entry unusable; recompiling");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Compiles verified module bytes (whose sha256 is `sha256`) and stores the result in the
    /// disk cache.
    pub(crate) fn compile(
        &self,
        plugin: &str,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<Component, PluginError> {
        check_component_header(plugin, bytes)?;
        let started = Instant::now();
        let component = Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
            plugin: plugin.to_owned(),
            reason: format!("{e:#}"),
        })?;
        self.metrics.module_loaded("compiled");
        tracing::info!(
            plugin,
            sha256,
            size = bytes.len(),
            ms = started.elapsed().as_millis() as u64,
            "module compiled"
        );
        if let Some(path) = self.cache_path(sha256) {
            match component.serialize() {
                Ok(ser) => {
                    if let Err(e) = write_atomically(&path, &ser) {
                        tracing::warn!(path = %path.display(), error = %e, "compile cache write failed");
                    }
                }
                Err(e) => tracing::warn!(plugin, error = %e, "serializing compiled module failed"),
            }
        }
        Ok(component)
    }

    /// What a component imports and exports.
    pub fn describe(&self, sha256: &str, size: usize, component: &Component) -> ModuleInfo {
        let ty = component.component_type();
        ModuleInfo {
            sha256: sha256.to_owned(),
            size,
            imports: ty
                .imports(&self.engine)
                .map(|(n, _)| n.to_owned())
                .collect(),
            exports: ty
                .exports(&self.engine)
                .map(|(n, _)| n.to_owned())
                .collect(),
        }
    }

    /// Links a component against the host: checks its interface version, grants the
    /// capabilities it was given, and turns every other import into a function that traps.
    pub(crate) fn prepare(
        &self,
        plugin: &str,
        component: &Component,
        capabilities: &[Capability],
    ) -> Result<PluginPre<HostState>, PluginError> {
        let interface = |reason: String| PluginError::Interface {
            plugin: plugin.to_owned(),
            reason,
        };
        let ty = component.component_type();
        let imports: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        for name in &imports {
            if name.starts_with("edgeward:policy/") && name != HOST_INTERFACE {
                return Err(interface(format!(
                    "imports {name}, this host provides {HOST_INTERFACE}"
                )));
            }
        }
        if !exports.iter().any(|e| e == INTERFACE) {
            return Err(interface(format!(
                "exports [{}], this host needs {INTERFACE}",
                exports.join(", ")
            )));
        }
        let mut linker = self.linker.clone();
        for name in &imports {
            let granted = |c| capabilities.contains(&c);
            let result = if name.starts_with("wasi:random/random@") && granted(Capability::Random) {
                define_random(&mut linker, name)
            } else if name.starts_with("wasi:cli/environment@") && granted(Capability::Environment)
            {
                define_environment(&mut linker, name)
            } else {
                Ok(())
            };
            result.map_err(|e| interface(format!("granting {name}: {e:#}")))?;
        }
        linker
            .define_unknown_imports_as_traps(component)
            .map_err(|e| interface(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(component)
            .map_err(|e| interface(format!("{e:#}")))?;
        PluginPre::new(pre).map_err(|e| interface(format!("{e:#}")))
    }

    /// A fresh store for one instance of `plugin`.
    pub(crate) fn store(&self, plugin: &Arc<str>, memory_mib: u32) -> Store<HostState> {
        let mut store = Store::new(
            &self.engine,
            HostState::new(plugin.clone(), memory_mib, self.metrics.clone()),
        );
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        store.epoch_deadline_trap();
        store
    }
}

/// Loads a compiled component from the cache.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: the bytes are a file this agent wrote itself with `Component::serialize` (written
    // to a temporary name and renamed, so never half-written) into its own cache directory,
    // under a name that includes the engine's compatibility hash; wasmtime additionally checks
    // the header, its version and the engine configuration before using them.
    unsafe { Component::deserialize(engine, bytes) }
}

fn check_component_header(plugin: &str, bytes: &[u8]) -> Result<(), PluginError> {
    let not = |reason: &str| PluginError::NotAComponent {
        plugin: plugin.to_owned(),
        reason: reason.to_owned(),
    };
    if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
        return Err(not(
            "the bytes do not start with the WebAssembly magic \\0asm",
        ));
    }
    // Bytes 4..8: version (u16) and layer (u16); layer 1 = component, 0 = core module.
    match u16::from_le_bytes([bytes[6], bytes[7]]) {
        1 => Ok(()),
        0 => Err(not(
            "it is a core WebAssembly module; build a component (target wasm32-wasip2, or \
             `wasm-tools component new`)",
        )),
        layer => Err(not(&format!("unknown WebAssembly layer {layer}"))),
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

fn define_random(linker: &mut Linker<HostState>, name: &str) -> wasmtime::Result<()> {
    let mut inst = linker.instance(name)?;
    inst.func_wrap("get-random-bytes", |_, (len,): (u64,)| {
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        fill_random(&mut buf)?;
        Ok((buf,))
    })?;
    inst.func_wrap("get-random-u64", |_, (): ()| {
        let mut buf = [0u8; 8];
        fill_random(&mut buf)?;
        Ok((u64::from_le_bytes(buf),))
    })?;
    Ok(())
}

fn fill_random(buf: &mut [u8]) -> wasmtime::Result<()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| wasmtime::format_err!("reading /dev/urandom: {e}"))
}

fn define_environment(linker: &mut Linker<HostState>, name: &str) -> wasmtime::Result<()> {
    let mut inst = linker.instance(name)?;
    inst.func_wrap("get-environment", |_, (): ()| {
        Ok((Vec::<(String, String)>::new(),))
    })?;
    inst.func_wrap("get-arguments", |_, (): ()| Ok((Vec::<String>::new(),)))?;
    inst.func_wrap("initial-cwd", |_, (): ()| Ok((None::<String>,)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_tell_modules_from_components() {
        assert!(check_component_header("p", b"\0asm\x0d\0\x01\0").is_ok());
        let e = check_component_header("p", b"\0asm\x01\0\0\0").unwrap_err();
        assert!(e.to_string().contains("core WebAssembly module"), "{e}");
        let e = check_component_header("p", b"PK\x03\x04").unwrap_err();
        assert!(e.to_string().contains("plugin p"), "{e}");
    }

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }
}
