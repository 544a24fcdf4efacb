//! The way back for a Postgres target: the reverse pipeline reads the new database through
//! its own slot and publication and applies to the old tables through the inverted mapping,
//! in a session with the reverse origin (which the forward stream drops and the fence lets
//! through), checkpointed in the old database like any Postgres target.
//!
//! It is the same configuration run with `--reverse`: [`reversed`] turns the forward
//! configuration around. Only tables whose phase streams back (`reversed`, `rolling_back`)
//! are applied: [`PhaseGate`] reads the phases from the state table in the old database, again
//! for every batch that holds changes of mapped tables, after the batch was received (a table
//! may have just moved: a change made after `finish` meets `finished`).

use std::collections::{BTreeMap, HashMap};

use sluice_core::{ChangeEvent, EventBatch, Problem, RetryPolicy};
use sluice_postgres::ReadSession;

use super::{Direction, MigrationConfig, Phase};
use crate::config::{Config, SourceConfig, SourceMode, TargetConfig};

/// The forward pipeline a reversed configuration streams back for.
#[derive(Clone, Debug)]
pub struct ReverseOf {
    /// The forward pipeline's name: the state table's rows are its.
    pub pipeline: String,
    /// The forward slot, which names both directions' replication origins.
    pub slot: String,
}

/// The reverse direction's slot in the new database, and its publication there.
pub fn reverse_names(config: &Config) -> Option<(String, String)> {
    let forward = config.source.replication()?;
    let slot = config.migration.reverse_slot.clone().unwrap_or_else(|| format!("{}_reverse", forward.slot));
    let publication =
        config.migration.reverse_publication.clone().unwrap_or_else(|| format!("{}_reverse", forward.slot));
    Some((slot, publication))
}

/// The way back's dead-letter file beside the forward one's: `.reverse` before its extension.
pub fn reverse_dead_letter(forward: &std::path::Path) -> std::path::PathBuf {
    let ext = forward.extension().and_then(|e| e.to_str()).unwrap_or("jsonl");
    forward.with_extension(format!("reverse.{ext}"))
}

/// The configuration of the way back: source and target swapped, the new database read
/// through the reverse slot and publication, the mapping inverted, the pipeline named
/// `<name>-reverse`, no backfill. Problems name the key at fault.
pub fn reversed(config: &Config) -> Result<Config, Vec<Problem>> {
    let Some(forward) = config.source.replication() else {
        return Err(vec![Problem::new(
            "source",
            "replication",
            "the way back needs a logical replication source ([source.replication])",
        )]);
    };
    let TargetConfig::Postgres(target) = &config.target else {
        return Err(vec![Problem::new(
            "target",
            "kind",
            format!(
                "the way back is built for a Postgres target; this pipeline writes to {}",
                config.target.kind()
            ),
        )]);
    };
    let (slot, publication) = reverse_names(config).expect("a replication source");
    let mut replication = forward.clone();
    replication.slot = slot;
    replication.publication = publication;
    replication.temporary_slot = false;
    let mut back = target.clone();
    back.connection = config.source.connection.clone();
    back.inverted = true;
    back.dead_letter = target.dead_letter.as_deref().map(reverse_dead_letter);
    let mut reversed = config.clone();
    reversed.pipeline.name = format!("{}-reverse", config.pipeline.name);
    reversed.source = SourceConfig {
        connection: target.connection.clone(),
        heartbeat_connection: None,
        mode: SourceMode::Replication(replication),
    };
    reversed.target = TargetConfig::Postgres(back);
    reversed.backfill.enabled = false;
    reversed.backfill.initial = false;
    // The forward daemon's background verify already compares the two stores, in every phase.
    reversed.verify.max_rows_per_second = 0;
    reversed.reverse_of =
        Some(ReverseOf { pipeline: config.pipeline.name.clone(), slot: forward.slot.clone() });
    let problems = reversed.validate();
    if problems.is_empty() {
        Ok(reversed)
    } else {
        Err(problems)
    }
}

/// Creates the reverse publication in the new database for the mapped new tables, or checks
/// that it publishes them all (a table missing is named, with the statement that adds it).
pub async fn ensure_publication(
    sql: &tokio_postgres::Client,
    publication: &str,
    tables: &[String],
) -> Result<(), String> {
    let quote = sluice_postgres::setup::quote_ident;
    let exists: bool = sql
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await
        .map_err(|e| format!("cannot read publication {publication}: {e}"))?
        .get(0);
    let quoted: Vec<String> = tables
        .iter()
        .map(|t| t.parse::<sluice_core::TableName>().map(|t| t.quoted()).unwrap_or_else(|_| t.clone()))
        .collect();
    if !exists {
        sql.batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote(publication),
            quoted.join(", ")
        ))
        .await
        .map_err(|e| {
            format!("cannot create the reverse publication {publication} in the new database: {e}")
        })?;
        tracing::info!(publication, tables = tables.len(), "created the reverse publication");
        return Ok(());
    }
    let published = sluice_postgres::catalog::publication_tables(sql, publication)
        .await
        .map_err(|e| format!("cannot list the tables of publication {publication}: {e}"))?;
    let missing: Vec<&String> = tables.iter().filter(|t| !published.contains(t)).collect();
    if !missing.is_empty() {
        return Err(format!(
            "publication {publication} in the new database does not publish {} (migration.reverse_publication): \
             ALTER PUBLICATION {} ADD TABLE {}",
            missing.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", "),
            quote(publication),
            missing.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(())
}

/// Lets through only the changes of new tables whose old table streams back.
pub struct PhaseGate {
    connection: sluice_postgres::ConnectionConfig,
    sql: Option<tokio_postgres::Client>,
    retry: RetryPolicy,
    migration: MigrationConfig,
    /// The forward pipeline's name.
    pipeline: String,
    /// New table → old table, from the inverted mapping.
    old_of: HashMap<String, String>,
    /// The old tables' phases as last read.
    phases: BTreeMap<String, Phase>,
}

impl PhaseGate {
    /// Connects to the old database (`config` is the reversed configuration: its target).
    pub async fn open(config: &Config, retry: RetryPolicy) -> Result<Self, String> {
        let (TargetConfig::Postgres(target), Some(of)) = (&config.target, &config.reverse_of) else {
            return Err("the phase gate needs a reversed Postgres configuration".into());
        };
        let mapping = target
            .load_mapping()
            .map_err(|p| p.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))?;
        let mut gate = PhaseGate {
            connection: target.connection.clone(),
            sql: None,
            retry,
            migration: config.migration.clone(),
            pipeline: of.pipeline.clone(),
            old_of: mapping.tables.iter().map(|t| (t.source.clone(), t.target.clone())).collect(),
            phases: BTreeMap::new(),
        };
        gate.refresh().await?;
        Ok(gate)
    }

    /// A gate over old tables by their own names (the way back from DynamoDB), for the
    /// forward pipeline `pipeline`, reading the phases in the old database at `connection`.
    pub async fn of_old_tables(
        connection: &sluice_postgres::ConnectionConfig,
        migration: &MigrationConfig,
        pipeline: &str,
        tables: impl IntoIterator<Item = String>,
        retry: RetryPolicy,
    ) -> Result<Self, String> {
        let mut gate = PhaseGate {
            connection: connection.clone(),
            sql: None,
            retry,
            migration: migration.clone(),
            pipeline: pipeline.to_owned(),
            old_of: tables.into_iter().map(|t| (t.clone(), t)).collect(),
            phases: BTreeMap::new(),
        };
        gate.refresh().await?;
        Ok(gate)
    }

    /// Reads the phases again; a lost connection or a slow server is retried within the
    /// pipeline's `retry_for` (reconnecting), what is not transient fails at once.
    pub async fn refresh(&mut self) -> Result<(), String> {
        use sluice_core::Classify;
        let mut backoff = sluice_core::Backoff::new(self.retry);
        loop {
            let error = match self.read().await {
                Ok(Ok(phases)) => {
                    self.phases = phases;
                    return Ok(());
                }
                Ok(Err(unknown)) => return Err(unknown.to_string()),
                Err(error) => error,
            };
            self.sql = None;
            let message = format!(
                "cannot read the migration state table {} in the old database: {}",
                self.migration.state_table,
                sluice_postgres::error::Chain(&error)
            );
            match backoff.next_delay() {
                Some(delay) if error.is_transient() => {
                    tracing::warn!(
                        retry_in_ms = delay.as_millis() as u64,
                        gives_up_in_s = backoff.gives_up_in().as_secs(),
                        "{message}; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                _ => return Err(message),
            }
        }
    }

    /// The phases, or a phase this sluice does not know; SQL failures apart, for the retry.
    async fn read(
        &mut self,
    ) -> sluice_postgres::Result<Result<BTreeMap<String, Phase>, super::MigrationError>> {
        if self.sql.is_none() {
            self.sql = Some(sluice_postgres::connect_sql(&self.connection).await?);
        }
        let sql = self.sql.as_ref().expect("connected");
        super::ensure_state_tables(sql, &self.migration).await?;
        super::command::split(super::phases(sql, &self.migration, &self.pipeline).await)
    }

    /// The old tables that stream back now.
    pub fn streaming(&self) -> Vec<&str> {
        self.phases
            .iter()
            .filter(|(_, p)| p.direction() == Some(Direction::Reverse))
            .map(|(t, _)| t.as_str())
            .collect()
    }

    /// Whether changes of `new_table` (by its old table's phase, as last read) stream back.
    pub fn allowed(&self, new_table: &str) -> bool {
        match self.old_of.get(new_table) {
            // Not mapped: the translator skips it.
            None => true,
            Some(old) => self.phases.get(old).and_then(|p| p.direction()) == Some(Direction::Reverse),
        }
    }

    fn tables_of(event: &ChangeEvent) -> Vec<String> {
        match event {
            ChangeEvent::Insert { relation, .. }
            | ChangeEvent::Update { relation, .. }
            | ChangeEvent::Delete { relation, .. } => vec![relation.qualified_name()],
            ChangeEvent::Truncate { relations, .. } => relations.iter().map(|r| r.qualified_name()).collect(),
            _ => Vec::new(),
        }
    }

    /// Drops the batch's changes of tables that do not stream back, after reading the phases
    /// again (one query a batch holding changes of mapped tables); counts them by new table.
    pub async fn retain(&mut self, batch: &mut EventBatch) -> Result<(), String> {
        let mapped =
            |gate: &Self, e: &ChangeEvent| Self::tables_of(e).iter().any(|t| gate.old_of.contains_key(t));
        if !batch.events.iter().any(|e| mapped(self, e)) {
            return Ok(());
        }
        // Read after the batch's changes were received: a change made after a table moved
        // (a `finish`) meets the new phase.
        self.refresh().await?;
        let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
        let gate = &*self;
        batch.events.retain_mut(|event| {
            if let ChangeEvent::Truncate { relations, .. } = event {
                relations.retain(|r| {
                    let keep = gate.allowed(&r.qualified_name());
                    if !keep {
                        *skipped.entry(r.qualified_name()).or_default() += 1;
                    }
                    keep
                });
                return !relations.is_empty();
            }
            match Self::tables_of(event).first() {
                Some(table) if !gate.allowed(table) => {
                    *skipped.entry(table.clone()).or_default() += 1;
                    false
                }
                _ => true,
            }
        });
        for (table, n) in skipped {
            tracing::debug!(
                table,
                changes = n,
                "skipped: the table does not stream back in its migration phase"
            );
            metrics::counter!(crate::metrics::REVERSE_SKIPPED_TOTAL, "table" => table).increment(n);
        }
        Ok(())
    }
}

/// Before the way back streams: its publication in the new database (created for the mapped
/// new tables when missing, else checked). `config` is the reversed configuration.
pub async fn prepare(config: &Config) -> Result<(), crate::error::CommandError> {
    use crate::error::{CommandContext, CommandError};
    let (TargetConfig::Postgres(target), Some(replication)) = (&config.target, config.source.replication())
    else {
        return Err(CommandError::invalid("the way back needs a reversed Postgres configuration"));
    };
    let mapping = target.load_mapping().map_err(|p| {
        CommandError::invalid(p.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    })?;
    let tables: Vec<String> = mapping.tables.iter().map(|t| t.source.clone()).collect();
    let mut sql = ReadSession::connect(
        &config.source.connection,
        "sluice reverse setup",
        RetryPolicy::new(config.pipeline.retry_for),
    )
    .await
    .context("cannot connect to the new database (target.connection)")?;
    let publication = replication.publication.as_str();
    let checked = sql
        .run(async |c| Ok(ensure_publication(c, publication, &tables).await))
        .await
        .context("cannot check the reverse publication")?;
    checked.map_err(CommandError::invalid)
}
