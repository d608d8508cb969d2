//! `edgeward plugin check|run|publish|list` with real plugins compiled from source and a real
//! etcd.

mod support;

use edgeward::status::{PluginState, PluginStatus, StatusHandle};
use serde_json::Value;
use support::{Etcd, EtcdVersion, edgeward, plugins::wasm_path};

#[test]
fn check_says_what_the_plugin_is_or_why_not() {
    let allow = wasm_path("allowlist");
    let allow = allow.to_str().unwrap();
    let (code, out, err) = edgeward(&["plugin", "check", allow, "--config", r#"{"ports":[22]}"#]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("interface: edgeward:policy/policy@0.1.0 (ok)"),
        "{out}"
    );
    assert!(out.contains("init:      ok"), "{out}");
    assert!(out.contains("sha256:    "), "{out}");

    let (code, _, err) = edgeward(&["plugin", "check", allow, "--config", r#"{"cidrs":["x"]}"#]);
    assert_eq!(code, 1);
    assert!(
        err.contains("init rejected its config") && err.contains("\"x\""),
        "{err}"
    );

    let old = wasm_path("old-interface");
    let (code, _, err) = edgeward(&["plugin", "check", old.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("wrong interface") && err.contains("@0.0.9"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let (code, _, err) = edgeward(&["plugin", "check", core.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not a WebAssembly component"), "{err}");

    let (code, _, err) = edgeward(&["plugin", "check", "/nonexistent.wasm"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent.wasm"), "{err}");
    let (code, _, err) = edgeward(&["plugin", "check", allow, "--config", "{nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("--config"), "{err}");
}

#[test]
fn run_prints_one_verdict_per_recorded_event() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    std::fs::write(
        &events,
        concat!(
            r#"{"conn_id": 1, "peer": "10.1.1.1:22"}"#,
            "\n",
            r#"{"conn_id": 2, "peer": "10.1.1.1:443", "comm": "curl"}"#,
            "\n\n",
            r#"{"conn_id": 3, "peer": "[2001:db8::1]:22", "close_reason": "refused"}"#,
            "\n",
        ),
    )
    .unwrap();
    let allow = wasm_path("allowlist");
    let (code, out, err) = edgeward(&[
        "plugin",
        "run",
        allow.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
        "--config",
        r#"{"mode":"deny","cidrs":["10.0.0.0/8"],"ports":[22]}"#,
        "--batch-size",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let verdicts: Vec<(i64, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["conn_id"].as_i64().unwrap(),
                l["verdict"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(verdicts, vec![(1, "drop"), (2, "keep"), (3, "keep")]);
    assert!(err.contains("3 events: 2 kept, 1 dropped"), "{err}");

    let tagger = wasm_path("tagger");
    let (code, out, err) = edgeward(&[
        "plugin",
        "run",
        tagger.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
        "--config",
        r#"{"attributes":{"env":"prod"},"ports":[443]}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    let second: Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
    assert_eq!(second["edits"][0]["set"], "env");
    assert_eq!(second["edits"][0]["value"], "prod");

    std::fs::write(&events, "{\"kind\": \"sideways\"}\n").unwrap();
    let (code, _, err) = edgeward(&[
        "plugin",
        "run",
        allow.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("line 1") && err.contains("sideways"), "{err}");
}

#[test]
fn publish_is_one_guarded_transaction_and_list_shows_the_nodes() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let prefix = "/ew-test";
    let allow = wasm_path("allowlist");
    let allow = allow.to_str().unwrap();
    let publish = |extra: &[&str]| {
        let mut args = vec![
            "plugin",
            "publish",
            allow,
            "--name",
            "deny-ssh",
            "--etcd-endpoints",
            &etcd.client_url,
            "--prefix",
            prefix,
            "--config",
            r#"{"ports":[22]}"#,
            "--order",
            "10",
            "--failure-policy",
            "fail_closed",
        ];
        args.extend_from_slice(extra);
        edgeward(&args)
    };
    let (code, out, err) = publish(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published deny-ssh"), "{out}");

    let manifest: Value = serde_json::from_str(
        etcd.etcdctl(&["get", "/ew-test/plugins/deny-ssh", "--print-value-only"])
            .trim(),
    )
    .unwrap();
    assert_eq!(manifest["failure_policy"], "fail_closed");
    assert_eq!(manifest["order"], 10);
    let sha = manifest["sha256"].as_str().unwrap().to_owned();
    let bytes = std::fs::read(allow).unwrap();
    assert_eq!(sha, support::plugins::sha256(&bytes));
    let chunk = etcd.etcdctl(&[
        "get",
        &format!("/ew-test/blobs/sha256/{sha}/0000"),
        "--print-value-only",
    ]);
    assert!(chunk.len() >= bytes.len(), "chunk missing or short");
    // Manifest and chunk were written by the same transaction: same mod revision.
    let revs = etcd.etcdctl(&["get", "/ew-test/", "--prefix", "-w", "json"]);
    let revs: Value = serde_json::from_str(&revs).unwrap();
    let mods: Vec<i64> = revs["kvs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| kv["mod_revision"].as_i64().unwrap())
        .collect();
    assert_eq!(mods.len(), 2);
    assert_eq!(mods[0], mods[1], "one transaction");

    // A publisher that read an older revision (or expects the key not to exist) writes nothing.
    let before = etcd.revision();
    let (code, _, err) = publish(&["--expect-revision", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("changed while publishing"), "{err}");
    let (code, _, err) = publish(&["--expect-revision", &(mods[0] - 1).to_string()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(etcd.revision(), before, "a refused publish wrote something");
    // With the current revision it goes through.
    let (code, _, err) = publish(&["--expect-revision", &mods[0].to_string()]);
    assert_eq!(code, 0, "{err}");

    // Nodes report what they run under <prefix>/status/<node>.
    for (node, state, node_sha) in [
        ("edge-1", PluginState::Active, sha.clone()),
        ("edge-2", PluginState::Failed, sha.clone()),
        ("edge-3", PluginState::Active, "0".repeat(64)),
    ] {
        let status = StatusHandle::new(node);
        status.update(|s| {
            s.plugins = vec![PluginStatus {
                name: "deny-ssh".into(),
                sha256: node_sha,
                state,
                last_error: None,
            }]
        });
        let doc = serde_json::to_string(&status.snapshot()).unwrap();
        etcd.etcdctl(&["put", &format!("/ew-test/status/{node}"), &doc]);
    }
    let (code, out, err) = edgeward(&[
        "plugin",
        "list",
        "--etcd-endpoints",
        &etcd.client_url,
        "--prefix",
        prefix,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(out.trim()).unwrap();
    let p = &list["plugins"][0];
    assert_eq!(p["name"], "deny-ssh");
    assert_eq!(p["running_on"], serde_json::json!(["edge-1"]));
    assert_eq!(p["not_running_on"].as_array().unwrap().len(), 2);
    let (code, out, _) = edgeward(&[
        "plugin",
        "list",
        "--etcd-endpoints",
        &etcd.client_url,
        "--prefix",
        prefix,
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("deny-ssh") && out.contains("edge-1"), "{out}");
}
