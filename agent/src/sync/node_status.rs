//! This node's status in etcd: `<prefix>/status/<node>`, the same JSON as `/status`, written
//! under a lease so that it disappears when the node dies, rewritten when the lease is lost,
//! and released on a clean shutdown.

use std::time::{Duration, Instant};

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio_util::sync::CancellationToken;

use super::{SyncMetrics, etcd::EtcdConfig};
use crate::{
    backoff::Backoff,
    status::{AgentStatus, StatusHandle},
};

/// How often the status is compared with what was last written.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Counters change all the time; they are rewritten at most this often.
const REFRESH_EVERY: Duration = Duration::from_secs(30);

/// The key of `node`'s status.
pub fn key(prefix: &str, node: &str) -> String {
    format!("{prefix}/status/{node}")
}

/// The status without its counters: a change here is worth a write at once.
fn digest(status: &AgentStatus) -> String {
    let mut s = status.clone();
    s.probe.events = 0;
    s.probe.drops = 0;
    s.export.batches = 0;
    s.export.dropped = 0;
    serde_json::to_string(&s).unwrap_or_default()
}

/// Keeps the status key written until shutdown, then revokes the lease.
pub async fn run(
    config: EtcdConfig,
    node: String,
    status: StatusHandle,
    metrics: SyncMetrics,
    shutdown: CancellationToken,
) {
    let key = key(&config.prefix, &node);
    let mut backoff = Backoff::new(Duration::from_millis(200), config.backoff_max);
    loop {
        match session(&config, &key, &status, &metrics, &shutdown).await {
            Ok(()) => return,
            Err(why) => {
                let delay = backoff.next_delay();
                tracing::warn!(key = %key, error = %why, retry_in = ?delay, "node status not written");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

struct Lease {
    id: i64,
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
}

async fn grant(config: &EtcdConfig, client: &mut Client) -> Result<Lease, String> {
    let ttl = config.lease_ttl.as_secs() as i64;
    let id = client
        .lease_grant(ttl, None)
        .await
        .map_err(|e| format!("lease grant: {e}"))?
        .id();
    let (keeper, responses) = client
        .lease_keep_alive(id)
        .await
        .map_err(|e| format!("lease keep-alive: {e}"))?;
    Ok(Lease {
        id,
        keeper,
        responses,
    })
}

async fn session(
    config: &EtcdConfig,
    key: &str,
    status: &StatusHandle,
    metrics: &SyncMetrics,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let mut client = config.connect().await.map_err(|e| e.to_string())?;
    let mut lease = grant(config, &mut client).await?;
    let keep_alive_every = config.lease_ttl / 3;
    let mut last_keep_alive = Instant::now();
    let mut written: Option<(String, Instant)> = None;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Release: the key goes with the lease.
                let _ = tokio::time::timeout(config.request_timeout, client.lease_revoke(lease.id)).await;
                return Ok(());
            }
            _ = tick.tick() => {}
        }
        if last_keep_alive.elapsed() >= keep_alive_every {
            lease
                .keeper
                .keep_alive()
                .await
                .map_err(|e| format!("lease keep-alive: {e}"))?;
            let answer = tokio::time::timeout(config.request_timeout, lease.responses.message())
                .await
                .map_err(|_| "lease keep-alive: no answer".to_owned())?
                .map_err(|e| format!("lease keep-alive: {e}"))?;
            last_keep_alive = Instant::now();
            if answer.is_none_or(|r| r.ttl() <= 0) {
                tracing::warn!(lease = lease.id, "status lease lost; granting a new one");
                lease = grant(config, &mut client).await?;
                written = None;
            }
        }
        let snapshot = status.snapshot();
        let d = digest(&snapshot);
        let due = match &written {
            None => true,
            Some((last, at)) => *last != d || at.elapsed() >= REFRESH_EVERY,
        };
        if due {
            let body = serde_json::to_vec(&snapshot).unwrap_or_default();
            let put = client.put(key, body, Some(PutOptions::new().with_lease(lease.id)));
            tokio::time::timeout(config.request_timeout, put)
                .await
                .map_err(|_| "status put: no answer".to_owned())?
                .map_err(|e| format!("status put: {e}"))?;
            metrics.status_writes.inc();
            written = Some((d, Instant::now()));
        }
    }
}
