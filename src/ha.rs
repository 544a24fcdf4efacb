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
//! **Fencing.** A target written without a per-write condition (DynamoDB's `batch` mode) is
//! safe only with one writer at a time, and a predecessor that lost the lock may still have
//! a write in flight when the next replica takes it. Each holder therefore records in the
//! state table (`ha.state_table`, in the source database) that it holds the lock, and that it
//! released it once its last write was durable. A replica that finds the lock taken but not
//! released waits out the longest time such a write can still land (the predecessor's loss
//! detection, [`LOSS_DETECTION`], plus the target's request timeout) before it writes: the
//! lock-delay of Chubby. A clean handover (SIGTERM, a rolling update) waits for nothing.
//!
//! The pipeline's name is claimed the same way (`claim_name`, a second lock on
//! `'sluice-pipeline:' || pipeline.name`): backfill and reconcile requests are addressed by
//! it, so two running pipelines of one name (two configs left at `default`) are refused.

use sluice_core::{Backoff, Classify, RetryPolicy, Shutdown, TableName};
use std::time::Duration;

use sluice_postgres::{connect_sql, ConnectionConfig};

/// The held lock; dropping it closes the connection and releases the lock.
pub struct HaLock {
    client: tokio_postgres::Client,
    /// The state table's row of this lock, for the HA lock (not the pipeline name's).
    state: Option<(String, String)>,
    /// How the previous holder let go of the lock.
    pub predecessor: Predecessor,
}

/// How the previous holder of the HA lock let go of it, from the state table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Predecessor {
    /// No replica held it before (or the state table was new).
    None,
    /// It released the lock after its last write was durable.
    Released,
    /// It held the lock and did not release it: it died, or lost the lock's connection, and a
    /// write of its may still be in flight.
    Unclean,
    /// The state table could not be read or written (logged): assumed unclean.
    Unknown,
}

/// How often the holder probes the lock's connection.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a probe may take before the lock counts as lost.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a holder goes on after its lock's session ended at the server: the next
/// probe, and its timeout.
pub const LOSS_DETECTION: Duration = Duration::from_secs(PROBE_INTERVAL.as_secs() + PROBE_TIMEOUT.as_secs());

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
    state_table: &TableName,
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
            Ok(Some(mut lock)) => {
                lock.predecessor = lock.record_held(state_table, &key).await;
                tracing::info!(slot, predecessor = ?lock.predecessor, "holding the HA lock: this replica streams");
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
    Ok(if held {
        client.take().map(|client| HaLock { client, state: None, predecessor: Predecessor::None })
    } else {
        None
    })
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

/// The state table's columns.
const STATE_COLUMNS: &str = "(
    lock text PRIMARY KEY,
    state text NOT NULL CONSTRAINT sluice_ha_state_check CHECK (state IN ('held', 'released')),
    holder text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now())";

impl HaLock {
    /// Marks the lock `key` held by this process in `table` (created when missing) and
    /// returns how the previous holder let go of it. Runs on the lock's own session, while
    /// holding the lock, so no other replica changes the row meanwhile.
    async fn record_held(&mut self, table: &TableName, key: &str) -> Predecessor {
        let quoted = table.quoted();
        let holder = format!(
            "{} pid {}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "sluice".into()),
            std::process::id()
        );
        let recorded = async {
            sluice_postgres::setup::create_table_if_missing(&self.client, &quoted, STATE_COLUMNS).await?;
            let previous = self
                .client
                .query_opt(&format!("SELECT state FROM {quoted} WHERE lock = $1"), &[&key])
                .await?
                .map(|row| row.get::<_, String>(0));
            self.client
                .execute(
                    &format!(
                        "INSERT INTO {quoted} (lock, state, holder) VALUES ($1, 'held', $2) \
                         ON CONFLICT (lock) DO UPDATE SET state = 'held', holder = $2, changed_at = now()"
                    ),
                    &[&key, &holder],
                )
                .await?;
            Ok::<_, tokio_postgres::Error>(previous)
        };
        match recorded.await {
            Ok(previous) => {
                self.state = Some((quoted, key.to_owned()));
                match previous.as_deref() {
                    None => Predecessor::None,
                    Some("released") => Predecessor::Released,
                    Some(_) => Predecessor::Unclean,
                }
            }
            Err(error) => {
                tracing::warn!(
                    table = %quoted,
                    error = %sluice_postgres::error::Chain(&error),
                    "ha.state_table: cannot record the HA lock's holder; a fencing delay counts the predecessor as unclean"
                );
                Predecessor::Unknown
            }
        }
    }

    /// Records that this holder's writes are all durable, then lets go of the lock: the next
    /// holder need not wait for a write of ours. Logged, not returned, when it fails (the next
    /// holder then waits as after a crash).
    pub async fn release(self) {
        if let Some((table, key)) = &self.state {
            let released = self
                .client
                .execute(
                    &format!("UPDATE {table} SET state = 'released', changed_at = now() WHERE lock = $1"),
                    &[key],
                )
                .await;
            if let Err(error) = released {
                tracing::warn!(
                    error = %sluice_postgres::error::Chain(&error),
                    "cannot record the HA lock's clean release; the next holder waits its fencing delay"
                );
            }
        }
    }

    /// Resolves when the lock can no longer be trusted: its connection closed, or a probe
    /// (every [`PROBE_INTERVAL`]) failed or took over [`PROBE_TIMEOUT`].
    pub async fn lost(&self) -> String {
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            probe.tick().await;
            if self.client.is_closed() {
                return "the HA lock's connection closed".into();
            }
            match tokio::time::timeout(PROBE_TIMEOUT, self.client.simple_query("SELECT 1")).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    return format!(
                        "the HA lock's connection failed: {}",
                        sluice_postgres::error::Chain(&error)
                    )
                }
                Err(_) => {
                    return format!(
                        "the HA lock's connection did not answer within {} s",
                        PROBE_TIMEOUT.as_secs()
                    )
                }
            }
        }
    }
}
