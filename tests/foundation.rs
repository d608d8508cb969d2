//! The agent's skeleton against real processes: etcd, the `edgeward` binary, the admin HTTP
//! server, signals and the kernel's BPF.

mod support;

use std::{io::Write as _, time::Duration};

use support::{Agent, Etcd, EtcdVersion, edgeward};

#[test]
fn agent_against_etcd_serves_health_ready_and_status() {
    for version in EtcdVersion::ALL {
        let etcd = Etcd::start(version);
        etcd.etcdctl(&["put", "/edgeward/v1/config/global", r#"{"example": true}"#]);
        etcd.etcdctl(&["put", "/outside/prefix", "x"]);
        let revision = etcd.revision();

        let agent = Agent::spawn(&["--etcd-endpoints", &etcd.client_url]);
        agent.wait_ready(Duration::from_secs(20));

        assert_eq!(agent.get("/healthz"), (200, "ok\n".to_owned()));
        assert_eq!(agent.get("/readyz").0, 200);
        let status = agent.status();
        assert_eq!(status["node"], "test-node", "{status}");
        assert_eq!(status["ready"], true, "{status}");
        assert_eq!(status["config"]["source"], "etcd", "{status}");
        assert_eq!(
            status["config"]["revision"], revision,
            "{version:?}: {status}"
        );
        assert!(status["plugins"].is_array(), "{status}");
        // CI runs as root on a kernel with BPF: the probe must be running, not degraded.
        assert_eq!(
            status["probe"]["state"],
            "running",
            "the eBPF probe did not start (this suite needs root and BPF): {status}\n{}",
            agent.log()
        );
        let (code, metrics) = agent.get("/metrics");
        assert_eq!(code, 200);
        assert!(
            metrics.contains("edgeward_build_info{version="),
            "{metrics}"
        );
    }
}

#[test]
fn not_ready_until_etcd_answers_then_ready() {
    // Reserve a port, point the agent at it, then start etcd there.
    let mut etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.kill();
    let agent = Agent::spawn(&["--etcd-endpoints", &etcd.client_url, "--no-ebpf"]);
    std::thread::sleep(Duration::from_millis(500));
    let (code, body) = agent.get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("not ready: "), "{body}");
    assert_eq!(agent.get("/healthz").0, 200);
    let status = agent.status();
    assert_eq!(status["ready"], false, "{status}");
    assert!(status["config"]["source"].is_null(), "{status}");
    assert_eq!(status["probe"]["state"], "off", "{status}");

    etcd.restart();
    agent.wait_ready(Duration::from_secs(30));
    assert_eq!(agent.status()["config"]["source"], "etcd");
}

#[test]
fn sigterm_exits_zero_within_the_deadline() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let mut agent = Agent::spawn(&["--etcd-endpoints", &etcd.client_url]);
    agent.wait_ready(Duration::from_secs(20));
    // Default shutdown_timeout is 10 s; a clean agent needs far less.
    let (status, took) = agent.terminate(Duration::from_secs(12));
    assert!(status.success(), "exit status {status}:\n{}", agent.log());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(agent.log().contains("edgeward stopped"), "{}", agent.log());
}

#[test]
fn standalone_without_a_directory_runs_on_defaults() {
    let agent = Agent::spawn(&["--no-ebpf"]);
    agent.wait_ready(Duration::from_secs(10));
    let status = agent.status();
    assert_eq!(status["config"]["source"], "default", "{status}");
    assert_eq!(status["config"]["revision"], 0, "{status}");
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn bad_config_file_exits_with_one_line_naming_key_and_file() {
    let cases = [
        ("[admin]\naddress = \"127.0.0.1:1\"\n", "admin.address"),
        ("[probe]\nenabled = \"yes\"\n", "probe.enabled"),
        ("shutdown_timeout = 5\n", "shutdown_timeout"),
    ];
    for (text, key) in cases {
        let file = config_file(text);
        let path = file.path().to_str().unwrap();
        let (code, stdout, stderr) = edgeward(&["run", "--config", path]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stdout.is_empty(), "{stdout}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "names {key}: {stderr}");
        assert!(stderr.contains(path), "names the file: {stderr}");
    }
}

#[test]
fn bad_environment_variable_is_named() {
    let out = std::process::Command::new(support::edgeward_bin())
        .args(["run", "--no-ebpf"])
        .env("EDGEWARD_ETCD_ENDPOINTS", "etcd:2379")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("etcd.endpoints") && stderr.contains("etcd:2379"),
        "{stderr}"
    );
}

#[test]
fn version_help_and_bad_input_to_commands() {
    let (code, stdout, _) = edgeward(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("edgeward "), "{stdout}");
    for cmd in [&["run"][..], &["plugin"], &["status"], &["cache"]] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let (code, stdout, stderr) = edgeward(&args);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        assert!(stdout.contains("Usage: edgeward"), "{args:?}: {stdout}");
    }
    // Bad input: a non-zero exit and one line saying why, never a panic.
    let (code, _, stderr) = edgeward(&["cache", "inspect", "--cache-dir", "/nonexistent/edgeward"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/edgeward"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn print_config_shows_the_effective_configuration_as_toml() {
    let (code, defaults, stderr) = edgeward(&["run", "--print-config"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        defaults.contains("[admin]") && defaults.contains("addr = \"127.0.0.1:9464\""),
        "{defaults}"
    );
    // What it prints is a valid config file that loads to the same thing.
    let file = config_file(&defaults);
    let (code, again, stderr) = edgeward(&[
        "run",
        "--print-config",
        "--config",
        file.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(again, defaults);
    let (_, overridden, _) =
        edgeward(&["run", "--print-config", "--prefix", "/other", "--no-ebpf"]);
    assert!(overridden.contains("prefix = \"/other\""), "{overridden}");
    assert!(overridden.contains("enabled = false"), "{overridden}");
}
