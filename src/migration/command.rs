//! `sluice migration` (each table's phase, fence and moves), `sluice fence` and
//! `sluice unfence`.

use sluice_core::TableName;
use sluice_postgres::ReadSession;

use super::{ensure_state_tables, fence, history, phases, Phase};
use crate::backfill::Scope;
use crate::error::{CommandContext, CommandError};

/// A session on the source database with the state tables there, and the pipeline's
/// published tables.
async fn session(
    config: &crate::config::Config,
    application_name: &str,
) -> Result<(ReadSession, Scope, Vec<String>), CommandError> {
    let Some(scope) = Scope::of(config) else {
        return Err(CommandError::invalid(
            "migration phases need the logical replication source ([source.replication])",
        ));
    };
    let mut sql = crate::backfill::source_session(config, application_name).await?;
    sql.run(async |c| Ok(ensure_state_tables(c, &config.migration).await?)).await.with_context(|| {
        format!(
            "cannot create the migration state table {} (migration.state_table)",
            config.migration.state_table
        )
    })?;
    let published = sql
        .run(async |c| Ok(crate::backfill::published_tables(c, &config.backfill, &scope.publication).await?))
        .await
        .with_context(|| format!("cannot list the tables of publication {}", scope.publication))?;
    Ok((sql, scope, published))
}

/// One table's state.
#[derive(serde::Serialize)]
struct TableState {
    table: String,
    phase: Phase,
    fenced: bool,
}

/// `sluice migration`: every published table's phase and whether it is fenced, and with
/// `with_history` every move (who, when).
pub async fn show(
    config: &crate::config::Config,
    json: bool,
    with_history: bool,
) -> Result<(), CommandError> {
    let (mut sql, scope, published) = session(config, "sluice migration").await?;
    let known = sql
        .run(async |c| split(phases(c, &config.migration, &scope.pipeline).await))
        .await
        .context("cannot read the migration state")?
        .map_err(|e| CommandError::invalid(e.to_string()))?;
    let mut tables = Vec::new();
    for table in &published {
        let name: TableName =
            table.parse().map_err(|_| CommandError::invalid(format!("{table} is no schema.table")))?;
        let fenced = sql
            .run(async |c| Ok(fence::is_fenced(c, &name).await?))
            .await
            .with_context(|| format!("cannot read the triggers of {table}"))?;
        tables.push(TableState {
            table: table.clone(),
            phase: known.get(table).copied().unwrap_or(Phase::Forward),
            fenced,
        });
    }
    let moves = if with_history {
        sql.run(async |c| split(history(c, &config.migration, &scope.pipeline).await))
            .await
            .context("cannot read the migration log")?
            .map_err(|e| CommandError::invalid(e.to_string()))?
    } else {
        Vec::new()
    };
    let text = if json {
        let mut value = serde_json::json!({ "pipeline": scope.pipeline, "tables": tables });
        if with_history {
            value["history"] = serde_json::json!(moves);
        }
        format!("{value:#}\n")
    } else {
        let mut text =
            format!("pipeline {:?}\n{:<40} {:<13} {}\n", scope.pipeline, "table", "phase", "fenced");
        for t in &tables {
            text.push_str(&format!(
                "{:<40} {:<13} {}\n",
                t.table,
                t.phase.as_str(),
                if t.fenced { "yes" } else { "no" }
            ));
        }
        for m in &moves {
            text.push_str(&format!(
                "{}  {}: {} -> {} by {} ({})\n",
                m.changed_at, m.table, m.from, m.to, m.changed_by, m.command
            ));
        }
        text
    };
    crate::error::print(&text).context("cannot write to standard output")
}

/// `sluice fence` (`up`) and `sluice unfence`: puts the fence up on (or takes it down from)
/// each of `tables`, which must be the pipeline's. A fenced table lets through only the writes
/// of sluice's reverse session.
pub async fn fence_tables(
    config: &crate::config::Config,
    tables: &[String],
    up: bool,
) -> Result<(), CommandError> {
    let (mut sql, scope, published) =
        session(config, if up { "sluice fence" } else { "sluice unfence" }).await?;
    if tables.is_empty() {
        return Err(CommandError::invalid("name the tables: --table schema.table (repeat for several)"));
    }
    crate::backfill::outside_publication(&scope, &published, tables)?;
    for table in tables {
        let name: TableName =
            table.parse().map_err(|_| CommandError::invalid(format!("{table} is no schema.table")))?;
        if up {
            let lsn = sql
                .run(async |c| {
                    split_fence(
                        fence::fence(c, &config.migration, &scope, &name, super::Direction::Reverse).await,
                    )
                })
                .await
                .with_context(|| format!("cannot fence {table}"))?
                .map_err(|e| CommandError::invalid(e.to_string()))?;
            eprintln!(
                "fenced {table} at {lsn}: writes refused (SQLSTATE {}) but sluice's reverse session's",
                fence::REFUSED_SQLSTATE
            );
        } else {
            let removed = sql
                .run(async |c| split_fence(fence::unfence(c, &name).await))
                .await
                .with_context(|| format!("cannot take the fence of {table} down"))?
                .map_err(|e| CommandError::invalid(e.to_string()))?;
            eprintln!("{table}: {}", if removed { "fence taken down" } else { "was not fenced" });
        }
    }
    Ok(())
}

/// SQL failures to the session (which retries the transient ones), the others kept apart
/// for the command to report.
pub(crate) fn split<T>(
    result: Result<T, super::MigrationError>,
) -> sluice_postgres::Result<Result<T, super::MigrationError>> {
    match result {
        Err(super::MigrationError::Sql(e)) => Err(e.into()),
        other => Ok(other),
    }
}

pub(super) fn split_fence<T>(
    result: Result<T, fence::FenceError>,
) -> sluice_postgres::Result<Result<T, fence::FenceError>> {
    match result {
        Err(fence::FenceError::Sql { source, .. }) => Err(source.into()),
        other => Ok(other),
    }
}
