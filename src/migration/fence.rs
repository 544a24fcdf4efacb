//! The fence: a statement-level trigger on a table that refuses every write (INSERT, UPDATE,
//! DELETE, TRUNCATE) with an error naming the migration — except the writes of sluice's own
//! session for the direction that now feeds the table, recognised by its replication origin.
//!
//! Creating the trigger takes a lock that waits for the table's open writers, so once it is
//! in place every earlier write has committed: the WAL position read right after it (the
//! fence position) is past the last write the fenced store will ever take from the
//! application. The stream draining the table is done when it has applied up to there.

use sluice_core::TableName;

use super::{Direction, MigrationConfig};

/// The trigger's name on every fenced table.
pub const TRIGGER: &str = "sluice_fence";

/// The SQLSTATE of a write the fence refuses (`SL001`): an application can tell it apart.
pub const REFUSED_SQLSTATE: &str = "SL001";

/// The replication origin of a pipeline's sessions that write in `direction`, named after
/// its source (the slot, or the polled table: `SourceConfig::lock_name`), which is unique in
/// the source cluster; origins are cluster-wide, so two pipelines writing into one cluster
/// need two. The streams drop transactions that carry the other direction's origin (no
/// loops), and the fence lets the writes of the direction that feeds a fenced table through.
pub fn origin_name(source: &str, direction: Direction) -> String {
    format!("sluice_{source}_{}", direction.as_str())
}

/// The fence could not be put up or taken down.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The role may not create triggers on the table.
    #[error(
        "role {role} may not create triggers on {table}: GRANT TRIGGER ON {table} TO {role} (or make the role its owner)"
    )]
    NoTriggerRight {
        /// The table.
        table: String,
        /// sluice's role.
        role: String,
    },
    /// The role may not check the session's replication origin, which the fence needs to
    /// let sluice's own writes through.
    #[error(
        "role {role} may not call pg_replication_origin_session_is_setup(), which the fence needs to let sluice's own \
         writes through: GRANT EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_session_is_setup() TO {role} \
         (and pg_replication_origin_session_setup(text), pg_replication_origin_create(text))"
    )]
    NoOriginRight {
        /// sluice's role.
        role: String,
    },
    /// The table does not exist.
    #[error("table {0} does not exist")]
    NoTable(String),
    /// The database failed (a lock timeout included: the table's writers held it).
    #[error("cannot fence {table}: {source}")]
    Sql {
        /// The table.
        table: String,
        /// The cause.
        source: tokio_postgres::Error,
    },
}

fn sql_error(table: &TableName) -> impl Fn(tokio_postgres::Error) -> FenceError + '_ {
    move |source| FenceError::Sql { table: table.to_string(), source }
}

/// The trigger function, in the state table's schema.
fn function(config: &MigrationConfig) -> String {
    TableName::new(config.state_table.schema(), "sluice_fence").quoted()
}

/// Fences `table` for the pipeline of `scope`, letting through only writes of sessions with the origin of
/// `allowed` (the direction that feeds the table once it is fenced). Returns the fence
/// position, read after the trigger is in place; a table already fenced is left as it is.
pub async fn fence(
    sql: &tokio_postgres::Client,
    config: &MigrationConfig,
    scope: &crate::backfill::Scope,
    table: &TableName,
    allowed: Direction,
) -> Result<sluice_core::Lsn, FenceError> {
    let pipeline = scope.pipeline.as_str();
    let err = sql_error(table);
    let quoted = table.quoted();
    let row = sql
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL, current_user::text, \
                    CASE WHEN to_regclass($1) IS NULL THEN false ELSE has_table_privilege(to_regclass($1), 'TRIGGER') END, \
                    has_function_privilege('pg_catalog.pg_replication_origin_session_is_setup()', 'EXECUTE')",
            &[&quoted],
        )
        .await
        .map_err(&err)?;
    let (exists, role, may_trigger, may_origin): (bool, String, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !exists {
        return Err(FenceError::NoTable(table.to_string()));
    }
    if !may_trigger {
        return Err(FenceError::NoTriggerRight { table: table.to_string(), role });
    }
    if !may_origin {
        return Err(FenceError::NoOriginRight { role });
    }
    if !is_fenced(sql, table).await.map_err(&err)? {
        let literal = |s: &str| sluice_postgres::catalog::quote_literal(s);
        // The function runs as its owner (sluice's role), so that any writer's session can
        // ask whether it has sluice's origin.
        let statements = format!(
            "BEGIN;
             SET LOCAL lock_timeout = '10s';
             CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
               SET search_path = pg_catalog AS $fence$
             BEGIN
               IF pg_replication_origin_session_is_setup()
                  AND current_setting('sluice.origin', true) = TG_ARGV[1] THEN
                 RETURN NULL;
               END IF;
               RAISE EXCEPTION 'table %.% is fenced by sluice pipeline %: its writers moved to the other store',
                   TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]
                 USING ERRCODE = '{REFUSED_SQLSTATE}',
                       HINT = 'write to the store the migration moved this table to; sluice rollback or sluice unfence lifts the fence';
             END
             $fence$;
             CREATE TRIGGER {TRIGGER} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {quoted}
               FOR EACH STATEMENT EXECUTE FUNCTION {function}({pipeline}, {origin});
             COMMIT",
            function = function(config),
            pipeline = literal(pipeline),
            origin = literal(&origin_name(&scope.slot, allowed)),
        );
        if let Err(error) = sql.batch_execute(&statements).await {
            let _ = sql.batch_execute("ROLLBACK").await;
            // Another `fence` of the same table won the race: fenced all the same.
            if !is_fenced(sql, table).await.map_err(&err)? {
                return Err(err(error));
            }
        }
        tracing::info!(pipeline, table = %table, "fenced: writes refused but from sluice's {} session", allowed.as_str());
    }
    let lsn: i64 =
        sql.query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8", &[]).await.map_err(&err)?.get(0);
    Ok(sluice_core::Lsn(lsn as u64))
}

/// Takes the fence down; `false` when there was none.
pub async fn unfence(sql: &tokio_postgres::Client, table: &TableName) -> Result<bool, FenceError> {
    let err = sql_error(table);
    if !is_fenced(sql, table).await.map_err(&err)? {
        return Ok(false);
    }
    sql.batch_execute(&format!(
        "BEGIN; SET LOCAL lock_timeout = '10s'; DROP TRIGGER IF EXISTS {TRIGGER} ON {}; COMMIT",
        table.quoted()
    ))
    .await
    .map_err(&err)?;
    tracing::info!(table = %table, "fence taken down");
    Ok(true)
}

/// The table has the fence.
pub async fn is_fenced(
    sql: &tokio_postgres::Client,
    table: &TableName,
) -> Result<bool, tokio_postgres::Error> {
    Ok(sql
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2)",
            &[&table.quoted(), &TRIGGER],
        )
        .await?
        .get(0))
}

/// Sets up `session` as sluice's writer in `direction` for the pipeline reading `source` (its
/// slot): the replication origin (created when missing) that the other direction's stream
/// drops and the fence lets through.
pub async fn as_origin(
    session: &tokio_postgres::Client,
    source: &str,
    direction: Direction,
) -> Result<(), tokio_postgres::Error> {
    as_origin_named(session, &origin_name(source, direction)).await
}

/// Sets up `session` with the replication origin `name` (created when missing).
pub async fn as_origin_named(
    session: &tokio_postgres::Client,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    session
        .execute(
            "SELECT pg_replication_origin_create($1) WHERE pg_replication_origin_oid($1) IS NULL",
            &[&name],
        )
        .await?;
    session.execute("SELECT pg_replication_origin_session_setup($1)", &[&name]).await?;
    session.execute("SELECT set_config('sluice.origin', $1, false)", &[&name]).await?;
    Ok(())
}
