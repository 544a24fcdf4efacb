//! `sluice dead-letter list|replay`: the entries of the dead-letter file (`target.dead_letter`),
//! and their re-drive once the mapping is fixed.
//!
//! A replay does not write the old change again: it asks the running daemon to backfill the
//! entries' keys (a keyed backfill request, as `reconcile` makes), so each row is read from the
//! source as it is now and written through the translator and the position guard at a new
//! position. A row changed since is written as it is now, never as it was, and a row deleted
//! since is deleted in the target. Replayed entries are listed, by position and table, in
//! `<dead_letter>.replayed` beside the file (the daemon keeps appending to the file itself).

mod keys;

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::{CommandContext, CommandError};

/// One line of the dead-letter file.
pub struct Entry {
    /// Its line number, from 1.
    pub line: usize,
    /// `commit_lsn/ordinal table`: what names the entry in the replayed list.
    pub id: String,
    /// The entry as written.
    pub value: serde_json::Value,
}

fn path_of(config: &Config) -> Result<&Path, CommandError> {
    config.target.dead_letter().ok_or_else(|| {
        CommandError::invalid(format!(
            "target {} has no dead-letter file (target.dead_letter): dead-lettered changes were only logged and counted",
            config.target.kind()
        ))
    })
}

fn replayed_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".replayed");
    path.with_file_name(name)
}

/// The entries of the file; a torn last line (a crash mid-append) is skipped.
pub fn read_entries(path: &Path) -> Result<Vec<Entry>, CommandError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let id = format!(
            "{}/{} {}",
            value["commit_lsn"].as_str().unwrap_or("?"),
            value["ordinal"].as_u64().unwrap_or(0),
            value["table"].as_str().unwrap_or("?")
        );
        entries.push(Entry { line: i + 1, id, value });
    }
    Ok(entries)
}

fn replayed(path: &Path) -> Result<HashSet<String>, CommandError> {
    match std::fs::read_to_string(replayed_path(path)) {
        Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(error) => Err(error).with_context(|| format!("cannot read {}", replayed_path(path).display())),
    }
}

/// Prints the entries: position, table, whether replayed, and the reason (never values;
/// `--json` prints the entries as written, values included).
pub fn list(config: &Config, json: bool) -> Result<(), CommandError> {
    let path = path_of(config)?;
    let entries = read_entries(path)?;
    let done = replayed(path)?;
    let mut out = std::io::stdout().lock();
    let written = (|| -> std::io::Result<()> {
        if json {
            for entry in &entries {
                let mut value = entry.value.clone();
                value["replayed"] = serde_json::Value::Bool(done.contains(&entry.id));
                writeln!(out, "{value}")?;
            }
            return Ok(());
        }
        let waiting = entries.iter().filter(|e| !done.contains(&e.id)).count();
        writeln!(out, "{}: {} entries, {waiting} not replayed", path.display(), entries.len())?;
        for entry in &entries {
            writeln!(
                out,
                "{:>5}  {:<24} {:<9} {}",
                entry.line,
                entry.id,
                if done.contains(&entry.id) { "replayed" } else { "waiting" },
                entry.value["reason"].as_str().unwrap_or("")
            )?;
        }
        Ok(())
    })();
    crate::error::reader_gone_ok(written).context("cannot write the list to standard output")
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct Replay {
    /// Entries re-driven (their keys backfilled).
    pub replayed: usize,
    /// Entries that lead back to no source row, with the reason.
    pub not_replayable: Vec<(String, String)>,
}

/// Re-drives every entry not yet replayed through keyed backfill requests served by the
/// running daemon, and waits for them (unless `wait` is false: then nothing is marked).
pub async fn replay(config: &Config, wait: bool) -> Result<Replay, CommandError> {
    let path = path_of(config)?;
    let Some(scope) = crate::backfill::Scope::of(config) else {
        return Err(CommandError::invalid(
            "replay re-drives keys through the backfill, which needs the logical replication source ([source.replication])",
        ));
    };
    let done = replayed(path)?;
    let entries: Vec<Entry> = read_entries(path)?.into_iter().filter(|e| !done.contains(&e.id)).collect();
    let mut summary = Replay::default();
    if entries.is_empty() {
        eprintln!("nothing to replay in {}", path.display());
        return Ok(summary);
    }
    let mut sql = crate::backfill::progress_session(config, "sluice dead-letter replay").await?;
    let mut finder = keys::Finder::new(config);
    // Source table → its keys (text, in key order), and the entries they replay.
    let mut by_table: BTreeMap<String, (Vec<Vec<String>>, Vec<String>)> = BTreeMap::new();
    for entry in &entries {
        match finder.key_of(&mut sql, &entry.value).await? {
            Ok((table, key)) => {
                let slot = by_table.entry(table).or_default();
                if !slot.0.contains(&key) {
                    slot.0.push(key);
                }
                slot.1.push(entry.id.clone());
            }
            Err(reason) => summary.not_replayable.push((entry.id.clone(), reason)),
        }
    }
    let mut ids = Vec::new();
    let mut replayed_ids = Vec::new();
    for (table, (keys, entry_ids)) in &by_table {
        let id = crate::backfill::add_request(&mut sql, &config.backfill, &scope, table, Some(keys)).await?;
        eprintln!("requested replay {id}: {} keys of {table} ({} entries)", keys.len(), entry_ids.len());
        ids.push(id);
        replayed_ids.extend(entry_ids.iter().cloned());
    }
    for (id, reason) in &summary.not_replayable {
        eprintln!("cannot replay {id}: {reason}");
    }
    if !wait || ids.is_empty() {
        return Ok(summary);
    }
    crate::backfill::follow(&mut sql, &config.backfill, &config.pipeline.name, &ids).await?;
    let marks = replayed_path(path);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&marks)
        .with_context(|| format!("cannot open {}", marks.display()))?;
    let text: String = replayed_ids.iter().map(|id| format!("{id}\n")).collect();
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_data())
        .with_context(|| format!("cannot write {}", marks.display()))?;
    summary.replayed = replayed_ids.len();
    eprintln!(
        "replayed {} entries ({} tables); {} cannot be replayed",
        summary.replayed,
        by_table.len(),
        summary.not_replayable.len()
    );
    Ok(summary)
}
