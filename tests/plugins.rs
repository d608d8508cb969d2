//! The plugin host with real plugins compiled from source: examples give the right verdicts,
//! hostile plugins cannot take the host down, hot swap under load loses and duplicates
//! nothing, and a warm compile cache is not recompiled.

mod support;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use edgeward::{
    pipeline::{BatchPolicy, PolicyRx},
    plugins::{
        FailurePolicy, PluginError, PluginHost, PluginMetrics, PluginRuntime, PluginsConfig,
    },
    probe::event::{AttrEdit, AttrValue, ConnectionEvent},
    status::{PluginState, StatusHandle},
};
use serde_json::json;
use support::plugins::{desired, event, manifest, wasm};

fn host_in(dir: &std::path::Path) -> (PluginHost, PolicyRx, StatusHandle) {
    let status = StatusHandle::new("test-node");
    let runtime =
        PluginRuntime::new(Some(dir.to_owned()), PluginMetrics::unregistered()).expect("engine");
    let (host, rx) = PluginHost::new(runtime, PluginsConfig::default(), status.clone());
    (host, rx, status)
}

fn run(rx: &PolicyRx, batch: &mut Vec<ConnectionEvent>) {
    let chain: Arc<dyn BatchPolicy> = rx.borrow().clone();
    chain.apply(batch);
}

fn ids(batch: &[ConnectionEvent]) -> Vec<u64> {
    batch.iter().map(|e| e.conn_id).collect()
}

fn set_value<'a>(e: &'a ConnectionEvent, key: &str) -> Option<&'a AttrValue> {
    e.edits.iter().rev().find_map(|edit| match edit {
        AttrEdit::Set(k, v) if &**k == key => Some(v),
        _ => None,
    })
}

#[test]
fn examples_give_the_right_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut host, rx, status) = host_in(dir.path());
    let state = desired(vec![
        (
            manifest(
                "allowlist",
                &wasm("allowlist"),
                json!({"mode": "deny", "cidrs": ["192.168.0.0/16"], "ports": [22]}),
                10,
                FailurePolicy::FailOpen,
            ),
            wasm("allowlist"),
        ),
        (
            manifest(
                "sampler",
                &wasm("sampler"),
                json!({"keep_one_in": 1000000}),
                20,
                FailurePolicy::FailOpen,
            ),
            wasm("sampler"),
        ),
        (
            manifest(
                "redactor",
                &wasm("redactor"),
                json!({"mode": "hash", "key": "k", "fields": ["peer"]}),
                30,
                FailurePolicy::FailClosed,
            ),
            wasm("redactor"),
        ),
        (
            manifest(
                "tagger",
                &wasm("tagger"),
                json!({"attributes": {"env": "prod", "tier": 2}, "ports": [443]}),
                40,
                FailurePolicy::FailOpen,
            ),
            wasm("tagger"),
        ),
    ]);
    let outcome = host.apply(&state).expect("chain of four examples");
    assert_eq!(
        outcome.plugins,
        vec!["allowlist", "sampler", "redactor", "tagger"]
    );

    let failed = |id, peer| {
        let mut e = event(id, peer);
        e.close_reason = edgeward::probe::event::CloseReason::Refused;
        e
    };
    let mut batch = vec![
        event(1, "192.168.1.5:22"),   // allowlist drops
        event(2, "192.168.1.5:443"),  // sampler drops (healthy, 1 in a million)
        failed(3, "192.168.1.5:443"), // failed: kept, redacted, tagged
        failed(4, "8.8.8.8:22"),      // kept (port 22 but not in the CIDR), redacted, not tagged
    ];
    run(&rx, &mut batch);
    assert_eq!(ids(&batch), vec![3, 4]);
    let AttrValue::Str(h3) = set_value(&batch[0], "network.peer.address").expect("redacted") else {
        panic!("pseudonym is not a string")
    };
    assert!(h3.starts_with("anon-") && !h3.contains("192.168"), "{h3}");
    assert_eq!(
        set_value(&batch[0], "env"),
        Some(&AttrValue::Str("prod".into()))
    );
    assert_eq!(set_value(&batch[0], "tier"), Some(&AttrValue::Int(2)));
    assert!(
        set_value(&batch[1], "env").is_none(),
        "port 22 is not tagged"
    );
    assert!(set_value(&batch[1], "network.peer.address").is_some());

    let json = serde_json::to_value(status.snapshot()).unwrap();
    let states: Vec<_> = json["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["state"].clone()))
        .collect();
    assert_eq!(states.len(), 4);
    assert!(states.iter().all(|(_, s)| s == "active"), "{states:?}");
    // The sampler reports what it dropped through the host's counter import.
    let metrics = host.runtime().metrics();
    assert_eq!(metrics.errors("sampler", "trap"), 0);
}

/// A good chain (a tagger), then a change that adds `hostile`: returns what `apply` said.
fn with_tagger(
    host: &mut PluginHost,
    hostile: Option<(edgeward::plugins::PluginManifest, Arc<[u8]>)>,
) -> Result<edgeward::plugins::SwapOutcome, PluginError> {
    let tagger = (
        manifest(
            "tagger",
            &wasm("tagger"),
            json!({"attributes": {"good": true}}),
            50,
            FailurePolicy::FailOpen,
        ),
        wasm("tagger"),
    );
    let mut plugins = vec![tagger];
    plugins.extend(hostile);
    host.apply(&desired(plugins))
}

fn status_of(status: &StatusHandle, name: &str) -> (PluginState, String) {
    let s = status.snapshot();
    let p = s
        .plugins
        .iter()
        .rfind(|p| p.name == name)
        .unwrap_or_else(|| panic!("{name} not in status: {:?}", s.plugins));
    (p.state, p.last_error.clone().unwrap_or_default())
}

fn assert_tagged_and_kept(rx: &PolicyRx, n: u64) {
    let mut batch: Vec<_> = (0..n).map(|i| event(i, "1.1.1.1:443")).collect();
    run(rx, &mut batch);
    assert_eq!(batch.len() as u64, n, "events lost");
    assert!(
        batch
            .iter()
            .all(|e| set_value(e, "good") == Some(&AttrValue::Bool(true))),
        "the good plugin did not run"
    );
}

#[test]
fn hostile_plugins_that_fail_to_load_leave_the_last_good_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (mut host, rx, status) = host_in(dir.path());
    with_tagger(&mut host, None).expect("good chain");

    let misbehave = wasm("misbehave");
    let old = wasm("old-interface");
    let core_module: Arc<[u8]> = Arc::from(&b"\0asm\x01\0\0\0"[..]);
    let mut wrong_sha = manifest("sha", &misbehave, json!("ok"), 1, FailurePolicy::FailOpen);
    wrong_sha.sha256 = support::plugins::sha256(b"something else");
    let cases: Vec<(&str, _, &str)> = vec![
        (
            "reject",
            (
                manifest(
                    "reject",
                    &misbehave,
                    json!("reject"),
                    1,
                    FailurePolicy::FailOpen,
                ),
                misbehave.clone(),
            ),
            "init rejected its config: misbehave rejects config",
        ),
        (
            "core",
            (
                manifest(
                    "core",
                    &core_module,
                    json!(null),
                    1,
                    FailurePolicy::FailOpen,
                ),
                core_module.clone(),
            ),
            "not a WebAssembly component: it is a core WebAssembly module",
        ),
        (
            "old",
            (
                manifest("old", &old, json!(null), 1, FailurePolicy::FailOpen),
                old.clone(),
            ),
            "wrong interface: exports [edgeward:policy/policy@0.0.9], this host needs \
             edgeward:policy/policy@0.1.0",
        ),
        ("sha", (wrong_sha, misbehave.clone()), "sha256 mismatch"),
    ];
    for (name, plugin, cause) in cases {
        let e = with_tagger(&mut host, Some(plugin)).expect_err(name);
        assert!(
            e.to_string().contains(name),
            "error does not name {name}: {e}"
        );
        assert!(e.to_string().contains(cause), "{name}: {e}");
        let (state, last_error) = status_of(&status, name);
        assert_eq!(state, PluginState::Failed, "{name}");
        assert!(last_error.contains(cause), "{name}: {last_error}");
        // The last good chain (the tagger alone) is still the one running.
        assert_eq!(host.current().len(), 1);
        assert_eq!(status_of(&status, "tagger").0, PluginState::Active);
        assert_tagged_and_kept(&rx, 10);
    }
}

#[test]
fn hostile_plugins_that_fail_at_run_time_follow_their_failure_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (mut host, rx, status) = host_in(dir.path());
    let misbehave = wasm("misbehave");
    let cases = [
        ("loop", "on-batch ran past its deadline of 10ms"),
        ("grow", "on-batch hit the memory limit of 16 MiB"),
        ("recurse", "on-batch overflowed its stack"),
        ("trap", "on-batch trapped"),
        ("wrong-count", "bad verdicts: 9 verdict codes for 8 events"),
        ("bad-code", "bad verdicts: verdict code 7 for event 0"),
    ];
    for (mode, cause) in cases {
        for policy in [FailurePolicy::FailOpen, FailurePolicy::FailClosed] {
            let name = format!("{mode}-{policy:?}").to_lowercase();
            let m = manifest(&name, &misbehave, json!(mode), 1, policy);
            with_tagger(&mut host, Some((m, misbehave.clone()))).expect(&name);
            let started = Instant::now();
            let mut batch: Vec<_> = (0..8).map(|i| event(i, "1.1.1.1:443")).collect();
            run(&rx, &mut batch);
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{name}: a batch took {:?}",
                started.elapsed()
            );
            match policy {
                FailurePolicy::FailOpen => {
                    assert_eq!(batch.len(), 8, "{name}: fail_open lost events");
                    assert!(batch.iter().all(|e| set_value(e, "good").is_some()));
                }
                FailurePolicy::FailClosed => assert!(batch.is_empty(), "{name}: fail_closed kept"),
            }
            let (state, last_error) = status_of(&status, &name);
            assert_eq!(state, PluginState::Failed, "{name}");
            assert!(last_error.contains(&name), "{name}: {last_error}");
            assert!(last_error.contains(cause), "{name}: {last_error}");
            assert!(
                host.runtime().metrics().errors(&name, "bad_verdicts")
                    + host.runtime().metrics().errors(&name, "timeout")
                    + host.runtime().metrics().errors(&name, "memory_limit")
                    + host.runtime().metrics().errors(&name, "stack_overflow")
                    + host.runtime().metrics().errors(&name, "trap")
                    >= 1
            );
        }
    }

    // Repeated failures disable the plugin (it is not called any more) until a new manifest.
    let m = manifest(
        "trap-again",
        &misbehave,
        json!("trap"),
        1,
        FailurePolicy::FailOpen,
    );
    with_tagger(&mut host, Some((m, misbehave.clone()))).unwrap();
    for _ in 0..PluginsConfig::default().max_consecutive_failures {
        assert_tagged_and_kept(&rx, 4);
    }
    let (_, last_error) = status_of(&status, "trap-again");
    assert!(
        last_error.contains("disabled after 5 failures"),
        "{last_error}"
    );
    assert!(host.current()[0].is_disabled());
    let traps = host.runtime().metrics().errors("trap-again", "trap");
    assert_tagged_and_kept(&rx, 4);
    assert_eq!(host.runtime().metrics().errors("trap-again", "trap"), traps);
    // A new manifest (here: a config that behaves) brings it back.
    let m = manifest(
        "trap-again",
        &misbehave,
        json!("ok"),
        1,
        FailurePolicy::FailOpen,
    );
    with_tagger(&mut host, Some((m, misbehave.clone()))).unwrap();
    assert_eq!(status_of(&status, "trap-again").0, PluginState::Active);
    assert!(!host.current()[0].is_disabled());
}

#[test]
fn hot_swap_under_load_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut host, rx, _status) = host_in(dir.path());
    let tagger = wasm("tagger");
    let generation = |g: i64| {
        let mut gen_manifest = manifest(
            "gen",
            &tagger,
            json!({"attributes": {"generation": g}}),
            1,
            FailurePolicy::FailOpen,
        );
        // The most the agent allows: this test is about swaps losing nothing, and with the
        // default 10 ms a swap's `init` was once refused as timed out on a busy two-core
        // machine (the limit is wall-clock time).
        gen_manifest.limits.batch_timeout = Duration::from_millis(100);
        desired(vec![(gen_manifest, tagger.clone())])
    };
    host.apply(&generation(0)).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let rx = rx.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut next_id = 0u64;
            let mut seen: HashMap<u64, i64> = HashMap::new();
            let mut last_generation = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let mut batch: Vec<_> = (0..64)
                    .map(|i| event(next_id + i, "10.0.0.2:443"))
                    .collect();
                next_id += 64;
                run(&rx, &mut batch);
                assert_eq!(batch.len(), 64, "events lost in a swap");
                for e in &batch {
                    let sets: Vec<_> = e
                        .edits
                        .iter()
                        .filter(|x| matches!(x, AttrEdit::Set(k, _) if &**k == "generation"))
                        .collect();
                    assert_eq!(
                        sets.len(),
                        1,
                        "event {} processed {} times",
                        e.conn_id,
                        sets.len()
                    );
                    let Some(AttrValue::Int(g)) = set_value(e, "generation") else {
                        panic!("generation is not an integer")
                    };
                    assert!(
                        *g >= last_generation,
                        "chain went back from {last_generation} to {g}"
                    );
                    last_generation = *g;
                    assert!(
                        seen.insert(e.conn_id, *g).is_none(),
                        "event {} seen twice",
                        e.conn_id
                    );
                }
            }
            (next_id, seen.len() as u64, last_generation)
        })
    };
    let mut took = Vec::new();
    for g in 1..=100 {
        let outcome = host.apply(&generation(g)).expect("swap");
        took.push(outcome.took);
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    let (produced, distinct, _) = producer.join().expect("producer panicked");
    assert_eq!(produced, distinct, "every event was seen exactly once");
    assert!(produced > 64 * 10, "too few batches flowed: {produced}");

    let mut batch = vec![event(u64::MAX, "10.0.0.2:443")];
    run(&rx, &mut batch);
    assert_eq!(
        set_value(&batch[0], "generation"),
        Some(&AttrValue::Int(100))
    );
    assert_eq!(host.runtime().metrics().modules_loaded("compiled"), 1);
}

#[test]
fn restart_with_a_warm_compile_cache_does_not_recompile() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = wasm("allowlist");
    let state = desired(vec![(
        manifest(
            "deny-ssh",
            &bytes,
            json!({"ports": [22]}),
            1,
            FailurePolicy::FailOpen,
        ),
        bytes.clone(),
    )]);
    let (mut cold, _, _) = host_in(dir.path());
    let outcome = cold.apply(&state).unwrap();
    assert_eq!((outcome.compiled, outcome.from_cache), (1, 0));
    assert_eq!(cold.runtime().metrics().modules_loaded("compiled"), 1);
    drop(cold);

    // A new engine and host on the same cache directory: a restarted agent.
    let (mut warm, rx, _) = host_in(dir.path());
    let outcome = warm.apply(&state).unwrap();
    assert_eq!((outcome.compiled, outcome.from_cache), (0, 1));
    assert_eq!(warm.runtime().metrics().modules_loaded("compiled"), 0);
    assert_eq!(warm.runtime().metrics().modules_loaded("cache"), 1);
    let mut batch = vec![event(1, "1.2.3.4:22"), event(2, "1.2.3.4:80")];
    run(&rx, &mut batch);
    assert_eq!(ids(&batch), vec![2]);

    // A corrupt cache entry is not trusted: it is recompiled.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"garbage").unwrap();
    }
    let (mut again, _, _) = host_in(dir.path());
    let outcome = again.apply(&state).unwrap();
    assert_eq!((outcome.compiled, outcome.from_cache), (1, 0));
}

#[test]
fn capabilities_need_the_operators_permission() {
    let dir = tempfile::tempdir().unwrap();
    let tagger = wasm("tagger");
    let mut m = manifest(
        "wants-random",
        &tagger,
        json!({"attributes": {"a": 1}}),
        1,
        FailurePolicy::FailOpen,
    );
    m.capabilities = vec![edgeward::plugins::Capability::Random];
    let (mut host, _, status) = host_in(dir.path());
    let e = host
        .apply(&desired(vec![(m.clone(), tagger.clone())]))
        .unwrap_err();
    assert!(
        e.to_string().contains("wants-random") && e.to_string().contains("Random"),
        "{e}"
    );
    assert_eq!(status_of(&status, "wants-random").0, PluginState::Failed);

    let runtime =
        PluginRuntime::new(Some(dir.path().to_owned()), PluginMetrics::unregistered()).unwrap();
    let config = PluginsConfig {
        allowed_capabilities: vec![edgeward::plugins::Capability::Random],
        ..PluginsConfig::default()
    };
    let (mut host, _rx) = PluginHost::new(runtime, config, StatusHandle::new("n"));
    host.apply(&desired(vec![(m, tagger)])).expect("allowed");
}

#[test]
fn a_change_whose_init_ran_out_of_time_is_tried_again_until_it_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (host, rx, status) = host_in(dir.path());
    let metrics = host.runtime().metrics().clone();
    let misbehave = wasm("misbehave");
    // `init` spins past its 10 ms for the next 1.5 s, as on a node too busy to run it in
    // time, then succeeds: only trying again, with nothing changed, ever loads it.
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        + Duration::from_millis(1500);
    let slow = manifest(
        "slow",
        &misbehave,
        json!(format!("slow-init-until={}", until.as_nanos())),
        1,
        FailurePolicy::FailOpen,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, desired_rx) =
        tokio::sync::watch::channel(Arc::new(desired(vec![(slow, misbehave.clone())])));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = rt.spawn(host.run(desired_rx, shutdown.clone()));

    let wait_for = |what: &str, done: &dyn Fn(PluginState, &str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            let s = status.snapshot();
            if let Some(p) = s.plugins.iter().rfind(|p| p.name == what) {
                let error = p.last_error.clone().unwrap_or_default();
                if done(p.state, &error) {
                    return seen;
                }
                if seen.last() != Some(&error) {
                    seen.push(error);
                }
            }
            assert!(Instant::now() < deadline, "{what}: still {seen:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let seen = wait_for("slow", &|state, _| state == PluginState::Active);
    assert!(
        seen.iter()
            .any(|e| e.contains("init ran past its deadline of 10ms")
                && e.contains("last good chain kept")
                && e.contains("trying again in")),
        "no failed attempt said it would be tried again: {seen:?}"
    );
    assert!(metrics.errors("slow", "timeout") >= 1);
    let mut batch: Vec<_> = (0..4).map(|i| event(i, "1.1.1.1:443")).collect();
    run(&rx, &mut batch);
    assert_eq!(
        ids(&batch),
        vec![0, 1, 2, 3],
        "the loaded chain keeps everything"
    );

    // A refusal is the plugin's answer, not bad luck: not tried again.
    let reject = manifest(
        "reject",
        &misbehave,
        json!("reject"),
        1,
        FailurePolicy::FailOpen,
    );
    tx.send_replace(Arc::new(desired(vec![(reject, misbehave)])));
    wait_for("reject", &|state, _| state == PluginState::Failed);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(metrics.errors("reject", "init_rejected"), 1);
    let (_, last_error) = status_of(&status, "reject");
    assert!(!last_error.contains("trying again"), "{last_error}");
    shutdown.cancel();
    rt.block_on(task).unwrap();
}
