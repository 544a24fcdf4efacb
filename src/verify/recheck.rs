//! The re-check after a verify pass: once the stream has passed the end of the pass, every
//! key found wrong is read again on both sides; only what is still wrong stays in the report.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{tally, Extra, Report, Side, SourceKey, Verifier};
use crate::compare::{source_key, Finding};
use crate::error::{CommandContext, CommandError};
use sluice_core::Lsn;

/// The source's current WAL position, or none when it cannot be read (then no re-check).
pub(super) async fn current_lsn(verifier: &Verifier) -> Option<Lsn> {
    let row = verifier.sql.lock().await.query_opt("SELECT pg_current_wal_lsn()::text", &[]).await.ok()??;
    row.get::<_, String>(0).parse().ok()
}

/// Waits until the slot has confirmed `end`, then checks every wrong key again with fresh
/// reads; keeps only what is still wrong.
pub(super) async fn recheck(
    verifier: &Verifier,
    report: &mut Report,
    end: Option<Lsn>,
    timeout: Duration,
) -> Result<(), CommandError> {
    let (Some(end), Some(replication)) = (end, verifier.config.source.replication()) else {
        report.recheck_note = Some("not re-checked: no logical replication source".into());
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    loop {
        let confirmed: Option<String> = verifier
            .sql
            .lock()
            .await
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&replication.slot],
            )
            .await
            .with_context(|| format!("cannot read the position of slot {}", replication.slot))?
            .and_then(|r| r.get(0));
        if confirmed.and_then(|c| c.parse::<Lsn>().ok()).is_some_and(|c| c >= end) {
            break;
        }
        if Instant::now() >= deadline {
            report.recheck_note = Some(format!(
                "not re-checked: slot {} did not confirm {end} within {timeout:?} (is the pipeline running?)",
                replication.slot
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for table_report in &mut report.tables {
        let (source, target) = (table_report.table.clone(), table_report.target.clone());
        let table = &verifier.tables[&source];
        let mut keys: Vec<SourceKey> = table_report.missing_keys.drain(..).collect();
        keys.extend(table_report.different_keys.drain(..).map(|d| d.key));
        let extras = std::mem::take(&mut table_report.extra_keys);
        table_report.matched += table_report.missing + table_report.different;
        table_report.missing = 0;
        table_report.different = 0;
        table_report.extra = 0;
        let rows = verifier.rows_by_key(table, &keys).await?;
        let present: HashSet<SourceKey> = rows.iter().map(|r| source_key(table, r)).collect();
        for (key, _, finding) in verifier.check_rows(&source, &target, rows).await? {
            if !matches!(finding, Finding::Matched | Finding::NotExpected) {
                table_report.matched = table_report.matched.saturating_sub(1);
            }
            tally(table_report, key, finding);
        }
        // A wrong key whose row is gone now: its target row or item must be gone too.
        for key in keys.into_iter().filter(|k| !present.contains(k)) {
            let left = match &verifier.side {
                Side::Dynamo(side) => side.left_behind(&target, table, &key).await?,
                Side::Postgres(side) => side.left_behind(&source, &target, table, &key).await?,
            };
            if let Some(item_key) = left {
                table_report.matched = table_report.matched.saturating_sub(1);
                table_report.extra += 1;
                table_report.extra_keys.push(Extra { item_key, source_key: Some(key) });
            }
        }
        // Extras: still there, and still produced by no row?
        for extra in extras {
            let rows = match &extra.source_key {
                Some(key) => verifier.rows_by_key(table, std::slice::from_ref(key)).await?,
                None => Vec::new(),
            };
            let still = match &verifier.side {
                Side::Dynamo(side) => side.still_extra(table, &source, &extra, rows).await?,
                Side::Postgres(side) => side.still_extra(table, &source, &target, &extra, rows).await?,
            };
            if still {
                table_report.extra += 1;
                table_report.extra_keys.push(extra);
            }
        }
    }
    report.rechecked = true;
    Ok(())
}
