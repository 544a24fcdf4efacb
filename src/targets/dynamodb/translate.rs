//! Change events → position-guarded DynamoDB writes, through a `Mapping`. Pure: no I/O, no
//! clock (the caller passes the time for tombstone TTLs).
//!
//! - insert, update with a full row → Put of the whole item;
//! - update with unchanged TOAST columns → Update of the present columns only (the stored
//!   values of the others stay);
//! - update that changes the key template's output → Delete of the old item, Put of the new;
//! - delete, or a row leaving the filter → a tombstone Put (or a Delete without tombstones);
//! - every write carries the change's position as its version: `commit_lsn · 2³² + ordinal`.

use std::collections::{HashMap, HashSet};

use sluice_dynamodb::{Attr, GuardedWrite, Item, WriteAction};

use super::attrs::{constant_attr, to_attr, version};
use super::config::DynamoConfig;
use super::mapping::{parse_template, Mapping, Segment, TableMapping, TruncatePolicy};
use crate::error::TargetError;
use crate::translate::filter::passes_filter;
use crate::translate::mapping::MappingFile;
use crate::translate::outbox::{OutboxConfig, Routed};
use crate::translate::{text_of, Context, TranslateError, Translator};
use sluice_core::{ChangeEvent, Column, NewRow, Position, Relation, Value};

struct CompiledTable {
    mapping: TableMapping,
    partition_key: Vec<Segment>,
    sort_key: Option<Vec<Segment>>,
    dropped: HashSet<String>,
}

pub struct MappingTranslator {
    tables: HashMap<String, CompiledTable>,
    version_attribute: String,
    tombstones: super::mapping::Tombstones,
    on_truncate: TruncatePolicy,
}

/// A row as the translator sees it: values by column name; `None` for unchanged TOAST.
struct Row<'a> {
    relation: &'a Relation,
    values: Vec<Option<&'a Value>>,
}

impl<'a> Row<'a> {
    fn full(relation: &'a Relation, values: &'a [Value]) -> Self {
        Row { relation, values: values.iter().map(Some).collect() }
    }

    fn get(&self, column: &str) -> Option<Option<&'a Value>> {
        let index = self.relation.columns.iter().position(|c| c.name == column)?;
        Some(self.values[index])
    }

    fn columns(&self) -> impl Iterator<Item = (&'a Column, Option<&'a Value>)> + '_ {
        self.relation.columns.iter().zip(self.values.iter().copied())
    }
}

impl MappingTranslator {
    /// Compiles a validated mapping.
    pub fn new(mapping: &Mapping) -> Self {
        let tables = mapping
            .tables
            .iter()
            .map(|t| {
                let compiled = CompiledTable {
                    partition_key: parse_template(&t.partition_key.template).expect("validated template"),
                    sort_key: t
                        .sort_key
                        .as_ref()
                        .map(|k| parse_template(&k.template).expect("validated template")),
                    dropped: t.drop.iter().cloned().collect(),
                    mapping: t.clone(),
                };
                (t.source.clone(), compiled)
            })
            .collect();
        MappingTranslator {
            tables,
            version_attribute: mapping.version_attribute.clone(),
            tombstones: mapping.tombstones.clone(),
            on_truncate: mapping.on_truncate,
        }
    }

    /// The item key a row of `relation` maps to; None when the table is not mapped or the
    /// key does not render.
    pub fn key_for(&self, relation: &Relation, values: &[Value]) -> Option<Item> {
        let table = self.table(relation)?;
        self.key(table, &Row::full(relation, values)).ok()
    }

    /// The writes for one event, appended to `out`. `now_unix_secs` dates tombstone TTLs.
    pub fn translate(
        &self,
        event: &ChangeEvent,
        now_unix_secs: u64,
        out: &mut Vec<GuardedWrite>,
    ) -> Result<(), TranslateError> {
        match event {
            ChangeEvent::Insert { position, relation, new, .. } => {
                let Some(table) = self.table(relation) else { return Ok(()) };
                let row = Row::full(relation, new);
                if self.passes(table, &row)? {
                    out.push(self.put(table, &row, *position)?);
                }
            }
            ChangeEvent::Update { position, relation, old, new } => {
                let Some(table) = self.table(relation) else { return Ok(()) };
                let row = match new {
                    NewRow::Full(values) => Row::full(relation, values),
                    NewRow::Partial(values) => {
                        Row { relation, values: values.iter().map(Option::as_ref).collect() }
                    }
                };
                let new_key = self.key(table, &row)?;
                if let Some(old) = old {
                    let old_row = Row::full(relation, old.values());
                    let old_key = self.key(table, &old_row).map_err(|e| match e {
                        TranslateError::Poison { table, column, reason } => TranslateError::Poison {
                            table,
                            column,
                            reason: format!(
                                "old key: {reason} (is the column part of the replica identity?)"
                            ),
                        },
                        other => other,
                    })?;
                    if old_key != new_key {
                        out.push(self.delete(table, old_key, *position, now_unix_secs));
                    }
                }
                if !self.passes(table, &row)? {
                    out.push(self.delete(table, new_key, *position, now_unix_secs));
                } else if matches!(new, NewRow::Partial(_)) {
                    out.push(self.partial_update(table, &row, new_key, *position)?);
                } else {
                    out.push(self.put(table, &row, *position)?);
                }
            }
            ChangeEvent::Delete { position, relation, old } => {
                let Some(table) = self.table(relation) else { return Ok(()) };
                let key = self.key(table, &Row::full(relation, old.values()))?;
                out.push(self.delete(table, key, *position, now_unix_secs));
            }
            ChangeEvent::Truncate { relations, .. } => {
                for relation in relations {
                    if self.table(relation).is_some() && self.on_truncate == TruncatePolicy::Error {
                        return Err(TranslateError::Fatal {
                            table: relation.qualified_name(),
                            reason: "TRUNCATE cannot be mirrored item by item; set on_truncate = \"ignore\" in the mapping to skip truncates".into(),
                        });
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

    fn guarded(
        &self,
        table: &CompiledTable,
        key: Item,
        position: Position,
        action: WriteAction,
    ) -> GuardedWrite {
        GuardedWrite {
            table: table.mapping.target.clone(),
            key,
            partition_key: table.mapping.partition_key.attribute.clone(),
            version_attribute: self.version_attribute.clone(),
            version: version(position),
            action,
        }
    }

    fn key(&self, table: &CompiledTable, row: &Row<'_>) -> Result<Item, TranslateError> {
        let mut key = Item::new();
        let m = &table.mapping;
        key.insert(m.partition_key.attribute.clone(), Attr::S(render(&table.partition_key, row, &m.source)?));
        if let (Some(segments), Some(sort)) = (&table.sort_key, &m.sort_key) {
            key.insert(sort.attribute.clone(), Attr::S(render(segments, row, &m.source)?));
        }
        Ok(key)
    }

    fn put(
        &self,
        table: &CompiledTable,
        row: &Row<'_>,
        position: Position,
    ) -> Result<GuardedWrite, TranslateError> {
        let key = self.key(table, row)?;
        let (item, _) = self.attributes(table, row)?;
        Ok(self.guarded(table, key, position, WriteAction::Put(item)))
    }

    fn partial_update(
        &self,
        table: &CompiledTable,
        row: &Row<'_>,
        key: Item,
        position: Position,
    ) -> Result<GuardedWrite, TranslateError> {
        let (mut set, mut remove) = self.attributes(table, row)?;
        for name in key.keys() {
            set.remove(name);
        }
        remove.push(self.tombstones.marker_attribute.clone());
        Ok(self.guarded(table, key, position, WriteAction::Update { set, remove }))
    }

    fn delete(
        &self,
        table: &CompiledTable,
        key: Item,
        position: Position,
        now_unix_secs: u64,
    ) -> GuardedWrite {
        let action = if self.tombstones.enabled {
            let mut item = Item::from([(self.tombstones.marker_attribute.clone(), Attr::Bool(true))]);
            if let Some(ttl) = &self.tombstones.ttl_attribute {
                item.insert(
                    ttl.clone(),
                    Attr::N((now_unix_secs + self.tombstones.ttl.as_secs()).to_string()),
                );
            }
            WriteAction::Put(item)
        } else {
            WriteAction::Delete
        };
        self.guarded(table, key, position, action)
    }

    /// The mapped attributes of the present columns, and the names of NULL columns left out
    /// (a partial update removes those).
    fn attributes(
        &self,
        table: &CompiledTable,
        row: &Row<'_>,
    ) -> Result<(Item, Vec<String>), TranslateError> {
        let m = &table.mapping;
        let mut item = Item::new();
        let mut nulls = Vec::new();
        for (column, value) in row.columns() {
            let Some(value) = value else { continue };
            if table.dropped.contains(&column.name) {
                continue;
            }
            let name = m.rename.get(&column.name).cloned().unwrap_or_else(|| column.name.clone());
            let rule = m.columns.get(&column.name);
            let null_policy = rule.and_then(|r| r.nulls).unwrap_or(m.nulls);
            let kind = rule.and_then(|r| r.as_);
            match to_attr(value, kind, null_policy) {
                Ok(Some(attr)) => {
                    item.insert(name, attr);
                }
                Ok(None) => nulls.push(name),
                Err(reason) => {
                    return Err(TranslateError::Poison {
                        table: m.source.clone(),
                        column: Some(column.name.clone()),
                        reason,
                    })
                }
            }
        }
        for (name, constant) in &m.constants {
            item.insert(name.clone(), constant_attr(constant));
        }
        Ok((item, nulls))
    }

    fn passes(&self, table: &CompiledTable, row: &Row<'_>) -> Result<bool, TranslateError> {
        passes_filter(&table.mapping.filter, &table.mapping.source, row.relation, &row.values)
    }
}

fn render(segments: &[Segment], row: &Row<'_>, table: &str) -> Result<String, TranslateError> {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Literal(text) => out.push_str(text),
            Segment::Column(column) => {
                let poison = |reason: &str| TranslateError::Poison {
                    table: table.to_owned(),
                    column: Some(column.clone()),
                    reason: reason.into(),
                };
                match row.get(column) {
                    None => {
                        return Err(TranslateError::Fatal {
                            table: table.to_owned(),
                            reason: format!("key template column {column} is not in the table"),
                        })
                    }
                    Some(None) => return Err(poison("key column arrived as an unchanged TOAST value")),
                    Some(Some(Value::Null)) => return Err(poison("key column is NULL")),
                    Some(Some(value)) => out.push_str(&text_of(value)),
                }
            }
        }
    }
    Ok(out)
}

/// The DynamoDB target's translator: mapped tables' rows through the mapping, and (with
/// `target.outbox`) outbox events into the event-log table.
pub struct DynamoTranslator {
    /// Mapped tables; `None` when the target only logs outbox events.
    mapping: Option<MappingTranslator>,
    /// The outbox router and the event-log table it writes to.
    outbox: Option<(OutboxConfig, String)>,
}

impl DynamoTranslator {
    /// The translator a DynamoDB target's configuration describes (its mapping file is read).
    pub fn open(config: &DynamoConfig) -> Result<Self, TargetError> {
        let mapping = match &config.mapping {
            Some(path) => {
                Some(MappingTranslator::new(&Mapping::load(path).map_err(|problems| TargetError {
                    target: "dynamodb",
                    kind: crate::error::ErrorKind::Fatal,
                    message: problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                    source: None,
                })?))
            }
            None => None,
        };
        let outbox = config
            .outbox
            .as_ref()
            .and_then(|outbox| outbox.event_table.clone().map(|table| (outbox.clone(), table)));
        Ok(DynamoTranslator { mapping, outbox })
    }
}

impl Translator for DynamoTranslator {
    type Op = GuardedWrite;

    fn translate(
        &mut self,
        event: &ChangeEvent,
        context: &Context,
        out: &mut Vec<GuardedWrite>,
    ) -> Result<(), TranslateError> {
        if let Some((outbox, table)) = &self.outbox {
            let poison = |p: crate::translate::outbox::Poison| TranslateError::Poison {
                table: p.table,
                column: None,
                reason: p.reason,
            };
            match outbox.route(event).map_err(poison)? {
                Routed::Event(routed) => {
                    out.push(super::event_log::event_log_item(&routed, outbox, table).map_err(poison)?);
                    return Ok(());
                }
                Routed::Ignored => return Ok(()),
                Routed::NotOutbox => {}
            }
        }
        match &self.mapping {
            Some(mapping) => mapping.translate(event, context.now_unix_seconds, out),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use proptest::prelude::*;
    use sluice_core::Numeric;
    use sluice_core::TypeKind;

    use super::super::mapping::NullPolicy;
    use super::*;
    use sluice_core::{Lsn, OldRow, ReplicaIdentity, Timestamp};

    const MAPPING: &str = r#"
        [tombstones]
        ttl_attribute = "expires_at"
        ttl = "1h"

        [[tables]]
        source = "public.users"
        target = "app"
        partition_key = { attribute = "pk", template = "USER#{id}" }
        sort_key = { attribute = "sk", template = "PROFILE" }
        drop = ["password_hash"]
        rename = { email = "emailAddress" }
        constants = { entity = "User" }
        filter = [{ column = "status", op = "ne", value = "deleted" }]
        columns = { balance = { as = "string" }, seen_at = { as = "epoch_millis" }, tags = { as = "set" } }

        [[tables]]
        source = "public.orders"
        target = "app"
        partition_key = { attribute = "pk", template = "USER#{user_id}" }
        sort_key = { attribute = "sk", template = "ORDER#{id}" }
        constants = { entity = "Order" }
    "#;

    fn translator() -> MappingTranslator {
        MappingTranslator::new(&Mapping::parse(MAPPING).unwrap())
    }

    fn column(name: &str, kind: TypeKind, is_key: bool) -> Column {
        Column { name: name.into(), type_oid: 0, type_modifier: -1, is_key, kind }
    }

    fn users() -> Arc<Relation> {
        Arc::new(Relation {
            oid: 1,
            namespace: "public".into(),
            name: "users".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("id", TypeKind::Int8, true),
                column("email", TypeKind::Text, false),
                column("password_hash", TypeKind::Text, false),
                column("status", TypeKind::Text, false),
                column("balance", TypeKind::Numeric, false),
                column("seen_at", TypeKind::TimestampTz, false),
                column(
                    "tags",
                    TypeKind::Array { element: Box::new(TypeKind::Text), element_oid: 25, delimiter: b',' },
                    false,
                ),
                column("bio", TypeKind::Text, false),
            ],
        })
    }

    fn user_row(id: i64, status: &str) -> Vec<Value> {
        vec![
            Value::Int8(id),
            Value::Text("a@x".into()),
            Value::Text("secret".into()),
            Value::Text(status.into()),
            Value::Numeric(Numeric::Finite("12.50".into())),
            Value::TimestampTz(Timestamp(1_000_000)),
            Value::Array(vec![Value::Text("b".into()), Value::Text("a".into()), Value::Text("b".into())]),
            Value::Null,
        ]
    }

    fn at(lsn: u64, ordinal: u32) -> Position {
        Position { commit_lsn: Lsn(lsn), tx_ordinal: ordinal }
    }

    fn translate(event: &ChangeEvent) -> Result<Vec<GuardedWrite>, TranslateError> {
        let mut out = Vec::new();
        translator().translate(event, 1_000, &mut out).map(|()| out)
    }

    fn s(v: &str) -> Attr {
        Attr::S(v.into())
    }

    fn user_key(id: i64) -> Item {
        Item::from([("pk".to_string(), s(&format!("USER#{id}"))), ("sk".to_string(), s("PROFILE"))])
    }

    #[test]
    fn insert_becomes_a_guarded_put_of_the_mapped_item() {
        let writes = translate(&ChangeEvent::Insert {
            position: at(0x10, 2),
            relation: users(),
            new: user_row(7, "active"),
            snapshot: false,
        })
        .unwrap();
        let expected_item = Item::from([
            ("id".to_string(), Attr::N("7".into())),
            ("emailAddress".to_string(), s("a@x")),
            ("status".to_string(), s("active")),
            ("balance".to_string(), s("12.50")),
            ("seen_at".to_string(), Attr::N("946684801000".into())),
            ("tags".to_string(), Attr::Ss(vec!["a".into(), "b".into()])),
            ("entity".to_string(), s("User")),
        ]);
        assert_eq!(
            writes,
            vec![GuardedWrite {
                table: "app".into(),
                key: user_key(7),
                partition_key: "pk".into(),
                version_attribute: "_version".into(),
                version: ((0x10u128 << 32) | 2).to_string(),
                action: WriteAction::Put(expected_item),
            }]
        );
    }

    #[test]
    fn key_change_deletes_the_old_item_and_puts_the_new() {
        let mut old = vec![Value::Null; 8];
        old[0] = Value::Int8(7);
        let writes = translate(&ChangeEvent::Update {
            position: at(0x20, 1),
            relation: users(),
            old: Some(OldRow::Key(old)),
            new: NewRow::Full(user_row(8, "active")),
        })
        .unwrap();
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[0].key, user_key(7));
        assert_eq!(
            writes[0].action,
            WriteAction::Put(Item::from([
                ("_deleted".to_string(), Attr::Bool(true)),
                ("expires_at".to_string(), Attr::N("4600".into()))
            ]))
        );
        assert_eq!(writes[1].key, user_key(8));
        assert!(matches!(writes[1].action, WriteAction::Put(_)));
    }

    #[test]
    fn unchanged_toast_updates_only_the_present_columns() {
        let mut values: Vec<Option<Value>> = user_row(7, "active").into_iter().map(Some).collect();
        values[7] = None;
        values[1] = Some(Value::Null);
        let writes = translate(&ChangeEvent::Update {
            position: at(0x20, 1),
            relation: users(),
            old: None,
            new: NewRow::Partial(values),
        })
        .unwrap();
        let WriteAction::Update { set, remove } = &writes[0].action else {
            panic!("expected an update: {writes:?}")
        };
        assert!(!set.contains_key("bio") && !set.contains_key("pk") && set.contains_key("status"));
        assert_eq!(
            remove,
            &vec!["emailAddress".to_string(), "_deleted".to_string()],
            "a NULL column is removed, the tombstone marker too"
        );
    }

    #[test]
    fn leaving_the_filter_deletes_the_item_and_filtered_inserts_write_nothing() {
        let writes = translate(&ChangeEvent::Update {
            position: at(0x30, 1),
            relation: users(),
            old: None,
            new: NewRow::Full(user_row(7, "deleted")),
        })
        .unwrap();
        assert_eq!(writes.len(), 1);
        assert!(matches!(&writes[0].action, WriteAction::Put(item) if item.contains_key("_deleted")));
        assert!(translate(&ChangeEvent::Insert {
            position: at(0x30, 1),
            relation: users(),
            new: user_row(7, "deleted"),
            snapshot: false
        })
        .unwrap()
        .is_empty());
    }

    #[test]
    fn numeric_past_38_digits_is_poison_naming_the_column() {
        let relation = Arc::new(Relation {
            name: "orders".into(),
            columns: vec![
                column("id", TypeKind::Int8, true),
                column("user_id", TypeKind::Int8, false),
                column("total", TypeKind::Numeric, false),
            ],
            ..(*users()).clone()
        });
        let big = Value::Numeric(Numeric::Finite("1234567890123456789012345678901234567890".into()));
        let err = translate(&ChangeEvent::Insert {
            position: at(1, 1),
            relation,
            new: vec![Value::Int8(1), Value::Int8(2), big],
            snapshot: false,
        })
        .unwrap_err();
        assert_eq!(
            err,
            TranslateError::Poison {
                table: "public.orders".into(),
                column: Some("total".into()),
                reason: "39 significant digits exceed DynamoDB's 38; map the column with as = \"string\""
                    .into()
            }
        );
    }

    #[test]
    fn two_tables_share_one_target_table_with_their_own_keys() {
        let relation = Arc::new(Relation {
            name: "orders".into(),
            columns: vec![column("id", TypeKind::Int8, true), column("user_id", TypeKind::Int8, false)],
            ..(*users()).clone()
        });
        let writes = translate(&ChangeEvent::Insert {
            position: at(1, 1),
            relation,
            new: vec![Value::Int8(3), Value::Int8(7)],
            snapshot: false,
        })
        .unwrap();
        assert_eq!(writes[0].table, "app");
        assert_eq!(
            writes[0].key,
            Item::from([("pk".to_string(), s("USER#7")), ("sk".to_string(), s("ORDER#3"))])
        );
    }

    #[test]
    fn truncate_of_a_mapped_table_stops_by_default() {
        let err = translate(&ChangeEvent::Truncate {
            position: at(1, 1),
            relations: vec![users()],
            cascade: false,
            restart_identity: false,
        })
        .unwrap_err();
        assert!(matches!(err, TranslateError::Fatal { ref table, .. } if table == "public.users"));
    }

    #[test]
    fn json_becomes_nested_maps_with_exact_numbers() {
        let attr = to_attr(
            &Value::Json(r#"{"a": [1, 12345678901234567890.5, null], "b": {"c": true}}"#.into()),
            None,
            NullPolicy::Omit,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            attr,
            Attr::M(BTreeMap::from([
                (
                    "a".to_string(),
                    Attr::L(vec![Attr::N("1".into()), Attr::N("12345678901234567890.5".into()), Attr::Null])
                ),
                ("b".to_string(), Attr::M(BTreeMap::from([("c".to_string(), Attr::Bool(true))]))),
            ]))
        );
    }

    proptest! {
        #[test]
        fn versions_order_exactly_as_positions(a in any::<(u64, u32)>(), b in any::<(u64, u32)>()) {
            let (pa, pb) = (at(a.0, a.1), at(b.0, b.1));
            let (va, vb) = (version(pa).parse::<u128>().unwrap(), version(pb).parse::<u128>().unwrap());
            prop_assert_eq!(pa.cmp(&pb), va.cmp(&vb));
            prop_assert!(version(pa).len() <= 38, "fits a DynamoDB number");
        }

        #[test]
        fn puts_hold_every_kept_non_null_column(id in any::<i64>(), email in proptest::option::of(".*"), status in "[a-z]{1,8}") {
            let mut row = user_row(id, &status);
            row[1] = email.clone().map_or(Value::Null, Value::Text);
            let writes = translate(&ChangeEvent::Insert { position: at(1, 1), relation: users(), new: row, snapshot: false }).unwrap();
            if status == "deleted" {
                prop_assert!(writes.is_empty());
            } else {
                let WriteAction::Put(item) = &writes[0].action else { panic!() };
                prop_assert_eq!(item.get("emailAddress").cloned(), email.map(Attr::S));
                prop_assert!(!item.contains_key("password_hash") && !item.contains_key("bio"));
                prop_assert_eq!(&writes[0].key["pk"], &Attr::S(format!("USER#{id}")));
            }
        }
    }
}
