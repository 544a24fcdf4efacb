//! The migration state: per table of a pipeline its phase (`phase.rs`), durable in the
//! source database beside the backfill progress table, with every move recorded in a log
//! table (who, when, from, to); and the fence (`fence.rs`), the trigger that refuses writes
//! to a table whose writers moved to the other store.
//!
//! A table without a row is `forward`: every table starts there, and the row is written with
//! the first move. Moves are made under a row lock, so two operators (or a command re-run
//! while the first still runs) cannot both move a table.

pub(crate) mod command;
pub mod cutover;
pub mod fence;
pub mod phase;
pub mod reverse;
pub mod reverse_dynamodb;

pub use command::{fence_tables, show};
pub use cutover::{cutover, finish, rollback, MoveArgs};

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_core::{Problem, TableName};

pub use phase::{decide, Direction, IllegalMove, Move, Phase, Step};

/// `[migration]`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// The table of the tables' phases (`schema.table`), in the source database, created
    /// when missing; its moves go to `<table>_log`.
    #[serde(default = "default_state_table")]
    pub state_table: TableName,
    /// The way back's replication slot, in the new database (default `<slot>_reverse`).
    #[serde(default)]
    pub reverse_slot: Option<String>,
    /// The way back's publication in the new database, created by `run --reverse` for the
    /// mapped new tables when missing (default `<slot>_reverse`).
    #[serde(default)]
    pub reverse_publication: Option<String>,
    /// Where the way back from a DynamoDB target keeps each stream shard's last applied
    /// sequence number (`schema.table`, in the source database, created when missing).
    #[serde(default = "default_stream_checkpoint_table")]
    pub stream_checkpoint_table: TableName,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            state_table: default_state_table(),
            reverse_slot: None,
            reverse_publication: None,
            stream_checkpoint_table: default_stream_checkpoint_table(),
        }
    }
}

fn default_state_table() -> TableName {
    TableName::new("public", "sluice_migration")
}

fn default_stream_checkpoint_table() -> TableName {
    TableName::new("public", "sluice_stream_checkpoint")
}

impl MigrationConfig {
    /// The state table, quoted for SQL.
    pub fn quoted_table(&self) -> String {
        self.state_table.quoted()
    }

    /// The log table, quoted for SQL.
    pub fn quoted_log_table(&self) -> String {
        TableName::new(self.state_table.schema(), format!("{}_log", self.state_table.name())).quoted()
    }

    /// Problems visible without the database.
    pub fn validate(&self, problems: &mut Vec<Problem>) {
        if self.state_table.name().len() > 59 {
            problems.push(Problem::new(
                "migration",
                "state_table",
                "its name must be at most 59 characters (the log table adds _log)",
            ));
        }
    }
}

/// The migration state failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The move is not allowed from the table's phase.
    #[error(transparent)]
    Illegal(#[from] IllegalMove),
    /// The table is not one of the pipeline's.
    #[error("table {table} is not in pipeline {pipeline:?}'s publication {publication:?}")]
    NotInPipeline {
        /// The table asked for.
        table: String,
        /// `pipeline.name`.
        pipeline: String,
        /// `source.replication.publication`.
        publication: String,
    },
    /// A phase in the state table that this sluice does not know.
    #[error("the migration state table holds phase {phase:?} for {table}, which this sluice does not know")]
    Unknown {
        /// The table.
        table: String,
        /// What the state table holds.
        phase: String,
    },
    /// The database failed.
    #[error("migration state table: {0}")]
    Sql(#[from] tokio_postgres::Error),
}

/// Creates the state and log tables when missing.
pub async fn ensure_state_tables(
    sql: &tokio_postgres::Client,
    config: &MigrationConfig,
) -> Result<(), tokio_postgres::Error> {
    sluice_postgres::setup::create_table_if_missing(
        sql,
        &config.quoted_table(),
        "(
           pipeline text NOT NULL,
           source_table text NOT NULL,
           phase text NOT NULL CONSTRAINT sluice_migration_phase_check
             CHECK (phase IN ('forward', 'fenced', 'reversed', 'rolling_back', 'finished')),
           changed_at timestamptz NOT NULL DEFAULT now(),
           changed_by text NOT NULL,
           PRIMARY KEY (pipeline, source_table))",
    )
    .await?;
    sluice_postgres::setup::create_table_if_missing(
        sql,
        &config.quoted_log_table(),
        "(
           id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
           pipeline text NOT NULL,
           source_table text NOT NULL,
           from_phase text NOT NULL,
           to_phase text NOT NULL,
           command text NOT NULL,
           changed_by text NOT NULL,
           role name NOT NULL DEFAULT current_user,
           changed_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
}

/// The phases of `pipeline`'s tables that have left `forward` at least once (the others are
/// `forward`).
pub async fn phases(
    sql: &tokio_postgres::Client,
    config: &MigrationConfig,
    pipeline: &str,
) -> Result<BTreeMap<String, Phase>, MigrationError> {
    let rows = sql
        .query(
            &format!("SELECT source_table, phase FROM {} WHERE pipeline = $1", config.quoted_table()),
            &[&pipeline],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let (table, phase): (String, String) = (row.get(0), row.get(1));
            match phase.parse() {
                Ok(phase) => Ok((table, phase)),
                Err(_) => Err(MigrationError::Unknown { table, phase }),
            }
        })
        .collect()
}

/// The tables of `pipeline` whose writers moved to the new store (reversed, rolling_back,
/// finished); none while the state table does not exist.
pub async fn moved_tables(
    sql: &tokio_postgres::Client,
    config: &MigrationConfig,
    pipeline: &str,
) -> Result<std::collections::HashSet<String>, MigrationError> {
    let exists: bool =
        sql.query_one("SELECT to_regclass($1) IS NOT NULL", &[&config.quoted_table()]).await?.get(0);
    if !exists {
        return Ok(Default::default());
    }
    Ok(phases(sql, config, pipeline)
        .await?
        .into_iter()
        .filter(|(_, phase)| phase.direction() != Some(Direction::Forward))
        .map(|(table, _)| table)
        .collect())
}

/// The phase of every table of `publication` (the state table aside): `forward` where the
/// state table has no row, or is not there yet.
pub async fn published_phases(
    sql: &tokio_postgres::Client,
    config: &MigrationConfig,
    pipeline: &str,
    publication: &str,
) -> Result<BTreeMap<String, Phase>, MigrationError> {
    let mut tables = sluice_postgres::catalog::publication_tables(sql, publication).await?;
    tables.retain(|t| config.state_table != *t.as_str());
    let exists: bool =
        sql.query_one("SELECT to_regclass($1) IS NOT NULL", &[&config.quoted_table()]).await?.get(0);
    let known = if exists { phases(sql, config, pipeline).await? } else { BTreeMap::new() };
    Ok(tables
        .into_iter()
        .map(|t| {
            let phase = known.get(&t).copied().unwrap_or(Phase::Forward);
            (t, phase)
        })
        .collect())
}

/// One move of a table, as the log records it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Logged {
    /// The table, `schema.table`.
    pub table: String,
    /// The phase it left.
    pub from: String,
    /// The phase it entered.
    pub to: String,
    /// The command that moved it.
    pub command: String,
    /// Who ran it (the operator's user name) and the database role.
    pub changed_by: String,
    /// When, as Postgres prints it.
    pub changed_at: String,
}

/// The moves of `pipeline`'s tables, oldest first.
pub async fn history(
    sql: &tokio_postgres::Client,
    config: &MigrationConfig,
    pipeline: &str,
) -> Result<Vec<Logged>, MigrationError> {
    let rows = sql
        .query(
            &format!(
                "SELECT source_table, from_phase, to_phase, command, changed_by || ' (role ' || role || ')', changed_at::text \
                 FROM {} WHERE pipeline = $1 ORDER BY id",
                config.quoted_log_table()
            ),
            &[&pipeline],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Logged {
            table: r.get(0),
            from: r.get(1),
            to: r.get(2),
            command: r.get(3),
            changed_by: r.get(4),
            changed_at: r.get(5),
        })
        .collect())
}

/// Makes `step` for `table` of `pipeline`, by `who`: moves it and logs the move, or finds it
/// already moved (`Move::AlreadyThere`), or refuses naming both phases. One transaction, the
/// table's row locked; safe to retry after a lost connection (a move that committed is then
/// found made).
pub async fn transition(
    sql: &tokio_postgres::Client,
    config: &MigrationConfig,
    pipeline: &str,
    table: &str,
    step: Step,
    who: &str,
) -> Result<Move, MigrationError> {
    sql.batch_execute("BEGIN").await?;
    let result = transition_in_transaction(sql, config, pipeline, table, step, who).await;
    match &result {
        Ok(_) => sql.batch_execute("COMMIT").await?,
        Err(_) => {
            let _ = sql.batch_execute("ROLLBACK").await;
        }
    }
    let decided = result?;
    let (from, to) = step.phases();
    match decided {
        Move::To(_) => {
            tracing::info!(pipeline, table, from = %from, to = %to, command = step.command(), by = who, "migration phase changed")
        }
        Move::AlreadyThere => {
            tracing::info!(pipeline, table, phase = %to, command = step.command(), "migration phase already reached")
        }
    }
    Ok(decided)
}

async fn transition_in_transaction(
    tx: &tokio_postgres::Client,
    config: &MigrationConfig,
    pipeline: &str,
    table: &str,
    step: Step,
    who: &str,
) -> Result<Move, MigrationError> {
    let state = config.quoted_table();
    tx.execute(
        &format!(
            "INSERT INTO {state} (pipeline, source_table, phase, changed_by) VALUES ($1, $2, 'forward', $3) \
             ON CONFLICT (pipeline, source_table) DO NOTHING"
        ),
        &[&pipeline, &table, &who],
    )
    .await?;
    let text: String = tx
        .query_one(
            &format!("SELECT phase FROM {state} WHERE pipeline = $1 AND source_table = $2 FOR UPDATE"),
            &[&pipeline, &table],
        )
        .await?
        .get(0);
    let current: Phase =
        text.parse().map_err(|_| MigrationError::Unknown { table: table.to_owned(), phase: text.clone() })?;
    let decided = decide(table, current, step)?;
    if let Move::To(next) = decided {
        tx.execute(
            &format!(
                "UPDATE {state} SET phase = $3, changed_at = now(), changed_by = $4 WHERE pipeline = $1 AND source_table = $2"
            ),
            &[&pipeline, &table, &next.as_str(), &who],
        )
        .await?;
        tx.execute(
            &format!(
                "INSERT INTO {} (pipeline, source_table, from_phase, to_phase, command, changed_by) VALUES ($1, $2, $3, $4, $5, $6)",
                config.quoted_log_table()
            ),
            &[&pipeline, &table, &current.as_str(), &next.as_str(), &step.command(), &who],
        )
        .await?;
    }
    Ok(decided)
}

/// Who runs this command: the operator's user name from the environment, else `unknown`.
pub fn operator() -> String {
    std::env::var("SLUICE_OPERATOR")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}
