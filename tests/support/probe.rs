//! Helpers for the probe tests: the real probe loaded in-process, traffic in child processes
//! whose pids are known, network namespaces that are removed even when a test fails.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use edgeward::{
    probe::{ProbeConfig, event::ConnectionEvent},
    status::StatusHandle,
};
use tokio_util::sync::CancellationToken;

/// `setpriv` options that leave a command exactly the capabilities the shipped unit and
/// DaemonSet grant (`--inh-caps=-all --bounding-set=-all,+bpf,+perfmon` today), nothing
/// inheritable: how operators run the agent.
pub fn shipped_setpriv() -> String {
    let caps: Vec<String> = super::deploy::unit_capabilities()
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.is_empty(), "the systemd unit names no capabilities");
    format!("--inh-caps=-all --bounding-set=-all,{}", caps.join(","))
}

/// The probe, loaded into this kernel and read on a private runtime. Every event it delivers
/// is kept; tests filter by their own ports.
pub struct RunningProbe {
    rt: tokio::runtime::Runtime,
    shutdown: CancellationToken,
    events: Arc<Mutex<Vec<ConnectionEvent>>>,
    /// The status the probe updates.
    pub status: StatusHandle,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningProbe {
    /// Loads and attaches the probe with `config`. Fails the test (it does not skip) when the
    /// kernel refuses: the suite needs root and BPF.
    pub fn start(config: ProbeConfig) -> RunningProbe {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let status = StatusHandle::new("probe-test");
        let mut probe = {
            let _guard = rt.enter();
            config.start(&status).unwrap_or_else(|e| {
                panic!(
                    "loading the eBPF probe failed: {e}\n\
                     these tests need root (CAP_BPF, CAP_PERFMON), a kernel with BTF and \
                     tracefs mounted: run them as root after scripts/setup.sh"
                )
            })
        };
        let mut rx = probe.take_events().expect("events receiver");
        let events = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let task = rt.spawn(probe.run(shutdown.clone()));
        {
            let events = events.clone();
            rt.spawn(async move {
                while let Some(batch) = rx.recv().await {
                    events.lock().unwrap().extend(batch);
                }
            });
        }
        RunningProbe {
            rt,
            shutdown,
            events,
            status,
            task: Some(task),
        }
    }

    /// Events whose local or peer port is `port`.
    pub fn events_on_port(&self, port: u16) -> Vec<ConnectionEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.local.port() == port || e.peer.port() == port)
            .cloned()
            .collect()
    }

    /// Waits until `done` holds for the events on `port`, then returns them; fails the test
    /// after `timeout` with what was seen.
    pub fn wait_events(
        &self,
        port: u16,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[ConnectionEvent]) -> bool,
    ) -> Vec<ConnectionEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events_on_port(port);
            if done(&events) {
                return events;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what} on port {port}; saw {} \
                     events:\n{events:#?}\nstatus: {:?}",
                    events.len(),
                    self.status.snapshot().probe
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunningProbe {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
        }
    }
}

/// The real python3 interpreter (not a pyenv shim, so the pid the test sees is the pid that
/// makes the connections).
pub fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 must be installed: run scripts/setup.sh");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

fn traffic_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support/probe_traffic.py")
}

/// A `probe_traffic.py` child process.
pub struct Traffic {
    child: Child,
    stdout: BufReader<ChildStdout>,
    stdin: Option<ChildStdin>,
    role: String,
}

impl Traffic {
    /// Starts `probe_traffic.py ARGS`, inside network namespace `netns` if given.
    pub fn spawn(netns: Option<&NetNs>, args: &[&str]) -> Traffic {
        let mut cmd = match netns {
            // `ip netns exec` enters the namespace and execs: the pid stays the same.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name]).arg(python());
                c
            }
            None => Command::new(python()),
        };
        let mut child = cmd
            .arg(traffic_script())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn probe_traffic.py");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let stdin = child.stdin.take();
        Traffic {
            child,
            stdout,
            stdin,
            role: args.join(" "),
        }
    }

    /// Its pid (equal to its tgid and its main thread's id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line it prints.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read traffic output");
        assert!(!line.is_empty(), "`{}` exited early", self.role);
        line.trim().to_owned()
    }

    /// The port a server role printed first.
    pub fn port(&mut self) -> u16 {
        let line = self.line();
        line.parse()
            .unwrap_or_else(|_| panic!("`{}` printed {line:?}, not a port", self.role))
    }

    /// Sends a line to its stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to traffic stdin");
        stdin.flush().expect("flush");
    }

    /// Waits for it to exit successfully (within 30 s); returns the lines it printed.
    pub fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let mut lines = Vec::new();
        let mut line = String::new();
        while self.stdout.read_line(&mut line).unwrap_or(0) > 0 {
            lines.push(line.trim().to_owned());
            line.clear();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "`{}` failed: {status}", self.role);
                return lines;
            }
            assert!(Instant::now() < deadline, "`{}` did not exit", self.role);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command and fails the test with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e} (run scripts/setup.sh)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of this test, deleted on drop (also when the test panics).
pub struct NetNs {
    /// Its name under /run/netns.
    pub name: String,
}

impl NetNs {
    /// Creates `ew-<pid>-<tag>` with loopback up.
    pub fn new(tag: &str) -> NetNs {
        let name = format!("ew-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside it.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// The namespace's inode number (what the probe reports as `netns`).
    pub fn inode(&self) -> u32 {
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("netns file")
            .ino() as u32
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Two namespaces joined by a veth pair: `a` is 10.X.Y.1/24, `b` is 10.X.Y.2/24, with X.Y
/// derived from this process id so that concurrent runs do not collide.
pub struct VethPair {
    /// First namespace.
    pub a: NetNs,
    /// Second namespace.
    pub b: NetNs,
    /// Address of `a`.
    pub addr_a: String,
    /// Address of `b`.
    pub addr_b: String,
}

impl VethPair {
    /// Creates both namespaces and the link.
    pub fn new(tag: &str) -> VethPair {
        let a = NetNs::new(&format!("{tag}a"));
        let b = NetNs::new(&format!("{tag}b"));
        let pid = std::process::id();
        let (x, y) = (100 + (pid / 250) % 100, pid % 250);
        let addr_a = format!("10.{x}.{y}.1");
        let addr_b = format!("10.{x}.{y}.2");
        let (va, vb) = (
            format!("ewa{}", pid % 1_000_000),
            format!("ewb{}", pid % 1_000_000),
        );
        run(
            "ip",
            &[
                "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns",
                &b.name,
            ],
        );
        a.exec(&["ip", "addr", "add", &format!("{addr_a}/24"), "dev", &va]);
        b.exec(&["ip", "addr", "add", &format!("{addr_b}/24"), "dev", &vb]);
        a.exec(&["ip", "link", "set", &va, "up"]);
        b.exec(&["ip", "link", "set", &vb, "up"]);
        VethPair {
            a,
            b,
            addr_a,
            addr_b,
        }
    }
}

/// A pod's container cgroup as the kubelet's systemd cgroup driver and containerd lay it out,
/// named from `tag` (unique among the tests running at once) and the pod's QoS class: the
/// cgroup, and the pod uid and container id the enrichment should find in its path.
pub fn pod_container(tag: u32, qos: &str) -> (Cgroup, String, String) {
    let pod_uid = format!("0c6a7c3e-5f1b-4f5e-9a43-{tag:012x}");
    let container = format!("{tag:016x}").repeat(4);
    let cgroup = Cgroup::new(&[
        format!(
            "ew-{tag}-kubepods-{qos}-pod{}.slice",
            pod_uid.replace('-', "_")
        ),
        format!("cri-containerd-{container}.scope"),
    ]);
    (cgroup, pod_uid, container)
}

/// A nested cgroup v2 path of this test (e.g. a fake pod slice and container scope), removed
/// on drop after moving any process left in it back to the root cgroup.
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    root: PathBuf,
}

impl Cgroup {
    /// Creates `parts` nested under the cgroup v2 mount point.
    pub fn new(parts: &[String]) -> Cgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = edgeward::probe::enrich::cgroup2_mount(&mountinfo)
            .expect("no cgroup v2 hierarchy mounted (needed by the enrichment test)");
        let mut dirs = Vec::new();
        let mut path = root.clone();
        for part in parts {
            path = path.join(part);
            std::fs::create_dir(&path)
                .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
            dirs.push(path.clone());
        }
        Cgroup { dirs, root }
    }

    /// The innermost cgroup's directory.
    pub fn path(&self) -> &Path {
        self.dirs.last().expect("a cgroup")
    }

    /// Moves process `pid` into the innermost cgroup.
    pub fn add(&self, pid: u32) {
        let leaf = self.dirs.last().expect("a cgroup");
        std::fs::write(leaf.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", leaf.display()));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}
