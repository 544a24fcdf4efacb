//! Change events → row operations on tables of another Postgres database (or another schema of
//! the same one), through a Postgres mapping (`schemas/postgres/README.md`). Pure: no I/O.
//!
//! - insert, update with a full row → upsert of the mapped row (insert, or update on key conflict);
//! - update with unchanged TOAST columns → update of the present columns only;
//! - update that changes the target key → delete of the old key, then the new row;
//! - delete, or a row leaving the filter → delete by key;
//! - truncate → truncate of the target table, when only that source feeds it.
//!
//! Values leave as Postgres text (what the source server printed), so the target's input
//! functions convert them to the target column types, and a value the target type refuses is
//! a row that can never apply (dead-lettered by the target).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::mapping::{PgMapping, PgTableMapping, PgTruncatePolicy};
use crate::translate::filter::passes_filter;
use crate::translate::mapping::Constant;
use crate::translate::{Context, TranslateError, Translator};
use sluice_core::{ChangeEvent, NewRow, Relation, Value};

/// A target column's value as Postgres text; `None` is NULL.
pub type Text = Option<String>;

/// One operation on a target table. Column names are target names.
#[derive(Clone, Debug, PartialEq)]
pub enum RowOp {
    /// Insert the row, or overwrite the row with its key.
    Upsert {
        table: Arc<str>,
        columns: Vec<(String, Text)>,
    },
    /// Set these columns of the row with this key (unchanged TOAST columns keep their values).
    Update {
        table: Arc<str>,
        key: Vec<(String, Text)>,
        set: Vec<(String, Text)>,
    },
    Delete {
        table: Arc<str>,
        key: Vec<(String, Text)>,
    },
    Truncate {
        table: Arc<str>,
    },
}

impl RowOp {
    pub fn table(&self) -> &Arc<str> {
        match self {
            RowOp::Upsert { table, .. }
            | RowOp::Update { table, .. }
            | RowOp::Delete { table, .. }
            | RowOp::Truncate { table } => table,
        }
    }
}

struct CompiledTable {
    mapping: PgTableMapping,
    target: Arc<str>,
    dropped: HashSet<String>,
    /// The target table's primary key columns.
    key: Vec<String>,
    /// Several sources feed the target table.
    shared: bool,
}

pub struct PgTranslator {
    tables: HashMap<String, CompiledTable>,
    on_truncate: PgTruncatePolicy,
}

impl Translator for PgTranslator {
    type Op = RowOp;

    fn translate(
        &mut self,
        event: &ChangeEvent,
        _context: &Context,
        out: &mut Vec<RowOp>,
    ) -> Result<(), TranslateError> {
        PgTranslator::translate(self, event, out)
    }
}

impl PgTranslator {
    /// Compiles a validated mapping; `keys` holds each target table's primary key columns.
    pub fn new(mapping: &PgMapping, keys: &HashMap<String, Vec<String>>) -> Self {
        let mut feeds: HashMap<&str, usize> = HashMap::new();
        for t in &mapping.tables {
            *feeds.entry(t.target.as_str()).or_default() += 1;
        }
        let tables = mapping
            .tables
            .iter()
            .map(|t| {
                let compiled = CompiledTable {
                    target: t.target.as_str().into(),
                    dropped: t.drop.iter().cloned().collect(),
                    key: keys.get(&t.target).cloned().unwrap_or_default(),
                    shared: feeds[t.target.as_str()] > 1,
                    mapping: t.clone(),
                };
                (t.source.clone(), compiled)
            })
            .collect();
        PgTranslator { tables, on_truncate: mapping.on_truncate }
    }

    /// The target column each source column of `relation` is written to (`None` when dropped),
    /// and the constants' columns: for checking the mapping against the target catalog.
    pub fn target_columns<'a>(
        &'a self,
        source: &str,
        source_columns: impl IntoIterator<Item = &'a str>,
    ) -> Option<Vec<String>> {
        let table = self.tables.get(source)?;
        let mut columns: Vec<String> = source_columns
            .into_iter()
            .filter(|c| !table.dropped.contains(*c))
            .map(|c| target_name(table, c).to_owned())
            .collect();
        columns.extend(table.mapping.constants.keys().cloned());
        Some(columns)
    }

    /// The operations for one event, appended to `out`.
    pub fn translate(&self, event: &ChangeEvent, out: &mut Vec<RowOp>) -> Result<(), TranslateError> {
        match event {
            ChangeEvent::Insert { relation, new, .. } => {
                let Some(table) = self.table(relation) else { return Ok(()) };
                let row: Vec<Option<&Value>> = new.iter().map(Some).collect();
                if self.passes(table, relation, &row)? {
                    out.push(RowOp::Upsert {
                        table: Arc::clone(&table.target),
                        columns: self.columns(table, relation, &row)?,
                    });
                }
            }
            ChangeEvent::Update { relation, old, new, .. } => {
                let Some(table) = self.table(relation) else { return Ok(()) };
                let row: Vec<Option<&Value>> = match new {
                    NewRow::Full(values) => values.iter().map(Some).collect(),
                    NewRow::Partial(values) => values.iter().map(Option::as_ref).collect(),
                };
                let columns = self.columns(table, relation, &row)?;
                let key = self.key(table, &columns)?;
                if let Some(old) = old {
                    let old_row: Vec<Option<&Value>> = old.values().iter().map(Some).collect();
                    let old_key = self
                        .columns(table, relation, &old_row)
                        .and_then(|c| self.key(table, &c))
                        .map_err(|e| match e {
                        TranslateError::Poison { table, column, reason } => TranslateError::Poison {
                            table,
                            column,
                            reason: format!(
                                "old key: {reason} (is the column part of the replica identity?)"
                            ),
                        },
                        other => other,
                    })?;
                    if old_key != key {
                        out.push(RowOp::Delete { table: Arc::clone(&table.target), key: old_key });
                    }
                }
                if !self.passes(table, relation, &row)? {
                    out.push(RowOp::Delete { table: Arc::clone(&table.target), key });
                } else if matches!(new, NewRow::Partial(_)) {
                    let set = columns.into_iter().filter(|(name, _)| !table.key.contains(name)).collect();
                    out.push(RowOp::Update { table: Arc::clone(&table.target), key, set });
                } else {
                    out.push(RowOp::Upsert { table: Arc::clone(&table.target), columns });
                }
            }
            ChangeEvent::Delete { relation, old, .. } => {
                let Some(table) = self.table(relation) else { return Ok(()) };
                let row: Vec<Option<&Value>> = old.values().iter().map(Some).collect();
                let key = self.key(table, &self.columns(table, relation, &row)?)?;
                out.push(RowOp::Delete { table: Arc::clone(&table.target), key });
            }
            ChangeEvent::Truncate { relations, .. } => {
                for relation in relations {
                    let Some(table) = self.table(relation) else { continue };
                    match self.on_truncate {
                        PgTruncatePolicy::Ignore => {}
                        PgTruncatePolicy::Error => {
                            return Err(TranslateError::Fatal {
                                table: relation.qualified_name(),
                                reason: "TRUNCATE is refused by the mapping (on_truncate = \"error\")".into(),
                            })
                        }
                        PgTruncatePolicy::Truncate if table.shared => {
                            return Err(TranslateError::Fatal {
                                table: relation.qualified_name(),
                                reason: format!(
                                    "TRUNCATE cannot be mirrored: target table {} is fed by several source tables; set on_truncate = \"ignore\" in the mapping",
                                    table.target
                                ),
                            })
                        }
                        PgTruncatePolicy::Truncate => out.push(RowOp::Truncate { table: Arc::clone(&table.target) }),
                    }
                }
            }
            ChangeEvent::Begin { .. }
            | ChangeEvent::Commit { .. }
            | ChangeEvent::Relation(_)
            | ChangeEvent::Message { .. } => {}
        }
        Ok(())
    }

    fn table(&self, relation: &Relation) -> Option<&CompiledTable> {
        self.tables.get(&relation.qualified_name())
    }

    fn passes(
        &self,
        table: &CompiledTable,
        relation: &Relation,
        row: &[Option<&Value>],
    ) -> Result<bool, TranslateError> {
        let passes = passes_filter(&table.mapping.filter, &table.mapping.source, relation, row)?;
        if !passes && table.mapping.refuse_filtered {
            return Err(TranslateError::Poison {
                table: table.mapping.source.clone(),
                column: None,
                reason: format!(
                    "the row fails the mapping's filter, so the way back does not carry it into {} (the old table keeps its row)",
                    table.target
                ),
            });
        }
        Ok(passes)
    }

    /// The present columns of a row under their target names, with the constants.
    fn columns(
        &self,
        table: &CompiledTable,
        relation: &Relation,
        row: &[Option<&Value>],
    ) -> Result<Vec<(String, Text)>, TranslateError> {
        let mut columns = Vec::with_capacity(row.len() + table.mapping.constants.len());
        for (column, value) in relation.columns.iter().zip(row) {
            let Some(value) = value else { continue };
            if table.dropped.contains(&column.name) {
                continue;
            }
            let text = match value {
                Value::Null => None,
                Value::UnknownBinary { type_oid, .. } => {
                    return Err(TranslateError::Poison {
                        table: table.mapping.source.clone(),
                        column: Some(column.name.clone()),
                        reason: format!("a value of type oid {type_oid} arrived in binary form, which the target cannot read; stream with binary = false"),
                    })
                }
                value => Some(value.to_string()),
            };
            columns.push((target_name(table, &column.name).to_owned(), text));
        }
        for (name, constant) in &table.mapping.constants {
            let text = match constant {
                Constant::Bool(b) => b.to_string(),
                Constant::Integer(i) => i.to_string(),
                Constant::Float(f) => f.to_string(),
                Constant::Text(t) => t.clone(),
            };
            columns.push((name.clone(), Some(text)));
        }
        Ok(columns)
    }

    /// The target key of a mapped row, in the key's column order.
    fn key(
        &self,
        table: &CompiledTable,
        columns: &[(String, Text)],
    ) -> Result<Vec<(String, Text)>, TranslateError> {
        table
            .key
            .iter()
            .map(|name| match columns.iter().find(|(c, _)| c == name) {
                Some((_, Some(text))) => Ok((name.clone(), Some(text.clone()))),
                Some((_, None)) => Err(TranslateError::Poison { table: table.mapping.source.clone(), column: Some(name.clone()), reason: "target key column is NULL".into() }),
                None => Err(TranslateError::Poison {
                    table: table.mapping.source.clone(),
                    column: Some(name.clone()),
                    reason: "target key column is missing from the change (an unchanged TOAST value, or not mapped)".into(),
                }),
            })
            .collect()
    }
}

fn target_name<'a>(table: &'a CompiledTable, column: &'a str) -> &'a str {
    table.mapping.rename.get(column).map(String::as_str).unwrap_or(column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::mapping::MappingFile;
    use sluice_core::TypeKind;
    use sluice_core::{Column, Lsn, OldRow, Position, ReplicaIdentity};

    fn relation() -> Arc<Relation> {
        let column = |name: &str, kind: TypeKind, key: bool| Column {
            name: name.into(),
            type_oid: 0,
            type_modifier: -1,
            is_key: key,
            kind,
        };
        Arc::new(Relation {
            oid: 1,
            namespace: "public".into(),
            name: "customers".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("id", TypeKind::Int8, true),
                column("email", TypeKind::Text, false),
                column("secret", TypeKind::Text, false),
                column("status", TypeKind::Text, false),
                column("bio", TypeKind::Text, false),
            ],
        })
    }

    /// The test mapping with `top` keys before the tables and `extra` tables after.
    fn translator(top: &str, extra: &str) -> PgTranslator {
        let mapping = PgMapping::parse(&format!(
            "{top}\n[[tables]]\nsource = \"public.customers\"\ntarget = \"v2.customers\"\nrename = {{ email = \"email_address\", id = \"customer_id\" }}\n\
             drop = [\"secret\"]\nconstants = {{ origin = \"legacy\" }}\nfilter = [{{ column = \"status\", op = \"ne\", value = \"deleted\" }}]\n{extra}"
        ))
        .unwrap();
        PgTranslator::new(
            &mapping,
            &HashMap::from([("v2.customers".to_owned(), vec!["customer_id".to_owned()])]),
        )
    }

    fn row(id: i64, email: &str, status: &str) -> Vec<Value> {
        vec![
            Value::Int8(id),
            Value::Text(email.into()),
            Value::Text("pw".into()),
            Value::Text(status.into()),
            Value::Null,
        ]
    }

    fn at(ordinal: u32) -> Position {
        Position { commit_lsn: Lsn(0x100), tx_ordinal: ordinal }
    }

    fn text(name: &str, value: &str) -> (String, Text) {
        (name.into(), Some(value.into()))
    }

    fn ops(event: ChangeEvent) -> Vec<RowOp> {
        let mut out = Vec::new();
        translator("", "").translate(&event, &mut out).unwrap();
        out
    }

    #[test]
    fn an_insert_becomes_an_upsert_renamed_without_dropped_columns_and_with_constants() {
        let out = ops(ChangeEvent::Insert {
            position: at(1),
            relation: relation(),
            new: row(7, "a@x", "active"),
            snapshot: false,
        });
        assert_eq!(
            out,
            vec![RowOp::Upsert {
                table: "v2.customers".into(),
                columns: vec![
                    text("customer_id", "7"),
                    text("email_address", "a@x"),
                    text("status", "active"),
                    ("bio".into(), None),
                    text("origin", "legacy")
                ],
            }]
        );
    }

    #[test]
    fn a_key_change_deletes_the_old_key_and_a_partial_update_sets_only_present_columns() {
        let mut partial: Vec<Option<Value>> = row(8, "b@x", "active").into_iter().map(Some).collect();
        partial[4] = None;
        let out = ops(ChangeEvent::Update {
            position: at(1),
            relation: relation(),
            old: Some(OldRow::Key(row(7, "", ""))),
            new: NewRow::Partial(partial),
        });
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0],
            RowOp::Delete { table: "v2.customers".into(), key: vec![text("customer_id", "7")] }
        );
        let RowOp::Update { key, set, .. } = &out[1] else { panic!("{out:?}") };
        assert_eq!(key, &vec![text("customer_id", "8")]);
        assert_eq!(
            set.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            ["email_address", "status", "origin"]
        );
    }

    #[test]
    fn a_row_leaving_the_filter_is_deleted_and_one_outside_it_is_never_written() {
        let out = ops(ChangeEvent::Update {
            position: at(1),
            relation: relation(),
            old: None,
            new: NewRow::Full(row(7, "a@x", "deleted")),
        });
        assert_eq!(
            out,
            vec![RowOp::Delete { table: "v2.customers".into(), key: vec![text("customer_id", "7")] }]
        );
        assert!(ops(ChangeEvent::Insert {
            position: at(1),
            relation: relation(),
            new: row(7, "a@x", "deleted"),
            snapshot: false
        })
        .is_empty());
    }

    #[test]
    fn truncate_follows_the_policy_and_is_refused_for_a_shared_target() {
        let event = ChangeEvent::Truncate {
            position: at(1),
            relations: vec![relation()],
            cascade: false,
            restart_identity: false,
        };
        assert_eq!(ops(event.clone()), vec![RowOp::Truncate { table: "v2.customers".into() }]);
        let mut out = Vec::new();
        assert!(
            translator("on_truncate = \"ignore\"", "").translate(&event, &mut out).is_ok() && out.is_empty()
        );
        let shared = translator("", "[[tables]]\nsource = \"public.leads\"\ntarget = \"v2.customers\"\n");
        assert!(matches!(shared.translate(&event, &mut out), Err(TranslateError::Fatal { .. })));
    }

    #[test]
    fn a_null_key_is_poison_naming_the_column() {
        let mut values = row(7, "a@x", "active");
        values[0] = Value::Null;
        let mut out = Vec::new();
        let error = translator("", "")
            .translate(
                &ChangeEvent::Delete { position: at(1), relation: relation(), old: OldRow::Key(values) },
                &mut out,
            )
            .unwrap_err();
        assert!(
            matches!(&error, TranslateError::Poison { column: Some(c), .. } if c == "customer_id"),
            "{error:?}"
        );
    }

    #[test]
    fn bad_mappings_name_the_key() {
        let problems = PgMapping::parse("[[tables]]\nsource = \"customers\"\ntarget = \"v2.customers\"\nrename = { a = \"x\", b = \"x\" }\n").unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert!(
            keys.contains(&"mapping.tables[0].source") && keys.contains(&"mapping.tables[0].rename.b"),
            "{problems:?}"
        );
        assert!(PgMapping::parse("[[tables]]\nsource = \"public.a\"\ntarget = \"v2.a\"\nkey = [\"id\"]\n")
            .is_err());
    }

    /// The new table's columns, as the forward mapping writes them.
    fn new_relation() -> Arc<Relation> {
        let column = |name: &str, key: bool| Column {
            name: name.into(),
            type_oid: 0,
            type_modifier: -1,
            is_key: key,
            kind: TypeKind::Text,
        };
        Arc::new(Relation {
            oid: 2,
            namespace: "v2".into(),
            name: "customers".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("customer_id", true),
                column("email_address", false),
                column("status", false),
                column("bio", false),
                column("origin", false),
            ],
        })
    }

    fn inverted() -> PgTranslator {
        let forward = PgMapping::parse(
            "[[tables]]\nsource = \"public.customers\"\ntarget = \"v2.customers\"\nrename = { email = \"email_address\", id = \"customer_id\" }\n\
             drop = [\"secret\"]\nconstants = { origin = \"legacy\" }\nfilter = [{ column = \"status\", op = \"ne\", value = \"deleted\" }]\n",
        )
        .unwrap();
        PgTranslator::new(
            &forward.inverted().unwrap(),
            &HashMap::from([("public.customers".to_owned(), vec!["id".to_owned()])]),
        )
    }

    #[test]
    fn the_way_back_renames_back_drops_the_constant_and_refuses_rows_outside_the_filter() {
        let new = |status: &str| {
            vec![
                Value::Text("7".into()),
                Value::Text("a@x".into()),
                Value::Text(status.into()),
                Value::Null,
                Value::Text("legacy".into()),
            ]
        };
        let mut out = Vec::new();
        let back = inverted();
        back.translate(
            &ChangeEvent::Insert {
                position: at(1),
                relation: new_relation(),
                new: new("active"),
                snapshot: false,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            vec![RowOp::Upsert {
                table: "public.customers".into(),
                columns: vec![
                    text("id", "7"),
                    text("email", "a@x"),
                    text("status", "active"),
                    ("bio".into(), None)
                ],
            }]
        );
        // A row the forward filter would never have written is not deleted from the old
        // table: it is refused, for the dead-letter store.
        out.clear();
        let refused = back
            .translate(
                &ChangeEvent::Update {
                    position: at(2),
                    relation: new_relation(),
                    old: None,
                    new: NewRow::Full(new("deleted")),
                },
                &mut out,
            )
            .unwrap_err();
        assert!(
            matches!(&refused, TranslateError::Poison { table, .. } if table == "v2.customers"),
            "{refused:?}"
        );
        assert!(out.is_empty(), "{out:?}");
        // A delete carries the key only: deleted by the old key.
        back.translate(
            &ChangeEvent::Delete {
                position: at(3),
                relation: new_relation(),
                old: OldRow::Key(new("active")),
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(out, vec![RowOp::Delete { table: "public.customers".into(), key: vec![text("id", "7")] }]);
    }

    #[test]
    fn mappings_the_way_back_cannot_invert_are_named() {
        let shared = PgMapping::parse(
            "[[tables]]\nsource = \"public.a\"\ntarget = \"v2.all\"\nconstants = { kind = \"a\" }\n\
             [[tables]]\nsource = \"public.b\"\ntarget = \"v2.all\"\nconstants = { kind = \"b\" }\n\
             [[tables]]\nsource = \"public.c\"\ntarget = \"v2.c\"\ndrop = [\"flag\"]\nfilter = [{ column = \"flag\", op = \"is_null\" }]\n",
        )
        .unwrap();
        let problems = shared.inverted().unwrap_err();
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 3, "{text:?}");
        assert!(
            text[0].contains("mapping.tables[0].target") && text[0].contains("public.a and public.b"),
            "{text:?}"
        );
        assert!(
            text[2].contains("mapping.tables[2].filter[0].column") && text[2].contains("flag"),
            "{text:?}"
        );
    }
}
