//! Plugins for the tests: the example and hostile plugins compiled from source to
//! wasm32-wasip2 (once per test binary, one cargo invocation in the workspace's target dir),
//! and helpers that build manifests, desired states and events around them.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::{Arc, OnceLock},
};

use edgeward::{
    plugins::{FailurePolicy, ModuleLocation, PluginLimits, PluginManifest},
    probe::event::{CloseReason, ConnectionEvent, Direction, EventKind, SmolStr},
    status::ConfigSource,
    sync::DesiredState,
};

/// The plugin crates built for the tests, by short name.
pub const CRATES: &[(&str, &str)] = &[
    ("allowlist", "edgeward-example-allowlist"),
    ("redactor", "edgeward-example-redactor"),
    ("sampler", "edgeward-example-sampler"),
    ("tagger", "edgeward-example-tagger"),
    ("misbehave", "edgeward-hostile-misbehave"),
    ("old-interface", "edgeward-hostile-old-interface"),
];

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Builds every test plugin (once per process) and returns the directory of the `.wasm` files.
pub fn build_all() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace()).args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--quiet",
        ]);
        for (_, krate) in CRATES {
            cmd.args(["-p", krate]);
        }
        let out = cmd
            .output()
            .expect("running cargo to build the test plugins");
        assert!(
            out.status.success(),
            "building the test plugins for wasm32-wasip2 failed (is the target installed? \
             scripts/setup.sh adds it):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target_dir().join("wasm32-wasip2").join("release")
    })
}

/// The path of a built plugin by short name (`allowlist`, `misbehave`, ...).
pub fn wasm_path(short: &str) -> PathBuf {
    let krate = CRATES
        .iter()
        .find(|(s, _)| *s == short)
        .map(|(_, k)| *k)
        .unwrap_or_else(|| panic!("no test plugin {short}"));
    build_all().join(format!("{}.wasm", krate.replace('-', "_")))
}

/// The bytes of a built plugin.
pub fn wasm(short: &str) -> Arc<[u8]> {
    let path = wasm_path(short);
    Arc::from(std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())))
}

/// Lowercase hex sha256.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A manifest for a module kept in etcd.
pub fn manifest(
    name: &str,
    bytes: &[u8],
    config: serde_json::Value,
    order: i32,
    failure_policy: FailurePolicy,
) -> PluginManifest {
    PluginManifest {
        name: name.to_owned(),
        version: "0.1.0".to_owned(),
        sha256: sha256(bytes),
        module: ModuleLocation::Etcd {
            size: bytes.len() as u64,
            chunks: (bytes.len() as u64).div_ceil(1 << 20).max(1) as u32,
        },
        config,
        order,
        failure_policy,
        limits: PluginLimits::default(),
        node_selector: Default::default(),
        enabled: true,
        capabilities: Vec::new(),
    }
}

/// A desired state holding these plugins (sorted as sync sorts them) and module bytes.
pub fn desired(mut plugins: Vec<(PluginManifest, Arc<[u8]>)>) -> DesiredState {
    plugins.sort_by(|a, b| (a.0.order, &a.0.name).cmp(&(b.0.order, &b.0.name)));
    let mut state = DesiredState::empty(ConfigSource::Etcd);
    let mut modules = BTreeMap::new();
    for (m, bytes) in &plugins {
        modules.insert(m.sha256.clone(), bytes.clone());
    }
    state.plugins = plugins.into_iter().map(|(m, _)| m).collect();
    state.modules = modules;
    state
}

/// A connection event with id `id` to `peer`.
pub fn event(id: u64, peer: &str) -> ConnectionEvent {
    let peer: SocketAddr = peer.parse().expect("peer address");
    ConnectionEvent {
        kind: EventKind::Close,
        conn_id: id,
        direction: Direction::Active,
        local: "10.0.0.1:40000".parse().expect("local"),
        peer,
        pid: 100,
        tgid: 100,
        comm: SmolStr::new("curl"),
        cgroup_id: 1,
        netns: 4026531840,
        start_unix_nanos: 1_700_000_000_000_000_000,
        end_unix_nanos: 1_700_000_000_500_000_000,
        bytes_sent: 1000,
        bytes_received: 2000,
        srtt_us: 300,
        rttvar_us: 50,
        retransmits: 0,
        close_reason: CloseReason::Normal,
        started_before_probe: false,
        executable: Some(SmolStr::new("/usr/bin/curl")),
        container_id: None,
        pod_uid: None,
        edits: Vec::new(),
    }
}
