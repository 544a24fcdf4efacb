//! The verify report as a person reads it (tables of counts, the first keys of each kind), or
//! as JSON.

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
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot write the report as JSON")?);
        return Ok(());
    }
    println!(
        "{:<28} {:>10} {:>10} {:>9} {:>10} {:>7}",
        "table", "rows", "matched", "missing", "different", "extra"
    );
    for t in &report.tables {
        let extra = if t.extra_checked { t.extra.to_string() } else { "-".into() };
        println!(
            "{:<28} {:>10} {:>10} {:>9} {:>10} {:>7}",
            t.table, t.rows, t.matched, t.missing, t.different, extra
        );
        for key in &t.missing_keys {
            println!("  missing    {}", show_key(key));
        }
        for d in &t.different_keys {
            println!("  different  {}  attributes: {}", show_key(&d.key), d.attributes.join(", "));
            if let Some(values) = &d.values {
                for (name, (want, have)) in values {
                    println!(
                        "             {name}: source {} / target {}",
                        want.as_deref().unwrap_or("(absent)"),
                        have.as_deref().unwrap_or("(absent)")
                    );
                }
            }
        }
        for e in &t.extra_keys {
            let item: Vec<String> = e.item_key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "  extra      {}{}",
                item.join(" "),
                e.source_key.as_ref().map(|k| format!("  (source key {})", show_key(k))).unwrap_or_default()
            );
        }
    }
    println!("{:.0} rows/s over {:.1} s", report.rows_per_second, report.seconds);
    if let Some(note) = &report.recheck_note {
        println!("{note}");
    }
    Ok(())
}

fn show_key(key: &SourceKey) -> String {
    key.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}
