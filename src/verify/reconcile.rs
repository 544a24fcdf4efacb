//! `sluice reconcile`: verify, ask the running daemon to backfill exactly the keys found wrong,
//! follow the request, and verify again.

use super::{verify_with, Report, Side, SourceKey, Verifier, VerifyArgs, UNVERSIONED};
use crate::config::Config;
use crate::error::CommandError;

/// `sluice reconcile`: verify, re-drive the wrong keys through the daemon, verify them again.
pub async fn reconcile(config: &Config, args: &VerifyArgs) -> Result<Report, CommandError> {
    let verifier = Verifier::open(config).await?;
    let report = verify_with(&verifier, args).await?;
    if report.differences() == 0 {
        eprintln!("nothing to reconcile: the target equals the source");
        return Ok(report);
    }
    let Some(scope) = crate::backfill::Scope::of(config) else {
        return Err(CommandError::invalid(
            "reconcile re-drives keys through the backfill, which needs the logical replication source ([source.replication])",
        ));
    };
    // Items without their version attribute: the guard keeps the backfill's writes from them
    // too, so --force deletes them first (only while they still have none).
    let unversioned: usize = report
        .tables
        .iter()
        .flat_map(|t| &t.different_keys)
        .filter(|d| d.reason.as_deref() == Some(UNVERSIONED))
        .count();
    if unversioned > 0 && !args.force {
        eprintln!("{unversioned} items have no version attribute: reconcile cannot rewrite them through the guard; use --force");
    }
    if unversioned > 0 && args.force {
        if let Side::Dynamo(side) = &verifier.side {
            let mut deleted = 0;
            for table_report in &report.tables {
                let keys: Vec<SourceKey> = table_report
                    .different_keys
                    .iter()
                    .filter(|d| d.reason.as_deref() == Some(UNVERSIONED))
                    .map(|d| d.key.clone())
                    .collect();
                if !keys.is_empty() {
                    let table = &verifier.tables[&table_report.table];
                    deleted += side.delete_unversioned(&table_report.target, table, &keys).await?;
                }
            }
            eprintln!("--force: deleted {deleted} unversioned items, to be written again from the source");
        }
    }
    let mut sql = verifier.sql.lock().await;
    crate::backfill::open_progress_table(&mut sql, &config.backfill).await?;
    let mut ids = Vec::new();
    let mut unreachable = 0;
    for table_report in &report.tables {
        let table = &verifier.tables[&table_report.table];
        let names: Vec<&String> =
            table.primary_key.iter().map(|&i| &table.relation.columns[i].name).collect();
        let mut keys: Vec<Vec<String>> = Vec::new();
        let as_list = |key: &SourceKey| {
            names.iter().map(|n| key.get(*n).cloned().unwrap_or_default()).collect::<Vec<_>>()
        };
        keys.extend(table_report.missing_keys.iter().map(as_list));
        keys.extend(table_report.different_keys.iter().map(|d| as_list(&d.key)));
        for extra in &table_report.extra_keys {
            match &extra.source_key {
                Some(key) => keys.push(as_list(key)),
                None => unreachable += 1,
            }
        }
        if keys.is_empty() {
            continue;
        }
        let id = crate::backfill::add_request(
            &mut sql,
            &config.backfill,
            &scope,
            &table_report.table,
            Some(&keys),
        )
        .await?;
        eprintln!("requested reconcile {id}: {} keys of {}", keys.len(), table_report.table);
        ids.push(id);
    }
    if unreachable > 0 {
        eprintln!("{unreachable} extra items lead back to no source key (their key templates do not parse); delete them by hand");
    }
    crate::backfill::follow(&mut sql, &config.backfill, &config.pipeline.name, &ids).await?;
    drop(sql);
    // Verify again: the keys were re-driven through the stream, so the whole check applies.
    verify_with(&verifier, args).await
}
