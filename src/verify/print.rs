//! The verify report as a person reads it (tables of counts, the first keys of each kind), or
//! as JSON.

use std::io::Write;

use super::{Report, SourceKey, VerifyArgs};
use crate::error::{CommandContext, CommandError};

/// Prints a report: a table per source table, the first `show` keys of each kind.
pub fn print(report: &Report, args: &VerifyArgs) -> Result<(), CommandError> {
    let mut report = report.clone();
    for table in &mut report.tables {
        table.missing_keys.truncate(args.show);
        table.different_keys.truncate(args.show);
        table.extra_keys.truncate(args.show);
        if !args.values {
            for difference in &mut table.different_keys {
                difference.values = None;
            }
        }
    }
    let written = if args.json {
        let json = serde_json::to_string_pretty(&report).context("cannot write the report as JSON")?;
        writeln!(std::io::stdout().lock(), "{json}")
    } else {
        write_table(&report, &mut std::io::stdout().lock())
    };
    // A reader that stopped early (`| head`) cuts the report; the exit code still says
    // whether the target matches.
    crate::error::reader_gone_ok(written).context("cannot write the report to standard output")
}

fn write_table(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<28} {:>10} {:>10} {:>9} {:>10} {:>7}",
        "table", "rows", "matched", "missing", "different", "extra"
    )?;
    for t in &report.tables {
        let extra = if t.extra_checked { t.extra.to_string() } else { "-".into() };
        writeln!(
            out,
            "{:<28} {:>10} {:>10} {:>9} {:>10} {:>7}",
            t.table, t.rows, t.matched, t.missing, t.different, extra
        )?;
        for key in &t.missing_keys {
            writeln!(out, "  missing    {}", show_key(key))?;
        }
        for d in &t.different_keys {
            writeln!(out, "  different  {}  attributes: {}", show_key(&d.key), d.attributes.join(", "))?;
            if let Some(reason) = &d.reason {
                writeln!(out, "             {reason}")?;
            }
            if let Some(values) = &d.values {
                for (name, (want, have)) in values {
                    writeln!(
                        out,
                        "             {name}: source {} / target {}",
                        want.as_deref().unwrap_or("(absent)"),
                        have.as_deref().unwrap_or("(absent)")
                    )?;
                }
            }
        }
        for e in &t.extra_keys {
            let item: Vec<String> = e.item_key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(
                out,
                "  extra      {}{}",
                item.join(" "),
                e.source_key.as_ref().map(|k| format!("  (source key {})", show_key(k))).unwrap_or_default()
            )?;
        }
    }
    for foreign in &report.foreign {
        writeln!(
            out,
            "foreign    {} items in {} that no mapping of this pipeline produces (another writer's keys; not differences)",
            foreign.items, foreign.target
        )?;
        for key in &foreign.keys {
            let key: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(out, "  foreign    {}", key.join(" "))?;
        }
    }
    writeln!(out, "{:.0} rows/s over {:.1} s", report.rows_per_second, report.seconds)?;
    if let Some(note) = &report.recheck_note {
        writeln!(out, "{note}")?;
    }
    Ok(())
}

fn show_key(key: &SourceKey) -> String {
    key.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}
