//! The Postgres side of verify: target rows compared with source rows through the Postgres
//! mapping.
//!
//! Each chunk of translated rows goes to the target database as one VALUES list, every value
//! cast to its target column's type exactly as the target's writes cast it, left-joined with
//! the target table on its primary key. Both sides are then printed by the target server as
//! text, so equal values compare equal whatever their source types (`int4` into `int8`, numeric
//! scales, `jsonb` key order). Extra rows come from a keyset scan of the target's keys.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use sluice_core::retry::RetryPolicy;
use sluice_postgres::catalog::Table;
use sluice_postgres::setup::quote_ident;
use sluice_postgres::ReadSession;

use super::catalog::{target_keys, target_tables, TargetTable};
use crate::compare::{as_snapshot_insert, source_key, DifferentValues, Extra, Finding, SourceKey};
use crate::error::{CommandContext, CommandError};
use crate::targets::postgres::config::PostgresTargetConfig;
use crate::targets::postgres::mapping::{PgMapping, PgTableMapping};
use crate::targets::postgres::translate::{PgTranslator, RowOp, Text};
use sluice_core::Value;

/// Target keys read per page when looking for extra rows.
const KEY_PAGE: usize = 10_000;

pub(crate) struct PgSide {
    mapping: PgMapping,
    translator: PgTranslator,
    /// One session, used by one command at a time: a lock only to reconnect through `&self`.
    client: tokio::sync::Mutex<ReadSession>,
    tables: HashMap<Arc<str>, TargetTable>,
}

/// A value the target type refuses (SQLSTATE class 22): the stream dead-letters such a row.
fn refused_value(error: &sluice_postgres::Error) -> bool {
    error.sqlstate().is_some_and(|code| code.starts_with("22"))
}

/// A failed comparison read, named by its SQLSTATE only: the server's message may quote a value.
/// (A failure without a SQLSTATE, such as a lost connection, keeps its cause.)
fn withheld(target: &str, error: sluice_postgres::Error) -> CommandError {
    if error.sqlstate().is_none() {
        return CommandError::Failed {
            what: format!("cannot read rows of target table {target}"),
            source: Box::new(error),
        };
    }
    CommandError::invalid(format!(
        "cannot read rows of target table {target}: SQLSTATE {} (the server's message is not shown: it may \
         quote a row's value)",
        error.sqlstate().unwrap_or("?")
    ))
}

/// A 128-bit digest of a target key as the target prints it.
fn digest(key: &BTreeMap<String, String>) -> u128 {
    crate::compare::digest(&crate::compare::key_identity(key))
}

impl PgSide {
    pub(crate) async fn open(
        config: &PostgresTargetConfig,
        retry: RetryPolicy,
    ) -> Result<Self, CommandError> {
        let mapping = config.load_mapping().map_err(|p| {
            CommandError::invalid(p.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        })?;
        let mut session = ReadSession::connect(&config.connection, "sluice verify", retry)
            .await
            .context("cannot connect to the target database (target.connection)")?;
        let client =
            session.client().await.context("cannot connect to the target database (target.connection)")?;
        let tables =
            target_tables(client, &mapping).await.context("cannot read the target tables' catalog")?;
        Ok(PgSide {
            translator: PgTranslator::new(&mapping, &target_keys(&tables)),
            mapping,
            client: tokio::sync::Mutex::new(session),
            tables,
        })
    }

    pub(crate) fn pairs(&self) -> Vec<(String, String)> {
        self.mapping.tables.iter().map(|t| (t.source.clone(), t.target.clone())).collect()
    }

    fn mapping(&self, source: &str) -> &PgTableMapping {
        self.mapping.tables.iter().find(|m| m.source == source).expect("mapped")
    }

    /// The target row a source row must be (its mapped columns), or why there is none.
    fn expected(&self, table: &Table, row: Vec<Value>) -> Result<Option<Vec<(String, Text)>>, ()> {
        let event = as_snapshot_insert(table, row);
        let mut ops = Vec::new();
        self.translator.translate(&event, &mut ops).map_err(drop)?;
        Ok(ops.into_iter().find_map(|op| match op {
            RowOp::Upsert { columns, .. } => Some(columns),
            _ => None,
        }))
    }

    pub(crate) async fn check_rows(
        &self,
        target: &str,
        table: &Table,
        rows: Vec<Vec<Value>>,
    ) -> Result<Vec<(SourceKey, Option<u128>, Finding)>, CommandError> {
        let t = &self.tables[target];
        let mut out: Vec<(SourceKey, Option<u128>, Finding)> = Vec::with_capacity(rows.len());
        let mut expected: Vec<(usize, Vec<(String, Text)>)> = Vec::new();
        for row in rows {
            let key = source_key(table, &row);
            let finding = match self.expected(table, row) {
                Ok(None) => Finding::NotExpected,
                Ok(Some(columns)) if t.key.iter().all(|k| columns.iter().any(|(c, _)| c == k)) => {
                    expected.push((out.len(), columns));
                    // Until the target's answer below.
                    Finding::Missing
                }
                Ok(Some(_)) | Err(()) => Finding::Untranslatable,
            };
            out.push((key, None, finding));
        }
        let Some((_, first)) = expected.first() else { return Ok(out) };
        // Rows of one source table map to the same columns.
        let names: Vec<String> = first.iter().map(|(c, _)| c.clone()).collect();
        if let Some(missing) = names.iter().find(|n| !t.types.contains_key(*n)) {
            return Err(CommandError::invalid(format!(
                "target table {target} has no column {missing} (from {}); the stream stops at it too",
                table.relation.qualified_name()
            )));
        }
        let rows = match self.compare_query(t, &names, &expected).await {
            Ok(rows) => rows,
            // A value the target type refuses (the stream dead-letters such a row): find the
            // rows row by row; the server's message, which quotes the value, is not shown.
            Err(error) if refused_value(&error) => {
                let mut rows = Vec::new();
                for one in &expected {
                    match self.compare_query(t, &names, std::slice::from_ref(one)).await {
                        Ok(found) => rows.extend(found),
                        Err(error) if refused_value(&error) => out[one.0].2 = Finding::Untranslatable,
                        Err(error) => return Err(withheld(target, error)),
                    }
                }
                rows
            }
            Err(error) => return Err(withheld(target, error)),
        };
        for row in rows {
            let index = row.get::<_, i32>(0) as usize;
            let key: BTreeMap<String, String> = t
                .key
                .iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), row.get::<_, Option<String>>(1 + i).unwrap_or_default()))
                .collect();
            let base = 1 + t.key.len();
            let finding = if row.get::<_, bool>(base) {
                Finding::Missing
            } else {
                let mut different = Vec::new();
                let mut values = DifferentValues::new();
                for (i, name) in names.iter().enumerate() {
                    let (want, have): (Option<String>, Option<String>) =
                        (row.get(base + 1 + 2 * i), row.get(base + 2 + 2 * i));
                    if want != have {
                        different.push(name.clone());
                        values.insert(name.clone(), (want, have));
                    }
                }
                if different.is_empty() {
                    Finding::Matched
                } else {
                    Finding::Different(different, values)
                }
            };
            out[index].1 = Some(digest(&key));
            out[index].2 = finding;
        }
        Ok(out)
    }

    /// The expected rows (`(index, columns)`) cast to the target types and left-joined with
    /// the target table: per row its index, the key as the target prints it, whether the
    /// target lacks the row, and each column's expected and stored text.
    async fn compare_query(
        &self,
        t: &TargetTable,
        names: &[String],
        expected: &[(usize, Vec<(String, Text)>)],
    ) -> Result<Vec<tokio_postgres::Row>, sluice_postgres::Error> {
        let mut sql = String::from("SELECT e.n");
        for k in &t.key {
            let i = names.iter().position(|n| n == k).expect("key column checked above");
            sql.push_str(&format!(", e.c{i}::text"));
        }
        sql.push_str(&format!(", t.{} IS NULL", quote_ident(&t.key[0])));
        for (i, name) in names.iter().enumerate() {
            sql.push_str(&format!(", e.c{i}::text, t.{}::text", quote_ident(name)));
        }
        sql.push_str(" FROM (VALUES ");
        for (n, (index, columns)) in expected.iter().enumerate() {
            sql.push_str(if n == 0 { "(" } else { ", (" });
            sql.push_str(&index.to_string());
            sql.push_str(", ");
            // Every column exists in the target: checked by the caller.
            let _ = t.values(columns, &mut sql);
            sql.push(')');
        }
        let aliases: Vec<String> = (0..names.len()).map(|i| format!("c{i}")).collect();
        let join: Vec<String> = t
            .key
            .iter()
            .map(|k| {
                format!("t.{0} = e.c{1}", quote_ident(k), names.iter().position(|n| n == k).unwrap_or(0))
            })
            .collect();
        sql.push_str(&format!(
            ") AS e(n, {}) LEFT JOIN {} t ON {}",
            aliases.join(", "),
            t.quoted,
            join.join(" AND ")
        ));
        self.client.lock().await.query(&sql, &[]).await
    }

    /// Target rows no verified row produced, by keyset pages over the target's primary key.
    pub(crate) async fn extras(
        &self,
        target: &str,
        sources: &[String],
        expected: &HashSet<u128>,
        tables: &HashMap<String, Table>,
    ) -> Result<Vec<(String, Extra)>, CommandError> {
        let t = &self.tables[target];
        let columns: Vec<String> = t.key.iter().map(|k| format!("s.{}::text", quote_ident(k))).collect();
        let mut extras = Vec::new();
        let mut after: Option<Vec<String>> = None;
        loop {
            let statement = t.table.page_query(&columns.join(", "), after.as_deref(), KEY_PAGE, None);
            let rows = self
                .client
                .lock()
                .await
                .query(&statement, &[])
                .await
                .with_context(|| format!("cannot scan target table {target}"))?;
            let count = rows.len();
            for row in &rows {
                let texts: Vec<String> =
                    (0..t.key.len()).map(|i| row.get::<_, Option<String>>(i).unwrap_or_default()).collect();
                let key: BTreeMap<String, String> =
                    t.key.iter().cloned().zip(texts.iter().cloned()).collect();
                if !expected.contains(&digest(&key)) {
                    let owner = sources
                        .iter()
                        .find_map(|s| self.source_key_of(s, &tables[s], &key).map(|k| (s.clone(), k)));
                    let report_table =
                        owner.as_ref().map(|(s, _)| s.clone()).unwrap_or_else(|| sources[0].clone());
                    extras.push((report_table, Extra { item_key: key, source_key: owner.map(|(_, k)| k) }));
                }
                after = Some(texts);
            }
            if count < KEY_PAGE {
                return Ok(extras);
            }
        }
    }

    /// The source key a target key leads back to through the renames, when the target key
    /// holds every source key column.
    fn source_key_of(
        &self,
        source: &str,
        table: &Table,
        key: &BTreeMap<String, String>,
    ) -> Option<SourceKey> {
        let mapping = self.mapping(source);
        table
            .primary_key
            .iter()
            .map(|&i| {
                let column = &table.relation.columns[i].name;
                key.get(mapping.rename.get(column).unwrap_or(column)).map(|v| (column.clone(), v.clone()))
            })
            .collect()
    }

    /// The target key of a source key, when the target key is made of source key columns.
    fn target_key_of(&self, source: &str, key: &SourceKey) -> Option<BTreeMap<String, String>> {
        let mapping = self.mapping(source);
        let t = &self.tables[mapping.target.as_str()];
        let by_target: HashMap<&String, &String> =
            key.iter().map(|(c, v)| (mapping.rename.get(c).unwrap_or(c), v)).collect();
        t.key.iter().map(|k| by_target.get(k).map(|v| (k.clone(), (*v).clone()))).collect()
    }

    /// Whether the target holds a row with this key.
    async fn holds(&self, target: &str, key: &BTreeMap<String, String>) -> Result<bool, CommandError> {
        let t = &self.tables[target];
        let mut sql = format!("SELECT 1 FROM {} t WHERE ", t.quoted);
        for (n, k) in t.key.iter().enumerate() {
            sql.push_str(&format!("{}t.{} = ", if n == 0 { "" } else { " AND " }, quote_ident(k)));
            t.value(k, &key.get(k).cloned(), &mut sql)
                .with_context(|| format!("target table {target} cannot hold this key"))?;
        }
        Ok(self
            .client
            .lock()
            .await
            .query_opt(&sql, &[])
            .await
            .with_context(|| format!("cannot read target table {target}"))?
            .is_some())
    }

    /// For a wrong key whose row is gone: the target key when the target still holds the row.
    pub(crate) async fn left_behind(
        &self,
        source: &str,
        target: &str,
        _table: &Table,
        key: &SourceKey,
    ) -> Result<Option<BTreeMap<String, String>>, CommandError> {
        let Some(target_key) = self.target_key_of(source, key) else { return Ok(None) };
        Ok(self.holds(target, &target_key).await?.then_some(target_key))
    }

    /// Whether an extra row is still in the target and still produced by no source row.
    pub(crate) async fn still_extra(
        &self,
        table: &Table,
        _source: &str,
        target: &str,
        extra: &Extra,
        rows: Vec<Vec<Value>>,
    ) -> Result<bool, CommandError> {
        if !self.holds(target, &extra.item_key).await? {
            return Ok(false);
        }
        if extra.source_key.is_none() {
            return Ok(true);
        }
        let produced = rows.into_iter().any(|row| matches!(self.expected(table, row), Ok(Some(_))));
        Ok(!produced)
    }
}
