//! `sluice reconcile`: verify, ask the running daemon to backfill exactly the keys found wrong,
//! follow the request, and verify again.

use super::{verify_with, Report, SourceKey, Verifier, VerifyArgs};
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
            &config.pipeline.name,
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
