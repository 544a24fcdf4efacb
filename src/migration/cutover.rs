//! `sluice cutover`, `sluice rollback` and `sluice finish`: the moves of a table between the
//! stores, each step printed as it is made, each command safe to re-run after a crash at any
//! step (the phase in the state table says where it stopped; every step is idempotent).
//!
//! ```text
//! cutover   checks (phase forward, forward lag, way back ready, verify clean)
//!           → fenced: the old tables refuse the application's writes
//!           → drain: the forward slot confirmed past the fence position
//!           → verify: 0 differences, else unfence and back to forward
//!           → reversed: the new tables take the application's writes (their fence, if a
//!             rollback left one, comes down); the way back applies them to the old tables
//! rollback  checks (phase reversed, way back streaming, its lag)
//!           → rolling_back: the new tables refuse the application's writes
//!           → drain: the reverse slot confirmed past the new side's fence position
//!           → verify: 0 differences, else unfence the new side and back to reversed
//!           → forward: the old tables' fence comes down; the new ones keep theirs (only
//!             the forward stream writes there)
//! finish    phase reversed → drain the way back → finished: the way back stops applying
//!           the table for good (the old table keeps its fence)
//! ```

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sluice_core::{Lsn, RetryPolicy, TableName};
use sluice_postgres::ReadSession;

use super::command::{split, split_fence};
use super::fence::{self, REFUSED_SQLSTATE};
use super::reverse::{reverse_names, reversed};
use super::{decide, ensure_state_tables, phases, transition, Direction, Move, Phase, Step};
use crate::backfill::Scope;
use crate::config::{Config, TargetConfig};
use crate::error::{CommandContext, CommandError};
use crate::targets::dynamodb::verify::DynamoSide;

/// The arguments of `cutover`, `rollback` and `finish`.
#[derive(Clone, Debug, clap::Args)]
pub struct MoveArgs {
    /// The configuration file (of the forward pipeline).
    #[arg(short, long)]
    pub config: std::path::PathBuf,
    /// A source table (`schema.table`) to move; repeat for several.
    #[arg(long = "table", value_name = "TABLE", required = true)]
    pub tables: Vec<String>,
    /// Refuse to start while the stream that must drain is further behind than this many
    /// bytes of WAL.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub max_lag_bytes: u64,
    /// How long to wait for the stream to apply everything up to the fence.
    #[arg(long, default_value = "5m", value_parser = sluice_core::duration::parse)]
    pub drain_timeout: Duration,
    /// How long verify waits for the stream before re-checking a key found wrong.
    #[arg(long, default_value = "60s", value_parser = sluice_core::duration::parse)]
    pub recheck_timeout: Duration,
    /// `rollback` with a DynamoDB target: the application no longer writes the DynamoDB
    /// tables (an IAM deny, or its writers stopped). sluice cannot fence DynamoDB itself.
    #[arg(long)]
    pub new_side_fenced: bool,
}

/// The new store, as the moves see it.
enum NewStore {
    /// A Postgres database, with the way back's slot in it.
    Postgres { sql: ReadSession, reverse_slot: String },
    /// DynamoDB: the way back reads the tables' streams; the application's writes are
    /// fenced by the operator.
    Dynamodb { side: DynamoSide, streams: BTreeSet<String> },
}

/// Both stores, the pipeline's names, and the tables asked for with their new tables.
struct Stores {
    old: ReadSession,
    new: NewStore,
    scope: Scope,
    /// (old table, new table) of each table asked for: `schema.table` in a Postgres
    /// database, a DynamoDB table's name.
    tables: Vec<(TableName, String)>,
    started: Instant,
    command: &'static str,
}

impl Stores {
    async fn open(config: &Config, args: &MoveArgs, command: &'static str) -> Result<Stores, CommandError> {
        let started = Instant::now();
        let Some(scope) = Scope::of(config) else {
            return Err(CommandError::invalid(format!(
                "{command} needs a logical replication source ([source.replication])"
            )));
        };
        // (source table, new table) of the mapping.
        let (pairs, mapping_file): (Vec<(String, String)>, std::path::PathBuf) = match &config.target {
            TargetConfig::Dynamodb(dynamo) => {
                let mapping = super::reverse_dynamodb::mapping(config)?;
                let pairs = mapping.tables.iter().map(|t| (t.source.clone(), t.target.clone())).collect();
                (pairs, dynamo.mapping.clone().unwrap_or_default())
            }
            _ => {
                let back = reversed(config).map_err(|problems| {
                    CommandError::invalid(format!(
                        "{command} needs the way back, which this configuration cannot run: {}",
                        problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
                    ))
                })?;
                drop(back);
                let TargetConfig::Postgres(target) = &config.target else {
                    unreachable!("reversed checked the target")
                };
                let mapping = target.load_mapping().map_err(|p| {
                    CommandError::invalid(p.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
                })?;
                let pairs = mapping.tables.iter().map(|t| (t.source.clone(), t.target.clone())).collect();
                (pairs, target.mapping.clone())
            }
        };
        let mut tables = Vec::new();
        for table in &args.tables {
            let old: TableName =
                table.parse().map_err(|_| CommandError::invalid(format!("{table} is no schema.table")))?;
            let Some((_, new)) = pairs.iter().find(|(source, _)| *source == old.to_string()) else {
                return Err(CommandError::invalid(format!(
                    "table {table} is not in the mapping ({})",
                    mapping_file.display()
                )));
            };
            tables.push((old, new.clone()));
        }
        let retry = RetryPolicy::new(config.pipeline.retry_for);
        let mut old = crate::backfill::source_session(config, &format!("sluice {command}")).await?;
        old.run(async |c| Ok(ensure_state_tables(c, &config.migration).await?)).await.with_context(|| {
            format!(
                "cannot create the migration state table {} (migration.state_table)",
                config.migration.state_table
            )
        })?;
        let published = old
            .run(async |c| {
                Ok(crate::backfill::published_tables(c, &config.backfill, &scope.publication).await?)
            })
            .await
            .with_context(|| format!("cannot list the tables of publication {}", scope.publication))?;
        crate::backfill::outside_publication(&scope, &published, &args.tables)?;
        let new = match &config.target {
            TargetConfig::Dynamodb(dynamo) => {
                let side = DynamoSide::open(dynamo).await?;
                let names: BTreeSet<&str> = tables.iter().map(|(_, new)| new.as_str()).collect();
                let streams =
                    super::reverse_dynamodb::streams(side.client(), &names.into_iter().collect::<Vec<_>>())
                        .await
                        .map_err(|e| {
                            CommandError::invalid(format!("the way back cannot read DynamoDB: {e}"))
                        })?;
                NewStore::Dynamodb { side, streams: streams.into_iter().map(|(_, arn)| arn).collect() }
            }
            TargetConfig::Postgres(target) => {
                let sql = ReadSession::connect(&target.connection, &format!("sluice {command}"), retry)
                    .await
                    .context("cannot connect to the new database (target.connection)")?;
                let (reverse_slot, _) = reverse_names(config).expect("a replication source");
                for (_, new) in &tables {
                    new.parse::<TableName>()
                        .map_err(|_| CommandError::invalid(format!("{new} is no schema.table")))?;
                }
                NewStore::Postgres { sql, reverse_slot }
            }
            _ => unreachable!("only Postgres and DynamoDB targets have a way back"),
        };
        Ok(Stores { old, new, scope, tables, started, command })
    }

    /// A progress line on standard error, with the time since the command started.
    fn say(&self, table: impl std::fmt::Display, step: &str) {
        eprintln!("{} {table}: {step} (+{:.1}s)", self.command, self.started.elapsed().as_secs_f64());
    }

    async fn phase_of(&mut self, config: &Config) -> Result<Vec<Phase>, CommandError> {
        let (migration, pipeline) = (&config.migration, &self.scope.pipeline);
        let known = self
            .old
            .run(async |c| split(phases(c, migration, pipeline).await))
            .await
            .context("cannot read the migration state")?
            .map_err(|e| CommandError::invalid(e.to_string()))?;
        Ok(self
            .tables
            .iter()
            .map(|(old, _)| known.get(&old.to_string()).copied().unwrap_or(Phase::Forward))
            .collect())
    }

    async fn step(&mut self, config: &Config, table: &TableName, step: Step) -> Result<Move, CommandError> {
        let (migration, pipeline, name, who) =
            (&config.migration, &self.scope.pipeline, table.to_string(), super::operator());
        self.old
            .run(async |c| split(transition(c, migration, pipeline, &name, step, &who).await))
            .await
            .with_context(|| format!("cannot record the phase of {table}"))?
            .map_err(|e| CommandError::invalid(e.to_string()))
    }

    /// Fences `table` in the old database (`new_side` false) or the new one; the fence position.
    async fn fence(
        &mut self,
        config: &Config,
        table: &TableName,
        new_side: bool,
    ) -> Result<Lsn, CommandError> {
        let (migration, scope) = (&config.migration, &self.scope);
        // The old tables let the way back's session through; the new ones the forward one's.
        let allowed = if new_side { Direction::Forward } else { Direction::Reverse };
        let sql = match (&mut self.new, new_side) {
            (NewStore::Postgres { sql, .. }, true) => sql,
            (NewStore::Dynamodb { .. }, true) => {
                return Err(CommandError::invalid("the new store is DynamoDB: sluice does not fence it"))
            }
            (_, false) => &mut self.old,
        };
        sql.run(async |c| split_fence(fence::fence(c, migration, scope, table, allowed).await))
            .await
            .with_context(|| format!("cannot fence {table}"))?
            .map_err(|e| CommandError::invalid(e.to_string()))
    }

    /// The new database's session; an error for a new store that is not Postgres.
    fn new_sql(&mut self) -> Result<&mut ReadSession, CommandError> {
        match &mut self.new {
            NewStore::Postgres { sql, .. } => Ok(sql),
            NewStore::Dynamodb { .. } => {
                Err(CommandError::invalid("the new store is DynamoDB: sluice does not fence it"))
            }
        }
    }

    /// Takes the fence down from a new table; nothing to do in DynamoDB (the operator fences it).
    async fn unfence_new(&mut self, table: &str) -> Result<bool, CommandError> {
        if matches!(self.new, NewStore::Dynamodb { .. }) {
            return Ok(false);
        }
        let table: TableName =
            table.parse().map_err(|_| CommandError::invalid(format!("{table} is no schema.table")))?;
        self.unfence(&table, true).await
    }

    async fn unfence(&mut self, table: &TableName, new_side: bool) -> Result<bool, CommandError> {
        let sql = if new_side { self.new_sql()? } else { &mut self.old };
        sql.run(async |c| split_fence(fence::unfence(c, table).await))
            .await
            .with_context(|| format!("cannot take the fence of {table} down"))?
            .map_err(|e| CommandError::invalid(e.to_string()))
    }

    /// The slot of the stream that drains, in the old database (`new_side` false: the forward
    /// one) or the new one (the way back's).
    async fn slot(&mut self, new_side: bool) -> Result<SlotLag, CommandError> {
        let slot = match (&self.new, new_side) {
            (NewStore::Postgres { reverse_slot, .. }, true) => reverse_slot.clone(),
            _ => self.scope.slot.clone(),
        };
        let sql = if new_side { self.new_sql()? } else { &mut self.old };
        let row = sql
            .run(async |c| {
                Ok(c.query_opt(
                    "SELECT active, (confirmed_flush_lsn - '0/0'::pg_lsn)::int8, \
                            (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8 \
                     FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?)
            })
            .await
            .with_context(|| format!("cannot read replication slot {slot}"))?;
        Ok(match row {
            None => SlotLag { slot, exists: false, active: false, confirmed: Lsn::ZERO, server: Lsn::ZERO },
            Some(row) => {
                let confirmed: Option<i64> = row.get(1);
                let server: i64 = row.get(2);
                SlotLag {
                    slot,
                    exists: true,
                    active: row.get(0),
                    confirmed: Lsn(confirmed.unwrap_or(0) as u64),
                    server: Lsn(server as u64),
                }
            }
        })
    }

    /// Waits until the slot has confirmed `lsn`: everything written before the fence is
    /// durable on the other side.
    async fn drain(
        &mut self,
        new_side: bool,
        lsn: Lsn,
        timeout: Duration,
        label: &str,
    ) -> Result<(), CommandError> {
        let deadline = Instant::now() + timeout;
        let mut said = Instant::now();
        loop {
            let slot = self.slot(new_side).await?;
            if slot.confirmed >= lsn {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CommandError::invalid(format!(
                    "the {} stream did not apply everything up to the fence at {lsn} within {} (slot {} confirmed {}{}): \
                     {label}; re-run the command to go on waiting",
                    if new_side { "reverse" } else { "forward" },
                    humantime_secs(timeout),
                    slot.slot,
                    slot.confirmed,
                    if slot.active { "" } else { ", and no process streams it" },
                )));
            }
            if said.elapsed() >= Duration::from_secs(5) {
                said = Instant::now();
                eprintln!(
                    "{}: waiting for slot {} to confirm {lsn} ({} bytes to go)",
                    self.command,
                    slot.slot,
                    lsn.0.saturating_sub(slot.confirmed.0)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A slot's state, for the checks and the drain.
struct SlotLag {
    slot: String,
    exists: bool,
    active: bool,
    confirmed: Lsn,
    server: Lsn,
}

impl SlotLag {
    fn lag(&self) -> u64 {
        self.server.0.saturating_sub(self.confirmed.0)
    }

    /// The slot streams, within `max` bytes of the server's position; else why not.
    fn ready(&self, max: u64, start: &str) -> Result<(), CommandError> {
        if !self.exists {
            return Err(CommandError::invalid(format!(
                "replication slot {} does not exist: {start}",
                self.slot
            )));
        }
        if !self.active {
            return Err(CommandError::invalid(format!(
                "no process streams replication slot {}: {start}",
                self.slot
            )));
        }
        if self.lag() > max {
            return Err(CommandError::invalid(format!(
                "replication slot {} is {} bytes of WAL behind, above --max-lag-bytes {max}: wait for it to catch up",
                self.slot,
                self.lag()
            )));
        }
        Ok(())
    }
}

/// Verifies `tables`; an error naming the keys (at most ten a kind) when any differ.
async fn verify_clean(config: &Config, args: &MoveArgs, tables: &[&TableName]) -> Result<u64, CommandError> {
    let verify = crate::verify::VerifyArgs {
        config: args.config.clone(),
        tables: tables.iter().map(|t| t.to_string()).collect(),
        show: 10,
        values: false,
        json: false,
        chunk_size: 1000,
        max_rows_per_second: 0,
        sample: None,
        recheck_timeout: args.recheck_timeout,
        force: false,
        background: false,
    };
    let report = crate::verify::verify(config, &verify).await?;
    let differences = report.differences();
    if differences > 0 {
        crate::verify::print(&report, &verify).context("cannot write to standard output")?;
    }
    Ok(differences)
}

/// `sluice cutover`: moves each of the tables from `forward` to `reversed`.
pub async fn cutover(config: &Config, args: &MoveArgs) -> Result<(), CommandError> {
    let mut stores = Stores::open(config, args, "cutover").await?;
    let phases = stores.phase_of(config).await?;
    let tables = stores.tables.clone();
    // Every table must be able to move before any does.
    for ((old, _), phase) in tables.iter().zip(&phases) {
        if *phase != Phase::Reversed {
            decide(&old.to_string(), *phase, Step::Fence)
                .map_err(|e| CommandError::invalid(e.to_string()))?;
        }
    }
    let fresh: Vec<&TableName> =
        tables.iter().zip(&phases).filter(|(_, p)| **p == Phase::Forward).map(|((old, _), _)| old).collect();
    let moving: Vec<&(TableName, String)> =
        tables.iter().zip(&phases).filter(|(_, p)| **p != Phase::Reversed).map(|(t, _)| t).collect();
    for ((old, new), phase) in tables.iter().zip(&phases) {
        if *phase == Phase::Reversed {
            // A cutover that stopped after its last move: the new table takes writes.
            stores.unfence_new(new).await?;
            stores.say(old, "already reversed");
        } else if *phase == Phase::Fenced {
            stores.say(old, "fenced by an earlier cutover: going on from the drain");
        }
    }
    if moving.is_empty() {
        return Ok(());
    }
    // 1. The checks, for the tables that are not fenced yet.
    let forward = stores.slot(false).await?;
    forward.ready(args.max_lag_bytes, "start `sluice run` so that the fenced tables can drain")?;
    // A DynamoDB stream keeps the new tables' changes for 24 hours from the start: its
    // configuration was checked when the stores were opened.
    if let NewStore::Postgres { .. } = stores.new {
        let back = stores.slot(true).await?;
        if !back.exists {
            return Err(CommandError::invalid(format!(
                "the way back is not set up: replication slot {} does not exist in the new database; start \
                 `sluice run --reverse -c {}` first, so that it keeps the new tables' changes from the first one",
                back.slot,
                args.config.display()
            )));
        }
    }
    if !fresh.is_empty() {
        for table in &fresh {
            stores.say(
                table,
                &format!("1/5 checks: phase forward, slot {} {} bytes behind", forward.slot, forward.lag()),
            );
        }
        let differences = verify_clean(config, args, &fresh).await?;
        if differences > 0 {
            return Err(CommandError::invalid(format!(
                "verify found {differences} difference{} (above): nothing was fenced; reconcile, then run cutover again",
                if differences == 1 { "" } else { "s" }
            )));
        }
        for table in &fresh {
            stores.say(table, "1/5 checks: verify found 0 differences");
        }
    }
    // 2. The fence.
    let mut fence_lsn = Lsn::ZERO;
    for (old, _) in &moving {
        stores.step(config, old, Step::Fence).await?;
        crate::faults::kill_at("cutover-1");
        let lsn = stores.fence(config, old, false).await?;
        fence_lsn = fence_lsn.max(lsn);
        stores.say(
            old,
            &format!(
                "2/5 fenced at {lsn}: the application's writes are refused (SQLSTATE {REFUSED_SQLSTATE})"
            ),
        );
    }
    crate::faults::kill_at("cutover-2");
    // 3. The drain.
    stores
        .drain(
            false,
            fence_lsn,
            args.drain_timeout,
            "the tables stay fenced; `sluice unfence` and `sluice migration` show the way back",
        )
        .await?;
    for (old, _) in &moving {
        stores.say(old, &format!("3/5 drained: the forward stream applied everything up to {fence_lsn}"));
    }
    crate::faults::kill_at("cutover-3");
    // 4. The final check.
    let olds: Vec<&TableName> = moving.iter().map(|(old, _)| old).collect();
    let differences = verify_clean(config, args, &olds).await?;
    if differences > 0 {
        for (old, _) in &moving {
            stores.unfence(old, false).await?;
            stores.step(config, old, Step::AbortCutover).await?;
            stores.say(old, "unfenced: back to forward");
        }
        return Err(CommandError::invalid(format!(
            "verify found {differences} difference{} after the drain (above): the tables are unfenced and forward again",
            if differences == 1 { "" } else { "s" }
        )));
    }
    // 5. The flip.
    for (old, new) in &moving {
        stores.say(old, "4/5 verified: 0 differences");
        stores.step(config, old, Step::Reverse).await?;
        crate::faults::kill_at("cutover-4");
        if stores.unfence_new(new).await? {
            stores.say(new, "fence of an earlier rollback taken down");
        }
        stores.say(old,
            &format!("5/5 reversed: the application writes to {new} now; the way back applies its changes to {old}"),
        );
    }
    Ok(())
}

/// `sluice rollback`: moves each of the tables from `reversed` back to `forward`.
pub async fn rollback(config: &Config, args: &MoveArgs) -> Result<(), CommandError> {
    let mut stores = Stores::open(config, args, "rollback").await?;
    let phases = stores.phase_of(config).await?;
    let tables = stores.tables.clone();
    for ((old, _), phase) in tables.iter().zip(&phases) {
        if *phase != Phase::Forward {
            decide(&old.to_string(), *phase, Step::StartRollback)
                .map_err(|e| CommandError::invalid(e.to_string()))?;
        }
    }
    let moving: Vec<&(TableName, String)> =
        tables.iter().zip(&phases).filter(|(_, p)| **p != Phase::Forward).map(|(t, _)| t).collect();
    for ((old, _), phase) in tables.iter().zip(&phases) {
        if *phase == Phase::Forward {
            // A rollback that stopped after its last move: the old table takes writes.
            stores.unfence(old, false).await?;
            stores.say(old, "already forward");
        }
    }
    if moving.is_empty() {
        return Ok(());
    }
    if let NewStore::Dynamodb { .. } = stores.new {
        return rollback_from_dynamodb(config, args, &mut stores, &moving).await;
    }
    let back = stores.slot(true).await?;
    back.ready(
        args.max_lag_bytes,
        &format!(
            "start `sluice run --reverse -c {}` so that the new tables can drain",
            args.config.display()
        ),
    )?;
    for (old, _) in &moving {
        stores.say(
            old,
            &format!("1/5 checks: the way back streams, slot {} {} bytes behind", back.slot, back.lag()),
        );
    }
    let mut fence_lsn = Lsn::ZERO;
    for (old, new) in &moving {
        stores.step(config, old, Step::StartRollback).await?;
        crate::faults::kill_at("rollback-1");
        let new_table: TableName =
            new.parse().map_err(|_| CommandError::invalid(format!("{new} is no schema.table")))?;
        let lsn = stores.fence(config, &new_table, true).await?;
        fence_lsn = fence_lsn.max(lsn);
        stores.say(
            new,
            &format!(
                "2/5 fenced at {lsn}: the application's writes are refused (SQLSTATE {REFUSED_SQLSTATE})"
            ),
        );
    }
    crate::faults::kill_at("rollback-2");
    stores
        .drain(true, fence_lsn, args.drain_timeout, "the tables stay rolling_back, the new ones fenced")
        .await?;
    for (old, _) in &moving {
        stores.say(old, &format!("3/5 drained: the way back applied everything up to {fence_lsn}"));
    }
    crate::faults::kill_at("rollback-3");
    let olds: Vec<&TableName> = moving.iter().map(|(old, _)| old).collect();
    let differences = verify_clean(config, args, &olds).await?;
    if differences > 0 {
        for (old, new) in &moving {
            stores.unfence_new(new).await?;
            stores.step(config, old, Step::AbortRollback).await?;
            stores.say(old, &format!("{new} unfenced: back to reversed"));
        }
        return Err(CommandError::invalid(format!(
            "verify found {differences} difference{} after the drain (above): the new tables are unfenced and the tables reversed again",
            if differences == 1 { "" } else { "s" }
        )));
    }
    for (old, new) in &moving {
        stores.say(old, "4/5 verified: 0 differences");
        stores.step(config, old, Step::CompleteRollback).await?;
        crate::faults::kill_at("rollback-4");
        stores.unfence(old, false).await?;
        stores.say(old,
            &format!("5/5 forward: the application writes to {old} again; {new} stays fenced but for the forward stream"),
        );
    }
    Ok(())
}

/// `sluice finish`: the way back stops applying the tables for good.
pub async fn finish(config: &Config, args: &MoveArgs) -> Result<(), CommandError> {
    let mut stores = Stores::open(config, args, "finish").await?;
    let phases = stores.phase_of(config).await?;
    let tables = stores.tables.clone();
    for ((old, _), phase) in tables.iter().zip(&phases) {
        decide(&old.to_string(), *phase, Step::Finish).map_err(|e| CommandError::invalid(e.to_string()))?;
    }
    // What the application wrote so far reaches the old tables first, when the way back runs.
    if let NewStore::Dynamodb { .. } = stores.new {
        let now = unix_now();
        if stores.streamed_since(config, now - WAY_BACK_STREAMING).await? {
            stores.drain_streams(config, now, args.drain_timeout, "nothing was finished").await?;
            for (old, _) in &tables {
                stores.say(old, "1/2 drained: the way back applied every record the streams held");
            }
        } else {
            tracing::warn!("no process streams the way back from DynamoDB: finishing without draining it");
        }
        return finish_moves(config, &mut stores, &tables, &phases).await;
    }
    let back = stores.slot(true).await?;
    if back.active {
        let target = back.server;
        stores.drain(true, target, args.drain_timeout, "nothing was finished").await?;
        for (old, _) in &tables {
            stores.say(old, &format!("1/2 drained: the way back applied everything up to {target}"));
        }
    } else {
        tracing::warn!(slot = %back.slot, "no process streams the way back: finishing without draining it");
    }
    finish_moves(config, &mut stores, &tables, &phases).await
}

/// `finish`'s last step: each table not finished yet is recorded `finished`.
async fn finish_moves(
    config: &Config,
    stores: &mut Stores,
    tables: &[(TableName, String)],
    phases: &[Phase],
) -> Result<(), CommandError> {
    for ((old, new), phase) in tables.iter().zip(phases) {
        if *phase == Phase::Finished {
            stores.say(old, "already finished");
            continue;
        }
        stores.step(config, old, Step::Finish).await?;
        stores.say(
            old,
            &format!("2/2 finished: {new} is the table from now on; the way back no longer applies to {old}"),
        );
    }
    Ok(())
}

/// How recently the way back from DynamoDB must have read every shard to its end for it to
/// count as streaming (seconds).
const WAY_BACK_STREAMING: f64 = 30.0;

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Stores {
    /// Whether the way back has read every shard of the new tables' streams to its end at
    /// or after `since` (seconds since the epoch).
    async fn streamed_since(&mut self, config: &Config, since: f64) -> Result<bool, CommandError> {
        let NewStore::Dynamodb { streams, .. } = &self.new else { return Ok(false) };
        let read_to = self
            .old
            .run(async |c| Ok(super::reverse_dynamodb::read_to(c, config, streams).await?))
            .await
            .with_context(|| format!("cannot read {}", config.migration.stream_checkpoint_table))?;
        Ok(read_to.is_some_and(|t| t >= since))
    }

    /// Waits until the way back has read every shard to its end after `from` (and the records
    /// written before it have settled into the streams), within `timeout`.
    async fn drain_streams(
        &mut self,
        config: &Config,
        from: f64,
        timeout: Duration,
        label: &str,
    ) -> Result<(), CommandError> {
        let target = from + super::reverse_dynamodb::STREAM_SETTLE.as_secs_f64();
        let deadline = Instant::now() + timeout;
        let mut said = Instant::now();
        while !self.streamed_since(config, target).await? {
            if Instant::now() >= deadline {
                return Err(CommandError::invalid(format!(
                    "the way back did not read the DynamoDB streams to their end within {}: {label}; is \
                     `sluice run --reverse` running? Re-run the command to go on waiting",
                    humantime_secs(timeout)
                )));
            }
            if said.elapsed() >= Duration::from_secs(5) {
                said = Instant::now();
                eprintln!(
                    "{}: waiting for the way back to read the DynamoDB streams to their end",
                    self.command
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}

/// `rollback` with a DynamoDB target: the operator has fenced the DynamoDB tables
/// (`--new-side-fenced`); the way back drains the streams, verify, the application's items
/// get a version so that the forward stream can write them again, then `forward`.
async fn rollback_from_dynamodb(
    config: &Config,
    args: &MoveArgs,
    stores: &mut Stores,
    moving: &[&(TableName, String)],
) -> Result<(), CommandError> {
    let news: BTreeSet<&str> = moving.iter().map(|(_, new)| new.as_str()).collect();
    let news = news.into_iter().collect::<Vec<_>>().join(", ");
    if !args.new_side_fenced {
        return Err(CommandError::invalid(format!(
            "the new store is DynamoDB, which sluice cannot fence: stop the application's writes to DynamoDB table {news} \
             (an IAM deny on PutItem, UpdateItem, DeleteItem, BatchWriteItem and TransactWriteItems, or stop its writers), \
             then run rollback again with --new-side-fenced; nothing was moved"
        )));
    }
    if !stores.streamed_since(config, unix_now() - WAY_BACK_STREAMING).await? {
        return Err(CommandError::invalid(format!(
            "no process streams the way back from DynamoDB (it has not read the streams to their end in the last {WAY_BACK_STREAMING} s): \
             start `sluice run --reverse -c {}` so that the new tables can drain; nothing was moved",
            args.config.display()
        )));
    }
    for (old, _) in moving {
        stores.say(old, "1/5 checks: the way back streams DynamoDB");
    }
    for (old, new) in moving {
        stores.step(config, old, Step::StartRollback).await?;
        crate::faults::kill_at("rollback-1");
        stores.say(
            old,
            &format!("2/5 rolling_back: DynamoDB table {new} fenced by the operator (--new-side-fenced)"),
        );
    }
    let fenced_at = unix_now();
    crate::faults::kill_at("rollback-2");
    stores.drain_streams(config, fenced_at, args.drain_timeout, "the tables stay rolling_back").await?;
    for (old, _) in moving {
        stores.say(old, "3/5 drained: the way back applied every record the streams held");
    }
    crate::faults::kill_at("rollback-3");
    let olds: Vec<&TableName> = moving.iter().map(|(old, _)| old).collect();
    let differences = verify_clean(config, args, &olds).await?;
    if differences > 0 {
        for (old, _) in moving {
            stores.step(config, old, Step::AbortRollback).await?;
            stores.say(old, "back to reversed: the application may write DynamoDB again");
        }
        return Err(CommandError::invalid(format!(
            "verify found {differences} difference{} after the drain (above): the tables are reversed again",
            if differences == 1 { "" } else { "s" }
        )));
    }
    let NewStore::Dynamodb { side, .. } = &stores.new else { unreachable!("a DynamoDB rollback") };
    let sources: Vec<String> = olds.iter().map(|t| t.to_string()).collect();
    let stamped = side.stamp_unversioned(&sources).await?;
    for (old, _) in moving {
        stores.say(
            old,
            &format!("4/5 verified: 0 differences; {stamped} items the application wrote now carry version 0, for the forward stream's guard"),
        );
    }
    for (old, new) in moving {
        stores.step(config, old, Step::CompleteRollback).await?;
        crate::faults::kill_at("rollback-4");
        stores.unfence(old, false).await?;
        stores.say(
            old,
            &format!("5/5 forward: the application writes to {old} again; the forward stream writes DynamoDB table {new}"),
        );
    }
    Ok(())
}

/// `90s`, `5m`: a duration as the flags take it.
fn humantime_secs(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}
