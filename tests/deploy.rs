//! The operator-facing layer, checked with the real tools: kustomize renders every overlay and
//! the Kubernetes schemas accept it; the DaemonSet asks for exactly the documented privileges;
//! the rendered agent configuration is accepted by the real binary; the `.deb` builds,
//! installs and runs; the released binary is static and needs no shared library; the collector
//! configuration and the dashboard name only metrics a live agent exports; the example etcd
//! layout seeds a real etcd that a real agent applies.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{Agent, Etcd, EtcdVersion, deploy::*, free_port, http_get, wait_for};

const OVERLAYS: [&str; 3] = ["plain", "etcd-tls", "with-collector"];

fn overlay_dir(name: &str) -> PathBuf {
    repo().join("deploy/kubernetes/overlays").join(name)
}

fn render(name: &str) -> (String, Vec<Value>) {
    let yaml = kustomize(&overlay_dir(name));
    let docs = yaml_documents(&yaml);
    (yaml, docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}* in the rendered manifests"))
}

fn container<'a>(daemonset: &'a Value, name: &str) -> &'a Value {
    daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in the DaemonSet"))
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The capabilities docs/operators.md documents: `CAP_*` in the first column of the table
/// under its "### Capabilities" heading.
fn documented_capabilities() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(repo().join("docs/operators.md")).expect("docs/operators.md");
    let section = doc
        .split("\n### Capabilities")
        .nth(1)
        .expect("docs/operators.md has a '### Capabilities' section");
    let section = section.split("\n#").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|l| l.strip_prefix('|'))
        .filter_map(|l| l.split('|').next())
        .map(|c| c.trim().trim_matches('`').to_owned())
        .filter(|c| c.starts_with("CAP_"))
        .collect()
}

#[test]
fn every_overlay_renders_and_passes_the_kubernetes_schemas() {
    for overlay in OVERLAYS {
        let (yaml, docs) = render(overlay);
        if let Err(report) = kubernetes_validate(&yaml) {
            panic!("overlay {overlay} fails kubernetes-validate --strict:\n{report}\n{yaml}");
        }
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "Secret",
            "DaemonSet",
            "NetworkPolicy",
        ] {
            assert!(kinds.contains(kind), "overlay {overlay} renders no {kind}");
        }
        // The agent never calls the API server: no RBAC at all.
        for kind in ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"] {
            assert!(
                !kinds.contains(kind),
                "overlay {overlay} grants RBAC ({kind})"
            );
        }
    }
}

#[test]
fn daemonset_is_least_privilege_with_exactly_the_documented_capabilities() {
    let documented = documented_capabilities();
    assert_eq!(
        documented,
        BTreeSet::from(["CAP_BPF".to_owned(), "CAP_PERFMON".to_owned()]),
        "docs/operators.md documents other capabilities than the probe's (docs/probe.md)"
    );
    // The systemd unit bounds the agent to the same set.
    assert_eq!(
        unit_capabilities(),
        documented,
        "the systemd unit's CapabilityBoundingSet"
    );
    for overlay in OVERLAYS {
        let (_, docs) = render(overlay);
        let ds = find(&docs, "DaemonSet", "edgeward");
        let pod = &ds["spec"]["template"]["spec"];
        let ctx = format!("overlay {overlay}");

        // Rolling update, one node at a time by default.
        assert_eq!(
            ds["spec"]["updateStrategy"]["type"], "RollingUpdate",
            "{ctx}"
        );
        assert!(
            !ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].is_null(),
            "{ctx}: rolling update without maxUnavailable"
        );
        // hostPID for /proc/<pid> of host processes; no host network, no host IPC.
        assert_eq!(pod["hostPID"], true, "{ctx}");
        assert_ne!(pod["hostNetwork"], true, "{ctx}");
        assert_ne!(pod["hostIPC"], true, "{ctx}");
        assert_eq!(pod["automountServiceAccountToken"], false, "{ctx}");
        let sa = find(&docs, "ServiceAccount", "edgeward");
        assert_eq!(sa["automountServiceAccountToken"], false, "{ctx}");
        assert!(
            pod["tolerations"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["key"] == "node-role.kubernetes.io/edge")),
            "{ctx}: no toleration for the edge taint"
        );

        for c in pod["containers"].as_array().expect("containers") {
            let name = c["name"].as_str().unwrap_or("?");
            let sc = &c["securityContext"];
            assert_ne!(
                sc["privileged"], true,
                "{ctx}: container {name} is privileged"
            );
            assert_eq!(
                sc["allowPrivilegeEscalation"], false,
                "{ctx}: container {name}"
            );
            assert_eq!(
                sc["readOnlyRootFilesystem"], true,
                "{ctx}: container {name}"
            );
            assert_eq!(
                strings(&sc["capabilities"]["drop"]),
                BTreeSet::from(["ALL".to_owned()]),
                "{ctx}: container {name} must drop ALL capabilities"
            );
            for r in ["requests", "limits"] {
                for res in ["cpu", "memory"] {
                    assert!(
                        c["resources"][r][res].is_string(),
                        "{ctx}: container {name} has no {r}.{res}"
                    );
                }
            }
            assert!(
                !c["livenessProbe"].is_null() && !c["readinessProbe"].is_null(),
                "{ctx}: container {name} lacks probes"
            );
        }

        let agent = container(ds, "edgeward");
        let added: BTreeSet<String> = strings(&agent["securityContext"]["capabilities"]["add"])
            .into_iter()
            .map(|c| format!("CAP_{c}"))
            .collect();
        assert_eq!(
            added, documented,
            "{ctx}: the agent's capabilities differ from docs/operators.md"
        );
        // The collector sidecar gets no capability and runs as non-root.
        for c in pod["containers"].as_array().expect("containers") {
            if c["name"] != "edgeward" {
                assert!(
                    c["securityContext"]["capabilities"]["add"].is_null(),
                    "{ctx}: {} adds capabilities",
                    c["name"]
                );
                assert_eq!(c["securityContext"]["runAsNonRoot"], true, "{ctx}");
            }
        }

        assert_eq!(
            agent["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{ctx}"
        );
        assert_eq!(
            agent["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{ctx}"
        );
        let env: BTreeMap<&str, &Value> = agent["env"]
            .as_array()
            .expect("env")
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?, e)))
            .collect();
        assert_eq!(
            env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
            "{ctx}: NODE_NAME must come from the Downward API"
        );
        let secret = env["EDGEWARD_ETCD_ENDPOINTS"]["valueFrom"]["secretKeyRef"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{ctx}: etcd endpoints must come from a Secret"));
        assert!(
            docs.iter()
                .any(|d| d["kind"] == "Secret" && d["metadata"]["name"] == secret),
            "{ctx}: the endpoints Secret {secret} is not rendered"
        );

        // Host paths: exactly these, read-only except the cache.
        let volumes: BTreeMap<&str, &str> = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
            .collect();
        assert_eq!(
            volumes.values().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([
                "/sys/kernel/btf",
                "/sys/kernel/tracing",
                "/sys/fs/cgroup",
                "/var/lib/edgeward",
            ]),
            "{ctx}: host paths"
        );
        for m in agent["volumeMounts"].as_array().expect("mounts") {
            let Some(host) = m["name"].as_str().and_then(|n| volumes.get(n)) else {
                continue;
            };
            let writable = *host == "/var/lib/edgeward";
            assert_eq!(
                m["readOnly"] == true,
                !writable,
                "{ctx}: host path {host} mounted {}",
                if writable { "read-only" } else { "writable" }
            );
        }
    }
}

/// Starts `binary` with `config` and `env`, waits for `/readyz`, returns the status. With
/// `probe`, the agent loads its eBPF programs and the status is taken once the probe has left
/// `starting`; without, it runs with `--no-ebpf` (only the configuration is under test).
fn run_with_config(binary: &Path, config: &Path, env: &[(&str, &str)], probe: bool) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let admin = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("agent.log")).expect("log");
    let mut child: Child = Command::new(binary)
        .arg("run")
        .arg(format!("--config={}", config.display()))
        .arg(format!("--admin-addr={admin}"))
        .arg(format!(
            "--cache-dir={}",
            dir.path().join("cache").display()
        ))
        .arg("--node-name=deploy-test")
        .args((!probe).then_some("--no-ebpf"))
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
    let log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok((200, _)) = http_get(&format!("http://{admin}/readyz")) {
            let (_, body) = http_get(&format!("http://{admin}/status")).expect("status");
            let status = serde_json::from_str::<Value>(&body).expect("status JSON");
            if !probe || status["probe"]["state"] != "starting" {
                break status;
            }
        }
        if let Ok(Some(code)) = child.try_wait() {
            panic!(
                "{} rejected {} (exit {code}):\n{}",
                binary.display(),
                config.display(),
                log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} with {} never ready:\n{}",
            binary.display(),
            config.display(),
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    status
}

#[test]
fn the_agent_accepts_every_rendered_configuration() {
    for overlay in OVERLAYS {
        let (_, docs) = render(overlay);
        let cm = find(&docs, "ConfigMap", "edgeward-config");
        let toml = cm["data"]["edgeward.toml"]
            .as_str()
            .unwrap_or_else(|| panic!("overlay {overlay}: no edgeward.toml in the ConfigMap"));
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("edgeward.toml");
        std::fs::write(&file, toml).expect("write config");
        // The literal EDGEWARD_* values of the DaemonSet go through the real loader too.
        let ds = find(&docs, "DaemonSet", "edgeward");
        let agent = container(ds, "edgeward");
        let literal: Vec<(String, String)> = agent["env"]
            .as_array()
            .expect("env")
            .iter()
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_owned(),
                    e["value"].as_str()?.to_owned(),
                ))
            })
            .filter(|(k, _)| k.starts_with("EDGEWARD_"))
            .collect();
        let env: Vec<(&str, &str)> = literal
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let status = run_with_config(
            Path::new(env!("CARGO_BIN_EXE_edgeward")),
            &file,
            &env,
            false,
        );
        assert_eq!(status["ready"], true, "overlay {overlay}: {status}");

        // TLS files named in the config are the ones the Secret mount provides.
        if overlay == "etcd-tls" {
            let mount = agent["volumeMounts"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["name"] == "etcd-tls"))
                .expect("etcd-tls overlay mounts the TLS Secret");
            let at = mount["mountPath"].as_str().expect("mountPath");
            for f in ["ca.crt", "tls.crt", "tls.key"] {
                assert!(
                    toml.contains(&format!("\"{at}/{f}\"")),
                    "etcd-tls config does not name {at}/{f}:\n{toml}"
                );
            }
        }
    }
}

fn collector_config() -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/collector/collector.yaml"))
        .expect("deploy/collector/collector.yaml");
    yaml_documents(&text)
        .into_iter()
        .next()
        .expect("one YAML document")
}

#[test]
fn collector_config_wires_edgeward_in_and_every_pipeline_component_exists() {
    let config = collector_config();
    for (kind, pipelines) in config["service"]["pipelines"]
        .as_object()
        .expect("service.pipelines")
    {
        for section in ["receivers", "processors", "exporters"] {
            for component in strings(&pipelines[section]) {
                assert!(
                    config[section].get(&component).is_some(),
                    "pipeline {kind} uses {section}.{component}, which is not defined"
                );
            }
        }
    }
    for kind in ["traces", "metrics"] {
        assert!(
            strings(&config["service"]["pipelines"][kind]["receivers"]).contains("otlp"),
            "the {kind} pipeline does not receive OTLP"
        );
    }
    // It scrapes the agent where the agent listens by default, and receives OTLP where the
    // sidecar overlay points the agent.
    let target = &config["receivers"]["prometheus"]["config"]["scrape_configs"][0]["static_configs"]
        [0]["targets"][0];
    assert_eq!(
        target, "127.0.0.1:9464",
        "scrape target vs admin.addr default"
    );
    let (_, docs) = render("with-collector");
    let agent = container(find(&docs, "DaemonSet", "edgeward"), "edgeward");
    let otlp = agent["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "EDGEWARD_OTLP_ENDPOINT"))
        .expect("with-collector sets EDGEWARD_OTLP_ENDPOINT");
    let grpc = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
        .as_str()
        .expect("otlp grpc endpoint");
    assert_eq!(otlp["value"], format!("http://{grpc}"));
}

#[test]
fn otlp_capture_reads_metric_names_from_protobuf() {
    // ExportMetricsServiceRequest{resource_metrics{scope_metrics{metrics{name:"a.b"}}}},
    // encoded by hand: the capture must find the name, or the metric check below proves nothing.
    let metric = [&[0x0a, 3][..], b"a.b"].concat();
    let scope = [&[0x12, metric.len() as u8][..], &metric].concat();
    let resource = [&[0x12, scope.len() as u8][..], &scope].concat();
    let request = [&[0x0a, resource.len() as u8][..], &resource].concat();
    let mut names = BTreeSet::new();
    metric_names_from_request(&request, &mut names);
    assert_eq!(names, BTreeSet::from(["a.b".to_owned()]));
    assert_eq!(
        metric_base("edgeward_tcp_rtt_seconds_bucket"),
        "edgeward_tcp_rtt"
    );
    assert_eq!(
        metric_base("edgeward.tcp.bytes_sent"),
        "edgeward_tcp_bytes_sent"
    );
    assert_eq!(
        metric_base("edgeward_tcp_bytes_sent_bytes_total"),
        "edgeward_tcp_bytes_sent"
    );
}

#[test]
fn collector_config_and_dashboard_name_only_metrics_the_agent_exports() {
    // What they name.
    let dashboard_text =
        std::fs::read_to_string(repo().join("deploy/collector/edgeward-dashboard.json"))
            .expect("dashboard");
    let dashboard: Value = serde_json::from_str(&dashboard_text).expect("dashboard is JSON");
    assert!(
        dashboard["panels"].as_array().is_some_and(|p| p.len() > 5),
        "dashboard has no panels"
    );
    let mut named = BTreeSet::new();
    let mut texts = Vec::new();
    json_strings(&dashboard, &mut texts);
    json_strings(&collector_config(), &mut texts);
    for t in &texts {
        named.extend(edgeward_identifiers(t));
    }
    assert!(!named.is_empty(), "the dashboard names no edgeward metric");

    // What a live agent exports: its /metrics page, and its OTLP metrics captured by a real
    // OTLP/HTTP receiver. The probe runs (we are root) so connection metrics have data.
    let capture = OtlpCapture::start();
    let otlp = format!("http://{}", capture.addr);
    // A plugin in the chain, so that the per-plugin series exist.
    let state = tempfile::tempdir().expect("temp dir");
    let module = support::plugins::wasm("tagger");
    let sha = support::plugins::sha256(&module);
    std::fs::create_dir_all(state.path().join("plugins")).unwrap();
    std::fs::create_dir_all(state.path().join(format!("blobs/sha256/{sha}"))).unwrap();
    std::fs::write(
        state.path().join(format!("blobs/sha256/{sha}/0000")),
        &module,
    )
    .unwrap();
    std::fs::write(
        state.path().join("plugins/tagger.json"),
        format!(
            r#"{{"name": "tagger", "sha256": "{sha}", "module": {{"etcd": {{"size": {}, "chunks": 1}}}},
                "config": {{"attributes": {{"deploy.test": true}}}}}}"#,
            module.len()
        ),
    )
    .unwrap();
    let mut agent = Agent::spawn(&[
        "--otlp-endpoint",
        &otlp,
        "--otlp-protocol",
        "http",
        "--config-dir",
        state.path().to_str().unwrap(),
    ]);
    agent.wait_status(Duration::from_secs(60), "the plugin to be active", |s| {
        s["plugins"][0]["state"] == "active"
    });
    agent.wait_ready(Duration::from_secs(20));
    // Some TCP connections for the probe to see.
    for _ in 0..20 {
        let _ = TcpStream::connect(agent.admin);
    }
    let (code, metrics_page) = agent.get("/metrics");
    assert_eq!(code, 200);
    let scraped = prometheus_names(&metrics_page);
    // Metrics are exported every 10 s by default; give it one interval, then flush by stopping.
    let deadline = Instant::now() + Duration::from_secs(12);
    while capture.metric_names().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.terminate(Duration::from_secs(15));
    let exported_otlp = capture.metric_names();

    let mut known: BTreeMap<String, String> = BTreeMap::new();
    for n in &scraped {
        known.insert(metric_base(n), format!("/metrics {n}"));
    }
    for n in &exported_otlp {
        known.insert(metric_base(n), format!("OTLP {n}"));
    }
    let missing: Vec<&String> = named
        .iter()
        .filter(|n| !known.contains_key(&metric_base(n)))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard or collector config names metrics the agent does not export: {missing:?}\n\
         /metrics has: {scraped:?}\nOTLP export had: {exported_otlp:?} (requests: {:?})",
        capture.requests()
    );
}

#[test]
fn released_binary_is_static_and_the_package_depends_on_nothing() {
    // The reader sees dependencies where there are some: the debug build these tests run is a
    // dynamic glibc executable.
    let dynamic = elf_linking(Path::new(env!("CARGO_BIN_EXE_edgeward")));
    assert!(
        dynamic
            .interpreter
            .as_deref()
            .is_some_and(|i| i.contains("ld-linux"))
            && dynamic.needed.iter().any(|n| n.starts_with("libc.so")),
        "the ELF reader misses the debug build's dynamic loader or libc: {dynamic:?}"
    );

    // What ships is the binary inside the package (cargo-deb strips it), so check that one as
    // well as the build output.
    let (deb, built) = deb();
    let unpacked = tempfile::tempdir().expect("temp dir");
    let out = run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(unpacked.path()),
        "dpkg-deb",
    );
    assert!(
        out.status.success(),
        "dpkg-deb -x {}: {out:?}",
        deb.display()
    );
    let shipped = unpacked.path().join("usr/bin/edgeward");
    for binary in [built.as_path(), shipped.as_path()] {
        let linking = elf_linking(binary);
        assert!(linking.loads > 0, "{}: no PT_LOAD", binary.display());
        assert!(
            linking.interpreter.is_none() && linking.needed.is_empty(),
            "{} is not static: {linking:?}",
            binary.display()
        );
        // glibc's ldd, a second reader, agrees.
        let out = run(Command::new("ldd").arg(binary), "ldd");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("statically linked") || text.contains("not a dynamic executable"),
            "ldd {}: {text}",
            binary.display()
        );
    }

    // So the package needs no library package either.
    let out = run(
        Command::new("dpkg-deb").arg("-f").arg(deb).arg("Depends"),
        "dpkg-deb",
    );
    assert!(
        out.status.success(),
        "dpkg-deb -f {}: {out:?}",
        deb.display()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "",
        "the .deb's Depends"
    );
}

#[test]
fn deb_builds_installs_and_runs_standalone() {
    let (deb, _) = deb();
    let installed = InstalledDeb::install(deb, "edgeward");
    let files = installed.files();
    for f in [
        "/usr/bin/edgeward",
        "/etc/edgeward/edgeward.toml",
        "/etc/default/edgeward",
        "/usr/share/doc/edgeward/operators.md",
    ] {
        assert!(
            files.iter().any(|x| x == f),
            "the .deb does not install {f}: {files:?}"
        );
    }
    let unit = files
        .iter()
        .find(|f| f.ends_with("/systemd/system/edgeward.service"))
        .unwrap_or_else(|| panic!("the .deb installs no systemd unit: {files:?}"));

    let out = run(
        Command::new("/usr/bin/edgeward").arg("--version"),
        "edgeward",
    );
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "edgeward --version: {out:?}");
    assert_eq!(
        version.trim(),
        format!("edgeward {}", env!("CARGO_PKG_VERSION")),
        "installed binary's version"
    );

    // The unit is valid for systemd (ExecStart points at the installed binary).
    let out = run(
        Command::new("systemd-analyze").arg("verify").arg(unit),
        "systemd-analyze",
    );
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify {unit}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The installed binary with the installed configuration runs standalone from the
    // installed local directory (the admin port and cache moved so tests can run side by side),
    // and the static build loads and attaches its eBPF programs.
    let status = run_with_config(
        Path::new("/usr/bin/edgeward"),
        Path::new("/etc/edgeward/edgeward.toml"),
        &[],
        true,
    );
    assert_eq!(status["config"]["source"], "file", "{status}");
    assert_eq!(status["probe"]["state"], "running", "{status}");
    drop(installed);
    assert!(
        !Path::new("/usr/bin/edgeward").exists(),
        "dpkg --purge left /usr/bin/edgeward behind"
    );
}

#[test]
fn dockerfile_is_multi_stage_with_a_minimal_runtime_and_the_setup_toolchain() {
    let text =
        std::fs::read_to_string(repo().join("deploy/docker/Dockerfile")).expect("Dockerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "not multi-stage: {froms:?}");
    // The static binary needs no C library, so the runtime is distroless/static: no libc, no
    // shell, no package manager.
    assert!(
        froms
            .last()
            .is_some_and(|f| f.contains("gcr.io/distroless/static")),
        "the runtime stage is not distroless/static: {froms:?}"
    );
    // The binary is the one the .deb ships: the same target, with musl-gcc for the C of ring
    // and wasmtime.
    assert!(
        text.contains(&format!(
            "cargo build --release --locked -p edgeward --target {RELEASE_TARGET}"
        )),
        "the image does not build for {RELEASE_TARGET}"
    );
    assert!(
        text.contains(&format!("target/{RELEASE_TARGET}/release/edgeward")),
        "the image does not install the {RELEASE_TARGET} binary"
    );
    assert!(
        text.contains("musl-tools"),
        "no musl-tools in the build stage"
    );
    assert!(text.contains("COPY --from=build"));
    assert!(
        text.lines().any(|l| l.starts_with("USER ")),
        "no explicit USER"
    );
    // The same bpf-linker as scripts/setup.sh.
    let setup = std::fs::read_to_string(repo().join("scripts/setup.sh")).expect("setup.sh");
    let version = |t: &str| {
        t.lines()
            .find_map(|l| {
                l.split_once("BPF_LINKER_VERSION=")
                    .map(|(_, v)| v.trim().to_owned())
            })
            .expect("BPF_LINKER_VERSION")
    };
    assert_eq!(
        version(&text),
        version(&setup),
        "bpf-linker versions differ"
    );
    // scripts/setup.sh installs the target the tests build the .deb for.
    assert!(
        setup
            .lines()
            .any(|l| l.trim() == format!("RELEASE_TARGET={RELEASE_TARGET}")),
        "scripts/setup.sh does not install {RELEASE_TARGET}"
    );
}

#[test]
fn example_etcd_layout_seeds_an_etcd_that_the_agent_applies() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let dir = tempfile::tempdir().expect("temp dir");
    // A module of 2.5 MiB (three chunks) with bytes that a text path would mangle.
    let module: Vec<u8> = (0..(5 * 512 * 1024 + 7))
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    let module_file = dir.path().join("tagger.wasm");
    std::fs::write(&module_file, &module).expect("module");
    let etcdctl = etcdctl_3_5();
    let out = run(
        Command::new(repo().join("deploy/etcd/seed.sh"))
            .env("ETCDCTL", &etcdctl)
            .args(["--endpoints", &etcd.client_url, "--module"])
            .arg(format!("tagger={}", module_file.display())),
        "deploy/etcd/seed.sh",
    );
    assert!(
        out.status.success(),
        "seed.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut agent = Agent::spawn_in(
        dir.path(),
        "edge-0001",
        &["--etcd-endpoints", &etcd.client_url, "--no-ebpf"],
    );
    let status = agent.wait_status(Duration::from_secs(20), "config from etcd", |s| {
        s["config"]["source"] == "etcd"
    });
    assert_eq!(
        status["config"]["rejected"],
        serde_json::json!([]),
        "the example documents are rejected"
    );
    // Every seeded key reached the node, and the module chunks hold the file's bytes.
    let inspect = wait_for(Duration::from_secs(10), "the cache write", || {
        agent.try_cache_inspect().filter(|c| {
            c["keys"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k["key"] == "/edgeward/v1/plugins/tagger"))
        })
    });
    let keys: BTreeSet<String> = inspect["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["key"].as_str().map(str::to_owned))
        .collect();
    use sha2::Digest as _;
    let sha = format!("{:x}", sha2::Sha256::digest(&module));
    for k in [
        "/edgeward/v1/config/global".to_owned(),
        "/edgeward/v1/config/nodes/edge-0001".to_owned(),
        format!("/edgeward/v1/blobs/sha256/{sha}/0000"),
        format!("/edgeward/v1/blobs/sha256/{sha}/0002"),
    ] {
        assert!(keys.contains(&k), "{k} not applied; keys: {keys:?}");
    }
    let manifest: Value = serde_json::from_str(
        etcd.etcdctl(&["get", "--print-value-only", "/edgeward/v1/plugins/tagger"])
            .trim(),
    )
    .expect("manifest JSON");
    assert_eq!(manifest["sha256"], sha);
    assert_eq!(manifest["module"]["etcd"]["size"], module.len());
    assert_eq!(manifest["module"]["etcd"]["chunks"], 3);
    agent.terminate(Duration::from_secs(15));
}
