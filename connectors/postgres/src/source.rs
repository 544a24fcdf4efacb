//! The logical replication source: streams a slot through pgoutput and hands change events to
//! the pipeline in commit order, confirming positions upstream only once the pipeline reports
//! them durable.
//!
//! Acknowledgement protocol:
//! - Batches go to the pipeline over a bounded channel (backpressure keeps memory bounded: a
//!   transaction of any size flows through in slices of at most `batch_max_events`).
//! - The pipeline publishes the highest source LSN that is durable in the target (a `watch`).
//!   Standby status updates report it as the flush position; it never moves backwards.
//! - When everything sent is durable and no transaction is open, the WAL end from the latest
//!   keepalive is confirmed instead, so the slot advances while unpublished tables churn.
//! - After a lost connection the stream restarts after the last transaction handed over
//!   completely; a transaction cut in the middle is sent again from its Begin.

use sluice_core::{Backoff, Classify, RetryPolicy, Shutdown};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use tokio::sync::{mpsc, watch};
use tokio::time::Interval;

use crate::client::{connect_sql_choosing, ReplicationClient};
use crate::config::{ConnectionConfig, ReplicationConfig};
use crate::decode::Decoder;
use crate::error::{Error, Result};
use crate::pgoutput::{self, LogicalMessage};
use crate::setup::{self, publication_option, quote_ident};
use crate::spill::SpillStore;
use sluice_core::event::{ChangeEvent, EventBatch};
use sluice_core::lsn::Lsn;

/// Tuning that is not part of the user-facing replication settings.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Most events in one batch handed to the pipeline.
    pub batch_max_events: usize,
    /// Most bytes of change data in one batch.
    pub batch_max_bytes: usize,
    /// How long transient failures (network, server restart) are retried before giving up.
    pub retry_for: Duration,
    /// On shutdown, how long to wait for the pipeline to make sent batches durable.
    pub shutdown_timeout: Duration,
    /// Replication origins whose transactions are not delivered (sluice's own writes into
    /// this database from the other direction): no loops. Their commits still advance the
    /// position.
    pub drop_origins: Vec<String>,
    /// The primary, when the source connection is a standby: heartbeats go there, and slot
    /// creation asks it for the snapshot record a standby waits for.
    pub heartbeat_connection: Option<ConnectionConfig>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            batch_max_events: 4096,
            batch_max_bytes: 8 * 1024 * 1024,
            retry_for: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(30),
            drop_origins: Vec::new(),
            heartbeat_connection: None,
        }
    }
}

/// Counters the source keeps for status and metrics.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Highest WAL position received from the server.
    pub received_lsn: AtomicU64,
    /// Highest position confirmed to the server (standby status flush).
    pub confirmed_lsn: AtomicU64,
    /// Server WAL end from the latest keepalive.
    pub server_wal_end: AtomicU64,
    /// Change events delivered.
    pub events: AtomicU64,
    /// Bytes of change data received.
    pub bytes: AtomicU64,
    /// Sessions started again after a lost connection.
    pub reconnects: AtomicU64,
    /// Reads of the replication socket (with `bytes`, how many messages one read takes).
    pub socket_reads: AtomicU64,
    /// Bytes of streamed transactions held in spill files now.
    pub spilled_bytes: AtomicU64,
    /// True while a session is streaming (after START_REPLICATION and set-up).
    pub streaming: AtomicBool,
    /// Heartbeat messages emitted.
    pub heartbeats_sent: AtomicU64,
    /// Heartbeat messages received back through the stream.
    pub heartbeats_received: AtomicU64,
    /// Invalidated slots dropped and created anew (`on_slot_lost = "recreate"`).
    pub slots_recreated: AtomicU64,
    /// Transactions not delivered because they carry a dropped replication origin.
    pub origin_dropped: AtomicU64,
    /// Transactions with nothing to deliver (PG 14 sends one for every transaction, published or not).
    pub empty_transactions: AtomicU64,
    /// Streamed transactions (or subtransactions) that rolled back; with `streaming = "parallel"`
    /// the abort's LSN comes along and is logged.
    pub streamed_aborts: AtomicU64,
    /// The LSN of the last streamed abort, when the server sends it (`streaming = "parallel"`).
    pub last_abort_lsn: AtomicU64,
}

/// The prefix of heartbeat messages; their content is the emit time in Unix microseconds.
pub const HEARTBEAT_PREFIX: &str = "sluice.heartbeat";

/// The prefix of the backfill's watermark messages (transactional). They are delivered even
/// when `messages` is off: the pipeline consumes them.
pub const WATERMARK_PREFIX: &str = "sluice.watermark";

fn heartbeat_time(content: &[u8]) -> Option<i64> {
    let unix_micros: i64 = std::str::from_utf8(content).ok()?.trim().parse().ok()?;
    Some(unix_micros - crate::client::PG_EPOCH_OFFSET_MICROS)
}

/// Streams one slot. Create with `new`, then `run` until shutdown or a fatal error.
pub struct ReplicationSource {
    conn: ConnectionConfig,
    repl: ReplicationConfig,
    options: SourceOptions,
    stats: Arc<SourceStats>,
    decoder: Decoder,
    spill: SpillStore,
    sql: Option<tokio_postgres::Client>,
    /// Inside Stream Start … Stream Stop: the top-level xid.
    stream_xid: Option<u32>,
    /// The open transaction's Begin, held back until its first change: a transaction without
    /// one (PG 14 sends those for every transaction on unpublished tables) is never delivered.
    pending_begin: Option<ChangeEvent>,
    batch: EventBatch,
    batch_bytes: usize,
    received: Lsn,
    /// End LSN of the last transaction handed to the pipeline completely.
    last_sent_ack: Lsn,
    /// This session's `EventBatch::redelivery_horizon`.
    redelivery_horizon: Option<Lsn>,
    /// Off when `heartbeat_interval` is zero or the role may not write heartbeats.
    heartbeat_enabled: bool,
    /// The host streamed from last, when several are configured.
    server_addr: Option<String>,
    /// The source server is a standby: heartbeats go to `primary`.
    on_standby: bool,
    /// A session on `SourceOptions::heartbeat_connection`, opened at the first heartbeat.
    primary: Option<tokio_postgres::Client>,
    /// WAL end of a keepalive seen while no transaction was open.
    idle_wal_end: Lsn,
    reported_flush: Lsn,
    last_status: Instant,
    /// A status update owed because the durable position moved (sent at most once a second).
    status_due: Option<tokio::time::Instant>,
}

/// What a session needs besides the source's own state.
struct Session<'a> {
    client: ReplicationClient,
    ticker: Interval,
    tx: &'a mpsc::Sender<EventBatch>,
    durable: &'a mut watch::Receiver<Lsn>,
}

impl ReplicationSource {
    /// A source for this slot, not yet connected.
    pub fn new(conn: ConnectionConfig, repl: ReplicationConfig, options: SourceOptions) -> Self {
        let spill = SpillStore::new(repl.spill_dir.clone());
        let heartbeat_enabled = !repl.heartbeat_interval.is_zero();
        let decoder = Decoder::default().dropping_origins(options.drop_origins.clone());
        ReplicationSource {
            conn,
            repl,
            options,
            stats: Arc::new(SourceStats::default()),
            decoder,
            spill,
            sql: None,
            stream_xid: None,
            pending_begin: None,
            batch: EventBatch::default(),
            batch_bytes: 0,
            received: Lsn::ZERO,
            last_sent_ack: Lsn::ZERO,
            redelivery_horizon: None,
            heartbeat_enabled,
            server_addr: None,
            on_standby: false,
            primary: None,
            idle_wal_end: Lsn::ZERO,
            reported_flush: Lsn::ZERO,
            last_status: Instant::now(),
            status_due: None,
        }
    }

    /// Counters shared with the monitor.
    pub fn stats(&self) -> Arc<SourceStats> {
        Arc::clone(&self.stats)
    }

    /// Streams until `shutdown` turns true (then drains: waits for sent batches to become
    /// durable, up to `shutdown_timeout`, and confirms them), until the pipeline drops its
    /// receiver, or until a fatal error. Transient failures reconnect with backoff.
    pub async fn run(
        mut self,
        tx: mpsc::Sender<EventBatch>,
        mut durable: watch::Receiver<Lsn>,
        mut shutdown: Shutdown,
    ) -> Result<()> {
        let mut first = true;
        let mut backoff = Backoff::new(
            RetryPolicy::new(self.options.retry_for)
                .with_delays(Duration::from_millis(200), Duration::from_secs(10)),
        );
        loop {
            let started_streaming = AtomicBool::new(false);
            let mut shutdown_during_setup = shutdown.clone();
            let outcome = tokio::select! {
                outcome = self.session(first, &tx, &mut durable, &mut shutdown, &started_streaming) => outcome,
                // Before streaming starts, shutdown abandons set-up; after, the session drains itself.
                _ = async {
                    shutdown_during_setup.requested().await;
                    if started_streaming.load(Ordering::Relaxed) {
                        std::future::pending::<()>().await;
                    }
                } => Ok(()),
            };
            self.stats.streaming.store(false, Ordering::Relaxed);
            match outcome {
                Ok(()) | Err(Error::Stopped) => return Ok(()),
                Err(error) => {
                    // A slot in use may be held by a predecessor that is still going away (a
                    // killed process whose walsender has not noticed yet): wait within retry_for.
                    let retryable = error.is_transient() || matches!(error, Error::SlotInUse { .. });
                    if started_streaming.load(Ordering::Relaxed) {
                        backoff.reset();
                    }
                    let Some(delay) = backoff.next_delay().filter(|_| retryable) else {
                        return Err(error);
                    };
                    tracing::warn!(
                        error = %crate::error::Chain(&error),
                        retry_in_ms = delay.as_millis() as u64,
                        gives_up_in_s = backoff.gives_up_in().as_secs(),
                        "replication connection failed; retrying"
                    );
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.reset_session_state();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.requested() => return Ok(()),
                    }
                    first = false;
                }
            }
        }
    }

    fn reset_session_state(&mut self) {
        self.decoder.reset_transaction();
        self.spill.clear();
        self.stream_xid = None;
        self.pending_begin = None;
        self.batch = EventBatch::default();
        self.batch_bytes = 0;
        self.sql = None;
    }

    async fn session(
        &mut self,
        first: bool,
        tx: &mpsc::Sender<EventBatch>,
        durable: &mut watch::Receiver<Lsn>,
        shutdown: &mut Shutdown,
        started: &AtomicBool,
    ) -> Result<()> {
        // With several hosts, the SQL session picks the server; the replication connection follows.
        let (sql, server) = connect_sql_choosing(&self.conn, "sluice").await?;
        if self.conn.chooses() && self.server_addr.as_deref() != Some(server.addr().as_str()) {
            tracing::info!(host = %server.addr(), target_session_attrs = self.conn.target_session_attrs.name(),
                "source server chosen among the configured hosts");
            self.server_addr = Some(server.addr());
        }
        let mut client = ReplicationClient::connect(&server, self.repl.pacing()).await?;
        let slot = setup::check(&sql, &server, &self.repl).await?;
        self.on_standby = slot.server.in_recovery;
        if self.on_standby && self.heartbeat_enabled && self.options.heartbeat_connection.is_none() {
            tracing::warn!(host = %server.addr(), "heartbeats disabled: source.connection is a standby, which cannot write WAL; \
                set source.heartbeat_connection to the primary so that the slot advances while the published tables are idle");
            self.heartbeat_enabled = false;
        }
        if first {
            for warning in setup::identity_warnings(&sql, &self.repl.publication).await? {
                tracing::warn!(table = %warning.table, publication = %self.repl.publication, "{}", warning.reason);
            }
        }
        self.sql = Some(sql);
        let identity = client.simple_query("IDENTIFY_SYSTEM").await?;
        let server_lsn = identity
            .first()
            .and_then(|r| r.get(2))
            .and_then(|v| v.as_deref())
            .and_then(|v| v.parse::<Lsn>().ok());
        if slot.dropped_lost {
            tracing::error!(slot = %self.repl.slot, "the replication slot was invalidated and is recreated (on_slot_lost = \"recreate\"): \
                changes made before now and after its last confirmed position are lost; backfill the tables");
            self.stats.slots_recreated.fetch_add(1, Ordering::Relaxed);
            self.last_sent_ack = Lsn::ZERO;
        }
        if !slot.exists && self.on_standby {
            // A standby creates a logical slot at the primary's next running-transactions
            // record: ask the primary for one every second until the slot exists.
            let primary = self.options.heartbeat_connection.clone();
            let nudge = async move {
                let Some(conn) = primary else { return std::future::pending::<()>().await };
                loop {
                    if let Ok(sql) = connect_sql_choosing(&conn, "sluice").await {
                        while sql.0.simple_query("SELECT pg_catalog.pg_log_standby_snapshot()").await.is_ok()
                        {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            };
            tokio::select! {
                created = self.create_slot(&mut client) => created?,
                _ = nudge => {}
            }
        } else if !slot.exists {
            self.create_slot(&mut client).await?;
        } else if self.repl.failover && slot.failover == Some(false) {
            client
                .simple_query(&format!(
                    "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
                    quote_ident(&self.repl.slot)
                ))
                .await?;
            tracing::info!(slot = %self.repl.slot, "made the replication slot a failover slot (source.replication.failover)");
        }
        let start = self.last_sent_ack;
        client.start_replication(&self.start_command(start)).await.map_err(|e| match e.sqlstate() {
            Some("55006") => setup::slot_in_use(&self.repl.slot, None),
            Some("42704") => Error::Setup(format!("replication slot {:?} does not exist", self.repl.slot)),
            _ => e,
        })?;
        // The slot is ours now, so whatever earlier sessions were sent lies below this position.
        self.redelivery_horizon = Some(self.current_wal_insert_lsn().await?);
        tracing::info!(slot = %self.repl.slot, publication = %self.repl.publication,
            start = %start, confirmed_flush = %slot.confirmed_flush_lsn.unwrap_or_default(),
            server_lsn = %server_lsn.unwrap_or_default(), "streaming");
        if let Some((max_wait, buffer)) = client.paced() {
            tracing::debug!(
                receive_buffer = buffer,
                read_coalesce_ms = max_wait.as_millis() as u64,
                "replication reads are paced"
            );
        }
        started.store(true, Ordering::Relaxed);
        self.stats.streaming.store(true, Ordering::Relaxed);
        let mut ticker = tokio::time::interval(self.repl.status_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut session = Session { client, ticker, tx, durable };
        let mut heartbeat =
            tokio::time::interval(self.repl.heartbeat_interval.max(Duration::from_millis(100)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.requested() => return self.drain(session).await,
                _ = session.ticker.tick() => self.send_status(&mut session, false).await?,
                _ = heartbeat.tick(), if self.heartbeat_enabled => self.emit_heartbeat().await,
                changed = session.durable.changed() => {
                    if changed.is_err() {
                        return Err(Error::Stopped);
                    }
                    if self.status_due.is_none() {
                        self.confirm_soon();
                    }
                }
                _ = sleep_until_due(self.status_due) => self.send_status(&mut session, false).await?,
                data = session.client.recv_copy_data() => match data? {
                    Some(data) => {
                        self.on_copy_data(data, &mut session).await?;
                        // Decode whatever is already buffered without another trip through select!.
                        for _ in 0..BUFFERED_FRAMES_PER_WAKE {
                            if !session.client.has_buffered_frame() {
                                break;
                            }
                            match session.client.recv_copy_data().await? {
                                Some(data) => self.on_copy_data(data, &mut session).await?,
                                None => return Err(Error::ConnectionLost(std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof, "the server ended the replication stream"))),
                            }
                        }
                        self.stats.socket_reads.fetch_add(session.client.take_reads(), Ordering::Relaxed);
                        // Completed transactions go out as soon as no more data is waiting.
                        if self.batch.ack_lsn.is_some() && !session.client.has_buffered_frame() {
                            self.send_batch(&mut session).await?;
                        }
                    }
                    None => return Err(Error::ConnectionLost(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof, "the server ended the replication stream"))),
                },
            }
        }
    }

    /// Writes one heartbeat into the WAL. A role that may not call `pg_logical_emit_message`
    /// turns heartbeats off with a warning rather than stopping the stream.
    async fn emit_heartbeat(&mut self) {
        if self.on_standby && self.primary.as_ref().is_none_or(|c| c.is_closed()) {
            let Some(conn) = &self.options.heartbeat_connection else { return };
            match connect_sql_choosing(conn, "sluice").await {
                Ok((client, _)) => self.primary = Some(client),
                Err(e) => {
                    tracing::warn!(error = %crate::error::Chain(&e), "heartbeat: cannot reach source.heartbeat_connection");
                    return;
                }
            }
        }
        let sql = if self.on_standby { self.primary.as_ref() } else { self.sql.as_ref() };
        let Some(sql) = sql else { return };
        let statement = "SELECT pg_logical_emit_message(false, 'sluice.heartbeat', \
                         (extract(epoch FROM clock_timestamp()) * 1000000)::bigint::text)";
        match tokio::time::timeout(Duration::from_secs(10), sql.simple_query(statement)).await {
            Ok(Ok(_)) => {
                self.stats.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                tracing::warn!(error = %e, "heartbeats disabled: this role may not call pg_logical_emit_message (source.replication.heartbeat_interval)");
                self.heartbeat_enabled = false;
            }
            Ok(Err(e)) => tracing::warn!(error = %crate::error::Chain(&e), "heartbeat failed"),
            Err(_) => tracing::warn!("heartbeat timed out after 10 s"),
        }
    }

    async fn current_wal_insert_lsn(&self) -> Result<Lsn> {
        let sql = self.sql.as_ref().ok_or(Error::Stopped)?;
        let text: String = sql.query_one("SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text", &[]).await?.get(0);
        text.parse().map_err(|_| Error::Setup(format!("pg_current_wal_insert_lsn() returned {text:?}")))
    }

    async fn create_slot(&mut self, client: &mut ReplicationClient) -> Result<()> {
        let temporary = if self.repl.temporary_slot { " TEMPORARY" } else { "" };
        // The option list (PG 15+) is needed for FAILOVER; older servers know only the keyword.
        let options =
            if self.repl.failover { "(SNAPSHOT 'nothing', FAILOVER true)" } else { "NOEXPORT_SNAPSHOT" };
        let command = format!(
            "CREATE_REPLICATION_SLOT {}{temporary} LOGICAL pgoutput {options}",
            quote_ident(&self.repl.slot)
        );
        match client.simple_query(&command).await {
            Ok(rows) => {
                let lsn = rows.first().and_then(|r| r.get(1)).and_then(|v| v.as_deref()).unwrap_or("?");
                tracing::info!(slot = %self.repl.slot, consistent_point = lsn, temporary = self.repl.temporary_slot,
                    failover = self.repl.failover, "created replication slot");
                Ok(())
            }
            // Created meanwhile by another process: reuse it.
            Err(e) if e.sqlstate() == Some("42710") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn start_command(&self, start: Lsn) -> String {
        let mut options = vec![
            format!("proto_version '{}'", self.repl.proto_version),
            format!("publication_names {}", publication_option(&self.repl.publication)),
        ];
        // Always: the backfill's watermarks travel as messages.
        options.push("messages 'true'".into());
        if let Some(streaming) = self.repl.streaming.option() {
            options.push(format!("streaming '{streaming}'"));
        }
        if self.repl.origin == crate::config::OriginFilter::None {
            options.push("origin 'none'".into());
        }
        if self.repl.binary {
            options.push("binary 'true'".into());
        }
        format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({})",
            quote_ident(&self.repl.slot),
            options.join(", ")
        )
    }

    async fn on_copy_data(&mut self, mut data: Bytes, session: &mut Session<'_>) -> Result<()> {
        match data.first() {
            Some(b'w') if data.len() >= 25 => {
                data.advance(1);
                let wal_start = Lsn(data.get_u64());
                let wal_end = Lsn(data.get_u64());
                let _send_time = data.get_i64();
                self.received = self.received.max(wal_end).max(wal_start);
                self.stats.received_lsn.store(self.received.0, Ordering::Relaxed);
                self.stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                self.on_message(data, wal_start, session).await
            }
            Some(b'k') if data.len() >= 18 => {
                data.advance(1);
                let wal_end = Lsn(data.get_u64());
                let _send_time = data.get_i64();
                let reply_requested = data.get_u8() == 1;
                self.stats.server_wal_end.store(wal_end.0, Ordering::Relaxed);
                self.received = self.received.max(wal_end);
                if !self.decoder.in_transaction() && self.stream_xid.is_none() && self.batch.events.is_empty()
                {
                    self.idle_wal_end = self.idle_wal_end.max(wal_end);
                }
                if reply_requested {
                    self.send_status(session, false).await?;
                } else if self.status_due.is_none()
                    && self.confirmable(*session.durable.borrow()) > self.reported_flush
                {
                    // Idle WAL can be confirmed: do it soon so the slot does not hold it.
                    self.confirm_soon();
                }
                Ok(())
            }
            _ => Err(Error::protocol(self.received, "unknown or short CopyData message")),
        }
    }

    async fn on_message(&mut self, payload: Bytes, wal_start: Lsn, session: &mut Session<'_>) -> Result<()> {
        let size = payload.len();
        if let Some(top_xid) = self.stream_xid {
            let message = pgoutput::parse(payload.clone(), true)
                .map_err(|e| Error::protocol(wal_start, e.to_string()))?;
            if message == LogicalMessage::StreamStop {
                self.stream_xid = None;
                return Ok(());
            }
            let subxid = message.stream_xid().unwrap_or(top_xid);
            self.spill
                .append(top_xid, subxid, &payload)
                .await
                .map_err(|source| Error::Spill { xid: top_xid, source })?;
            self.stats.spilled_bytes.store(self.spill.bytes_spilled(), Ordering::Relaxed);
            return Ok(());
        }
        let message =
            pgoutput::parse(payload, false).map_err(|e| Error::protocol(wal_start, e.to_string()))?;
        match message {
            LogicalMessage::Begin { final_lsn, commit_time, xid } => {
                let event = self
                    .decoder
                    .begin(final_lsn, xid, commit_time)
                    .map_err(|e| Error::protocol(wal_start, e.to_string()))?;
                self.pending_begin = Some(event);
            }
            LogicalMessage::Commit { end_lsn, commit_time, .. } => {
                let event = self
                    .decoder
                    .commit(end_lsn, commit_time)
                    .map_err(|e| Error::protocol(wal_start, e.to_string()))?;
                self.end_transaction(event, end_lsn, commit_time, session).await?;
            }
            LogicalMessage::StreamStart { xid, .. } => self.stream_xid = Some(xid),
            LogicalMessage::StreamAbort { xid, subxid, abort } => {
                self.stats.streamed_aborts.fetch_add(1, Ordering::Relaxed);
                if let Some((abort_lsn, _)) = abort {
                    self.stats.last_abort_lsn.store(abort_lsn.0, Ordering::Relaxed);
                    tracing::debug!(xid, subxid, abort_lsn = %abort_lsn, "streamed transaction aborted");
                }
                self.spill.abort(xid, subxid).await.map_err(|source| Error::Spill { xid, source })?;
                self.stats.spilled_bytes.store(self.spill.bytes_spilled(), Ordering::Relaxed);
            }
            LogicalMessage::StreamCommit { xid, commit_lsn, end_lsn, commit_time, .. } => {
                self.replay_streamed(xid, commit_lsn, end_lsn, commit_time, session).await?;
            }
            LogicalMessage::Message { transactional: false, lsn, ref prefix, ref content, .. }
                if !self.decoder.in_transaction() =>
            {
                if prefix == HEARTBEAT_PREFIX {
                    // Confirmed like any change once the batch is durable; never delivered.
                    self.batch.commit_time = heartbeat_time(content).or(self.batch.commit_time);
                    self.stats.heartbeats_received.fetch_add(1, Ordering::Relaxed);
                } else if self.repl.messages {
                    if let Some(event) =
                        self.decoder.change(message).map_err(|e| Error::protocol(wal_start, e.to_string()))?
                    {
                        self.push(event, size, session).await?;
                    }
                }
                self.transaction_done(lsn);
            }
            message => self.on_change(message, wal_start, size, session).await?,
        }
        Ok(())
    }

    async fn on_change(
        &mut self,
        message: LogicalMessage,
        at: Lsn,
        size: usize,
        session: &mut Session<'_>,
    ) -> Result<()> {
        // Messages may be requested for heartbeats only: then the application's are not wanted.
        // Both live and spilled (streamed) transactions pass here.
        if let LogicalMessage::Message { prefix, .. } = &message {
            if !self.repl.messages && prefix != WATERMARK_PREFIX {
                return Ok(());
            }
        }
        if let LogicalMessage::Relation(body) = &message {
            let oids: Vec<u32> = body.columns.iter().map(|c| c.type_oid).collect();
            self.ensure_types(oids).await?;
        }
        if let Some(event) = self.decoder.change(message).map_err(|e| Error::protocol(at, e.to_string()))? {
            self.push(event, size, session).await?;
        }
        Ok(())
    }

    async fn replay_streamed(
        &mut self,
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
        session: &mut Session<'_>,
    ) -> Result<()> {
        let begin = self
            .decoder
            .begin(commit_lsn, xid, commit_time)
            .map_err(|e| Error::protocol(commit_lsn, e.to_string()))?;
        self.pending_begin = Some(begin);
        if let Some(mut reader) = self.spill.take(xid).await.map_err(|source| Error::Spill { xid, source })? {
            while let Some(raw) =
                reader.next_message().await.map_err(|source| Error::Spill { xid, source })?
            {
                let size = raw.len();
                let message =
                    pgoutput::parse(raw, true).map_err(|e| Error::protocol(commit_lsn, e.to_string()))?;
                self.on_change(message, commit_lsn, size, session).await?;
            }
        }
        self.stats.spilled_bytes.store(self.spill.bytes_spilled(), Ordering::Relaxed);
        let commit = self
            .decoder
            .commit(end_lsn, commit_time)
            .map_err(|e| Error::protocol(commit_lsn, e.to_string()))?;
        self.end_transaction(commit, end_lsn, commit_time, session).await
    }

    /// Resolves column types that are not built in (enums, domains, arrays of them).
    async fn ensure_types(&mut self, oids: Vec<u32>) -> Result<()> {
        for _ in 0..4 {
            let missing = self.decoder.types.missing(oids.iter().copied());
            if missing.is_empty() {
                return Ok(());
            }
            let sql =
                self.sql.as_ref().ok_or_else(|| Error::protocol(self.received, "no catalog connection"))?;
            let found = crate::types::catalog_types(sql, &missing).await?;
            if found.is_empty() {
                return Ok(());
            }
            self.decoder.types.add_catalog_rows(found);
        }
        Ok(())
    }

    /// Owes a status update as soon as `STATUS_MIN_INTERVAL` since the last one allows.
    fn confirm_soon(&mut self) {
        let earliest = tokio::time::Instant::from_std(self.last_status) + STATUS_MIN_INTERVAL;
        self.status_due = Some(earliest.max(tokio::time::Instant::now()));
    }

    /// Hands the commit on, or, for a transaction that delivered nothing, treats its end like
    /// idle WAL: confirmable once nothing before it is outstanding, without a batch.
    async fn end_transaction(
        &mut self,
        commit: ChangeEvent,
        end_lsn: Lsn,
        commit_time: i64,
        session: &mut Session<'_>,
    ) -> Result<()> {
        self.stats.origin_dropped.store(self.decoder.dropped_transactions, Ordering::Relaxed);
        if self.pending_begin.take().is_some() {
            self.stats.empty_transactions.fetch_add(1, Ordering::Relaxed);
            if self.batch.events.is_empty() {
                self.idle_wal_end = self.idle_wal_end.max(end_lsn);
                if self.status_due.is_none()
                    && self.confirmable(*session.durable.borrow()) > self.reported_flush
                {
                    self.confirm_soon();
                }
            } else {
                self.transaction_done(end_lsn);
            }
            return Ok(());
        }
        self.push(commit, 0, session).await?;
        self.batch.commit_time = Some(commit_time);
        self.transaction_done(end_lsn);
        Ok(())
    }

    async fn push(&mut self, event: ChangeEvent, size: usize, session: &mut Session<'_>) -> Result<()> {
        if let Some(begin) = self.pending_begin.take() {
            self.batch.events.push(begin);
            self.stats.events.fetch_add(1, Ordering::Relaxed);
        }
        self.batch.events.push(event);
        self.batch_bytes += size;
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        if self.batch.events.len() >= self.options.batch_max_events
            || self.batch_bytes >= self.options.batch_max_bytes
        {
            self.send_batch(session).await?;
        }
        Ok(())
    }

    /// A transaction (or standalone message) ended at `ack`: the batch may now confirm it.
    fn transaction_done(&mut self, ack: Lsn) {
        self.batch.ack_lsn = Some(ack);
    }

    async fn send_batch(&mut self, session: &mut Session<'_>) -> Result<()> {
        if self.batch.events.is_empty() && self.batch.ack_lsn.is_none() {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.redelivery_horizon = self.redelivery_horizon;
        self.batch_bytes = 0;
        let ack = batch.ack_lsn;
        // Wait for room while still telling the server we are alive.
        loop {
            tokio::select! {
                permit = session.tx.reserve() => {
                    permit.map_err(|_| Error::Stopped)?.send(batch);
                    break;
                }
                _ = session.ticker.tick() => self.send_status(session, false).await?,
            }
        }
        if let Some(ack) = ack {
            self.last_sent_ack = self.last_sent_ack.max(ack);
        }
        Ok(())
    }

    /// The flush position to report: what the pipeline made durable, or the idle WAL end when
    /// nothing is outstanding.
    fn confirmable(&self, durable: Lsn) -> Lsn {
        let nothing_outstanding = durable >= self.last_sent_ack
            && self.batch.events.is_empty()
            && !self.decoder.in_transaction()
            && self.stream_xid.is_none();
        let candidate = if nothing_outstanding { durable.max(self.idle_wal_end) } else { durable };
        candidate.max(self.reported_flush)
    }

    async fn send_status(&mut self, session: &mut Session<'_>, reply: bool) -> Result<()> {
        let durable = *session.durable.borrow_and_update();
        let flush = self.confirmable(durable);
        session.client.send_standby_status(self.received.max(flush), flush, reply).await?;
        if flush > self.reported_flush {
            tracing::debug!(flush = %flush, "confirmed position");
        }
        self.reported_flush = flush;
        self.stats.confirmed_lsn.store(flush.0, Ordering::Relaxed);
        self.last_status = Instant::now();
        self.status_due = None;
        Ok(())
    }

    /// Shutdown: hand over what was decoded, wait (bounded) for it to become durable, confirm, close.
    async fn drain(&mut self, mut session: Session<'_>) -> Result<()> {
        self.send_batch(&mut session).await?;
        let deadline = tokio::time::Instant::now() + self.options.shutdown_timeout;
        while *session.durable.borrow() < self.last_sent_ack {
            match tokio::time::timeout_at(deadline, session.durable.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    tracing::warn!(durable = %*session.durable.borrow(), sent = %self.last_sent_ack,
                        "shutdown timeout: some changes were not confirmed and will be streamed again");
                    break;
                }
            }
        }
        self.send_status(&mut session, false).await?;
        tracing::info!(confirmed = %self.reported_flush, "replication stream closed");
        session.client.close().await;
        Ok(())
    }
}

/// Frames decoded back to back before the loop looks at timers and shutdown again.
const BUFFERED_FRAMES_PER_WAKE: usize = 1024;

/// Durable progress is confirmed upstream at most this often (and at least every `status_interval`).
const STATUS_MIN_INTERVAL: Duration = Duration::from_millis(200);

async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
