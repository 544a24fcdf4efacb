//! The `sluice.relation` header: the shape of a CDC record's table, so that a reader can turn
//! the record's JSON back into typed values (the Kafka source, `inverse.rs`).
//!
//! ```json
//! {"oid":16384,"identity":"default","columns":[
//!   {"name":"id","type":"int8","oid":20,"key":true},
//!   {"name":"tags","type":"text[]","oid":1009,"element_oid":25}]}
//! ```
//!
//! `type` names how the value is written (the jsonl shape): `bool`, `int2`, `int4`, `int8`,
//! `float4`, `float8`, `numeric`, `text`, `bytea`, `uuid`, `json`, `jsonb`, `date`, `time`,
//! `timestamp`, `timestamptz`, `interval`, `enum`, `unknown` (the value's text), and any of
//! these with `[]` for an array of them. `oid` is the column's type in the source database,
//! `typmod` its modifier when it has one. The header is the same for every record of a table
//! until its shape changes, so the translator builds it once per relation.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_core::{Column, Relation, ReplicaIdentity, TypeKind};

/// The table's shape (this module).
pub const HEADER_RELATION: &str = "sluice.relation";
/// When the change's transaction committed at the source: microseconds since 2000-01-01 UTC
/// (Postgres' epoch), as decimal text. Absent for rows a backfill read outside a transaction.
pub const HEADER_COMMIT_TIME: &str = "sluice.commit_time";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelationJson<'a> {
    oid: u32,
    #[serde(borrow)]
    identity: &'a str,
    #[serde(borrow)]
    columns: Vec<ColumnJson<'a>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnJson<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    #[serde(rename = "type")]
    type_name: String,
    oid: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    key: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    element_oid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typmod: Option<i32>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The header's value for `relation`.
pub fn relation_header(relation: &Relation) -> Vec<u8> {
    let columns = relation
        .columns
        .iter()
        .map(|column| ColumnJson {
            name: column.name.as_str().into(),
            type_name: kind_name(&column.kind),
            oid: column.type_oid,
            key: column.is_key,
            element_oid: match &column.kind {
                TypeKind::Array { element_oid, .. } => Some(*element_oid),
                _ => None,
            },
            typmod: (column.type_modifier != -1).then_some(column.type_modifier),
        })
        .collect();
    let header = RelationJson { oid: relation.oid, identity: relation.replica_identity.as_str(), columns };
    serde_json::to_vec(&header).unwrap_or_default()
}

/// The relation a header describes, named `table` (`schema.name`, from the record); the
/// error says what is wrong with the header.
pub fn read_relation_header(header: &[u8], table: &str) -> Result<Arc<Relation>, String> {
    let parsed: RelationJson<'_> = serde_json::from_slice(header)
        .map_err(|e| format!("the {HEADER_RELATION} header is not valid: {e}"))?;
    let (namespace, name) =
        table.split_once('.').ok_or_else(|| format!("the table {table:?} is not schema-qualified"))?;
    let replica_identity = match parsed.identity {
        "default" => ReplicaIdentity::Default,
        "nothing" => ReplicaIdentity::Nothing,
        "full" => ReplicaIdentity::Full,
        "index" => ReplicaIdentity::Index,
        other => {
            return Err(format!("the {HEADER_RELATION} header names an unknown replica identity {other:?}"))
        }
    };
    let mut columns: Vec<Column> = Vec::with_capacity(parsed.columns.len());
    for column in parsed.columns {
        if columns.iter().any(|c| c.name == column.name) {
            return Err(format!("the {HEADER_RELATION} header lists column {} twice", column.name));
        }
        let kind = kind_from_name(&column.type_name, column.element_oid).ok_or_else(|| {
            format!(
                "the {HEADER_RELATION} header gives column {} the unknown type {:?}",
                column.name, column.type_name
            )
        })?;
        columns.push(Column {
            name: column.name.into_owned(),
            type_oid: column.oid,
            type_modifier: column.typmod.unwrap_or(-1),
            is_key: column.key,
            kind,
        });
    }
    Ok(Arc::new(Relation {
        oid: parsed.oid,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        replica_identity,
        columns,
    }))
}

const SCALARS: &[(&str, TypeKind)] = &[
    ("bool", TypeKind::Bool),
    ("int2", TypeKind::Int2),
    ("int4", TypeKind::Int4),
    ("int8", TypeKind::Int8),
    ("float4", TypeKind::Float4),
    ("float8", TypeKind::Float8),
    ("numeric", TypeKind::Numeric),
    ("text", TypeKind::Text),
    ("bytea", TypeKind::Bytea),
    ("uuid", TypeKind::Uuid),
    ("json", TypeKind::Json),
    ("jsonb", TypeKind::Jsonb),
    ("date", TypeKind::Date),
    ("time", TypeKind::Time),
    ("timestamp", TypeKind::Timestamp),
    ("timestamptz", TypeKind::TimestampTz),
    ("interval", TypeKind::Interval),
    ("enum", TypeKind::Enum),
    ("unknown", TypeKind::Unknown),
];

fn kind_name(kind: &TypeKind) -> String {
    match kind {
        TypeKind::Array { element, .. } => format!("{}[]", kind_name(element)),
        scalar => SCALARS.iter().find(|(_, k)| k == scalar).map(|(n, _)| (*n).to_owned()).unwrap_or_default(),
    }
}

fn kind_from_name(name: &str, element_oid: Option<u32>) -> Option<TypeKind> {
    if let Some(element) = name.strip_suffix("[]") {
        let element = kind_from_name(element, None)?;
        if matches!(element, TypeKind::Array { .. }) {
            return None;
        }
        return Some(TypeKind::Array {
            element: Box::new(element),
            element_oid: element_oid.unwrap_or(0),
            delimiter: b',',
        });
    }
    SCALARS.iter().find(|(n, _)| *n == name).map(|(_, k)| k.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_name_reads_back_as_its_kind() {
        for (name, kind) in SCALARS {
            assert_eq!(kind_name(kind), *name);
            assert_eq!(kind_from_name(name, None).as_ref(), Some(kind));
            let array = TypeKind::Array { element: Box::new(kind.clone()), element_oid: 7, delimiter: b',' };
            assert_eq!(kind_from_name(&kind_name(&array), Some(7)), Some(array));
        }
        assert_eq!(kind_from_name("int4[][]", None), None, "an array's element is never an array");
        assert_eq!(kind_from_name("money", None), None);
    }

    #[test]
    fn a_relation_reads_back_from_its_header() {
        let relation = Relation {
            oid: 16384,
            namespace: "public".into(),
            name: "accounts".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                    is_key: true,
                    kind: TypeKind::Int8,
                },
                Column {
                    name: "amount \"x\"".into(),
                    type_oid: 1700,
                    type_modifier: 655366,
                    is_key: false,
                    kind: TypeKind::Numeric,
                },
                Column {
                    name: "tags".into(),
                    type_oid: 1009,
                    type_modifier: -1,
                    is_key: false,
                    kind: TypeKind::Array {
                        element: Box::new(TypeKind::Text),
                        element_oid: 25,
                        delimiter: b',',
                    },
                },
            ],
        };
        let header = relation_header(&relation);
        assert_eq!(*read_relation_header(&header, "public.accounts").unwrap(), relation);
        assert!(read_relation_header(b"{}", "public.accounts").unwrap_err().contains(HEADER_RELATION));
        assert!(read_relation_header(&header, "accounts").unwrap_err().contains("schema-qualified"));
    }
}
