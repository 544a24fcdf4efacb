//! What an operator sees of a running pipeline: the state shared by the pipeline, the HTTP
//! endpoints and `sluice status`; the sampler that turns it into gauges once a second; and the
//! slot inspection that watches WAL retention.
//!
//! Lag is reported three ways:
//! - `sluice_source_lag_bytes`: the server's WAL position minus the slot's confirmed flush
//!   position, from `pg_replication_slots` every `slot_check_interval`. This is what the slot
//!   holds back and what a restart would read again.
//! - `sluice_apply_lag_bytes`: received minus durable, what is inside sluice right now.
//! - `sluice_lag_seconds`: now minus the commit time of the last transaction durable in the
//!   target. Heartbeats (non-transactional WAL messages every `heartbeat_interval`) count as
//!   transactions here, so on an idle database the figure stays below the heartbeat interval
//!   plus the real delay, and it grows when the stream stalls.

use sluice_core::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use sluice_core::Lsn;
use sluice_postgres::{ConnectionConfig, SourceStats};

use crate::config::Config;
use crate::metrics as m;
use crate::targets::TargetStats;

/// The slot as `pg_replication_slots` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SlotInfo {
    /// The slot's name.
    pub name: String,
    /// The slot exists.
    pub exists: bool,
    /// A client streams from it now.
    pub active: bool,
    /// The server process streaming from it.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// The oldest WAL the slot keeps.
    pub restart_lsn: Option<String>,
    /// The position the consumer confirmed.
    pub confirmed_flush_lsn: Option<String>,
    /// The server's current WAL position.
    pub server_wal_lsn: Option<String>,
    /// Current WAL position minus restart_lsn.
    pub retained_wal_bytes: Option<i64>,
    /// `safe_wal_size`; none when `max_slot_wal_keep_size` is unlimited.
    pub safe_wal_size_bytes: Option<i64>,
    /// Current WAL position minus confirmed_flush_lsn.
    pub lag_bytes: Option<i64>,
    /// The server is a standby (decoding on a standby): `server_wal_lsn` is its replay position.
    pub on_standby: bool,
    /// On a standby: the primary's current WAL position, read through
    /// `source.heartbeat_connection` (none without it, or while the primary does not answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_wal_lsn: Option<String>,
    /// On a standby: the primary's WAL position minus the standby's replay position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby_replay_lag_bytes: Option<i64>,
    /// On a standby: the primary's WAL position minus the slot's confirmed position (the
    /// standby's replay lag plus the slot's own lag on the standby).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_behind_primary_bytes: Option<i64>,
    /// Failover-slot state (PG 17+).
    pub failover: Option<sluice_postgres::setup::FailoverState>,
}

/// Where the daemon's `/status` reads the slot from.
#[derive(Debug)]
struct Inspect {
    connection: ConnectionConfig,
    /// `source.heartbeat_connection`: the primary, when the source is a standby.
    primary: Option<ConnectionConfig>,
    slot: String,
}

/// State shared by the pipeline, the sampler and the HTTP endpoints.
#[derive(Debug)]
pub struct PipelineState {
    /// The pipeline's name.
    pub name: String,
    source: OnceLock<Arc<SourceStats>>,
    /// The target's counters.
    pub target: Arc<TargetStats>,
    durable_lsn: AtomicU64,
    /// Postgres-epoch microseconds of the newest durable commit; none before the first.
    durable_commit_time: Mutex<Option<i64>>,
    /// This process holds the HA lock (or HA is off) and runs the pipeline.
    pub active: AtomicBool,
    /// A standby's last attempt at the HA lock reached Postgres (the lock is held elsewhere).
    pub standby_healthy: AtomicBool,
    slot: Mutex<Option<SlotInfo>>,
    /// Each published table's migration phase, as last read.
    migration: Mutex<Option<std::collections::BTreeMap<String, crate::migration::Phase>>>,
    /// Unpublished rows of a polled outbox table; none when not polling or not counted yet.
    outbox_backlog: Mutex<Option<i64>>,
    /// The background verify's passes; none when it is off (or this replica stands by).
    verify: Mutex<Option<crate::verify::background::VerifySummary>>,
    ready_max_lag: Duration,
    heartbeats: bool,
    /// Changes handed to the target: the sum of `sluice_events_total`.
    changes: AtomicU64,
    /// The source is a replication slot (positions are LSNs), not a polled table.
    replication: bool,
    /// Where to inspect the slot afresh for `/status`: the source connection and the slot.
    inspect: Option<Inspect>,
}

/// A point-in-time view for `/status` and `sluice status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The pipeline's name.
    pub pipeline: String,
    /// `active` (streams), `standby` (waits for the HA lock).
    pub role: &'static str,
    /// The source streams (or polls) now.
    pub streaming: bool,
    /// `/readyz` answers 200.
    pub ready: bool,
    /// Why it does not, when it does not.
    pub not_ready_reason: Option<String>,
    /// The newest position received from the source (replication sources).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_lsn: Option<String>,
    /// The position through which changes are durable in the target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durable_lsn: Option<String>,
    /// The position sluice confirmed to the slot, read before the slot (so never ahead of the
    /// server's WAL position shown with it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed_lsn: Option<String>,
    /// WAL bytes between the received and the durable position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apply_lag_bytes: Option<u64>,
    /// Seconds since the newest durable commit was made in the source.
    pub lag_seconds: Option<f64>,
    /// Changes handed to the target (row changes and truncates, as `sluice_events_total`).
    pub events: u64,
    /// Operations applied by the target.
    pub applied: u64,
    /// Operations the target found already applied (replays).
    pub already_applied: u64,
    /// Target requests retried.
    pub retries: u64,
    /// Changes dead-lettered.
    pub dead_lettered: u64,
    /// Source sessions started again.
    pub reconnects: u64,
    /// The slot, as last inspected (replication sources).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<SlotInfo>,
    /// The slot was read for this answer, after the positions above; false: it is the
    /// sampler's last inspection (Postgres did not answer in time), older than the positions.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub slot_fresh: bool,
    /// Polling source: rows of the outbox table not yet published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_backlog_rows: Option<i64>,
    /// Each published table's migration phase, as last read (replication sources).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<std::collections::BTreeMap<String, crate::migration::Phase>>,
    /// The background verify's passes (`[verify]`), when it runs here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<crate::verify::background::VerifySummary>,
}

impl PipelineState {
    /// The state of `config`'s pipeline.
    pub fn new(config: &Config) -> Arc<Self> {
        let mut state = Self::with(
            &config.pipeline.name,
            config.monitoring.ready_max_lag,
            config.source.replication().is_some_and(|r| !r.heartbeat_interval.is_zero()),
        );
        state.replication = config.source.replication().is_some();
        state.inspect = config.source.replication().map(|r| Inspect {
            connection: config.source.connection.clone(),
            primary: config.source.heartbeat_connection.clone(),
            slot: r.slot.clone(),
        });
        Arc::new(state)
    }

    /// A state for a pipeline named `name` (tests and the benchmark).
    pub fn with(name: &str, ready_max_lag: Duration, heartbeats: bool) -> Self {
        PipelineState {
            name: name.to_owned(),
            source: OnceLock::new(),
            target: Arc::new(TargetStats::default()),
            durable_lsn: AtomicU64::new(0),
            durable_commit_time: Mutex::new(None),
            active: AtomicBool::new(false),
            standby_healthy: AtomicBool::new(false),
            slot: Mutex::new(None),
            migration: Mutex::new(None),
            outbox_backlog: Mutex::new(None),
            verify: Mutex::new(None),
            ready_max_lag,
            heartbeats,
            changes: AtomicU64::new(0),
            replication: true,
            inspect: None,
        }
    }

    /// The status with the slot inspected after the positions were read, so that the two
    /// agree (the confirmed position is never ahead of the server's WAL position beside it).
    /// Without an answer within five seconds, the slot as last inspected (`slot_fresh` false).
    pub async fn status_now(&self) -> Status {
        let mut status = self.status();
        if let Some(Inspect { connection, primary, slot }) = &self.inspect {
            let fresh = async {
                let client = sluice_postgres::connect_sql(connection).await.ok()?;
                let mut info = inspect_slot(&client, slot).await.ok()?;
                if let Some(primary) = primary.as_ref().filter(|_| info.on_standby) {
                    if let Ok(primary) = sluice_postgres::connect_sql(primary).await {
                        let _ = read_primary(&mut info, &primary).await;
                    }
                }
                Some(info)
            };
            if let Ok(Some(info)) = tokio::time::timeout(Duration::from_secs(5), fresh).await {
                status.slot = Some(info.clone());
                status.slot_fresh = true;
                self.set_slot(info);
            }
        }
        status
    }

    /// Counts changes handed to the target (the pipeline, beside `sluice_events_total`).
    pub fn count_changes(&self, n: u64) {
        self.changes.fetch_add(n, Ordering::Relaxed);
    }

    /// Changes the background verify's summary (made on first use).
    pub fn update_verify(&self, change: impl FnOnce(&mut crate::verify::background::VerifySummary)) {
        change(self.verify.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Default::default));
    }

    /// Stores the slot as just inspected.
    pub fn set_slot(&self, slot: SlotInfo) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(slot);
    }

    /// Called once by the pipeline when its source exists.
    pub fn set_source(&self, stats: Arc<SourceStats>) {
        let _ = self.source.set(stats);
    }

    /// Records that changes through `lsn` are durable (committed at `commit_time`).
    pub fn set_durable(&self, lsn: Lsn, commit_time: Option<i64>) {
        self.durable_lsn.fetch_max(lsn.0, Ordering::Relaxed);
        if let Some(time) = commit_time {
            let mut newest = self.durable_commit_time.lock().unwrap_or_else(|e| e.into_inner());
            *newest = Some(newest.map_or(time, |t| t.max(time)));
        }
    }

    fn streaming(&self) -> bool {
        self.source.get().is_some_and(|s| s.streaming.load(Ordering::Relaxed))
    }

    /// Seconds since the last durable commit (or heartbeat); none before the first.
    pub fn lag_seconds(&self) -> Option<f64> {
        let time = (*self.durable_commit_time.lock().unwrap_or_else(|e| e.into_inner()))?;
        Some(((sluice_postgres::now_pg_micros() - time) as f64 / 1e6).max(0.0))
    }

    /// Ready: this replica streams, and (with heartbeats) the target is within `ready_max_lag`.
    /// With `standby_ok`, a standby that reaches Postgres and waits for the HA lock counts as
    /// ready too (Kubernetes' readiness, so that a PodDisruptionBudget sees both replicas).
    pub fn readiness(&self, standby_ok: bool) -> Result<(), String> {
        if !self.active.load(Ordering::Relaxed) {
            return match (standby_ok, self.standby_healthy.load(Ordering::Relaxed)) {
                (true, true) => Ok(()),
                (_, false) => {
                    Err("standby: cannot reach Postgres to wait for the HA lock (or not tried yet)".into())
                }
                (false, true) => Err("standby: another replica holds the HA lock".into()),
            };
        }
        if !self.streaming() {
            return Err("not streaming (connecting or reconnecting to Postgres)".into());
        }
        if self.heartbeats {
            match self.lag_seconds() {
                None => return Err("no transaction or heartbeat has reached the target yet".into()),
                Some(lag) if lag > self.ready_max_lag.as_secs_f64() => {
                    return Err(format!(
                        "lag {lag:.1}s exceeds monitoring.ready_max_lag ({:?})",
                        self.ready_max_lag
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// A snapshot of the state.
    pub fn status(&self) -> Status {
        let source = self.source.get();
        let load =
            |f: fn(&SourceStats) -> &AtomicU64| source.map(|s| f(s).load(Ordering::Relaxed)).unwrap_or(0);
        let received = load(|s| &s.received_lsn);
        let durable = self.durable_lsn.load(Ordering::Relaxed);
        let readiness = self.readiness(false);
        let replication = self.replication;
        Status {
            pipeline: self.name.clone(),
            role: if self.active.load(Ordering::Relaxed) { "active" } else { "standby" },
            streaming: self.streaming(),
            ready: readiness.is_ok(),
            not_ready_reason: readiness.err(),
            received_lsn: replication.then(|| Lsn(received).to_string()),
            durable_lsn: replication.then(|| Lsn(durable).to_string()),
            confirmed_lsn: replication.then(|| Lsn(load(|s| &s.confirmed_lsn)).to_string()),
            apply_lag_bytes: replication.then(|| received.saturating_sub(durable)),
            lag_seconds: self.lag_seconds(),
            events: self.changes.load(Ordering::Relaxed),
            applied: self.target.applied.load(Ordering::Relaxed),
            already_applied: self.target.already_applied.load(Ordering::Relaxed),
            retries: self.target.retries.load(Ordering::Relaxed),
            dead_lettered: self.target.dead_lettered.load(Ordering::Relaxed),
            reconnects: load(|s| &s.reconnects),
            slot: if replication {
                self.slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
            } else {
                None
            },
            slot_fresh: false,
            outbox_backlog_rows: *self.outbox_backlog.lock().unwrap_or_else(|e| e.into_inner()),
            migration: self.migration.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            verify: self.verify.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// Writes the sampled gauges and counters.
    fn sample(&self) {
        let status = self.status();
        metrics::gauge!(m::HA_ACTIVE).set(if self.active.load(Ordering::Relaxed) { 1.0 } else { 0.0 });
        metrics::gauge!(m::READY).set(if status.ready { 1.0 } else { 0.0 });
        metrics::gauge!(m::SOURCE_STREAMING).set(if status.streaming { 1.0 } else { 0.0 });
        if let Some(lag) = status.apply_lag_bytes {
            metrics::gauge!(m::APPLY_LAG_BYTES).set(lag as f64);
        }
        if let Some(lag) = status.lag_seconds {
            metrics::gauge!(m::LAG_SECONDS).set(lag);
        }
        if let Some(backlog) = status.outbox_backlog_rows {
            metrics::gauge!(m::OUTBOX_BACKLOG_ROWS).set(backlog as f64);
        }
        metrics::gauge!(m::DURABLE_LSN).set(self.durable_lsn.load(Ordering::Relaxed) as f64);
        if let Some(source) = self.source.get() {
            metrics::gauge!(m::RECEIVED_LSN).set(source.received_lsn.load(Ordering::Relaxed) as f64);
            metrics::gauge!(m::SPILLED_BYTES).set(source.spilled_bytes.load(Ordering::Relaxed) as f64);
            metrics::counter!(m::SOURCE_BYTES_TOTAL).absolute(source.bytes.load(Ordering::Relaxed));
            metrics::counter!(m::SOURCE_RECONNECTS_TOTAL).absolute(source.reconnects.load(Ordering::Relaxed));
            metrics::counter!(m::SOURCE_READS_TOTAL).absolute(source.socket_reads.load(Ordering::Relaxed));
            metrics::counter!(m::ORIGIN_DROPPED_TOTAL)
                .absolute(source.origin_dropped.load(Ordering::Relaxed));
            metrics::counter!(m::HEARTBEATS_SENT_TOTAL)
                .absolute(source.heartbeats_sent.load(Ordering::Relaxed));
            metrics::counter!(m::HEARTBEATS_RECEIVED_TOTAL)
                .absolute(source.heartbeats_received.load(Ordering::Relaxed));
        }
        let target = &self.target;
        metrics::counter!(m::TARGET_WRITES_TOTAL, "outcome" => "applied")
            .absolute(target.applied.load(Ordering::Relaxed));
        metrics::counter!(m::TARGET_WRITES_TOTAL, "outcome" => "already_applied")
            .absolute(target.already_applied.load(Ordering::Relaxed));
        metrics::counter!(m::TARGET_RETRIES_TOTAL).absolute(target.retries.load(Ordering::Relaxed));
        metrics::counter!(m::DEAD_LETTER_TOTAL).absolute(target.dead_lettered.load(Ordering::Relaxed));
    }
}

const SLOT_QUERY: &str = "SELECT s.active, s.active_pid, s.wal_status, s.restart_lsn::text, s.confirmed_flush_lsn::text, w.lsn::text,
        (w.lsn - s.restart_lsn)::int8, s.safe_wal_size::int8, (w.lsn - s.confirmed_flush_lsn)::int8, pg_is_in_recovery()
   FROM pg_replication_slots s,
        LATERAL (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END AS lsn) w
  WHERE s.slot_name = $1";

/// Reads the slot's row from `pg_replication_slots`.
pub async fn inspect_slot(
    sql: &tokio_postgres::Client,
    slot: &str,
) -> Result<SlotInfo, tokio_postgres::Error> {
    let row = sql.query_opt(SLOT_QUERY, &[&slot]).await?;
    let Some(row) = row else { return Ok(SlotInfo { name: slot.to_owned(), ..SlotInfo::default() }) };
    Ok(SlotInfo {
        name: slot.to_owned(),
        exists: true,
        active: row.get(0),
        active_pid: row.get(1),
        wal_status: row.get(2),
        restart_lsn: row.get(3),
        confirmed_flush_lsn: row.get(4),
        server_wal_lsn: row.get(5),
        retained_wal_bytes: row.get(6),
        safe_wal_size_bytes: row.get(7),
        lag_bytes: row.get(8),
        on_standby: row.get(9),
        failover: sluice_postgres::setup::failover_state(sql, slot).await?,
        ..SlotInfo::default()
    })
}

/// On a standby, reads the primary's WAL position (through `primary`, a session on
/// `source.heartbeat_connection`) into `info`: how far the standby's replay and the slot trail
/// it. A "primary" that is itself in recovery has no position of its own to give.
pub async fn read_primary(
    info: &mut SlotInfo,
    primary: &tokio_postgres::Client,
) -> Result<(), tokio_postgres::Error> {
    let row = primary
        .query_one("SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END", &[])
        .await?;
    let position: Option<String> = row.get(0);
    let lsn = position.as_deref().and_then(|p| p.parse::<Lsn>().ok());
    let behind = |of: &Option<String>| {
        let of = of.as_deref()?.parse::<Lsn>().ok()?;
        Some(lsn?.0.saturating_sub(of.0).min(i64::MAX as u64) as i64)
    };
    info.standby_replay_lag_bytes = behind(&info.server_wal_lsn);
    info.lag_behind_primary_bytes = behind(&info.confirmed_flush_lsn);
    info.primary_wal_lsn = position;
    Ok(())
}

/// Samples the state into gauges every second and inspects the slot every
/// `monitoring.slot_check_interval`, warning while it retains more than
/// `monitoring.retained_wal_warn_bytes`. Runs until `shutdown`.
pub async fn run(state: Arc<PipelineState>, config: Config, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let check_every = config.monitoring.slot_check_interval;
    let mut next_check = tokio::time::Instant::now();
    let mut sql: Option<tokio_postgres::Client> = None;
    let mut primary_sql: Option<tokio_postgres::Client> = None;
    let mut warned_unreachable = false;
    let mut warned_primary = false;
    let mut retention = RetentionWarning::default();
    let mut last_failover_warning: Option<String> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.requested() => return,
        }
        if tokio::time::Instant::now() >= next_check {
            next_check = tokio::time::Instant::now() + check_every;
            // A polling source has no slot to inspect: count its backlog instead.
            let Some(replication) = config.source.replication() else {
                if let Some(poll) = config.source.poll() {
                    match count_backlog(&mut sql, &config.source.connection, poll).await {
                        Ok(rows) => {
                            *state.outbox_backlog.lock().unwrap_or_else(|e| e.into_inner()) = Some(rows)
                        }
                        Err(error) => {
                            sql = None;
                            tracing::warn!(error = %sluice_postgres::error::Chain(&error), table = %poll.table, "cannot count the outbox backlog");
                        }
                    }
                }
                state.sample();
                continue;
            };
            match check_slot(&mut sql, &config.source.connection, &replication.slot).await {
                Ok(mut info) => {
                    warned_unreachable = false;
                    if let Some(primary) =
                        config.source.heartbeat_connection.as_ref().filter(|_| info.on_standby)
                    {
                        match check_primary(&mut primary_sql, primary, &mut info).await {
                            Ok(()) => warned_primary = false,
                            Err(error) => {
                                primary_sql = None;
                                if !warned_primary {
                                    tracing::warn!(error = %sluice_postgres::error::Chain(&error),
                                        "cannot read the primary's WAL position (source.heartbeat_connection)");
                                    warned_primary = true;
                                }
                            }
                        }
                    }
                    record_slot(&info);
                    retention.check(&info, config.monitoring.retained_wal_warn_bytes);
                    let failover_warning = info.failover.as_ref().and_then(|f| f.warning.clone());
                    if failover_warning != last_failover_warning {
                        match &failover_warning {
                            Some(warning) => tracing::warn!(slot = %info.name, "{warning}"),
                            None => {
                                tracing::info!(slot = %info.name, "a standby keeps the failover slot in step again")
                            }
                        }
                        last_failover_warning = failover_warning;
                    }
                    *state.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
                    if let Some(client) = &sql {
                        let phases = crate::migration::published_phases(
                            client,
                            &config.migration,
                            &config.pipeline.name,
                            &replication.publication,
                        );
                        match tokio::time::timeout(Duration::from_secs(10), phases).await {
                            Ok(Ok(phases)) => {
                                record_phases(&phases);
                                *state.migration.lock().unwrap_or_else(|e| e.into_inner()) = Some(phases);
                            }
                            Ok(Err(error)) => {
                                tracing::warn!(%error, "cannot read the tables' migration phases")
                            }
                            Err(_) => {
                                tracing::warn!("reading the tables' migration phases timed out after 10 s")
                            }
                        }
                    }
                }
                Err(error) => {
                    sql = None;
                    if !warned_unreachable {
                        tracing::warn!(error = %sluice_postgres::error::Chain(&error), "cannot inspect the replication slot");
                        warned_unreachable = true;
                    }
                }
            }
        }
        state.sample();
    }
}

/// `sluice_migration_phase{table, phase}`: 1 for each table's phase, 0 for the others.
fn record_phases(phases: &std::collections::BTreeMap<String, crate::migration::Phase>) {
    for (table, current) in phases {
        for phase in crate::migration::Phase::ALL {
            metrics::gauge!(m::MIGRATION_PHASE, "table" => table.clone(), "phase" => phase.as_str())
                .set(if phase == *current { 1.0 } else { 0.0 });
        }
    }
}

/// The session in `sql`, (re)connected to `conn` when there is none or it closed.
async fn session<'a>(
    sql: &'a mut Option<tokio_postgres::Client>,
    conn: &ConnectionConfig,
) -> Result<&'a tokio_postgres::Client, sluice_postgres::Error> {
    if sql.as_ref().is_none_or(|c| c.is_closed()) {
        *sql = Some(sluice_postgres::connect_sql(conn).await?);
    }
    Ok(sql.as_ref().expect("connected above"))
}

async fn count_backlog(
    sql: &mut Option<tokio_postgres::Client>,
    conn: &ConnectionConfig,
    poll: &sluice_postgres::PollConfig,
) -> Result<i64, sluice_postgres::Error> {
    let client = session(sql, conn).await?;
    match tokio::time::timeout(Duration::from_secs(10), sluice_postgres::poll::backlog(client, poll)).await {
        Ok(result) => result,
        Err(_) => {
            Err(sluice_postgres::Error::Setup("counting the outbox backlog timed out after 10 s".into()))
        }
    }
}

async fn check_slot(
    sql: &mut Option<tokio_postgres::Client>,
    conn: &ConnectionConfig,
    slot: &str,
) -> Result<SlotInfo, sluice_postgres::Error> {
    let client = session(sql, conn).await?;
    match tokio::time::timeout(Duration::from_secs(10), inspect_slot(client, slot)).await {
        Ok(result) => result.map_err(sluice_postgres::Error::Sql),
        Err(_) => Err(sluice_postgres::Error::Setup("slot inspection timed out after 10 s".into())),
    }
}

async fn check_primary(
    sql: &mut Option<tokio_postgres::Client>,
    conn: &ConnectionConfig,
    info: &mut SlotInfo,
) -> Result<(), sluice_postgres::Error> {
    let client = session(sql, conn).await?;
    match tokio::time::timeout(Duration::from_secs(10), read_primary(info, client)).await {
        Ok(result) => result.map_err(sluice_postgres::Error::Sql),
        Err(_) => Err(sluice_postgres::Error::Setup(
            "reading the primary's WAL position timed out after 10 s".into(),
        )),
    }
}

/// Warns when the slot's retained WAL crosses the threshold, again every ten minutes while it
/// stays above, and notes when it falls back below.
#[derive(Default)]
struct RetentionWarning {
    last_warned: Option<tokio::time::Instant>,
}

impl RetentionWarning {
    const REPEAT: Duration = Duration::from_secs(600);

    fn check(&mut self, info: &SlotInfo, threshold: u64) {
        let Some(retained) = info.retained_wal_bytes else { return };
        if retained.max(0) as u64 > threshold {
            if self.last_warned.is_none_or(|at| at.elapsed() >= Self::REPEAT) {
                tracing::warn!(slot = %info.name, retained_wal_bytes = retained, threshold,
                    "the replication slot retains more WAL than monitoring.retained_wal_warn_bytes");
                self.last_warned = Some(tokio::time::Instant::now());
            }
        } else if self.last_warned.take().is_some() {
            tracing::info!(slot = %info.name, retained_wal_bytes = retained, threshold, "the replication slot's retained WAL is below the threshold again");
        }
    }
}

fn record_slot(info: &SlotInfo) {
    if let (Some(server), Some(confirmed)) = (&info.server_wal_lsn, &info.confirmed_flush_lsn) {
        if let (Ok(server), Ok(confirmed)) = (server.parse::<Lsn>(), confirmed.parse::<Lsn>()) {
            metrics::gauge!(m::SERVER_WAL_LSN).set(server.0 as f64);
            metrics::gauge!(m::CONFIRMED_FLUSH_LSN).set(confirmed.0 as f64);
        }
    }
    if let Some(lag) = info.lag_bytes {
        metrics::gauge!(m::SOURCE_LAG_BYTES).set(lag.max(0) as f64);
    }
    if let Some(retained) = info.retained_wal_bytes {
        metrics::gauge!(m::SLOT_RETAINED_WAL_BYTES).set(retained.max(0) as f64);
    }
    if let Some(behind) = info.standby_replay_lag_bytes {
        metrics::gauge!(m::STANDBY_REPLAY_LAG_BYTES).set(behind as f64);
    }
    if let Some(behind) = info.lag_behind_primary_bytes {
        metrics::gauge!(m::LAG_BEHIND_PRIMARY_BYTES).set(behind as f64);
    }
    if let Some(safe) = info.safe_wal_size_bytes {
        metrics::gauge!(m::SLOT_SAFE_WAL_SIZE_BYTES).set(safe as f64);
    }
    if let Some(failover) = info.failover.as_ref().filter(|f| f.failover) {
        metrics::gauge!(m::SLOT_FAILOVER_READY).set(if failover.warning.is_none() { 1.0 } else { 0.0 });
    }
    for status in ["reserved", "extended", "unreserved", "lost"] {
        let value = if info.wal_status.as_deref() == Some(status) { 1.0 } else { 0.0 };
        metrics::gauge!(m::SLOT_WAL_STATUS, "status" => status).set(value);
    }
    if info.wal_status.as_deref() == Some("lost") {
        tracing::error!(slot = %info.name, "the replication slot was invalidated (wal_status = lost): changes were lost; see source.replication.on_slot_lost");
    }
}
