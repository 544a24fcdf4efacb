//! Checks and set-up before streaming: the server can do logical replication, the publication
//! exists, the slot exists (or is created) and is free, and each published table can be followed.

use tokio_postgres::Client;

use crate::config::{ConnectionConfig, ReplicationConfig, SlotLostPolicy};
use crate::error::{Error, Result};
use sluice_core::lsn::Lsn;

/// What is known of the slot before streaming.
#[derive(Clone, Debug)]
pub struct SlotState {
    /// The slot exists.
    pub exists: bool,
    /// Its confirmed position, when it has one.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// The slot was invalidated and dropped (`on_slot_lost = "recreate"`): create it anew.
    pub dropped_lost: bool,
}

/// A published table whose updates or deletes cannot be followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityWarning {
    /// The published table, `schema.table`.
    pub table: String,
    /// Why its updates and deletes cannot be matched to target rows.
    pub reason: &'static str,
}

/// Checks the server and the publication; returns what is known of the slot.
pub async fn check(sql: &Client, conn: &ConnectionConfig, repl: &ReplicationConfig) -> Result<SlotState> {
    check_with(sql, conn, repl, true).await
}

/// `check` without changing anything: a lost slot that `on_slot_lost = "recreate"` would drop
/// is reported as `dropped_lost` but left in place (`sluice validate`, `run`'s start checks).
pub async fn check_only(
    sql: &Client,
    conn: &ConnectionConfig,
    repl: &ReplicationConfig,
) -> Result<SlotState> {
    check_with(sql, conn, repl, false).await
}

async fn check_with(
    sql: &Client,
    conn: &ConnectionConfig,
    repl: &ReplicationConfig,
    mutate: bool,
) -> Result<SlotState> {
    let wal_level: String = sql.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(Error::Setup(format!(
            "wal_level is {wal_level:?} on {}; logical replication needs wal_level = logical \
             (set it in postgresql.conf and restart the server)",
            conn.addr()
        )));
    }
    let encoding: String = sql.query_one("SHOW server_encoding", &[]).await?.get(0);
    if encoding != "UTF8" && encoding != "SQL_ASCII" {
        return Err(Error::Setup(format!(
            "database {:?} uses encoding {encoding}; sluice reads pgoutput text as UTF-8 and needs a UTF8 database",
            conn.dbname
        )));
    }
    let publication = sql
        .query_opt(
            "SELECT pubupdate, pubdelete FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&repl.publication],
        )
        .await?;
    if publication.is_none() {
        return Err(Error::Setup(format!(
            "publication {:?} does not exist in database {:?} (source.replication.publication); \
             create it with CREATE PUBLICATION {} FOR TABLE …",
            repl.publication, conn.dbname, repl.publication
        )));
    }
    let slot = sql
        .query_opt(
            "SELECT plugin, database, active_pid, confirmed_flush_lsn::text, wal_status \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&repl.slot],
        )
        .await?;
    let Some(slot) = slot else {
        if !repl.create_slot && !repl.temporary_slot {
            return Err(Error::Setup(format!(
                "replication slot {:?} does not exist and create_slot = false (source.replication.create_slot)",
                repl.slot
            )));
        }
        return Ok(SlotState { exists: false, confirmed_flush_lsn: None, dropped_lost: false });
    };
    let plugin: Option<String> = slot.get(0);
    let database: Option<String> = slot.get(1);
    let active_pid: Option<i32> = slot.get(2);
    let confirmed: Option<String> = slot.get(3);
    let wal_status: Option<String> = slot.get(4);
    if plugin.as_deref() != Some("pgoutput") {
        return Err(Error::Setup(format!(
            "replication slot {:?} uses plugin {:?}, not pgoutput; choose another slot name",
            repl.slot,
            plugin.unwrap_or_else(|| "none (physical slot)".into())
        )));
    }
    if database.as_deref() != Some(conn.dbname.as_str()) {
        return Err(Error::Setup(format!(
            "replication slot {:?} belongs to database {:?}, not {:?}",
            repl.slot,
            database.unwrap_or_default(),
            conn.dbname
        )));
    }
    if let Some(pid) = active_pid {
        return Err(slot_in_use(&repl.slot, Some(pid)));
    }
    if wal_status.as_deref() == Some("lost") {
        if repl.on_slot_lost == SlotLostPolicy::Recreate {
            if mutate {
                sql.execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[&repl.slot]).await?;
            }
            return Ok(SlotState { exists: false, confirmed_flush_lsn: None, dropped_lost: true });
        }
        return Err(Error::Setup(format!(
            "replication slot {:?} was invalidated: the server removed WAL it still needed \
             (max_slot_wal_keep_size), so changes after {} were lost. Drop the slot, let sluice \
             create it and backfill the tables, or set source.replication.on_slot_lost = \"recreate\"",
            repl.slot,
            confirmed.as_deref().unwrap_or("its confirmed position")
        )));
    }
    Ok(SlotState {
        exists: true,
        confirmed_flush_lsn: confirmed.and_then(|c| c.parse().ok()),
        dropped_lost: false,
    })
}

pub(crate) fn slot_in_use(slot: &str, pid: Option<i32>) -> Error {
    Error::SlotInUse { slot: slot.to_owned(), pid }
}

/// Published tables whose updates or deletes lack an identity.
pub async fn identity_warnings(sql: &Client, publication: &str) -> Result<Vec<IdentityWarning>> {
    let rows = sql
        .query(
            "SELECT format('%I.%I', c.relnamespace::regnamespace::text, c.relname), c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    p.pubupdate OR p.pubdelete \
             FROM pg_catalog.pg_publication p \
             CROSS JOIN LATERAL pg_catalog.pg_get_publication_tables(p.pubname) t \
             JOIN pg_catalog.pg_class c ON c.oid = t.relid \
             WHERE p.pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await?;
    let mut warnings = Vec::new();
    for row in rows {
        let table: String = row.get(0);
        let identity: String = row.get(1);
        let has_primary_key: bool = row.get(2);
        let publishes_changes: bool = row.get(3);
        if !publishes_changes {
            continue;
        }
        let reason = match identity.as_str() {
            "n" => "REPLICA IDENTITY NOTHING: Postgres rejects its UPDATE and DELETE statements while it is published, \
                    and no old key could be streamed; set REPLICA IDENTITY DEFAULT (with a primary key), USING INDEX or FULL",
            "d" if !has_primary_key => "no primary key and REPLICA IDENTITY DEFAULT: Postgres rejects its UPDATE and \
                    DELETE statements while it is published; add a primary key or set REPLICA IDENTITY USING INDEX or FULL",
            _ => continue,
        };
        warnings.push(IdentityWarning { table, reason });
    }
    Ok(warnings)
}

/// `'"name"'`: a publication name as a START_REPLICATION option value.
pub(crate) fn publication_option(name: &str) -> String {
    let ident = format!("\"{}\"", name.replace('"', "\"\""));
    format!("'{}'", ident.replace('\'', "''"))
}

/// Creates `table` (quoted, `schema.table`) with `columns` (the parenthesised column list) when
/// it is missing. Safe when several processes start at once: `CREATE TABLE IF NOT EXISTS` alone
/// is not (two concurrent creations collide on `pg_type` with a unique violation), so the
/// creation holds a transaction-scoped advisory lock named after the table.
pub async fn create_table_if_missing(
    sql: &Client,
    table: &str,
    columns: &str,
) -> std::result::Result<(), tokio_postgres::Error> {
    // Looked up first: CREATE … IF NOT EXISTS would log a notice at every start.
    let exists: bool = sql.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?.get(0);
    if exists {
        return Ok(());
    }
    let created = sql
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext({})); CREATE TABLE IF NOT EXISTS {table} {columns}; COMMIT",
            crate::catalog::quote_literal(&format!("sluice create {table}"))
        ))
        .await;
    if created.is_err() {
        // The failed statement leaves the connection in the aborted transaction.
        let _ = sql.batch_execute("ROLLBACK").await;
    }
    created
}

/// `"name"` as an identifier in a replication command.
/// An identifier quoted for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_names_are_quoted_for_the_option_string() {
        assert_eq!(publication_option("pub"), "'\"pub\"'");
        assert_eq!(publication_option("it's"), "'\"it''s\"'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
