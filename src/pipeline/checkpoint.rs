//! Progress inside a large transaction, for the targets without a transactional checkpoint of
//! their own (DynamoDB, Kafka, JSON lines).
//!
//! The slot is confirmed only at transaction ends, so a restart replays a partly applied
//! transaction from its first change. Into a target that takes a request per change, a
//! transaction that takes longer than the time between crashes would never get past its
//! commit. So the apply loop publishes the position through which every change is durable
//! whenever that lies inside a transaction, and a task here writes it to
//! `pipeline.checkpoint_table` in the source database (the primary's, when the source is a
//! standby) at most every `pipeline.checkpoint_interval`. At start the pipeline reads it back
//! and skips the changes at or before it before translation, without a request each.
//!
//! Only a durable position is ever written, and a row never moves backwards, so skipping
//! through it loses nothing. Failing to write it (a read-only role, the server away) costs
//! only requests on the next replay, which the targets absorb as they always have: it is
//! logged, never fatal.

use std::time::Duration;

use sluice_core::{Lsn, Position, TableName};
use sluice_postgres::ConnectionConfig;
use tokio::sync::watch;

/// The checkpoint row of one pipeline and slot.
pub(crate) struct Checkpoint {
    connection: ConnectionConfig,
    table: TableName,
    pipeline: String,
    slot: String,
}

impl Checkpoint {
    pub(crate) fn new(connection: ConnectionConfig, table: TableName, pipeline: &str, slot: &str) -> Self {
        Checkpoint { connection, table, pipeline: pipeline.to_owned(), slot: slot.to_owned() }
    }

    async fn client(&self) -> Result<tokio_postgres::Client, String> {
        sluice_postgres::connect_sql_as(&self.connection, "sluice checkpoint")
            .await
            .map_err(|e| format!("cannot connect: {e}"))
    }

    /// Creates the table when missing and reads the pipeline's position. `None` when there is
    /// none, or when it cannot be read (logged: the pipeline then replays as before).
    pub(crate) async fn load(&self) -> Option<Position> {
        match self.try_load().await {
            Ok(position) => position,
            Err(reason) => {
                tracing::warn!(
                    table = %self.table,
                    "pipeline.checkpoint_table: {reason}; a transaction interrupted by a restart is replayed \
                     from its first change"
                );
                None
            }
        }
    }

    async fn try_load(&self) -> Result<Option<Position>, String> {
        let client = self.client().await?;
        let table = self.table.quoted();
        let read = client
            .query_opt(
                &format!(
                    "SELECT commit_lsn::text, tx_ordinal FROM {table} WHERE pipeline = $1 AND slot = $2"
                ),
                &[&self.pipeline, &self.slot],
            )
            .await;
        let row = match read {
            Ok(row) => row,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                client
                    .batch_execute(&format!(
                        "CREATE TABLE IF NOT EXISTS {table} (pipeline text NOT NULL, slot text NOT NULL, \
                         commit_lsn pg_lsn NOT NULL, tx_ordinal int8 NOT NULL, updated_at timestamptz NOT NULL \
                         DEFAULT now(), PRIMARY KEY (pipeline, slot))"
                    ))
                    .await
                    .map_err(|e| format!("cannot create {table}: {}", sluice_postgres::error::Chain(&e)))?;
                return Ok(None);
            }
            Err(e) => return Err(format!("cannot read {table}: {}", sluice_postgres::error::Chain(&e))),
        };
        let Some(row) = row else { return Ok(None) };
        let lsn: String = row.get(0);
        let ordinal: i64 = row.get(1);
        let commit_lsn: Lsn =
            lsn.parse().map_err(|_| format!("{table} holds a commit_lsn that is no LSN"))?;
        let tx_ordinal =
            u32::try_from(ordinal).map_err(|_| format!("{table} holds a tx_ordinal out of range"))?;
        Ok(Some(Position { commit_lsn, tx_ordinal }))
    }

    /// Writes `position`, unless the row is already at or past it.
    async fn store(
        &self,
        client: &tokio_postgres::Client,
        position: Position,
    ) -> Result<(), tokio_postgres::Error> {
        let table = self.table.quoted();
        client
            .execute(
                &format!(
                    "INSERT INTO {table} AS c (pipeline, slot, commit_lsn, tx_ordinal) VALUES ($1, $2, $3::text::pg_lsn, $4) \
                     ON CONFLICT (pipeline, slot) DO UPDATE SET commit_lsn = excluded.commit_lsn, \
                     tx_ordinal = excluded.tx_ordinal, updated_at = now() \
                     WHERE (c.commit_lsn, c.tx_ordinal) < (excluded.commit_lsn, excluded.tx_ordinal)"
                ),
                &[&self.pipeline, &self.slot, &position.commit_lsn.to_string(), &i64::from(position.tx_ordinal)],
            )
            .await
            .map(|_| ())
    }

    /// Writes each new position `durable` publishes, at most once per `interval`, until its
    /// sender is dropped.
    pub(crate) async fn keep(self, mut durable: watch::Receiver<Option<Position>>, interval: Duration) {
        let mut client = None;
        let mut warned = false;
        while durable.changed().await.is_ok() {
            let Some(position) = *durable.borrow_and_update() else { continue };
            if client.is_none() {
                client =
                    self.client().await.map_err(|reason| warn_once(&mut warned, &self.table, &reason)).ok();
            }
            if let Some(session) = &client {
                match self.store(session, position).await {
                    Ok(()) => warned = false,
                    Err(e) => {
                        warn_once(&mut warned, &self.table, &format!("cannot write: {e}"));
                        client = None;
                    }
                }
            }
            tokio::time::sleep(interval).await;
        }
    }
}

fn warn_once(warned: &mut bool, table: &TableName, reason: &str) {
    if !std::mem::replace(warned, true) {
        tracing::warn!(
            table = %table,
            "pipeline.checkpoint_table: {reason}; retrying with the next position (until then a restart replays \
             the current transaction from an earlier change)"
        );
    }
}
