//! Live checks of a DynamoDB target, for `sluice validate` and `run`'s start: the mapping
//! against the Postgres catalog (mapped tables exist and are published, every named column
//! exists, key template columns belong to the replica identity or the identity is FULL, type
//! rules fit the column types), and the DynamoDB tables against what sluice writes to them
//! (each exists, with the key attributes the mapping or the event log writes).

use sluice_core::Problem;
use tokio_postgres::Client;

use super::config::DynamoConfig;
use super::mapping::{parse_template, AttrKind, Mapping, Segment};
use crate::translate::mapping::MappingFile;
use crate::validate::Findings;

struct CatalogColumn {
    name: String,
    type_name: String,
    category: String,
    identity: bool,
}

/// Every problem of `mapping` against the database behind `sql`, with dotted keys.
pub async fn check(
    sql: &Client,
    mapping: &Mapping,
    publication: &str,
) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    for (i, table) in mapping.tables.iter().enumerate() {
        let prefix = format!("target.mapping.tables[{i}]");
        let Some((schema, name)) = table.source.split_once('.') else { continue };
        let relation = sql
            .query_opt(
                "SELECT c.oid::int8, c.relreplident::text FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &name],
            )
            .await?;
        let Some(relation) = relation else {
            problems.push(Problem::new(&prefix, "source", format!("table {} does not exist", table.source)));
            continue;
        };
        let oid: i64 = relation.get(0);
        let identity: String = relation.get(1);
        let published = sql
            .query_opt("SELECT 1 FROM pg_catalog.pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3", &[&publication, &schema, &name])
            .await?
            .is_some();
        if !published {
            problems.push(Problem::new(
                &prefix,
                "source",
                format!("table {} is not in publication {publication:?}", table.source),
            ));
        }
        let columns: Vec<CatalogColumn> = sql
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typcategory::text, \
                        ($2 = 'f') OR EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = a.attrelid \
                          AND a.attnum = ANY(i.indkey) AND (($2 = 'd' AND i.indisprimary) OR ($2 = 'i' AND i.indisreplident))) \
                 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&oid, &identity],
            )
            .await?
            .iter()
            .map(|row| CatalogColumn { name: row.get(0), type_name: row.get(1), category: row.get(2), identity: row.get(3) })
            .collect();
        let left_out = sluice_postgres::catalog::left_out_columns(sql, publication, schema, name).await?;
        let find = |column: &str| {
            columns.iter().find(|c| c.name == column).filter(|_| !left_out.iter().any(|l| l.column == column))
        };
        let require = |key: String, column: &str, problems: &mut Vec<Problem>| {
            if let Some(left) = left_out.iter().find(|l| l.column == column) {
                problems.push(Problem::new(&prefix, &key, format!("{}: {left}", table.source)));
            } else if find(column).is_none() {
                problems.push(Problem::new(
                    &prefix,
                    &key,
                    format!("column {column} does not exist in {}", table.source),
                ));
            }
        };
        for (key_name, key) in
            [("partition_key", Some(&table.partition_key)), ("sort_key", table.sort_key.as_ref())]
        {
            let Some(key) = key else { continue };
            let Ok(segments) = parse_template(&key.template) else { continue };
            for segment in segments {
                let Segment::Column(column) = segment else { continue };
                match find(&column) {
                    None => require(format!("{key_name}.template"), &column, &mut problems),
                    Some(c) if !c.identity => problems.push(Problem::new(
                        &prefix,
                        &format!("{key_name}.template"),
                        format!(
                            "column {column} is not part of the replica identity of {}: an update that changes it would leave the old item behind; \
                             use identity columns in the template, add it to the primary key, or set REPLICA IDENTITY FULL",
                            table.source
                        ),
                    )),
                    Some(_) => {}
                }
            }
        }
        for column in table.rename.keys() {
            require(format!("rename.{column}"), column, &mut problems);
        }
        // Dropping a column the stream never carries is harmless: only a missing one is named.
        for column in table.drop.iter().filter(|c| !left_out.iter().any(|l| &l.column == *c)) {
            require("drop".into(), column, &mut problems);
        }
        for (j, predicate) in table.filter.iter().enumerate() {
            require(format!("filter[{j}].column"), &predicate.column, &mut problems);
        }
        for (column, rule) in &table.columns {
            let Some(c) = find(column) else {
                require(format!("columns.{column}"), column, &mut problems);
                continue;
            };
            let Some(kind) = rule.as_ else { continue };
            let temporal = ["date", "timestamp without time zone", "timestamp with time zone"]
                .iter()
                .any(|t| c.type_name.starts_with(t));
            let fits = match kind {
                AttrKind::String => true,
                AttrKind::Number => c.category == "N",
                AttrKind::Iso8601 | AttrKind::EpochMillis => temporal,
                AttrKind::Map => c.type_name == "json" || c.type_name == "jsonb",
                AttrKind::List | AttrKind::Set => c.category == "A",
            };
            if !fits {
                problems.push(Problem::new(
                    &prefix,
                    &format!("columns.{column}.as"),
                    format!("{kind:?} does not fit column {column} of type {}", c.type_name),
                ));
            }
        }
    }
    Ok(problems)
}

/// A DynamoDB table sluice writes, with the key it writes and where the config names it.
struct Expected {
    table: String,
    key: String,
    partition_key: String,
    sort_key: Option<String>,
}

/// Describes every table the target writes and compares its key schema with the keys
/// sluice writes (every key attribute is a string). An endpoint that cannot be reached is
/// one `unreachable` line, and no further table is asked.
pub async fn target(config: &DynamoConfig, findings: &mut Findings) {
    let mut expected: Vec<Expected> = Vec::new();
    if let Some(Ok(mapping)) = config.mapping.as_deref().map(Mapping::load) {
        for (i, table) in mapping.tables.iter().enumerate() {
            if expected.iter().any(|e| e.table == table.target) {
                continue;
            }
            expected.push(Expected {
                table: table.target.clone(),
                key: format!("target.mapping.tables[{i}].target"),
                partition_key: table.partition_key.attribute.clone(),
                sort_key: table.sort_key.as_ref().map(|k| k.attribute.clone()),
            });
        }
    }
    if let Some(outbox) = &config.outbox {
        if let Some(table) = outbox.event_table.as_deref().filter(|t| !t.is_empty()) {
            expected.push(Expected {
                table: table.to_owned(),
                key: "target.outbox.event_table".into(),
                partition_key: outbox.partition_key.clone(),
                sort_key: Some(outbox.sort_key.clone()),
            });
        }
    }
    if expected.is_empty() {
        return;
    }
    let mut options = super::apply::client_options(config);
    // A check answers within seconds; the pipeline's own budget is for streaming.
    options.retry_for = options.retry_for.min(std::time::Duration::from_secs(10));
    let client = sluice_dynamodb::DynamoClient::connect(&options).await;
    let endpoint = config.endpoint_url.clone().unwrap_or_else(|| {
        format!("AWS (region {})", config.region.as_deref().unwrap_or("from the environment"))
    });
    for want in &expected {
        let key_text = |pk: &(String, String), sk: &Option<(String, String)>| {
            let mut text = format!("{} ({})", pk.0, pk.1);
            if let Some(sk) = sk {
                text.push_str(&format!(" and sort key {} ({})", sk.0, sk.1));
            }
            text
        };
        let want_pk = (want.partition_key.clone(), "S".to_owned());
        let want_sk = want.sort_key.clone().map(|k| (k, "S".to_owned()));
        match client.key_schema(&want.table).await {
            Ok(Some(found)) if found.partition_key == want_pk && found.sort_key == want_sk => {}
            Ok(Some(found)) => findings.problems.push(Problem::new(
                "",
                &want.key,
                format!(
                    "DynamoDB table {} has partition key {}, but sluice writes partition key {}; \
                     create a table with that key, or change the key attributes sluice writes",
                    want.table,
                    key_text(&found.partition_key, &found.sort_key),
                    key_text(&want_pk, &want_sk),
                ),
            )),
            Ok(None) => {
                let mut definitions = format!("AttributeName={},AttributeType=S", want_pk.0);
                let mut schema = format!("AttributeName={},KeyType=HASH", want_pk.0);
                if let Some((sk, _)) = &want_sk {
                    definitions.push_str(&format!(" AttributeName={sk},AttributeType=S"));
                    schema.push_str(&format!(" AttributeName={sk},KeyType=RANGE"));
                }
                findings.problems.push(Problem::new(
                    "",
                    &want.key,
                    format!(
                        "DynamoDB table {} does not exist at {endpoint}; create it with partition key {}: \
                         aws dynamodb create-table --table-name {} --attribute-definitions {definitions} \
                         --key-schema {schema} --billing-mode PAY_PER_REQUEST",
                        want.table,
                        key_text(&want_pk, &want_sk),
                        want.table,
                    ),
                ));
            }
            Err(error) if error.is_transient() => {
                findings.unreachable.push(Problem::new(
                    "target",
                    if config.endpoint_url.is_some() { "endpoint_url" } else { "region" },
                    format!("cannot reach DynamoDB at {endpoint}: {}", error.message),
                ));
                return;
            }
            Err(error) => findings.problems.push(Problem::new("", &want.key, error.to_string())),
        }
    }
    // The way back reads the mapped tables' streams: not needed forward, named as a way-back
    // finding.
    let tables: Vec<&str> =
        expected.iter().filter(|e| !e.key.starts_with("target.outbox")).map(|e| e.table.as_str()).collect();
    for table in tables {
        if let Err(reason) = crate::migration::reverse_dynamodb::streams(&client, &[table]).await {
            findings.irreversible.push(Problem::new("target", "mapping", reason));
        }
    }
    findings.checked.push(format!("DynamoDB tables at {endpoint}"));
}

/// What the way back could not do with `mapping` against the old tables' catalog: a column
/// the mapping drops that is NOT NULL without a default (rows the application adds could not
/// be inserted), and a primary key column neither a key template nor an attribute holds.
/// With the mapping's own problems (`inverse::offline_problems`).
pub async fn way_back(
    sql: &Client,
    mapping: &Mapping,
    irreversible: &mut Vec<Problem>,
) -> Result<(), sluice_postgres::Error> {
    irreversible.extend(super::inverse::offline_problems(mapping));
    for (i, table) in mapping.tables.iter().enumerate() {
        let Some((schema, name)) = table.source.split_once('.') else { continue };
        let Some(found) = sluice_postgres::catalog::table(sql, schema, name).await? else { continue };
        let in_templates: Vec<String> = super::mapping::key_templates(table)
            .into_iter()
            .filter_map(|(_, template)| parse_template(template).ok())
            .flatten()
            .filter_map(|s| match s {
                Segment::Column(c) => Some(c),
                Segment::Literal(_) => None,
            })
            .collect();
        let required: Vec<String> = sql
            .query(
                "SELECT a.attname::text FROM pg_catalog.pg_attribute a \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
                   AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''",
                &[&found.quoted_name()],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for column in &table.drop {
            if required.contains(column) && !in_templates.contains(column) {
                irreversible.push(Problem::new(
                    &format!("mapping.tables[{i}]"),
                    "drop",
                    format!(
                        "table {}: column {column} is dropped by the mapping, NOT NULL and without a default: the way back \
                         cannot insert the rows the application adds in DynamoDB; give it a default or map it",
                        table.source
                    ),
                ));
            }
        }
        for &k in &found.primary_key {
            let column = &found.relation.columns[k].name;
            if table.drop.contains(column) && !in_templates.contains(column) {
                irreversible.push(Problem::new(
                    &format!("mapping.tables[{i}]"),
                    "drop",
                    format!(
                        "table {}: key column {column} is dropped and in no key template: the way back cannot find the row of an item",
                        table.source
                    ),
                ));
            }
        }
    }
    Ok(())
}
