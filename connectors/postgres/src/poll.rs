//! The polling outbox source, for databases where logical replication is not allowed: outbox
//! rows are read with SQL, handed to the target, and deleted (or marked) only once the target
//! has made them durable.
//!
//! # Commit-safe order: the transaction-snapshot horizon
//!
//! Ids from a sequence are taken when a row is inserted, not when its transaction commits, so
//! transactions commit out of id order. A poller that read "everything committed, in id order"
//! would publish id 11 while id 10 is still uncommitted, then id 10 later, out of order; one
//! that remembered "published up to id 11" would skip id 10 for good.
//!
//! Each poll runs one statement in its own transaction and takes, from its snapshot, the
//! oldest transaction still running (`pg_snapshot_xmin(pg_current_snapshot())`, the
//! *horizon*). Every transaction with an older id has ended, and every transaction that has
//! not ended yet, or has not started, has an id at or above the horizon. A row is eligible
//! only when the transaction that inserted it (`xmin`) is older than the horizon, so the
//! eligible rows are exactly the rows of a closed prefix of transactions, and no row of an
//! older transaction can appear later. Eligible rows are read in transaction order, then by
//! `id_column` within a transaction (`ORDER BY age(xmin) DESC, id`; `age` counts back
//! from one reference for the whole transaction, which makes the 32-bit wrap-around
//! harmless), `batch_size` at a time.
//!
//! The cost: while a transaction that has written anything stays open, rows inserted by
//! younger transactions wait for it (read-only transactions have no id and hold nothing back).
//! Rows of a rolled-back transaction never become visible, so they leave no gap to wait for.
//!
//! # Delivery
//!
//! The rows are locked (`FOR UPDATE`) by the same statement and the transaction stays open
//! while the target writes them; once the pipeline reports them durable they are deleted (or
//! their `mark_column` set to `now()`) by `ctid` in that transaction, which then commits. A
//! crash before that commit leaves the rows in place, and the next poll publishes them again:
//! delivery is at least once, and a duplicate is always a whole batch that was in flight.
//!
//! Several pollers on one table: with `ha.enabled` only the holder of the HA lock polls. Even
//! without it, a second poller's statement waits on the rows the first one has locked, and
//! after the first commits it skips the rows deleted or marked meanwhile, so no row is
//! published by two pollers at once, and the rows it then takes sort after the first's.
//!
//! Positions: an event's position is the full (epoch-extended) id of the transaction that
//! inserted the row, with ordinal 0; within one transaction the id column orders events.

use sluice_core::{Backoff, Classify, RetryPolicy, Shutdown, TableName};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::ConnectionConfig;
use crate::error::{Error, Result};
use crate::setup::quote_ident;
use crate::source::{SourceOptions, SourceStats};
use sluice_core::event::{ChangeEvent, EventBatch, Position, Relation};
use sluice_core::lsn::Lsn;

/// `[source.poll]`.
#[derive(Clone, Debug, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PollConfig {
    /// The outbox table, `schema.table`.
    pub table: TableName,
    /// A unique column (the primary key) that orders the events of one transaction; a
    /// `bigserial` keeps insertion order.
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// Most rows read, published and deleted together.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// The pause after a poll that found less than a full batch.
    #[serde(default = "default_interval", deserialize_with = "sluice_core::duration::deserialize")]
    #[schemars(schema_with = "sluice_core::duration::schema")]
    pub interval: Duration,
    /// What happens to a published row: `delete` it, or `mark` it (set `mark_column`).
    #[serde(default)]
    pub after_publish: AfterPublish,
    /// With `after_publish = "mark"`: a nullable timestamptz column, NULL until published.
    #[serde(default = "default_mark_column")]
    pub mark_column: String,
}

/// What happens to an outbox row once its event is durable in the target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AfterPublish {
    /// Delete it (the default).
    #[default]
    Delete,
    /// Set its `published_at` column.
    Mark,
}

fn default_id_column() -> String {
    "id".into()
}
fn default_batch_size() -> usize {
    500
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_mark_column() -> String {
    "published_at".into()
}

impl PollConfig {
    /// Adds a problem for each setting that cannot work, under `prefix`.
    pub fn validate(&self, prefix: &str, problems: &mut Vec<sluice_core::Problem>) {
        if self.batch_size == 0 || self.batch_size > 100_000 {
            problems.push(sluice_core::Problem::new(prefix, "batch_size", "must be between 1 and 100000"));
        }
        if self.interval.is_zero() {
            problems.push(sluice_core::Problem::new(prefix, "interval", "must be more than 0s"));
        }
        if self.id_column.is_empty() {
            problems.push(sluice_core::Problem::new(prefix, "id_column", "must name a column"));
        }
        if self.after_publish == AfterPublish::Mark && self.mark_column.is_empty() {
            problems.push(sluice_core::Problem::new(prefix, "mark_column", "must name a column"));
        }
    }

    /// The name of the HA lock of pollers of this table.
    pub fn lock_name(&self) -> String {
        format!("poll:{}", self.table)
    }
}

/// The outbox table as the catalog describes it, as a `Relation` for the router.
pub async fn load_relation(sql: &tokio_postgres::Client, config: &PollConfig) -> Result<Relation> {
    let table = crate::catalog::required_table(sql, &config.table.to_string(), "source.poll.table").await?;
    let has = |column: &str| table.relation.columns.iter().any(|c| c.name == column);
    if !has(&config.id_column) {
        return Err(Error::Setup(format!(
            "source.poll.id_column: table {} has no column {:?}",
            config.table, config.id_column
        )));
    }
    if config.after_publish == AfterPublish::Mark && !has(&config.mark_column) {
        return Err(Error::Setup(format!(
            "source.poll.mark_column: table {} has no column {:?}",
            config.table, config.mark_column
        )));
    }
    Ok(table.relation)
}

/// The poll statement: eligible rows (inserted by transactions older than the horizon), in
/// transaction order, then id order, locked. Columns: ctid, the row's xmin, the horizon
/// (xid8), then the table's columns as text.
///
/// The rows are picked first (ctid and sort key only, a top-N sort under the LIMIT) and then
/// fetched and locked by ctid: locking below a full sort of every unpublished row, with all
/// columns as text, costs four times as much on a large backlog. The horizon's age is
/// computed once. A row a concurrent poller deleted, or marked (a new version, another
/// ctid), drops out when the lock's recheck finds it gone.
fn poll_statement(config: &PollConfig, relation: &Relation) -> String {
    let table = format!("{}.{}", quote_ident(&relation.namespace), quote_ident(&relation.name));
    let columns: Vec<String> =
        relation.columns.iter().map(|c| format!("t.{}::text", quote_ident(&c.name))).collect();
    let unpublished = match config.after_publish {
        AfterPublish::Delete => String::new(),
        AfterPublish::Mark => format!("t.{} IS NULL AND ", quote_ident(&config.mark_column)),
    };
    let id = quote_ident(&config.id_column);
    format!(
        "WITH horizon AS MATERIALIZED (\
           SELECT x.xid8, age((x.xid8::text::numeric % 4294967296)::text::xid) AS age \
           FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xid8) x), \
         picked AS MATERIALIZED (\
           SELECT t.ctid AS tid, age(t.xmin) AS tx_age, t.{id} AS id FROM {table} t, horizon h \
           WHERE {unpublished}age(t.xmin) > h.age ORDER BY age(t.xmin) DESC, t.{id} LIMIT $1) \
         SELECT t.ctid::text, t.xmin::text, h.xid8::text, {columns} \
         FROM picked p JOIN {table} t ON t.ctid = p.tid, horizon h \
         WHERE {unpublished}true \
         ORDER BY p.tx_age DESC, p.id \
         FOR UPDATE OF t",
        columns = columns.join(", "),
    )
}

/// Rows not yet published (the whole table, or its unmarked rows).
pub async fn backlog(sql: &tokio_postgres::Client, config: &PollConfig) -> Result<i64> {
    let filter = match config.after_publish {
        AfterPublish::Delete => String::new(),
        AfterPublish::Mark => format!(" WHERE {} IS NULL", quote_ident(&config.mark_column)),
    };
    let row = sql.query_one(&format!("SELECT count(*) FROM {}{filter}", config.table.quoted()), &[]).await?;
    Ok(row.get(0))
}

fn finish_statement(config: &PollConfig, relation: &Relation) -> String {
    let table = format!("{}.{}", quote_ident(&relation.namespace), quote_ident(&relation.name));
    match config.after_publish {
        AfterPublish::Delete => format!("DELETE FROM {table} WHERE ctid = ANY($1::text[]::tid[])"),
        AfterPublish::Mark => format!(
            "UPDATE {table} SET {} = now() WHERE ctid = ANY($1::text[]::tid[])",
            quote_ident(&config.mark_column)
        ),
    }
}

/// The full transaction id of a row's 32-bit `xmin`, from the horizon (a full id) it is older
/// than: the one id below the horizon, within 2³¹, with those low 32 bits. Frozen and
/// bootstrap ids (below 3) are older than everything: 0.
pub fn full_xid(xmin: u32, horizon: u64) -> u64 {
    if xmin < 3 {
        return 0;
    }
    let behind = (horizon as u32).wrapping_sub(xmin) as u64;
    horizon.saturating_sub(behind)
}

/// Polls one outbox table. Create with `new`, then `run` until shutdown or a fatal error.
pub struct PollSource {
    conn: ConnectionConfig,
    config: PollConfig,
    options: SourceOptions,
    stats: Arc<SourceStats>,
    /// The ack position of the latest batch: a counter, since a poll batch is confirmed by
    /// deleting its rows, not by a WAL position.
    sent: u64,
}

impl PollSource {
    /// A source that polls `config.table` on this connection.
    pub fn new(conn: ConnectionConfig, config: PollConfig, options: SourceOptions) -> Self {
        PollSource { conn, config, options, stats: Arc::new(SourceStats::default()), sent: 0 }
    }

    /// Counters shared with the monitor.
    pub fn stats(&self) -> Arc<SourceStats> {
        Arc::clone(&self.stats)
    }

    /// Polls until `shutdown` turns true (a batch in flight is still finished, within
    /// `shutdown_timeout`), until the pipeline drops its receiver or durable channel, or until
    /// a fatal error. Transient failures reconnect with backoff for up to `retry_for`.
    pub async fn run(
        mut self,
        tx: mpsc::Sender<EventBatch>,
        mut durable: watch::Receiver<Lsn>,
        mut shutdown: Shutdown,
    ) -> Result<()> {
        let mut backoff = Backoff::new(
            RetryPolicy::new(self.options.retry_for)
                .with_delays(Duration::from_millis(100), Duration::from_secs(10)),
        );
        loop {
            let worked = std::sync::atomic::AtomicBool::new(false);
            match self.session(&tx, &mut durable, &mut shutdown, &worked).await {
                Ok(()) | Err(Error::Stopped) => return Ok(()),
                Err(error) => {
                    self.stats.streaming.store(false, Ordering::Relaxed);
                    if worked.load(Ordering::Relaxed) {
                        backoff.reset();
                    }
                    let Some(delay) = backoff.next_delay().filter(|_| error.is_transient()) else {
                        return Err(error);
                    };
                    tracing::warn!(
                        error = %crate::error::Chain(&error),
                        retry_in_ms = delay.as_millis() as u64,
                        gives_up_in_s = backoff.gives_up_in().as_secs(),
                        table = %self.config.table,
                        "outbox poll failed; retrying"
                    );
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.requested() => return Ok(()),
                    }
                }
            }
        }
    }

    async fn session(
        &mut self,
        tx: &mpsc::Sender<EventBatch>,
        durable: &mut watch::Receiver<Lsn>,
        shutdown: &mut Shutdown,
        worked: &std::sync::atomic::AtomicBool,
    ) -> Result<()> {
        let mut sql = crate::connect_sql(&self.conn).await?;
        let relation = Arc::new(load_relation(&sql, &self.config).await?);
        let select = sql.prepare(&poll_statement(&self.config, &relation)).await?;
        let finish = sql.prepare(&finish_statement(&self.config, &relation)).await?;
        self.stats.streaming.store(true, Ordering::Relaxed);
        let limit = self.config.batch_size as i64;
        loop {
            if shutdown.is_requested() {
                return Ok(());
            }
            let txn = sql.transaction().await?;
            let rows = txn.query(&select, &[&limit]).await?;
            worked.store(true, Ordering::Relaxed);
            if rows.is_empty() {
                txn.rollback().await?;
                tokio::select! {
                    _ = tokio::time::sleep(self.config.interval) => {}
                    _ = shutdown.requested() => return Ok(()),
                }
                continue;
            }
            let full_batch = rows.len() == self.config.batch_size;
            let mut ctids: Vec<String> = Vec::with_capacity(rows.len());
            let mut events = Vec::with_capacity(rows.len());
            let mut bytes = 0;
            for row in &rows {
                ctids.push(row.get(0));
                let xmin: u32 = row
                    .get::<_, String>(1)
                    .parse()
                    .map_err(|_| Error::Setup("xmin is not a transaction id".into()))?;
                let horizon: u64 = row
                    .get::<_, String>(2)
                    .parse()
                    .map_err(|_| Error::Setup("the snapshot horizon is not a transaction id".into()))?;
                let mut values = Vec::with_capacity(relation.columns.len());
                for (i, column) in relation.columns.iter().enumerate() {
                    let text: Option<&str> = row.get(i + 3);
                    bytes += text.map_or(0, str::len);
                    values.push(
                        column
                            .decode_text(text)
                            .map_err(|e| Error::Setup(format!("table {}: {e}", self.config.table)))?,
                    );
                }
                let position = Position { commit_lsn: Lsn(full_xid(xmin, horizon)), tx_ordinal: 0 };
                events.push(ChangeEvent::Insert {
                    position,
                    relation: Arc::clone(&relation),
                    new: values,
                    snapshot: false,
                });
            }
            self.sent += 1;
            let ack = Lsn(self.sent);
            let count = events.len() as u64;
            let batch = EventBatch {
                events,
                ack_lsn: Some(ack),
                redelivery_horizon: None,
                commit_time: None,
                slice: None,
            };
            if tx.send(batch).await.is_err() {
                return Err(Error::Stopped);
            }
            self.stats.events.fetch_add(count, Ordering::Relaxed);
            self.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            if !self.wait_durable(ack, durable, shutdown).await? {
                // Not durable in time: the rows stay, unlocked by the rollback, for the next poll.
                txn.rollback().await?;
                return Ok(());
            }
            let finished = txn.execute(&finish, &[&ctids]).await?;
            if finished != count {
                return Err(Error::Setup(format!(
                    "table {}: {count} rows were published but {finished} were deleted or marked",
                    self.config.table
                )));
            }
            txn.commit().await?;
            self.stats.confirmed_lsn.store(ack.0, Ordering::Relaxed);
            if !full_batch {
                tokio::select! {
                    _ = tokio::time::sleep(self.config.interval) => {}
                    _ = shutdown.requested() => return Ok(()),
                }
            }
        }
    }

    /// Waits until `ack` is durable: true. False when shutdown came and `shutdown_timeout`
    /// passed first; `Stopped` when the pipeline went away (a failed target).
    async fn wait_durable(
        &self,
        ack: Lsn,
        durable: &mut watch::Receiver<Lsn>,
        shutdown: &mut Shutdown,
    ) -> Result<bool> {
        let timeout = self.options.shutdown_timeout;
        let deadline = async {
            shutdown.requested().await;
            tokio::time::sleep(timeout).await;
        };
        tokio::select! {
            reached = durable.wait_for(|&lsn| lsn >= ack) => match reached {
                Ok(_) => Ok(true),
                Err(_) => Err(Error::Stopped),
            },
            _ = deadline => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::event::{Column, ReplicaIdentity};

    #[test]
    fn full_transaction_ids_extend_32_bit_ids_below_the_horizon_across_wrap_around() {
        assert_eq!(full_xid(724, 725), 724);
        let horizon = (5u64 << 32) | 10;
        assert_eq!(full_xid(4, horizon), (5 << 32) | 4);
        assert_eq!(
            full_xid(u32::MAX - 5, horizon),
            (4 << 32) | (u32::MAX as u64 - 5),
            "an id from before the wrap is in the previous epoch"
        );
        assert_eq!(full_xid(2, horizon), 0, "frozen rows are the oldest");
    }

    #[test]
    fn the_poll_statement_orders_by_transaction_then_id_and_guards_the_horizon() {
        let config = PollConfig {
            table: TableName::new("app", "outbox"),
            id_column: "id".into(),
            batch_size: 10,
            interval: Duration::from_secs(1),
            after_publish: AfterPublish::Mark,
            mark_column: "published_at".into(),
        };
        let relation = Relation {
            oid: 1,
            namespace: "app".into(),
            name: "outbox".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
                is_key: true,
                kind: sluice_core::TypeKind::Int8,
            }],
        };
        let statement = poll_statement(&config, &relation);
        assert!(statement.contains("ORDER BY age(t.xmin) DESC, t.\"id\" LIMIT $1"), "{statement}");
        assert!(
            statement.contains("WHERE t.\"published_at\" IS NULL AND age(t.xmin) > h.age"),
            "{statement}"
        );
        assert!(statement.ends_with("ORDER BY p.tx_age DESC, p.id FOR UPDATE OF t"), "{statement}");
        assert!(finish_statement(&config, &relation)
            .starts_with("UPDATE \"app\".\"outbox\" SET \"published_at\" = now()"));
    }
}
