//! Checks and set-up before streaming: the server can do logical replication, the publication
//! exists, the slot exists (or is created) and is free, and each published table can be followed.

use tokio_postgres::Client;

use crate::config::{ConnectionConfig, OriginFilter, ReplicationConfig, SlotLostPolicy, Streaming};
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
    /// The existing slot is a failover slot (PG 17+; `None` before 17 or without a slot).
    pub failover: Option<bool>,
    /// The server: its version and whether it is a standby.
    pub server: ServerInfo,
}

/// What the source server is.
#[derive(Clone, Debug, Default)]
pub struct ServerInfo {
    /// `server_version_num`, e.g. 170002.
    pub version_num: u32,
    /// `server_version`, for messages.
    pub version: String,
    /// In recovery: a standby.
    pub in_recovery: bool,
}

impl ServerInfo {
    /// Reads the version and recovery state.
    pub async fn read(sql: &Client) -> Result<ServerInfo> {
        let row = sql
            .query_one(
                "SELECT current_setting('server_version_num')::int, current_setting('server_version'), pg_is_in_recovery()",
                &[],
            )
            .await?;
        let num: i32 = row.get(0);
        Ok(ServerInfo { version_num: num as u32, version: row.get(1), in_recovery: row.get(2) })
    }

    /// The major version: 15 for 150004.
    pub fn major(&self) -> u32 {
        self.version_num / 10000
    }
}

/// Settings the server at `addr` cannot honour, each named with the version it needs.
pub fn version_problems(server: &ServerInfo, addr: &str, repl: &ReplicationConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let runs = format!("the server at {addr} runs Postgres {}", server.version);
    let mut needs = |setting: String, major: u32| {
        if server.major() < major {
            problems.push(format!("{setting} needs Postgres {major} or later; {runs}"));
        }
    };
    if repl.failover {
        needs("source.replication.failover = true".into(), 17);
    }
    if repl.streaming == Streaming::Parallel {
        needs("source.replication.streaming = \"parallel\"".into(), 16);
    }
    match repl.proto_version {
        4 => needs("source.replication.proto_version = 4".into(), 16),
        3 => needs("source.replication.proto_version = 3".into(), 15),
        _ => {}
    }
    if repl.origin == OriginFilter::None {
        needs("source.replication.origin = \"none\"".into(), 16);
    }
    if server.in_recovery {
        needs(
            "source.connection points at a standby (in recovery); logical decoding on a standby".into(),
            16,
        );
        if repl.failover {
            problems.push(format!(
                "source.replication.failover = true: a failover slot is created on the primary (the standby \
                 synchronises it); source.connection points at a standby ({addr})"
            ));
        }
    }
    problems
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
    let server = ServerInfo::read(sql).await?;
    let problems = version_problems(&server, &conn.addr(), repl);
    if !problems.is_empty() {
        return Err(Error::Setup(problems.join("; ")));
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
    let failover = if server.major() >= 17 { "failover" } else { "NULL::bool" };
    // Why the slot was invalidated: named from 17 on; 16 says only whether a standby's
    // recovery conflicted with it.
    let reason = match server.major() {
        17.. => "invalidation_reason",
        16 => "CASE WHEN conflicting THEN 'conflict' END",
        _ => "NULL::text",
    };
    let slot = sql
        .query_opt(
            &format!(
                "SELECT plugin, database, active_pid, confirmed_flush_lsn::text, wal_status, {failover}, {reason} \
                 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1"
            ),
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
        return Ok(SlotState {
            exists: false,
            confirmed_flush_lsn: None,
            dropped_lost: false,
            failover: None,
            server,
        });
    };
    let plugin: Option<String> = slot.get(0);
    let database: Option<String> = slot.get(1);
    let active_pid: Option<i32> = slot.get(2);
    let confirmed: Option<String> = slot.get(3);
    let wal_status: Option<String> = slot.get(4);
    let slot_failover: Option<bool> = slot.get(5);
    let invalidation: Option<String> = slot.get(6);
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
    if wal_status.as_deref() == Some("lost") || invalidation.is_some() {
        if repl.on_slot_lost == SlotLostPolicy::Recreate {
            if mutate {
                sql.execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[&repl.slot]).await?;
            }
            return Ok(SlotState {
                exists: false,
                confirmed_flush_lsn: None,
                dropped_lost: true,
                failover: None,
                server,
            });
        }
        let after = confirmed.as_deref().unwrap_or("its confirmed position");
        let cause = match invalidation.as_deref() {
            Some("idle_timeout") => {
                let timeout: String = sql.query_one("SHOW idle_replication_slot_timeout", &[]).await?.get(0);
                format!(
                    "it was idle (nothing streamed from it) for longer than idle_replication_slot_timeout \
                     ({timeout}), and the server gave up the WAL and catalog rows it kept"
                )
            }
            Some("rows_removed") | Some("conflict") => {
                "catalog rows it still needed were removed (on a standby: \
                 the primary vacuumed them; set hot_standby_feedback = on and a primary_slot_name)"
                    .to_owned()
            }
            Some("wal_level_insufficient") => "the primary's wal_level was lowered below logical".to_owned(),
            _ => "the server removed WAL it still needed (max_slot_wal_keep_size)".to_owned(),
        };
        return Err(Error::Setup(format!(
            "replication slot {:?} was invalidated: {cause}, so changes after {after} were lost. Drop the slot, \
             let sluice create it and backfill the tables, or set source.replication.on_slot_lost = \"recreate\"",
            repl.slot,
        )));
    }
    Ok(SlotState {
        exists: true,
        confirmed_flush_lsn: confirmed.and_then(|c| c.parse().ok()),
        dropped_lost: false,
        failover: slot_failover,
        server,
    })
}

/// Whether a failover slot (PG 17+) is kept in step with a standby, as the server it is on
/// sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FailoverState {
    /// The slot is a failover slot.
    pub failover: bool,
    /// On a standby: the slot was synchronised from the primary (`pg_replication_slots.synced`).
    pub synced: bool,
    /// On the primary: `synchronized_standby_slots`, each listed physical slot and whether a
    /// standby streams from it now (`None`: no such slot).
    pub standby_slots: Vec<(String, Option<bool>)>,
    /// What leaves a promotion exposed, when anything does.
    pub warning: Option<String>,
}

/// The failover state of `slot` on the server `sql` reaches; `None` before 17 or without the slot.
pub async fn failover_state(
    sql: &Client,
    slot: &str,
) -> std::result::Result<Option<FailoverState>, tokio_postgres::Error> {
    let row = sql
        .query_one("SELECT current_setting('server_version_num')::int >= 170000, pg_is_in_recovery()", &[])
        .await?;
    let (seventeen, in_recovery): (bool, bool) = (row.get(0), row.get(1));
    if !seventeen {
        return Ok(None);
    }
    let Some(row) = sql
        .query_opt(
            "SELECT failover, synced FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
    else {
        return Ok(None);
    };
    let mut state = FailoverState { failover: row.get(0), synced: row.get(1), ..FailoverState::default() };
    if !state.failover || in_recovery {
        return Ok(Some(state));
    }
    let listed: String =
        sql.query_one("SELECT current_setting('synchronized_standby_slots')", &[]).await?.get(0);
    for name in listed.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let active: Option<bool> = sql
            .query_opt(
                "SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = $1 AND slot_type = 'physical'",
                &[&name],
            )
            .await?
            .map(|r| r.get(0));
        state.standby_slots.push((name.to_owned(), active));
    }
    state.warning = if state.standby_slots.is_empty() {
        Some(format!(
            "replication slot {slot:?} is a failover slot but synchronized_standby_slots is empty: changes may reach \
             sluice before a standby has them, and a promoted standby's copy of the slot may lack them; list the \
             standbys' physical slots there"
        ))
    } else {
        let idle: Vec<&str> = state
            .standby_slots
            .iter()
            .filter(|(_, active)| *active != Some(true))
            .map(|(name, _)| name.as_str())
            .collect();
        (!idle.is_empty()).then(|| {
            format!(
                "replication slot {slot:?} is a failover slot but no standby streams from {} (synchronized_standby_slots): \
                 the primary holds changes back from sluice until one does",
                idle.join(", ")
            )
        })
    };
    Ok(Some(state))
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

    fn server(version_num: u32, in_recovery: bool) -> ServerInfo {
        ServerInfo { version_num, version: format!("{}.3", version_num / 10000), in_recovery }
    }

    #[test]
    fn each_setting_names_the_version_it_needs_and_the_server_s() {
        let repl = ReplicationConfig {
            failover: true,
            proto_version: 4,
            streaming: Streaming::Parallel,
            origin: OriginFilter::None,
            ..ReplicationConfig::new("s", "p")
        };
        let on_15 = version_problems(&server(150013, false), "db:5432", &repl);
        assert_eq!(on_15.len(), 4, "{on_15:?}");
        assert!(
            on_15[0].starts_with("source.replication.failover = true needs Postgres 17 or later"),
            "{on_15:?}"
        );
        assert!(on_15.iter().all(|p| p.ends_with("the server at db:5432 runs Postgres 15.3")), "{on_15:?}");
        let on_16 = version_problems(&server(160009, false), "db:5432", &repl);
        assert_eq!(on_16.len(), 1, "{on_16:?}");
        assert!(version_problems(&server(170005, false), "db:5432", &repl).is_empty());

        let plain = ReplicationConfig::new("s", "p");
        let standby_15 = version_problems(&server(150013, true), "replica:5432", &plain);
        assert_eq!(standby_15.len(), 1);
        assert!(
            standby_15[0].contains("standby") && standby_15[0].contains("needs Postgres 16"),
            "{standby_15:?}"
        );
        assert!(version_problems(&server(160009, true), "replica:5432", &plain).is_empty());
        let failover_on_standby = version_problems(&server(170005, true), "replica:5432", &repl);
        assert_eq!(failover_on_standby.len(), 1);
        assert!(failover_on_standby[0].contains("created on the primary"), "{failover_on_standby:?}");
    }

    #[test]
    fn publication_names_are_quoted_for_the_option_string() {
        assert_eq!(publication_option("pub"), "'\"pub\"'");
        assert_eq!(publication_option("it's"), "'\"it''s\"'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
