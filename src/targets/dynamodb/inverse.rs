//! The DynamoDB mapping read backwards: a DynamoDB Streams record of a mapped table → row
//! operations on the old Postgres table the item came from (the way back after a cutover).
//! Pure: no I/O.
//!
//! - **Which table.** Of the mapping's tables that write to the record's DynamoDB table, the
//!   one whose key templates fit the item's key (literal parts checked) and whose constants
//!   the item carries (`entity = "Order"`). None: an item of another writer in a shared table,
//!   skipped and counted. Several: the record cannot be placed, and is dead-lettered
//!   (`validate` names mappings whose keys nothing tells apart).
//! - **Columns.** Key columns are parsed back out of the key templates (`CUSTOMER#{id}` →
//!   `id`); every other column from its attribute (its name, or its `rename`), converted back
//!   by the column's type and `as` rule (epoch millis → timestamp, set → array, map → jsonb,
//!   number → numeric). Constants, the version, tombstone and TTL attributes, and attributes
//!   no column maps to are left behind; dropped columns are not written (an update keeps the
//!   stored value, an insert gets the column's default).
//! - **No loops.** A record whose version attribute increased is sluice's own forward write,
//!   and is skipped: the application's writes never set it (the one edge: an application
//!   that writes the version attribute itself looks like sluice). A tombstone's removal (its
//!   TTL) is not a delete of the application.
//! - **Operations.** INSERT and MODIFY → an upsert of the mapped columns; REMOVE, or a
//!   tombstone written by another writer → a delete by the old table's key; a MODIFY that
//!   changes no mapped column → nothing; a row the forward filter would never have written →
//!   dead-lettered, never deleted.
//!
//! Errors name the table, the attribute and the types, never a value.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sluice_core::{Relation, TypeKind, Value};
use sluice_dynamodb::streams::{RecordEvent, StreamRecord};
use sluice_dynamodb::{Attr, Item};
use sluice_postgres::catalog::Table;

use super::attrs::constant_attr;
use super::mapping::{
    key_templates, match_template, parse_template, AttrKind, Mapping, Segment, TableMapping,
};
use crate::targets::postgres::translate::{RowOp, Text};
use crate::translate::filter::passes_filter;
use crate::translate::{iso, text_of};

/// What one stream record means for the old tables.
#[derive(Debug, PartialEq)]
pub(crate) enum Inverse {
    /// sluice's own forward write (its version attribute increased): not sent back.
    Own,
    /// No mapped table fits the item: another writer's item in a shared table.
    Foreign,
    /// Nothing mapped changed (a MODIFY of unmapped attributes, a tombstone's expiry).
    Unchanged,
    /// Row operations on this old table, in order.
    Apply(Arc<str>, Vec<RowOp>),
}

/// A record that can never be mapped back: it goes to the dead-letter store. Names the old
/// table when one was found, and never a value.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{}{reason}", table.as_deref().map(|t| format!("table {t}: ")).unwrap_or_default())]
pub(crate) struct Unmappable {
    /// The old table, when the record was placed.
    pub table: Option<String>,
    /// Why.
    pub reason: String,
}

impl Unmappable {
    fn of(table: &InverseTable, reason: impl Into<String>) -> Self {
        Unmappable { table: Some(table.old.to_string()), reason: reason.into() }
    }
}

/// One old table's column as the way back writes it.
#[derive(Debug)]
struct ColumnBack {
    name: String,
    /// The attribute it was written to (its rename, or its name).
    attribute: String,
    kind: TypeKind,
    rule: Option<AttrKind>,
    /// Dropped by the mapping: only a key template may give it back.
    dropped: bool,
}

#[derive(Debug)]
struct InverseTable {
    mapping: TableMapping,
    old: Arc<str>,
    /// (attribute, template) of the partition key, then the sort key.
    keys: Vec<(String, Vec<Segment>)>,
    relation: Relation,
    /// The old table's primary key columns.
    primary_key: Vec<String>,
    columns: Vec<ColumnBack>,
}

/// The mapping read backwards, with the old tables' catalog.
#[derive(Debug)]
pub(crate) struct InverseMapping {
    version_attribute: String,
    /// The tombstone marker, when the mapping writes tombstones.
    marker: Option<String>,
    /// DynamoDB table → the mapped tables that write to it.
    by_target: HashMap<String, Vec<InverseTable>>,
}

impl InverseMapping {
    /// Compiles a validated mapping against the old tables (`schema.table` → catalog); a table
    /// missing from `old_tables`, or without a primary key, is an error naming it.
    pub(crate) fn new(mapping: &Mapping, old_tables: &HashMap<String, Table>) -> Result<Self, String> {
        let mut by_target: HashMap<String, Vec<InverseTable>> = HashMap::new();
        for table in &mapping.tables {
            let old = old_tables
                .get(&table.source)
                .ok_or_else(|| format!("table {} is not in the old database's catalog", table.source))?;
            if old.primary_key.is_empty() {
                return Err(format!(
                    "table {} has no primary key: the way back updates and deletes its rows by it",
                    table.source
                ));
            }
            let keys = key_templates(table)
                .into_iter()
                .map(|(attribute, template)| {
                    parse_template(template).map(|segments| (attribute.clone(), segments))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let columns = old
                .relation
                .columns
                .iter()
                .map(|c| ColumnBack {
                    name: c.name.clone(),
                    attribute: table.rename.get(&c.name).cloned().unwrap_or_else(|| c.name.clone()),
                    kind: c.kind.clone(),
                    rule: table.columns.get(&c.name).and_then(|r| r.as_),
                    dropped: table.drop.contains(&c.name),
                })
                .collect();
            by_target.entry(table.target.clone()).or_default().push(InverseTable {
                mapping: table.clone(),
                old: Arc::from(table.source.as_str()),
                keys,
                relation: old.relation.clone(),
                primary_key: old.primary_key.iter().map(|&i| old.relation.columns[i].name.clone()).collect(),
                columns,
            });
        }
        Ok(InverseMapping {
            version_attribute: mapping.version_attribute.clone(),
            marker: mapping.tombstones.enabled.then(|| mapping.tombstones.marker_attribute.clone()),
            by_target,
        })
    }

    /// The DynamoDB tables the mapping writes to.
    pub(crate) fn dynamodb_tables(&self) -> Vec<&str> {
        let mut tables: Vec<&str> = self.by_target.keys().map(String::as_str).collect();
        tables.sort_unstable();
        tables
    }

    /// What `record`, read from the stream of `dynamodb_table`, means for the old tables.
    pub(crate) fn invert(&self, dynamodb_table: &str, record: &StreamRecord) -> Result<Inverse, Unmappable> {
        let Some(candidates) = self.by_target.get(dynamodb_table) else { return Ok(Inverse::Foreign) };
        let version =
            |image: Option<&Item>| image.and_then(|i| i.get(&self.version_attribute)).and_then(number);
        let (old_version, new_version) =
            (version(record.old_image.as_ref()), version(record.new_image.as_ref()));
        if new_version.is_some() && new_version > old_version {
            return Ok(Inverse::Own);
        }
        let old_tombstone = record.old_image.as_ref().is_some_and(|i| self.is_tombstone(i));
        let (image, removed) = match record.event {
            RecordEvent::Insert | RecordEvent::Modify => {
                let image = record.new_image.as_ref().unwrap_or(&record.keys);
                if self.is_tombstone(image) {
                    if old_tombstone || record.event == RecordEvent::Insert {
                        // Nothing lived there, nothing to delete.
                        return Ok(Inverse::Unchanged);
                    }
                    (image, true)
                } else {
                    (image, false)
                }
            }
            // A tombstone removed (by its TTL, or by hand): the row was deleted long before.
            RecordEvent::Remove if old_tombstone => return Ok(Inverse::Unchanged),
            RecordEvent::Remove => (record.old_image.as_ref().unwrap_or(&record.keys), true),
        };
        let Some(table) = self.place(candidates, image)? else { return Ok(Inverse::Foreign) };
        if let Some(attribute) = &record.unsupported {
            return Err(Unmappable::of(
                table,
                format!("attribute {attribute} has a type the way back does not convert (a binary set)"),
            ));
        }
        let key = table.key_of(image)?;
        if removed {
            return Ok(Inverse::Apply(
                Arc::clone(&table.old),
                vec![RowOp::Delete { table: Arc::clone(&table.old), key }],
            ));
        }
        let row = table.row_of(image)?;
        if !table.passes_filter(&row)? {
            return Err(Unmappable::of(
                table,
                "the row does not pass the mapping's filter: the forward direction would never have written it, \
                 so the way back does not either",
            ));
        }
        let mut ops = Vec::new();
        if record.event == RecordEvent::Modify {
            if let Some(before) = record.old_image.as_ref().filter(|_| !old_tombstone) {
                if let Ok(old_row) = table.row_of(before) {
                    if old_row == row {
                        return Ok(Inverse::Unchanged);
                    }
                }
                if let Ok(old_key) = table.key_of(before) {
                    if old_key != key {
                        ops.push(RowOp::Delete { table: Arc::clone(&table.old), key: old_key });
                    }
                }
            }
        }
        ops.push(RowOp::Upsert { table: Arc::clone(&table.old), columns: row });
        Ok(Inverse::Apply(Arc::clone(&table.old), ops))
    }

    fn is_tombstone(&self, item: &Item) -> bool {
        self.marker.as_ref().is_some_and(|m| item.get(m) == Some(&Attr::Bool(true)))
    }

    /// The one mapped table whose key templates and constants fit `item`; `None` when none
    /// does.
    fn place<'a>(
        &self,
        candidates: &'a [InverseTable],
        item: &Item,
    ) -> Result<Option<&'a InverseTable>, Unmappable> {
        let fitting: Vec<&InverseTable> =
            candidates.iter().filter(|t| t.key_fits(item) && t.constants_fit(item)).collect();
        match fitting.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            several => Err(Unmappable {
                table: None,
                reason: format!(
                    "the item's key fits the key templates of {}, and no constant tells them apart",
                    several.iter().map(|t| t.old.as_ref()).collect::<Vec<_>>().join(" and ")
                ),
            }),
        }
    }
}

impl InverseTable {
    fn key_fits(&self, item: &Item) -> bool {
        self.keys.iter().all(|(attribute, segments)| match item.get(attribute) {
            Some(Attr::S(text)) => match_template(segments, text).is_some(),
            _ => false,
        })
    }

    /// The constants the item carries equal the mapping's (a key-only image carries none).
    fn constants_fit(&self, item: &Item) -> bool {
        self.mapping.constants.iter().all(|(name, constant)| match item.get(name) {
            None => true,
            Some(attr) => same_attr(attr, &constant_attr(constant)),
        })
    }

    /// Column → text from the key templates; a column two templates give differently is an
    /// error.
    fn template_values(&self, item: &Item) -> Result<BTreeMap<String, String>, Unmappable> {
        let mut values = BTreeMap::new();
        for (attribute, segments) in &self.keys {
            let Some(Attr::S(text)) = item.get(attribute) else {
                return Err(Unmappable::of(
                    self,
                    format!("key attribute {attribute} is missing or not a string"),
                ));
            };
            let found = match_template(segments, text).ok_or_else(|| {
                Unmappable::of(self, format!("key attribute {attribute} does not fit its template"))
            })?;
            for (column, value) in found {
                if values.get(&column).is_some_and(|v| *v != value) {
                    return Err(Unmappable::of(
                        self,
                        format!("the key templates give column {column} two different values"),
                    ));
                }
                values.insert(column, value);
            }
        }
        Ok(values)
    }

    /// The old table's primary key of `item`, in key order.
    fn key_of(&self, item: &Item) -> Result<Vec<(String, Text)>, Unmappable> {
        let from_templates = self.template_values(item)?;
        self.primary_key
            .iter()
            .map(|name| {
                let column = self.columns.iter().find(|c| &c.name == name).expect("a column of the table");
                let text = match (from_templates.get(name), item.get(&column.attribute)) {
                    (Some(text), _) => Some(text.clone()),
                    (None, Some(attr)) if !column.dropped => self.convert(column, attr)?,
                    _ => None,
                };
                match text {
                    Some(text) => Ok((name.clone(), Some(text))),
                    None => Err(Unmappable::of(
                        self,
                        format!("key column {name} is in no key template and not in the item"),
                    )),
                }
            })
            .collect()
    }

    /// Every column the way back writes, in the table's order: the attributes converted back,
    /// key template columns from the key; a missing attribute is NULL (the forward mapping
    /// leaves NULLs out).
    fn row_of(&self, item: &Item) -> Result<Vec<(String, Text)>, Unmappable> {
        let from_templates = self.template_values(item)?;
        let mut row = Vec::with_capacity(self.columns.len());
        for column in &self.columns {
            let text = match (column.dropped, item.get(&column.attribute), from_templates.get(&column.name)) {
                (false, Some(attr), _) => self.convert(column, attr)?,
                (_, _, Some(text)) => Some(text.clone()),
                (true, _, None) => continue,
                (false, None, None) => None,
            };
            row.push((column.name.clone(), text));
        }
        Ok(row)
    }

    fn convert(&self, column: &ColumnBack, attr: &Attr) -> Result<Text, Unmappable> {
        text_back(attr, &column.kind, column.rule).map_err(|reason| {
            Unmappable::of(self, format!("column {} (attribute {}): {reason}", column.name, column.attribute))
        })
    }

    fn passes_filter(&self, row: &[(String, Text)]) -> Result<bool, Unmappable> {
        if self.mapping.filter.is_empty() {
            return Ok(true);
        }
        let values: Vec<Value> = self
            .relation
            .columns
            .iter()
            .map(|c| match row.iter().find(|(name, _)| *name == c.name).and_then(|(_, t)| t.as_deref()) {
                None => Value::Null,
                Some(text) => filter_value(text, &c.kind),
            })
            .collect();
        let present: Vec<Option<&Value>> = values.iter().map(Some).collect();
        passes_filter(&self.mapping.filter, &self.mapping.source, &self.relation, &present)
            .map_err(|e| Unmappable::of(self, e.to_string()))
    }
}

/// A column's value for the filter's comparisons, from its text.
fn filter_value(text: &str, kind: &TypeKind) -> Value {
    match kind {
        TypeKind::Bool => match text {
            "true" | "t" => Value::Bool(true),
            "false" | "f" => Value::Bool(false),
            _ => Value::Text(text.to_owned()),
        },
        TypeKind::Int2 | TypeKind::Int4 | TypeKind::Int8 => {
            text.parse().map(Value::Int8).unwrap_or_else(|_| Value::Text(text.to_owned()))
        }
        _ => Value::Text(text.to_owned()),
    }
}

/// A number attribute as an unsigned version.
fn number(attr: &Attr) -> Option<u128> {
    match attr {
        Attr::N(n) => n.parse().ok(),
        _ => None,
    }
}

/// Equal as DynamoDB compares them (numbers by value).
fn same_attr(a: &Attr, b: &Attr) -> bool {
    match (a, b) {
        (Attr::N(x), Attr::N(y)) => {
            x == y || matches!((x.parse::<f64>(), y.parse::<f64>()), (Ok(x), Ok(y)) if x == y)
        }
        _ => a == b,
    }
}

/// The descriptor of an attribute's type, for messages.
fn descriptor(attr: &Attr) -> &'static str {
    match attr {
        Attr::S(_) => "S",
        Attr::N(_) => "N",
        Attr::B(_) => "B",
        Attr::Bool(_) => "BOOL",
        Attr::Null => "NULL",
        Attr::L(_) => "L",
        Attr::M(_) => "M",
        Attr::Ss(_) => "SS",
        Attr::Ns(_) => "NS",
    }
}

const MILLIS_PER_DAY: i64 = 86_400_000;
/// Days from 1970-01-01 to 2000-01-01, Postgres' epoch.
const UNIX_TO_PG_DAYS: i64 = 10_957;

/// An attribute back as Postgres text for a column of type `kind` written with `rule`: the
/// inverse of `attrs::to_attr`. `None` is NULL.
pub(crate) fn text_back(attr: &Attr, kind: &TypeKind, rule: Option<AttrKind>) -> Result<Text, String> {
    use TypeKind as K;
    let wrong = || {
        Err(format!(
            "a {} attribute does not convert back to the column's type{}",
            descriptor(attr),
            rule.map(|r| format!(" (as = {r:?})")).unwrap_or_default()
        ))
    };
    Ok(Some(match (attr, kind) {
        (Attr::Null, _) => return Ok(None),
        (Attr::S(s), _) if rule == Some(AttrKind::String) => s.clone(),
        (_, K::Json | K::Jsonb) => attr_json(attr)?.to_string(),
        (Attr::N(n), K::Int2 | K::Int4 | K::Int8 | K::Float4 | K::Float8 | K::Numeric) => n.clone(),
        (Attr::N(n), K::Timestamp | K::TimestampTz) => {
            let millis: i64 = n.parse().map_err(|_| "an N attribute that is not whole epoch milliseconds")?;
            let micros = millis
                .checked_mul(1000)
                .and_then(|m| m.checked_sub(UNIX_TO_PG_DAYS * MILLIS_PER_DAY * 1000))
                .ok_or("epoch milliseconds out of range")?;
            iso(sluice_core::value::Timestamp(micros), *kind == K::TimestampTz)
        }
        (Attr::N(n), K::Date) => {
            let millis: i64 = n.parse().map_err(|_| "an N attribute that is not whole epoch milliseconds")?;
            let days = i32::try_from(millis.div_euclid(MILLIS_PER_DAY) - UNIX_TO_PG_DAYS)
                .map_err(|_| "epoch milliseconds out of range")?;
            text_of(&Value::Date(sluice_core::value::Date(days)))
        }
        (Attr::Bool(b), K::Bool) => b.to_string(),
        (Attr::B(bytes), K::Bytea) => {
            let mut text = String::with_capacity(2 + 2 * bytes.len());
            text.push_str("\\x");
            for b in bytes {
                text.push_str(&format!("{b:02x}"));
            }
            text
        }
        (Attr::L(_) | Attr::Ss(_) | Attr::Ns(_), K::Array { element, .. }) => {
            let mut text = String::new();
            array_literal(attr, element, &mut text)?;
            text
        }
        (Attr::S(s), K::Bool | K::Int2 | K::Int4 | K::Int8 | K::Float4 | K::Float8 | K::Numeric) => s.clone(),
        (Attr::S(s), K::Text | K::Enum | K::Uuid | K::Time | K::Interval | K::Unknown) => s.clone(),
        (Attr::S(s), K::Date | K::Timestamp | K::TimestampTz) => s.clone(),
        _ => return wrong(),
    }))
}

/// An array attribute (a list, or a set) as a Postgres array literal.
fn array_literal(attr: &Attr, element: &TypeKind, out: &mut String) -> Result<(), String> {
    let quoted = |text: &str, out: &mut String| {
        out.push('"');
        for c in text.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    };
    out.push('{');
    match attr {
        Attr::Ss(items) | Attr::Ns(items) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                quoted(item, out);
            }
        }
        Attr::L(items) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match item {
                    Attr::L(_) => array_literal(item, element, out)?,
                    other => match text_back(other, element, None)? {
                        None => out.push_str("NULL"),
                        Some(text) => quoted(&text, out),
                    },
                }
            }
        }
        other => return Err(format!("a {} attribute is not an array", descriptor(other))),
    }
    out.push('}');
    Ok(())
}

/// An attribute as JSON (the inverse of `attrs::json_attr`).
fn attr_json(attr: &Attr) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    let number = |n: &str| {
        n.parse::<serde_json::Number>()
            .map(J::Number)
            .map_err(|_| "an N attribute that is not a number".to_owned())
    };
    Ok(match attr {
        Attr::S(s) => J::String(s.clone()),
        Attr::N(n) => number(n)?,
        Attr::Bool(b) => J::Bool(*b),
        Attr::Null => J::Null,
        Attr::L(items) => J::Array(items.iter().map(attr_json).collect::<Result<_, _>>()?),
        Attr::M(map) => {
            J::Object(map.iter().map(|(k, v)| Ok((k.clone(), attr_json(v)?))).collect::<Result<_, String>>()?)
        }
        Attr::Ss(items) => J::Array(items.iter().map(|s| J::String(s.clone())).collect()),
        Attr::Ns(items) => J::Array(items.iter().map(|n| number(n)).collect::<Result<_, _>>()?),
        Attr::B(_) => return Err("a B attribute has no JSON form".into()),
    })
}

/// What the way back could not do with `mapping`, visible without a database: tables of one
/// DynamoDB table whose keys and constants nothing tells apart, and key templates that cannot
/// be parsed back (two columns with no literal between them). Each names the mapping key.
pub(crate) fn offline_problems(mapping: &Mapping) -> Vec<sluice_core::Problem> {
    let mut problems = Vec::new();
    for (i, table) in mapping.tables.iter().enumerate() {
        for (attribute, template) in key_templates(table) {
            let Ok(segments) = parse_template(template) else { continue };
            if segments.windows(2).any(|w| matches!(w, [Segment::Column(_), Segment::Column(_)])) {
                problems.push(sluice_core::Problem::new(
                    &format!("mapping.tables[{i}]"),
                    if *attribute == table.partition_key.attribute { "partition_key.template" } else { "sort_key.template" },
                    format!(
                        "{template:?} puts two columns side by side: the way back cannot tell where one ends; put a literal between them"
                    ),
                ));
            }
        }
        for (j, other) in mapping.tables.iter().enumerate().skip(i + 1) {
            if other.target == table.target
                && keys_may_overlap(table, other)
                && !constants_differ(table, other)
            {
                problems.push(sluice_core::Problem::new(
                    &format!("mapping.tables[{j}]"),
                    "partition_key",
                    format!(
                        "{} and {} write to DynamoDB table {} with keys that may look alike and no constant that differs: \
                         the way back cannot tell their items apart; give them distinct key literals or an `entity` constant",
                        table.source, other.source, table.target
                    ),
                ));
            }
        }
    }
    problems
}

/// Whether an item key could fit both tables' templates: each key attribute's templates agree
/// on their leading and trailing literal text.
fn keys_may_overlap(a: &TableMapping, b: &TableMapping) -> bool {
    let (ka, kb) = (key_templates(a), key_templates(b));
    ka.len() == kb.len()
        && ka.iter().zip(&kb).all(|((name_a, ta), (name_b, tb))| {
            name_a == name_b
                && match (parse_template(ta), parse_template(tb)) {
                    (Ok(sa), Ok(sb)) => templates_may_overlap(&sa, &sb),
                    _ => false,
                }
        })
}

fn templates_may_overlap(a: &[Segment], b: &[Segment]) -> bool {
    let literal = |s: &[Segment]| s.iter().all(|x| matches!(x, Segment::Literal(_)));
    let text = |s: &[Segment]| {
        s.iter()
            .map(|x| match x {
                Segment::Literal(l) | Segment::Column(l) => l.as_str(),
            })
            .collect::<String>()
    };
    if literal(a) && literal(b) {
        return text(a) == text(b);
    }
    let lead = |s: &[Segment]| match s.first() {
        Some(Segment::Literal(l)) => l.clone(),
        _ => String::new(),
    };
    let tail = |s: &[Segment]| match s.last() {
        Some(Segment::Literal(l)) if s.len() > 1 => l.clone(),
        _ => String::new(),
    };
    let compatible_prefix = |x: &str, y: &str| x.starts_with(y) || y.starts_with(x);
    let compatible_suffix = |x: &str, y: &str| x.ends_with(y) || y.ends_with(x);
    // A pure literal against a template: the literal must fit the template.
    if literal(a) {
        return match_template(b, &text(a)).is_some();
    }
    if literal(b) {
        return match_template(a, &text(b)).is_some();
    }
    compatible_prefix(&lead(a), &lead(b)) && compatible_suffix(&tail(a), &tail(b))
}

fn constants_differ(a: &TableMapping, b: &TableMapping) -> bool {
    a.constants.iter().any(|(name, value)| {
        b.constants.get(name).is_some_and(|other| !same_attr(&constant_attr(value), &constant_attr(other)))
    })
}

#[cfg(test)]
mod tests;
