//! A read session that outlives its connection, for the commands that read a whole table
//! (`verify`, `reconcile`, `status`): every statement goes through the one retry policy, and a
//! connection that was lost is opened again before the next attempt.
//!
//! Inside a snapshot (a `REPEATABLE READ READ ONLY` transaction), a failure ends the
//! transaction; the retry opens a new snapshot and runs the statement again. Reads after that
//! see the newer snapshot: callers that page through a table by key (as verify does) keep
//! their place, and verify's re-check against the stream covers any row that changed between
//! the two snapshots.

use sluice_core::retry::{Backoff, RetryPolicy};
use sluice_core::{action, Action, Classify};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::client::connect_sql_as;
use crate::config::ConnectionConfig;
use crate::error::{Error, Result};

/// A reconnecting SQL session for reads (and the few idempotent writes of the commands).
pub struct ReadSession {
    config: ConnectionConfig,
    application_name: String,
    policy: RetryPolicy,
    client: Option<tokio_postgres::Client>,
    /// A snapshot is wanted: statements run inside `BEGIN ISOLATION LEVEL REPEATABLE READ`.
    snapshot: bool,
    /// The wanted snapshot is open on the current connection.
    snapshot_open: bool,
    connects: u64,
}

impl ReadSession {
    /// Connects (retrying transient failures under `policy`), naming the session
    /// `application_name` in `pg_stat_activity`.
    pub async fn connect(
        config: &ConnectionConfig,
        application_name: &str,
        policy: RetryPolicy,
    ) -> Result<Self> {
        let mut session = ReadSession {
            config: config.clone(),
            application_name: application_name.to_owned(),
            policy,
            client: None,
            snapshot: false,
            snapshot_open: false,
            connects: 0,
        };
        session.run(async |_| Ok(())).await?;
        Ok(session)
    }

    /// The connection as it is now, for a single call whose failure the caller reports (a
    /// catalog lookup at start). Statements that must survive a lost connection go through
    /// [`ReadSession::query`] and its siblings.
    pub async fn client(&mut self) -> Result<&tokio_postgres::Client> {
        self.connected().await
    }

    /// How many times the connection was opened again after it was lost.
    pub fn reconnects(&self) -> u64 {
        self.connects.saturating_sub(1)
    }

    /// Starts a snapshot: the next statements run in one `REPEATABLE READ READ ONLY`
    /// transaction (a new one after a lost connection).
    pub async fn begin_snapshot(&mut self) -> Result<()> {
        self.snapshot = true;
        self.run(async |_| Ok(())).await
    }

    /// Ends the snapshot.
    pub async fn end_snapshot(&mut self) -> Result<()> {
        self.snapshot = false;
        if self.snapshot_open {
            self.snapshot_open = false;
            if let Some(client) = &self.client {
                client.batch_execute("COMMIT").await?;
            }
        }
        Ok(())
    }

    /// Runs a query, retried under the policy.
    pub async fn query(&mut self, statement: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.run(async |client| Ok(client.query(statement, params).await?)).await
    }

    /// Runs a query that returns at most one row, retried under the policy.
    pub async fn query_opt(
        &mut self,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        self.run(async |client| Ok(client.query_opt(statement, params).await?)).await
    }

    /// Runs statements without results (idempotent ones: they may run twice), retried.
    pub async fn batch_execute(&mut self, statements: &str) -> Result<()> {
        self.run(async |client| Ok(client.batch_execute(statements).await?)).await
    }

    /// Runs `attempt` on a live connection until it succeeds, retrying transient failures
    /// under the policy (reconnecting, and re-opening the snapshot, first where needed).
    /// `attempt` may run more than once: it must be a read, or a write that is idempotent.
    pub async fn run<T>(&mut self, attempt: impl AsyncFn(&tokio_postgres::Client) -> Result<T>) -> Result<T> {
        let mut backoff = Backoff::new(self.policy);
        loop {
            let result = match self.connected().await {
                Ok(client) => attempt(client).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(error) => self.wait_to_retry(&mut backoff, error).await?,
            }
        }
    }

    /// After a failed attempt: the error back when it is not transient or the budget is
    /// spent; otherwise the connection is made ready for the next attempt and the backoff's
    /// delay waited out.
    async fn wait_to_retry(&mut self, backoff: &mut Backoff, error: Error) -> Result<()> {
        if action(error.kind()) != Action::Retry {
            return Err(error);
        }
        let Some(delay) = backoff.next_delay() else { return Err(error) };
        self.after_failure().await;
        tracing::warn!(
            error = %crate::error::Chain(&error),
            retry_in_ms = delay.as_millis() as u64,
            gives_up_in_s = backoff.gives_up_in().as_secs(),
            attempt = backoff.attempts(),
            "a read from Postgres at {} failed; retrying",
            self.config.addr()
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// After a transient failure: a closed connection is dropped (the next attempt opens a
    /// new one); an open snapshot is rolled back (the failure aborted it).
    async fn after_failure(&mut self) {
        let Some(client) = &self.client else { return };
        if client.is_closed() {
            self.client = None;
            self.snapshot_open = false;
            return;
        }
        if self.snapshot_open {
            self.snapshot_open = false;
            if client.batch_execute("ROLLBACK").await.is_err() {
                self.client = None;
            }
        }
    }

    async fn connected(&mut self) -> Result<&tokio_postgres::Client> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
            self.snapshot_open = false;
        }
        if self.client.is_none() {
            let client = connect_sql_as(&self.config, &self.application_name).await?;
            if self.connects > 0 {
                tracing::info!(addr = %self.config.addr(), "reconnected to Postgres");
            }
            self.connects += 1;
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected above");
        if self.snapshot && !self.snapshot_open {
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(Error::from)?;
            self.snapshot_open = true;
        }
        Ok(client)
    }
}
