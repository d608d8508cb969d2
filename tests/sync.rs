//! Config sync against real etcd processes (3.5 and 3.4): list + watch, resume, relist after
//! compaction, failover, the offline cache, TLS and auth, node status, standalone mode.

mod support;

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use edgeward::{
    status::{ConfigSource, StatusHandle},
    sync::{self, Applier, DesiredState, EtcdConfig, SyncMetrics},
};
use serde_json::{Value, json};
use support::{Agent, Etcd, EtcdCluster, EtcdTls, EtcdVersion, edgeward, tls::TestPki, wait_for};

const PREFIX: &str = "/edgeward/v1";

fn global() -> String {
    format!("{PREFIX}/config/global")
}

fn node_key(node: &str) -> String {
    format!("{PREFIX}/config/nodes/{node}")
}

/// The keys of the synced range (everything under the prefix but `status/`) in etcd.
fn synced_keys(etcd: &Etcd) -> Vec<(String, i64)> {
    etcd.keys(&format!("{PREFIX}/"))
        .into_iter()
        .filter(|(k, _)| !k.starts_with(&format!("{PREFIX}/status/")))
        .collect()
}

/// The keys in the agent's cache, once it stands at `revision` or later (see
/// [`wait_revision`]).
fn cached_keys_at(agent: &Agent, revision: i64) -> Vec<(String, i64)> {
    let inspect = wait_for(
        Duration::from_secs(20),
        "the cache to reach the revision",
        || {
            let i = agent.try_cache_inspect()?;
            (i["revision"].as_i64() >= Some(revision)).then_some(i)
        },
    );
    assert_eq!(inspect["checksum"], "ok", "{inspect}");
    inspect["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key"].as_str().unwrap().to_owned(),
                k["mod_revision"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Waits until the agent stands at `revision` or later: the node's own status writes move
/// etcd's revision too, and a list stands at the store's revision.
fn wait_revision(agent: &Agent, revision: i64) -> Value {
    agent.wait_status(
        Duration::from_secs(20),
        "the agent to apply the revision",
        |s| s["config"]["revision"].as_i64() >= Some(revision),
    )
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// What the merged node config was in etcd at `revision`.
async fn expected_node_config(
    client: &mut etcd_client::Client,
    node: &str,
    revision: i64,
) -> Value {
    let mut merged = json!({});
    for key in [global(), node_key(node)] {
        let got = client
            .get(
                key,
                Some(etcd_client::GetOptions::new().with_revision(revision)),
            )
            .await
            .unwrap();
        if let Some(kv) = got.kvs().first() {
            let doc: Value = serde_json::from_slice(kv.value()).unwrap();
            sync::state::merge(&mut merged, &doc);
        }
    }
    merged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_apply_in_order_and_match_etcd_at_every_revision() {
    for version in EtcdVersion::ALL {
        let etcd = Etcd::start(version);
        let config = EtcdConfig {
            endpoints: vec![etcd.client_url.clone()],
            ..EtcdConfig::default()
        };
        let (tx, mut rx) =
            tokio::sync::watch::channel(Arc::new(DesiredState::empty(ConfigSource::Default)));
        let mut applied = tx.subscribe();
        let status = StatusHandle::new("n1");
        let applier = Applier::new(PREFIX, "n1", tx, status.clone(), SyncMetrics::default());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(sync::etcd::run(
            config,
            applier,
            status,
            SyncMetrics::default(),
            shutdown.clone(),
        ));

        // Record every state the agent publishes.
        let observer = tokio::spawn(async move {
            let mut seen: Vec<(i64, Value)> = Vec::new();
            while rx.changed().await.is_ok() {
                let state = rx.borrow_and_update().clone();
                seen.push((state.revision, state.node_config.clone()));
            }
            seen
        });

        let mut client = etcd_client::Client::connect([etcd.client_url.as_str()], None)
            .await
            .unwrap();
        let mut last = 0;
        for i in 0..60 {
            last = client
                .put(
                    global(),
                    json!({"v": i, "shared": "global"}).to_string(),
                    None,
                )
                .await
                .unwrap()
                .header()
                .unwrap()
                .revision();
            if i % 7 == 0 {
                client
                    .put(
                        node_key("n1"),
                        json!({"n": i, "shared": "node"}).to_string(),
                        None,
                    )
                    .await
                    .unwrap();
            }
            if i == 30 {
                client.delete(node_key("n1"), None).await.unwrap();
            }
            if i % 10 == 0 {
                // Outside the synced range or for another node: never part of n1's state.
                client
                    .put("/edgeward/v10/config/global", "{\"v\": -1}", None)
                    .await
                    .unwrap();
                client
                    .put(format!("{PREFIX}/status/n1"), "{}", None)
                    .await
                    .unwrap();
                client
                    .put(node_key("n2"), "{\"v\": -2}", None)
                    .await
                    .unwrap();
                last = client
                    .put("/other", "x", None)
                    .await
                    .unwrap()
                    .header()
                    .unwrap()
                    .revision();
            }
        }
        let final_rev = last;
        tokio::time::timeout(
            Duration::from_secs(20),
            applied.wait_for(|state| state.revision >= final_rev),
        )
        .await
        .expect("the final revision is applied within 20 s")
        .unwrap();
        shutdown.cancel();
        task.await.unwrap();
        let seen = observer.await.unwrap();

        assert!(!seen.is_empty(), "{version:?}: nothing applied");
        assert!(
            seen.windows(2).all(|w| w[0].0 <= w[1].0),
            "{version:?}: revisions went backwards: {:?}",
            seen.iter().map(|s| s.0).collect::<Vec<_>>()
        );
        for (revision, node_config) in &seen {
            let expected = expected_node_config(&mut client, "n1", *revision).await;
            assert_eq!(node_config, &expected, "{version:?} at revision {revision}");
        }
        let (final_seen, final_config) = seen.last().unwrap();
        assert_eq!(*final_seen, final_rev, "{version:?}");
        assert_eq!(final_config["v"], 59, "{version:?}");
        // Deleted at i = 30, written again at 35, 42, 49 and 56.
        assert_eq!(final_config["n"], 56, "{version:?}");
        assert_eq!(final_config["shared"], "node", "{version:?}");
    }
}

#[test]
fn cache_holds_exactly_the_synced_range() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put(&global(), r#"{"a": 1}"#);
    etcd.put(&node_key("test-node"), r#"{"b": 2}"#);
    etcd.put("/edgeward/v10/config/global", "{}");
    etcd.put("/edgeward/v", "{}");
    let agent = Agent::spawn(&["--etcd-endpoints", &etcd.client_url, "--no-ebpf"]);
    agent.wait_ready(Duration::from_secs(20));
    etcd.put(&global(), r#"{"a": 3}"#);
    etcd.delete(&node_key("test-node"));
    let revision = etcd.put(&format!("{PREFIX}/plugins/none"), "not a manifest");
    wait_revision(&agent, revision);
    assert_eq!(cached_keys_at(&agent, revision), synced_keys(&etcd));
    // The agent's own status key is outside the synced range.
    let keys = synced_keys(&etcd);
    assert!(
        keys.iter()
            .all(|(k, _)| k.starts_with(&format!("{PREFIX}/")))
    );
}

#[test]
fn converges_after_etcd_restart_with_changes_made_while_it_was_down() {
    let mut cluster = EtcdCluster::start(EtcdVersion::V3_5, 3);
    let m0 = cluster.members[0].client_url.clone();
    cluster.members[0].put(&global(), r#"{"v": 1}"#);
    cluster.members[0].put(
        &format!("{PREFIX}/config/nodes/test-node"),
        r#"{"gone": true}"#,
    );
    let agent = Agent::spawn(&["--etcd-endpoints", &m0, "--no-ebpf"]);
    agent.wait_ready(Duration::from_secs(20));

    cluster.members[0].kill();
    agent.wait_status(Duration::from_secs(20), "the agent to notice", |s| {
        !s["config"]["last_error"].is_null()
    });
    assert_eq!(
        agent.status()["ready"],
        true,
        "serves the last state while etcd is down"
    );
    let other = cluster.other_than(0);
    other.put(&global(), r#"{"v": 2}"#);
    other.delete(&format!("{PREFIX}/config/nodes/test-node"));
    other.put(&format!("{PREFIX}/config/nodes/other"), "{}");

    cluster.members[0].restart();
    let revision = cluster.members[0].put(&global(), r#"{"v": 3}"#);
    let status = wait_revision(&agent, revision);
    assert_eq!(status["config"]["source"], "etcd");
    assert!(status["config"]["last_error"].is_null(), "{status}");
    assert_eq!(
        cached_keys_at(&agent, revision),
        synced_keys(&cluster.members[0])
    );
}

#[test]
fn compaction_while_disconnected_relists_and_converges_with_deletes() {
    for version in EtcdVersion::ALL {
        let mut cluster = EtcdCluster::start(version, 3);
        let m0 = cluster.members[0].client_url.clone();
        for i in 0..5 {
            cluster.members[0].put(&format!("{PREFIX}/config/nodes/n{i}"), "{}");
        }
        cluster.members[0].put(&global(), r#"{"v": 1}"#);
        let agent = Agent::spawn(&["--etcd-endpoints", &m0, "--no-ebpf"]);
        agent.wait_ready(Duration::from_secs(20));
        let before = agent.status()["config"]["revision"].as_i64().unwrap();

        cluster.members[0].kill();
        let other = cluster.other_than(0);
        for i in 0..5 {
            other.delete(&format!("{PREFIX}/config/nodes/n{i}"));
        }
        other.put(&global(), r#"{"v": 2}"#);
        let head = other.put(&format!("{PREFIX}/config/nodes/new"), "{}");
        other.etcdctl_retry(&["compact", &head.to_string()]);
        assert!(head > before + 1);

        cluster.members[0].restart();
        wait_revision(&agent, head);
        assert_eq!(
            cached_keys_at(&agent, head),
            synced_keys(&cluster.members[0]),
            "{version:?}"
        );
        assert!(
            agent.log().contains("relisting"),
            "{version:?}: {}",
            agent.log()
        );
        let (_, metrics) = agent.get("/metrics");
        assert!(
            metrics.contains("edgeward_sync_relists_total 2"),
            "{version:?}: {metrics}"
        );
    }
}

#[test]
fn three_member_cluster_leader_failover_misses_nothing() {
    let mut cluster = EtcdCluster::start(EtcdVersion::V3_5, 3);
    let agent = Agent::spawn(&["--etcd-endpoints", &cluster.endpoints(), "--no-ebpf"]);
    agent.wait_ready(Duration::from_secs(20));
    let mut last = 0;
    for i in 0..40 {
        if i == 15 {
            let leader = cluster.leader();
            cluster.members[leader].kill();
        }
        let writer = cluster.members.iter().find(|m| m.is_running()).unwrap();
        last = writer.put(
            &format!("{PREFIX}/config/nodes/k{i:02}"),
            &format!("{{\"i\": {i}}}"),
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let writer = cluster.members.iter().find(|m| m.is_running()).unwrap();
    wait_revision(&agent, last);
    let keys = cached_keys_at(&agent, last);
    assert_eq!(keys, synced_keys(writer));
    assert_eq!(keys.len(), 40);
}

#[test]
fn starts_from_a_warm_cache_while_etcd_is_down_then_converges() {
    let root = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put(&global(), r#"{"v": 1}"#);
    let revision = etcd.put(&node_key("n"), r#"{"w": 1}"#);
    let mut agent = Agent::spawn_in(
        root.path(),
        "n",
        &["--etcd-endpoints", &etcd.client_url, "--no-ebpf"],
    );
    wait_revision(&agent, revision);
    cached_keys_at(&agent, revision);
    let (exit, _) = agent.terminate(Duration::from_secs(10));
    assert!(exit.success());
    let cached_revision = agent.cache_inspect()["revision"].as_i64().unwrap();
    assert!(cached_revision >= revision);
    etcd.kill();

    let started = Instant::now();
    let agent = Agent::spawn_in(
        root.path(),
        "n",
        &["--etcd-endpoints", &etcd.client_url, "--no-ebpf"],
    );
    agent.wait_ready(Duration::from_secs(5));
    let ready_after = started.elapsed();
    assert!(
        ready_after < Duration::from_secs(2),
        "ready after {ready_after:?}"
    );
    let status = agent.status();
    assert_eq!(status["config"]["source"], "cache", "{status}");
    assert_eq!(status["config"]["revision"], cached_revision, "{status}");
    assert!(status["config"]["cache_age_seconds"].is_u64(), "{status}");

    etcd.restart();
    let newer = etcd.put(&global(), r#"{"v": 2}"#);
    let status = wait_revision(&agent, newer);
    assert_eq!(status["config"]["source"], "etcd", "{status}");
    assert!(status["config"]["cache_age_seconds"].is_null(), "{status}");
}

#[test]
fn corrupt_cache_is_set_aside_with_a_clear_error_and_the_agent_waits_for_etcd() {
    let root = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(EtcdVersion::V3_5);
    let revision = etcd.put(&global(), r#"{"v": 1}"#);
    let mut agent = Agent::spawn_in(
        root.path(),
        "n",
        &["--etcd-endpoints", &etcd.client_url, "--no-ebpf"],
    );
    wait_revision(&agent, revision);
    cached_keys_at(&agent, revision);
    agent.terminate(Duration::from_secs(10));
    etcd.kill();
    let cache_file = root.path().join("cache/snapshot.bin");
    let good = std::fs::read(&cache_file).unwrap();

    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x01;
    let mut wrong_checksum = good.clone();
    let n = wrong_checksum.len();
    wrong_checksum[n - 1] ^= 0xff;
    let cases = [
        ("truncated", good[..good.len() / 3].to_vec()),
        ("flipped byte", flipped),
        ("wrong checksum", wrong_checksum),
    ];
    let mut last_agent = None;
    for (what, bytes) in cases {
        // Start from the corrupt file alone (the plugin compile cache may share the directory).
        for entry in std::fs::read_dir(root.path().join("cache")).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::remove_file(path).unwrap();
            }
        }
        std::fs::write(&cache_file, &bytes).unwrap();
        let agent = Agent::spawn_in(
            root.path(),
            "n",
            &["--etcd-endpoints", &etcd.client_url, "--no-ebpf"],
        );
        let status = agent.wait_status(Duration::from_secs(10), "the cache error", |s| {
            s["config"]["cache_error"]
                .as_str()
                .is_some_and(|e| e.contains("corrupt"))
        });
        assert_eq!(status["ready"], false, "{what}: {status}");
        assert_eq!(agent.get("/readyz").0, 503, "{what}");
        let aside: Vec<_> = std::fs::read_dir(root.path().join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            aside.iter().any(|n| n.starts_with("snapshot.bin.corrupt-")),
            "{what}: {aside:?}"
        );
        assert!(
            !cache_file.exists(),
            "{what}: the corrupt file is not left in place"
        );
        last_agent = Some(agent);
    }
    etcd.restart();
    let agent = last_agent.unwrap();
    agent.wait_ready(Duration::from_secs(20));
    assert_eq!(agent.status()["config"]["source"], "etcd");
}

#[test]
fn sigkill_during_cache_writes_leaves_the_old_or_the_new_cache() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(EtcdVersion::V3_5);
    // Values as large as one command-line argument may be: the cache file is ~2 MB, so writing
    // it takes long enough to be interrupted.
    let big = "x".repeat(100 * 1024);
    for i in 0..20 {
        etcd.put(
            &format!("{PREFIX}/config/nodes/big{i}"),
            &format!("{{\"pad\": \"{big}\"}}"),
        );
    }
    let writer = {
        let url = etcd.client_url.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut c = etcd_client::Client::connect([url.as_str()], None)
                    .await
                    .unwrap();
                for i in 0..400 {
                    let _ = c.put(global(), format!("{{\"i\": {i}}}"), None).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        })
    };
    // The first agent writes the first cache file; every kill after that must leave a good one.
    let first = Agent::spawn_in(
        root.path(),
        "n",
        &["--etcd-endpoints", &etcd.client_url, "--no-ebpf"],
    );
    wait_for(Duration::from_secs(20), "the first cache file", || {
        root.path()
            .join("cache/snapshot.bin")
            .exists()
            .then_some(())
    });
    drop(first);
    let mut kills = 0;
    let mut interrupted = 0;
    while !writer.is_finished() && kills < 12 {
        let mut agent = Agent::spawn_in(
            root.path(),
            "n",
            &["--etcd-endpoints", &etcd.client_url, "--no-ebpf"],
        );
        agent.wait_ready(Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50 + fastrand::u64(0..150)));
        agent.kill();
        kills += 1;
        let interrupted_now = std::fs::read_dir(root.path().join("cache"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp-"));
        interrupted += usize::from(interrupted_now);
        let inspect = agent.cache_inspect();
        assert_eq!(inspect["checksum"], "ok", "after kill {kills}: {inspect}");
        assert!(inspect["revision"].as_i64().unwrap() > 0);
    }
    writer.join().unwrap();
    assert!(kills >= 5, "only {kills} kills");
    assert!(
        interrupted >= 1,
        "no kill landed during a cache write in {kills} tries"
    );
}

#[test]
fn tls_with_client_certificates_works_and_a_wrong_ca_fails_clearly() {
    let pki = TestPki::generate("edgeward test CA");
    let tls = EtcdTls {
        ca: pki.ca.clone(),
        server_cert: pki.server_cert.clone(),
        server_key: pki.server_key.clone(),
        client_cert: pki.client_cert.clone(),
        client_key: pki.client_key.clone(),
        client_cert_auth: true,
    };
    let etcd = Etcd::start_tls(EtcdVersion::V3_5, Some(tls));
    let revision = etcd.put(&global(), r#"{"tls": true}"#);
    assert!(etcd.client_url.starts_with("https://"));

    let dir = tempfile::tempdir().unwrap();
    // An agent trusting `ca` and presenting the client certificate.
    let agent_trusting = |name: &str, ca: &Path| {
        let config = write_file(
            dir.path(),
            name,
            &format!(
                "[etcd.tls]\nca_file = {ca:?}\ncert_file = {:?}\nkey_file = {:?}\n",
                pki.client_cert, pki.client_key
            ),
        );
        Agent::spawn(&[
            "--config",
            &config,
            "--etcd-endpoints",
            &etcd.client_url,
            "--no-ebpf",
        ])
    };
    let agent = agent_trusting("good.toml", &pki.ca);
    agent.wait_ready(Duration::from_secs(20));
    wait_revision(&agent, revision);

    let other = TestPki::generate("some other CA");
    let agent = agent_trusting("bad.toml", &other.ca);
    let status = agent.wait_status(Duration::from_secs(20), "a TLS error", |s| {
        !s["config"]["last_error"].is_null()
    });
    assert_eq!(status["ready"], false, "{status}");
    let error = status["config"]["last_error"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(
        error.contains(&etcd.client_url),
        "names the endpoint: {error}"
    );
    assert!(
        error.contains("certificate") || error.contains("tls") || error.contains("transport"),
        "says why: {error}\n{}",
        agent.log()
    );
}

#[test]
fn user_and_password_auth_works_and_a_wrong_password_fails_clearly() {
    let mut etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.etcdctl(&["user", "add", "root", "--new-user-password=rootpw"]);
    etcd.etcdctl(&["auth", "enable"]);
    etcd.ctl_args.push("--user=root:rootpw".to_owned());
    let revision = etcd.put(&global(), r#"{"auth": true}"#);

    let dir = tempfile::tempdir().unwrap();
    let good_pw = write_file(dir.path(), "good.pw", "rootpw\n");
    let bad_pw = write_file(dir.path(), "bad.pw", "nope\n");
    let config = |pw: &str| {
        write_file(
            dir.path(),
            &format!("{}.toml", fastrand::u32(..)),
            &format!("[etcd]\nusername = \"root\"\npassword_file = {pw:?}\n"),
        )
    };
    let good = config(&good_pw);
    let agent = Agent::spawn(&[
        "--config",
        &good,
        "--etcd-endpoints",
        &etcd.client_url,
        "--no-ebpf",
    ]);
    wait_revision(&agent, revision);
    // The node status is written with the same credentials.
    wait_for(Duration::from_secs(10), "the node status key", || {
        etcd.try_etcdctl(&[
            "get",
            &format!("{PREFIX}/status/test-node"),
            "--print-value-only",
        ])
        .ok()
        .filter(|v| v.contains("test-node"))
    });

    let bad = config(&bad_pw);
    let agent = Agent::spawn(&[
        "--config",
        &bad,
        "--etcd-endpoints",
        &etcd.client_url,
        "--no-ebpf",
    ]);
    let status = agent.wait_status(Duration::from_secs(20), "an auth error", |s| {
        !s["config"]["last_error"].is_null()
    });
    assert_eq!(status["ready"], false);
    let error = status["config"]["last_error"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(
        error.contains("authentication failed") || error.contains("invalid"),
        "{error}"
    );
}

#[test]
fn malformed_json_at_one_key_leaves_the_rest_applied_and_is_reported() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put(&global(), r#"{"a": 1}"#);
    let good_node = etcd.put(&node_key("test-node"), r#"{"labels": {"zone": "z1"}}"#);
    let agent = Agent::spawn(&["--etcd-endpoints", &etcd.client_url, "--no-ebpf"]);
    wait_revision(&agent, good_node);

    let bad = etcd.put(&node_key("test-node"), r#"{"labels": oops"#);
    let bad_plugin = etcd.put(&format!("{PREFIX}/plugins/p1"), r#"{"name": "p1"}"#);
    let after = etcd.put(&global(), r#"{"a": 2}"#);
    let status = wait_revision(&agent, after);
    let rejected = status["config"]["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2, "{status}");
    assert_eq!(rejected[0]["key"], node_key("test-node"));
    assert_eq!(rejected[0]["revision"], bad);
    assert!(
        rejected[0]["error"]
            .as_str()
            .unwrap()
            .contains("invalid JSON"),
        "{status}"
    );
    assert_eq!(rejected[1]["key"], format!("{PREFIX}/plugins/p1"));
    assert_eq!(rejected[1]["revision"], bad_plugin);
    assert!(agent.log().contains("document rejected"), "{}", agent.log());
    let (_, metrics) = agent.get("/metrics");
    assert!(
        metrics.contains("edgeward_sync_rejected_documents 2"),
        "{metrics}"
    );

    // Fixing the key clears the report.
    let fixed = etcd.put(&node_key("test-node"), "{}");
    etcd.delete(&format!("{PREFIX}/plugins/p1"));
    let status = agent.wait_status(Duration::from_secs(10), "the report to clear", |s| {
        s["config"]["revision"].as_i64() > Some(fixed)
            && s["config"]["rejected"]
                .as_array()
                .is_some_and(Vec::is_empty)
    });
    assert_eq!(status["ready"], true);
}

#[test]
fn node_status_lives_under_a_lease_and_is_rewritten_when_the_lease_is_lost() {
    let etcd = Etcd::start(EtcdVersion::V3_4);
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(dir.path(), "c.toml", "[etcd]\nlease_ttl = \"5s\"\n");
    let mut agent = Agent::spawn(&[
        "--config",
        &config,
        "--etcd-endpoints",
        &etcd.client_url,
        "--no-ebpf",
    ]);
    agent.wait_ready(Duration::from_secs(20));
    let key = format!("{PREFIX}/status/test-node");
    let read_status = || -> Option<(Value, i64)> {
        let out = etcd.try_etcdctl(&["get", &key, "-w", "json"]).ok()?;
        let v: Value = serde_json::from_str(&out).ok()?;
        let kv = v["kvs"].as_array()?.first()?.clone();
        let lease = kv["lease"].as_i64()?;
        let value = String::from_utf8(support::base64_decode(kv["value"].as_str()?)).ok()?;
        Some((serde_json::from_str(&value).ok()?, lease))
    };
    // The key follows /status within a second (a check a second): a copy written before the
    // configuration arrived may still be there when the agent reports ready.
    let (doc, lease) = wait_for(
        Duration::from_secs(10),
        "the status key to show the etcd configuration",
        || read_status().filter(|(doc, _)| doc["config"]["source"] == "etcd"),
    );
    assert_eq!(doc["node"], "test-node");
    assert!(lease != 0, "written under a lease");

    etcd.etcdctl(&["lease", "revoke", &format!("{lease:x}")]);
    let (_, new_lease) = wait_for(
        Duration::from_secs(15),
        "the status to be rewritten",
        || read_status().filter(|(_, l)| *l != lease),
    );
    assert_ne!(new_lease, lease);

    // `status --fleet` sees it.
    let (code, stdout, stderr) = edgeward(&[
        "status",
        "--fleet",
        "--etcd-endpoints",
        &etcd.client_url,
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let fleet: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(fleet[0]["node"], "test-node", "{fleet}");
    let (code, table, _) = edgeward(&["status", "--fleet", "--etcd-endpoints", &etcd.client_url]);
    assert_eq!(code, 0);
    assert!(
        table.contains("test-node") && table.contains("etcd"),
        "{table}"
    );

    // A dead node's status expires with its lease.
    agent.kill();
    wait_for(Duration::from_secs(15), "the status key to expire", || {
        etcd.try_etcdctl(&["get", &key, "--print-value-only"])
            .ok()
            .filter(|v| v.trim().is_empty())
    });
}

#[test]
fn standalone_directory_is_applied_and_followed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config/nodes")).unwrap();
    std::fs::write(dir.path().join("config/global.json"), r#"{"a": 1}"#).unwrap();
    let agent = Agent::spawn(&["--config-dir", dir.path().to_str().unwrap(), "--no-ebpf"]);
    let status = agent.wait_status(Duration::from_secs(10), "file source", |s| {
        s["config"]["source"] == "file"
    });
    let first = status["config"]["revision"].as_i64().unwrap();

    std::fs::write(dir.path().join("config/nodes/test-node"), r#"{"broken": "#).unwrap();
    let status = agent.wait_status(Duration::from_secs(10), "the change to be applied", |s| {
        s["config"]["revision"].as_i64() > Some(first)
    });
    let rejected = &status["config"]["rejected"];
    assert_eq!(rejected[0]["key"], node_key("test-node"), "{status}");

    std::fs::write(
        dir.path().join("config/nodes/test-node"),
        r#"{"fixed": true}"#,
    )
    .unwrap();
    agent.wait_status(Duration::from_secs(10), "the fix", |s| {
        s["config"]["rejected"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
}

#[test]
fn cache_inspect_prints_a_table_and_fails_clearly_without_a_cache() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let revision = etcd.put(&global(), "{}");
    let agent = Agent::spawn(&["--etcd-endpoints", &etcd.client_url, "--no-ebpf"]);
    cached_keys_at(&agent, revision);
    let dir = agent.cache_dir();
    let (code, table, _) = edgeward(&["cache", "inspect", "--cache-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        table.contains("checksum   ok") && table.contains(&global()),
        "{table}"
    );

    let empty = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = edgeward(&[
        "cache",
        "inspect",
        "--cache-dir",
        empty.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(stderr.contains("no cache file"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_larger_than_a_grpc_message_is_applied() {
    let mut cluster = EtcdCluster::start(EtcdVersion::V3_5, 3);
    let m0 = cluster.members[0].client_url.clone();
    let agent = Agent::spawn(&["--etcd-endpoints", &m0, "--no-ebpf"]);
    agent.wait_ready(Duration::from_secs(20));

    // While the agent's member is down, 12 MiB of module chunks arrive through another one:
    // far more than gRPC's default 4 MiB message limit, for the watch catch-up and the list.
    cluster.members[0].kill();
    let other = cluster.other_than(0).client_url.clone();
    let mut client = etcd_client::Client::connect([other.as_str()], None)
        .await
        .unwrap();
    let chunk = vec![b'w'; 1024 * 1024];
    let mut last = 0;
    for i in 0..12 {
        let key = format!("{PREFIX}/blobs/sha256/{:064x}/{i:04}", 7);
        // Retry while the two remaining members elect a leader.
        let deadline = Instant::now() + Duration::from_secs(15);
        last = loop {
            match client.put(key.clone(), chunk.clone(), None).await {
                Ok(r) => break r.header().unwrap().revision(),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("put {key}: {e}"),
            }
        };
    }
    tokio::task::spawn_blocking(move || {
        cluster.members[0].restart();
        wait_revision(&agent, last);
        let keys = cached_keys_at(&agent, last);
        assert_eq!(keys.len(), 12);
        assert_eq!(keys, synced_keys(&cluster.members[0]));

        // A fresh agent lists all of it at start.
        let fresh = Agent::spawn(&["--etcd-endpoints", &m0, "--no-ebpf"]);
        wait_revision(&fresh, last);
        assert_eq!(cached_keys_at(&fresh, last), keys);
    })
    .await
    .unwrap();
}
