//! `sluice validate` for a Postgres target: the mapping against both catalogs.

use sluice_core::Problem;
use sluice_postgres::{catalog, ConnectionConfig};

use super::catalog::{owned_sequences, target_keys, target_tables};
use super::config::PostgresTargetConfig;
use super::mapping::PgMapping;
use super::translate::PgTranslator;
use crate::validate::Findings;
use sluice_core::Classify;

/// A Postgres target's mapping against both catalogs: the source tables exist, are published
/// and have the columns the mapping names; the target tables exist with a primary key and
/// every column the mapping writes, and no NOT NULL column without a default is left unwritten;
/// and, in the source's own database, sluice's writes are not published back into the stream.
pub async fn check(
    sql: &tokio_postgres::Client,
    source: &ConnectionConfig,
    pg: &PostgresTargetConfig,
    mapping: &PgMapping,
    publication: &str,
    findings: &mut Findings,
) -> Result<(), sluice_postgres::Error> {
    let target = match sluice_postgres::connect_sql(&pg.connection).await {
        Ok(client) => client,
        Err(e) if e.is_transient() => {
            findings.unreachable.push(Problem::new(
                "target",
                "connection",
                format!(
                    "cannot reach the target database at {}: {}",
                    pg.connection.addr(),
                    sluice_postgres::error::Chain(&e)
                ),
            ));
            return Ok(());
        }
        Err(e) => {
            findings.problems.push(Problem::new(
                "target",
                "connection",
                sluice_postgres::error::Chain(&e).to_string(),
            ));
            return Ok(());
        }
    };
    let problems = &mut findings.problems;
    let tables = match target_tables(&target, mapping).await {
        Ok(tables) => tables,
        Err(e) => {
            let cause = std::error::Error::source(&e).map(|c| format!(": {c}")).unwrap_or_default();
            problems.push(Problem::new("target", "mapping", format!("{}{cause}", e.message)));
            return Ok(());
        }
    };
    let translator = PgTranslator::new(mapping, &target_keys(&tables));
    let published = catalog::publication_tables(sql, publication).await?;
    for (i, table) in mapping.tables.iter().enumerate() {
        let prefix = format!("target.mapping.tables[{i}]");
        let (schema, name) = catalog::split_table(&table.source).unwrap_or_default();
        let Some(source) = catalog::table(sql, schema, name).await? else {
            problems.push(Problem::new(&prefix, "source", format!("table {} does not exist", table.source)));
            continue;
        };
        if !published.contains(&table.source) {
            problems.push(Problem::new(
                &prefix,
                "source",
                format!("table {} is not in publication {publication:?}", table.source),
            ));
        }
        let left_out = catalog::left_out_columns(sql, publication, schema, name).await?;
        let source = source.without(&left_out);
        let source_columns: Vec<&str> = source.relation.columns.iter().map(|c| c.name.as_str()).collect();
        let named = table
            .rename
            .keys()
            .map(|c| ("rename", c))
            .chain(table.drop.iter().map(|c| ("drop", c)))
            .chain(table.filter.iter().map(|f| ("filter", &f.column)));
        for (key, column) in named {
            if let Some(left) = left_out.iter().find(|l| &l.column == column) {
                // Dropping a column the stream never carries is harmless.
                if key != "drop" {
                    problems.push(Problem::new(&prefix, key, format!("{}: {left}", table.source)));
                }
            } else if !source_columns.contains(&column.as_str()) {
                problems.push(Problem::new(
                    &prefix,
                    key,
                    format!("column {column} does not exist in {}", table.source),
                ));
            }
        }
        let target_table = &tables[table.target.as_str()];
        let written =
            translator.target_columns(&table.source, source_columns.iter().copied()).unwrap_or_default();
        for column in &written {
            if !target_table.types.contains_key(column) {
                problems.push(Problem::new(
                    &prefix,
                    "target",
                    format!("target table {} has no column {column} (from {})", table.target, table.source),
                ));
            }
        }
        for key in &target_table.key {
            if !written.contains(key) {
                problems.push(Problem::new(
                    &prefix,
                    "target",
                    format!(
                        "target key column {key} of {} is written by no column of {}",
                        table.target, table.source
                    ),
                ));
            }
        }
        // Columns Postgres fills itself refuse a value: generated ones always, identity columns
        // GENERATED ALWAYS without OVERRIDING SYSTEM VALUE (which sluice does not send).
        let refusing: Vec<(String, bool)> = target
            .query(
                "SELECT a.attname::text, a.attgenerated <> '' FROM pg_catalog.pg_attribute a \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
                   AND (a.attgenerated <> '' OR a.attidentity = 'a')",
                &[&target_table.quoted],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        for (column, generated) in refusing.iter().filter(|(c, _)| written.contains(c)) {
            let what = if *generated {
                "a generated column: Postgres computes it and refuses a value for it"
            } else {
                "an identity column GENERATED ALWAYS: Postgres refuses a value for it (make it GENERATED BY DEFAULT)"
            };
            problems.push(Problem::new(
                &prefix,
                "target",
                format!(
                    "target column {}.{column} is {what}, and the mapping writes one from {}; \
                     drop that source column or rename it to another target column",
                    table.target, table.source
                ),
            ));
        }
        let required: Vec<String> = target
            .query(
                "SELECT a.attname::text FROM pg_catalog.pg_attribute a WHERE a.attrelid = $1::text::regclass AND a.attnum > 0                  AND NOT a.attisdropped AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''",
                &[&target_table.quoted],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for column in required.iter().filter(|c| !written.contains(c)) {
            problems.push(Problem::new(
                &prefix,
                "target",
                format!(
                    "target column {}.{column} is NOT NULL without a default and written by no column of {}",
                    table.target, table.source
                ),
            ));
        }
    }
    way_back(sql, mapping, &mut findings.irreversible).await?;
    if pg.sync_sequences {
        if let Err(e) = owned_sequences(&target, &tables).await {
            problems.push(Problem::new("target", "sync_sequences", e.message));
        }
    }
    let same_database = (&pg.connection.host, pg.connection.port, &pg.connection.dbname)
        == (&source.host, source.port, &source.dbname);
    if same_database {
        for looped in tables
            .keys()
            .map(|t| t.to_string())
            .chain([pg.checkpoint_table.to_string()])
            .filter(|t| published.contains(t))
        {
            problems.push(Problem::new("target", "mapping", format!("table {looped} is written by sluice and published in {publication:?}: its changes would stream back")));
        }
    }
    rights(&target, &tables, pg, problems).await?;
    Ok(())
}

/// What the mapping read backwards could not do: write a source row whose dropped column is
/// NOT NULL without a default, or tell apart the rows of two source tables in one target
/// table when no constant column holds a different value for each.
async fn way_back(
    sql: &tokio_postgres::Client,
    mapping: &PgMapping,
    irreversible: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    for (i, table) in mapping.tables.iter().enumerate() {
        let prefix = format!("target.mapping.tables[{i}]");
        if table.drop.is_empty() {
            continue;
        }
        let required: Vec<String> = sql
            .query(
                "SELECT a.attname::text FROM pg_catalog.pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 \
                   AND NOT a.attisdropped AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''",
                &[&catalog::split_table(&table.source)
                    .map(|(s, n)| sluice_core::TableName::new(s, n).quoted())
                    .unwrap_or_default()],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for column in table.drop.iter().filter(|c| required.contains(c)) {
            irreversible.push(Problem::new(
                &prefix,
                "drop",
                format!(
                    "column {column} of {} is dropped but NOT NULL without a default: a row written back from {} \
                     could not be inserted; give it a default in the source, or map it",
                    table.source, table.target
                ),
            ));
        }
    }
    irreversible.extend(untold_sources(mapping));
    Ok(())
}

/// Target tables several source tables write without a constant column that holds a
/// different value for each: the way back cannot tell which source a row belongs to.
fn untold_sources(mapping: &PgMapping) -> Vec<Problem> {
    let mut by_target: std::collections::BTreeMap<&str, Vec<usize>> = std::collections::BTreeMap::new();
    for (i, table) in mapping.tables.iter().enumerate() {
        by_target.entry(table.target.as_str()).or_default().push(i);
    }
    let mut found = Vec::new();
    for (target, sources) in by_target.into_iter().filter(|(_, s)| s.len() > 1) {
        let tables: Vec<_> = sources.iter().map(|&i| &mapping.tables[i]).collect();
        let told_apart = tables[0].constants.keys().any(|column| {
            let values: Vec<_> = tables.iter().map(|t| t.constants.get(column)).collect();
            values.iter().all(Option::is_some)
                && values.iter().enumerate().all(|(a, x)| values[a + 1..].iter().all(|y| y != x))
        });
        if !told_apart {
            found.push(Problem::new(
                &format!("target.mapping.tables[{}]", sources[0]),
                "target",
                format!(
                    "{} all write {target}, and no constant column holds a different value for each: the way back \
                     cannot tell which source table a row of {target} belongs to; add one (constants = {{ entity = \"…\" }})",
                    tables.iter().map(|t| t.source.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    found
}

/// The target role may write every target table, and keep its checkpoint (create the table
/// once, then read and write it).
async fn rights(
    target: &tokio_postgres::Client,
    tables: &std::collections::HashMap<std::sync::Arc<str>, super::catalog::TargetTable>,
    pg: &PostgresTargetConfig,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let role: String = target.query_one("SELECT current_user::text", &[]).await?.get(0);
    let lacking = async |table: &str, privileges: &[&str]| -> Result<Vec<String>, tokio_postgres::Error> {
        let mut missing = Vec::new();
        for privilege in privileges {
            let has: bool = target
                .query_one("SELECT has_table_privilege($1::text::regclass, $2)", &[&table, privilege])
                .await?
                .get(0);
            if !has {
                missing.push((*privilege).to_owned());
            }
        }
        Ok(missing)
    };
    let mut names: Vec<&std::sync::Arc<str>> = tables.keys().collect();
    names.sort();
    for name in names {
        let quoted = &tables[name].quoted;
        let missing = lacking(quoted, &["SELECT", "INSERT", "UPDATE", "DELETE"]).await?;
        if !missing.is_empty() {
            problems.push(Problem::new(
                "target",
                "mapping",
                format!(
                    "role {role:?} lacks {} on target table {name}; grant it with GRANT {} ON {quoted} TO {role}",
                    missing.join(", "),
                    missing.join(", ")
                ),
            ));
        }
    }
    let checkpoint = pg.checkpoint_table.quoted();
    let exists: bool = target.query_one("SELECT to_regclass($1) IS NOT NULL", &[&checkpoint]).await?.get(0);
    if exists {
        let missing = lacking(&checkpoint, &["SELECT", "INSERT", "UPDATE"]).await?;
        if !missing.is_empty() {
            problems.push(Problem::new(
                "target",
                "checkpoint_table",
                format!(
                    "role {role:?} lacks {} on the checkpoint table {}; grant it with GRANT {} ON {checkpoint} TO {role}",
                    missing.join(", "),
                    pg.checkpoint_table,
                    missing.join(", ")
                ),
            ));
        }
    } else {
        let schema = pg.checkpoint_table.schema();
        let may: bool = target
            .query_one("SELECT has_schema_privilege($1, 'CREATE')", &[&schema])
            .await
            .map(|row| row.get(0))
            .unwrap_or(false);
        if !may {
            problems.push(Problem::new(
                "target",
                "checkpoint_table",
                format!(
                    "the checkpoint table {} does not exist and role {role:?} may not create it in schema {schema}; \
                     grant it with GRANT CREATE ON SCHEMA {} TO {role}, or create the table beforehand",
                    pg.checkpoint_table,
                    sluice_postgres::setup::quote_ident(schema)
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::mapping::MappingFile;

    #[test]
    fn two_sources_in_one_target_table_need_a_constant_that_tells_them_apart() {
        let mapping = |a: &str, b: &str| {
            PgMapping::parse(&format!(
                "[[tables]]\nsource = \"public.people\"\ntarget = \"v2.parties\"\n{a}\n\
                 [[tables]]\nsource = \"public.firms\"\ntarget = \"v2.parties\"\n{b}\n"
            ))
            .unwrap()
        };
        let untold = untold_sources(&mapping("", ""));
        assert_eq!(untold.len(), 1);
        let text = untold[0].to_string();
        assert!(text.contains("public.people, public.firms all write v2.parties"), "{text}");
        // The same value in both tells nothing either.
        let same = "constants = { kind = \"x\" }";
        assert_eq!(untold_sources(&mapping(same, same)).len(), 1);
        assert!(untold_sources(&mapping(
            "constants = { kind = \"person\" }",
            "constants = { kind = \"firm\" }"
        ))
        .is_empty());
    }
}
