//! High availability: several replicas of one pipeline, exactly one of which streams.
//!
//! The active replica holds a session-level Postgres advisory lock named after the slot
//! (`hashtextextended('sluice:' || slot, 0)`) on a dedicated connection of the source
//! database; the others try to take it every `ha.retry_interval`. The lock belongs to that
//! connection's server session, so it is released the moment the active process dies (its
//! socket closes) or its session is terminated, and a standby takes over on its next try.
//!
//! Never both streaming: the slot itself admits one consumer at a time, and the lock makes the
//! standby wait instead of failing on "slot in use". When the active replica loses the lock's
//! connection (a network partition, a server restart) it stops at once with an error, because
//! the lock may already be someone else's; a supervisor restarts it as a standby. Keepalives on
//! the lock's session (10 s idle, 5 s interval, 3 probes) make the server notice a vanished
//! client within about half a minute, so the lock is not held by a dead peer for long.
//!
//! The pipeline's name is claimed the same way (`claim_name`, a second lock on
//! `'sluice-pipeline:' || pipeline.name`): backfill and reconcile requests are addressed by
//! it, so two running pipelines of one name (two configs left at `default`) are refused.

use sluice_core::{Backoff, Classify, RetryPolicy, Shutdown};
use std::time::Duration;

use sluice_postgres::{connect_sql, ConnectionConfig};

/// The held lock; dropping it closes the connection and releases the lock.
pub struct HaLock {
    client: tokio_postgres::Client,
}

const SESSION_SETTINGS: &[&str] = &[
    "SET tcp_keepalives_idle = 10",
    "SET tcp_keepalives_interval = 5",
    "SET tcp_keepalives_count = 3",
    // A lock connection sits idle: server-side idle timeouts must not end it (PG 14+).
    "SET idle_session_timeout = 0",
];

/// Waits until this process holds the lock for `slot`. Returns `Ok(None)` when `shutdown`
/// turns true first. While standing by, network failures are retried for up to `retry_for`
/// at a stretch (like the source's); anything else (a refused login) is returned at once.
pub async fn acquire(
    conn: &ConnectionConfig,
    slot: &str,
    retry_interval: Duration,
    retry_for: Duration,
    standby_healthy: &std::sync::atomic::AtomicBool,
    shutdown: &mut Shutdown,
) -> Result<Option<HaLock>, sluice_postgres::Error> {
    let key = format!("sluice:{slot}");
    let mut announced_standby = false;
    // Polls every `retry_interval`; a run of network failures is given up after `retry_for`.
    let mut failures = Backoff::new(RetryPolicy::new(retry_for).with_delays(retry_interval, retry_interval));
    // A standby keeps its connection between attempts and opens a new one only after a failure.
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        let attempt = try_lock(&mut client, conn, &key).await;
        if attempt.is_err() {
            client = None;
        }
        standby_healthy.store(attempt.is_ok(), std::sync::atomic::Ordering::Relaxed);
        match attempt {
            Ok(Some(lock)) => {
                tracing::info!(slot, "holding the HA lock: this replica streams");
                return Ok(Some(lock));
            }
            Ok(None) => {
                if !announced_standby {
                    tracing::info!(slot, "standing by: another replica holds the HA lock");
                    announced_standby = true;
                }
                failures.reset();
            }
            Err(error) if error.is_transient() => {
                if failures.next_delay().is_none() {
                    return Err(error);
                }
                tracing::warn!(
                    error = %sluice_postgres::error::Chain(&error),
                    gives_up_in_s = failures.gives_up_in().as_secs(),
                    "cannot reach Postgres for the HA lock; retrying"
                );
            }
            Err(error) => return Err(error),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry_interval) => {}
            _ = shutdown.requested() => return Ok(None),
        }
    }
}

/// One attempt on `client` (connected first when there is none); on success the connection
/// moves into the lock.
async fn try_lock(
    client: &mut Option<tokio_postgres::Client>,
    conn: &ConnectionConfig,
    key: &str,
) -> Result<Option<HaLock>, sluice_postgres::Error> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        let fresh = connect_sql(conn).await?;
        for setting in SESSION_SETTINGS {
            // Settings an older server lacks are not worth failing over.
            let _ = fresh.batch_execute(setting).await;
        }
        *client = Some(fresh);
    }
    let connected = client.as_ref().expect("connected above");
    let held: bool =
        connected.query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key]).await?.get(0);
    Ok(if held { client.take().map(|client| HaLock { client }) } else { None })
}

/// Why the pipeline's name could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// A process of another pipeline (another slot) holds the name.
    #[error(
        "another sluice process already runs pipeline {0:?} against this database; pipeline.name addresses backfill and reconcile requests, so give each pipeline of one database its own name"
    )]
    Taken(String),
    /// Postgres could not be asked.
    #[error("cannot claim the pipeline name {0:?}")]
    Postgres(String, #[source] sluice_postgres::Error),
}

/// Claims `pipeline.name` in the source database for as long as the returned lock lives.
/// A process that just took over from a dead one may find the name still held for a moment
/// (its sessions end one by one): it asks again for up to ten seconds before giving up.
pub async fn claim_name(conn: &ConnectionConfig, pipeline: &str) -> Result<HaLock, ClaimError> {
    let key = format!("sluice-pipeline:{pipeline}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut client = None;
    loop {
        match try_lock(&mut client, conn, &key).await {
            Ok(Some(lock)) => return Ok(lock),
            Ok(None) if std::time::Instant::now() >= deadline => {
                return Err(ClaimError::Taken(pipeline.to_owned()))
            }
            Ok(None) => {}
            Err(error) => return Err(ClaimError::Postgres(pipeline.to_owned(), error)),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether a running sluice holds pipeline `name`'s lock in the connected database: a daemon
/// that serves the pipeline's backfill and reconcile requests (`claim_name`).
pub async fn pipeline_running(
    sql: &tokio_postgres::Client,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    // A bigint advisory lock shows in pg_locks as classid (high half), objid (low half) and
    // objsubid 1.
    let row = sql
        .query_one(
            "WITH k AS (SELECT hashtextextended($1, 0) AS key) \
             SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l, k WHERE l.locktype = 'advisory' AND l.granted \
               AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()) \
               AND l.objsubid = 1 AND l.classid::text::int8 = (k.key >> 32) & 4294967295 \
               AND l.objid::text::int8 = k.key & 4294967295)",
            &[&format!("sluice-pipeline:{name}")],
        )
        .await?;
    Ok(row.get(0))
}

impl HaLock {
    /// Resolves when the lock can no longer be trusted: its connection closed, or a probe
    /// (every 2 s) failed or took over 5 s.
    pub async fn lost(&self) -> String {
        let mut probe = tokio::time::interval(Duration::from_secs(2));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            probe.tick().await;
            if self.client.is_closed() {
                return "the HA lock's connection closed".into();
            }
            match tokio::time::timeout(Duration::from_secs(5), self.client.simple_query("SELECT 1")).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    return format!(
                        "the HA lock's connection failed: {}",
                        sluice_postgres::error::Chain(&error)
                    )
                }
                Err(_) => return "the HA lock's connection did not answer within 5 s".into(),
            }
        }
    }
}
