//! The DynamoDB side of `sluice verify`: the items rows must be (through the same translator as
//! the stream), read with consistent BatchGetItem, compared attribute by attribute in
//! DynamoDB's canonical form; extra items found by a scan, led back to their source key
//! through the key templates.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use sluice_dynamodb::{Attr, DynamoClient, Item, WriteAction};
use sluice_postgres::catalog::Table;

use super::config::DynamoConfig;
use super::mapping::{key_templates, match_template, parse_template, Mapping, TableMapping};
use super::translate::MappingTranslator;
use crate::compare::{as_snapshot_insert, digest, source_key, Extra, Finding, Foreign, SourceKey};
use crate::error::{CommandContext, CommandError};
use crate::translate::mapping::MappingFile;
use crate::translate::TranslateError;
use sluice_core::Value;

pub struct DynamoSide {
    mapping: Mapping,
    translator: MappingTranslator,
    client: DynamoClient,
    /// Source tables whose items the application writes now (their phase is reversed,
    /// rolling_back or finished): an item without the version attribute is the application's,
    /// not a difference.
    app_written: HashSet<String>,
}

impl DynamoSide {
    /// The side for a DynamoDB target's configuration.
    pub(crate) async fn open(config: &DynamoConfig) -> Result<Self, CommandError> {
        let Some(path) = &config.mapping else {
            return Err(CommandError::invalid(
                "verify needs target.mapping: an outbox event log has no row-for-item mapping",
            ));
        };
        let mapping = Mapping::load(path).map_err(|p| {
            CommandError::invalid(p.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        })?;
        let client = DynamoClient::connect(&super::apply::client_options(config)).await;
        Ok(DynamoSide {
            translator: MappingTranslator::new(&mapping),
            mapping,
            client,
            app_written: HashSet::new(),
        })
    }

    /// The attributes the mapping of `source` writes: its columns' (renamed, not dropped),
    /// its constants, its key, the version and the tombstone marker.
    fn mapped_attributes(&self, source: &str, table: &Table) -> HashSet<String> {
        let mapping = self.mapping(source);
        let mut names: HashSet<String> = table
            .relation
            .columns
            .iter()
            .filter(|c| !mapping.drop.contains(&c.name))
            .map(|c| mapping.rename.get(&c.name).cloned().unwrap_or_else(|| c.name.clone()))
            .collect();
        names.extend(mapping.constants.keys().cloned());
        names.extend(key_templates(mapping).into_iter().map(|(attribute, _)| attribute.clone()));
        names.insert(self.mapping.version_attribute.clone());
        names.insert(self.mapping.tombstones.marker_attribute.clone());
        names
    }

    /// The DynamoDB client.
    pub(crate) fn client(&self) -> &DynamoClient {
        &self.client
    }

    /// Marks the source tables whose items the application writes (a cutover moved them).
    pub(crate) fn set_app_written(&mut self, tables: HashSet<String>) {
        self.app_written = tables;
    }

    /// Gives the items of `sources` (source tables) that carry no version attribute (the
    /// application's, written while the tables were reversed) the version 0, so that the
    /// forward stream's position guard lets its next writes through; tombstones and items of
    /// other tables are left alone. Scans each DynamoDB table once; the number stamped.
    pub(crate) async fn stamp_unversioned(&self, sources: &[String]) -> Result<u64, CommandError> {
        let version = &self.mapping.version_attribute;
        let mappings: Vec<&TableMapping> =
            self.mapping.tables.iter().filter(|t| sources.contains(&t.source)).collect();
        let targets: std::collections::BTreeSet<&str> = mappings.iter().map(|m| m.target.as_str()).collect();
        let mut stamped = 0;
        for target in targets {
            let ours: Vec<&&TableMapping> = mappings.iter().filter(|m| m.target == target).collect();
            let key_names = key_attributes(&[ours[0]]);
            let mut cursor = sluice_dynamodb::ScanCursor::default();
            loop {
                let (items, next) = self
                    .client
                    .scan_page(target, cursor)
                    .await
                    .with_context(|| format!("cannot scan DynamoDB table {target}"))?;
                for item in items {
                    if item.contains_key(version)
                        || self.is_tombstone(&item)
                        || !ours.iter().any(|m| key_fits(m, &item))
                    {
                        continue;
                    }
                    let key: Item = item
                        .iter()
                        .filter(|(k, _)| key_names.contains(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    if self
                        .client
                        .stamp_unversioned(target, &key, version)
                        .await
                        .with_context(|| format!("cannot stamp an item of DynamoDB table {target}"))?
                    {
                        stamped += 1;
                    }
                }
                match next {
                    Some(next) => cursor = next,
                    None => break,
                }
            }
        }
        Ok(stamped)
    }

    /// (source table, target table) of every table mapping, in mapping order.
    pub(crate) fn pairs(&self) -> Vec<(String, String)> {
        self.mapping.tables.iter().map(|t| (t.source.clone(), t.target.clone())).collect()
    }

    pub(crate) fn mapping(&self, source: &str) -> &TableMapping {
        self.mapping.tables.iter().find(|m| m.source == source).expect("mapped")
    }

    /// The item a row must be (key and attributes), or why there is none.
    pub(crate) fn expected(&self, table: &Table, row: Vec<Value>) -> Result<Option<(Item, Item)>, ()> {
        let event = as_snapshot_insert(table, row);
        let mut writes = Vec::new();
        match self.translator.translate(&event, now(), &mut writes) {
            Ok(()) => {}
            Err(TranslateError::Poison { .. } | TranslateError::Fatal { .. }) => return Err(()),
        }
        Ok(writes.into_iter().find_map(|w| match w.action {
            WriteAction::Put(item) => Some((w.key, item)),
            _ => None,
        }))
    }

    pub(crate) async fn check_rows(
        &self,
        target: &str,
        table: &Table,
        rows: Vec<Vec<Value>>,
    ) -> Result<Vec<(SourceKey, Option<u128>, Finding)>, CommandError> {
        let mut expected = Vec::with_capacity(rows.len());
        for row in rows {
            let key = source_key(table, &row);
            expected.push((key, self.expected(table, row)));
        }
        let keys: Vec<Item> = expected
            .iter()
            .filter_map(|(_, e)| e.as_ref().ok().and_then(|x| x.as_ref()).map(|(k, _)| k.clone()))
            .collect();
        let stored = self
            .client
            .get_items(target, &keys)
            .await
            .with_context(|| format!("cannot read items of DynamoDB table {target}"))?;
        let mut stored = stored.into_iter();
        // Where the application writes the items, the attributes no column maps to are its
        // own: the way back leaves them, and verify cannot compare them with a row.
        let source = table.relation.qualified_name();
        let mapped = self.app_written.contains(&source).then(|| self.mapped_attributes(&source, table));
        let mut out = Vec::with_capacity(expected.len());
        for (key, expectation) in expected {
            let finding = match expectation {
                Err(()) => (None, Finding::Untranslatable),
                Ok(None) => (None, Finding::NotExpected),
                Ok(Some((item_key, attributes))) => {
                    let item = stored.next().flatten();
                    let finding = match &item {
                        None => Finding::Missing,
                        Some(item) if self.is_tombstone(item) => Finding::Missing,
                        Some(item) => {
                            let mut want = attributes;
                            want.extend(item_key.clone());
                            let mut item = item.clone();
                            if let Some(mapped) = &mapped {
                                item.retain(|name, _| mapped.contains(name));
                            }
                            compare(&want, &item, &self.mapping.version_attribute, mapped.is_none())
                        }
                    };
                    (Some(key_digest(&item_key)), finding)
                }
            };
            out.push((key, finding.0, finding.1));
        }
        Ok(out)
    }

    pub(crate) fn is_tombstone(&self, item: &Item) -> bool {
        item.get(&self.mapping.tombstones.marker_attribute) == Some(&Attr::Bool(true))
    }

    /// Live items of `target` that no verified row produced (`expected` holds their digests),
    /// each with the source table it is reported under; and apart, the items whose key no
    /// mapping's key templates fit (another writer's).
    pub(crate) async fn extras(
        &self,
        target: &str,
        sources: &[String],
        expected: &HashSet<u128>,
        tables: &HashMap<String, Table>,
    ) -> Result<(Vec<(String, Extra)>, Option<Foreign>), CommandError> {
        // Every mapping into this table, verified or not, decides what sluice could write.
        let all: Vec<&TableMapping> = self.mapping.tables.iter().filter(|m| m.target == target).collect();
        let mut foreign = Foreign { target: target.to_owned(), items: 0, keys: Vec::new() };
        let mappings: Vec<&TableMapping> = sources.iter().map(|s| self.mapping(s)).collect();
        let key_names = key_attributes(&mappings);
        let mut extras = Vec::new();
        // Page by page: memory holds one page, plus the expected keys.
        let mut cursor = Some(sluice_dynamodb::ScanCursor::default());
        while let Some(start) = cursor.take() {
            let (items, next) = self
                .client
                .scan_page(target, start)
                .await
                .with_context(|| format!("cannot scan DynamoDB table {target}"))?;
            cursor = next;
            for item in items {
                if self.is_tombstone(&item) {
                    continue;
                }
                let key: Item =
                    key_names.iter().filter_map(|n| item.get(n).map(|a| (n.clone(), a.clone()))).collect();
                if expected.contains(&key_digest(&key)) {
                    continue;
                }
                // The source table whose templates fit the key, and the source key.
                let owner = mappings
                    .iter()
                    .find_map(|m| source_key_of(m, &tables[&m.source], &item).map(|k| (m.source.clone(), k)));
                if owner.is_none() && !all.iter().any(|m| key_fits(m, &item)) {
                    foreign.items += 1;
                    if foreign.keys.len() < FOREIGN_KEYS {
                        foreign.keys.push(key.iter().map(|(k, v)| (k.clone(), attr_text(v))).collect());
                    }
                    continue;
                }
                let report_table =
                    owner.as_ref().map(|(t, _)| t.clone()).unwrap_or_else(|| sources[0].clone());
                extras.push((
                    report_table,
                    Extra {
                        item_key: key.iter().map(|(k, v)| (k.clone(), attr_text(v))).collect(),
                        source_key: owner.map(|(_, k)| k),
                    },
                ));
            }
        }
        Ok((extras, (foreign.items > 0).then_some(foreign)))
    }

    /// Deletes the item of each key that has no version attribute (`reconcile --force`), so
    /// that the guarded write of a keyed backfill recreates it; an item that has one again is
    /// left to the guard. Returns how many were deleted.
    pub(crate) async fn delete_unversioned(
        &self,
        target: &str,
        table: &Table,
        keys: &[SourceKey],
    ) -> Result<usize, CommandError> {
        let mut deleted = 0;
        for key in keys {
            let Some(item_key) = self.item_key(table, key) else { continue };
            let gone = self
                .client
                .delete_unversioned(target, &item_key, &self.mapping.version_attribute)
                .await
                .with_context(|| format!("cannot delete an unversioned item of DynamoDB table {target}"))?;
            deleted += usize::from(gone);
        }
        Ok(deleted)
    }

    /// The DynamoDB key a source key maps to through the key templates (a row of only its key
    /// columns), or `None` when the templates need other columns.
    fn item_key(&self, table: &Table, key: &SourceKey) -> Option<Item> {
        let texts: Vec<String> = table
            .primary_key
            .iter()
            .map(|&i| key.get(&table.relation.columns[i].name).cloned().unwrap_or_default())
            .collect();
        let mut row = vec![Value::Null; table.relation.columns.len()];
        for (&i, value) in table.primary_key.iter().zip(table.decode_key(&texts).unwrap_or_default()) {
            row[i] = value;
        }
        self.translator.key_for(&table.relation, &row)
    }

    /// For a wrong key whose row is gone: the item's key when a live item is still there.
    pub(crate) async fn left_behind(
        &self,
        target: &str,
        table: &Table,
        key: &SourceKey,
    ) -> Result<Option<BTreeMap<String, String>>, CommandError> {
        let Some(item_key) = self.item_key(table, key) else { return Ok(None) };
        let item = self
            .client
            .get_items(target, std::slice::from_ref(&item_key))
            .await
            .with_context(|| format!("cannot read an item of DynamoDB table {target}"))?
            .pop()
            .flatten();
        Ok(item
            .filter(|i| !self.is_tombstone(i))
            .map(|_| item_key.iter().map(|(k, v)| (k.clone(), attr_text(v))).collect()))
    }

    /// Whether an extra item is still live and still produced by no row; `rows`: the rows of
    /// its source key, read afresh.
    pub(crate) async fn still_extra(
        &self,
        table: &Table,
        source: &str,
        extra: &Extra,
        rows: Vec<Vec<Value>>,
    ) -> Result<bool, CommandError> {
        let mapping = self.mapping(source);
        let key_names = key_attributes(&[mapping]);
        let key: Item = key_names
            .iter()
            .filter_map(|n| extra.item_key.get(n).map(|v| (n.clone(), Attr::S(v.clone()))))
            .collect();
        let item = self
            .client
            .get_items(&mapping.target, std::slice::from_ref(&key))
            .await
            .with_context(|| format!("cannot read an item of DynamoDB table {}", mapping.target))?
            .pop()
            .flatten();
        let live = item.as_ref().is_some_and(|i| !self.is_tombstone(i));
        let produced = rows.into_iter().any(
            |row| matches!(self.expected(table, row), Ok(Some((k, _))) if key_text(&k) == key_text(&key)),
        );
        Ok(live && !produced)
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The attributes whose values differ (the version attribute aside), and their values.
/// Keys of the other writers' items listed in the report.
const FOREIGN_KEYS: usize = 10;

/// Whether a key template of `mapping` fits the item's key (whatever the columns' values).
fn key_fits(mapping: &TableMapping, item: &Item) -> bool {
    let templates = key_templates(mapping);
    templates.into_iter().all(|(attribute, template)| {
        let Some(Attr::S(text)) = item.get(attribute) else { return false };
        parse_template(template).ok().and_then(|segments| match_template(&segments, text)).is_some()
    })
}

/// `versioned`: the item must carry the version attribute (the forward stream wrote it).
fn compare(expected: &Item, stored: &Item, version_attribute: &str, versioned: bool) -> Finding {
    let mut names: Vec<String> = Vec::new();
    let mut values = BTreeMap::new();
    let all: std::collections::BTreeSet<&String> =
        expected.keys().chain(stored.keys()).filter(|n| *n != version_attribute).collect();
    for name in all {
        let (want, have) = (expected.get(name), stored.get(name));
        let same = match (want, have) {
            (Some(a), Some(b)) => normalized(a) == normalized(b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            names.push(name.clone());
            values.insert(name.clone(), (want.map(attr_text), have.map(attr_text)));
        }
    }
    if versioned && !stored.contains_key(version_attribute) {
        names.push(version_attribute.to_owned());
        values.insert(version_attribute.to_owned(), (Some("(a position)".into()), None));
        return Finding::Unversioned(names, values);
    }
    if names.is_empty() {
        Finding::Matched
    } else {
        Finding::Different(names, values)
    }
}

/// DynamoDB's canonical form: numbers without insignificant zeros, sets sorted.
fn normalized(attr: &Attr) -> Attr {
    match attr {
        Attr::N(n) => Attr::N(canonical_number(n)),
        Attr::Ns(items) => {
            let mut items: Vec<String> = items.iter().map(|n| canonical_number(n)).collect();
            items.sort();
            Attr::Ns(items)
        }
        Attr::Ss(items) => {
            let mut items = items.clone();
            items.sort();
            Attr::Ss(items)
        }
        Attr::L(items) => Attr::L(items.iter().map(normalized).collect()),
        Attr::M(map) => Attr::M(map.iter().map(|(k, v)| (k.clone(), normalized(v))).collect()),
        other => other.clone(),
    }
}

fn canonical_number(n: &str) -> String {
    let (sign, digits) = match n.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", n.strip_prefix('+').unwrap_or(n)),
    };
    if digits.contains(['e', 'E']) {
        return n.to_owned();
    }
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    if int == "0" && frac.is_empty() {
        return "0".into();
    }
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

fn attr_text(attr: &Attr) -> String {
    match attr {
        Attr::S(s) | Attr::N(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A 128-bit digest of an item key: what verify keeps in memory per row to find extra items
/// (16 bytes a row; two keys colliding is beyond any table's size).
fn key_digest(key: &Item) -> u128 {
    digest(&key_text(key))
}

fn key_text(key: &Item) -> String {
    let normalized: Item = key.iter().map(|(name, value)| (name.clone(), normalized(value))).collect();
    sluice_dynamodb::attr::key_identity(&normalized)
}

/// The source key a DynamoDB key leads back to through a table's key templates, with the
/// item's attributes as a fallback for columns no template holds.
pub(crate) fn source_key_of(mapping: &TableMapping, table: &Table, item: &Item) -> Option<SourceKey> {
    let mut found: HashMap<String, String> = HashMap::new();
    let templates = key_templates(mapping);
    for (attribute, template) in templates {
        let Some(Attr::S(text)) = item.get(attribute) else { return None };
        let segments = parse_template(template).ok()?;
        for (column, value) in match_template(&segments, text)? {
            if found.get(&column).is_some_and(|v| *v != value) {
                return None;
            }
            found.insert(column, value);
        }
    }
    let mut key = SourceKey::new();
    for &i in &table.primary_key {
        let column = &table.relation.columns[i].name;
        let value = match found.get(column) {
            Some(v) => v.clone(),
            None => {
                let attribute = mapping.rename.get(column).unwrap_or(column);
                match item.get(attribute)? {
                    Attr::S(s) | Attr::N(s) => s.clone(),
                    _ => return None,
                }
            }
        };
        key.insert(column.clone(), value);
    }
    Some(key)
}

pub(crate) fn key_attributes(sources: &[&TableMapping]) -> Vec<String> {
    let mut names = vec![sources[0].partition_key.attribute.clone()];
    if let Some(sort) = &sources[0].sort_key {
        names.push(sort.attribute.clone());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pairs: &[(&str, Attr)]) -> Item {
        pairs.iter().map(|(n, v)| (n.to_string(), v.clone())).collect()
    }

    #[test]
    fn key_identity_tells_types_names_and_values_apart() {
        let s1 = key(&[("pk", Attr::S("1".into()))]);
        let n1 = key(&[("pk", Attr::N("1".into()))]);
        assert_ne!(key_text(&s1), key_text(&n1));
        // A separator inside a name or value cannot make two keys read the same.
        let a = key(&[("a", Attr::S("1:b".into())), ("c", Attr::S("d".into()))]);
        let b = key(&[("a", Attr::S("1".into())), ("b:c", Attr::S("d".into()))]);
        assert_ne!(key_text(&a), key_text(&b));
        let bin = key(&[("pk", Attr::B(vec![0x31]))]);
        assert_ne!(key_text(&bin), key_text(&s1));
    }

    #[test]
    fn key_identity_is_the_same_for_equal_numbers() {
        let a = key(&[("pk", Attr::N("1.50".into()))]);
        let b = key(&[("pk", Attr::N("1.5".into()))]);
        assert_eq!(key_text(&a), key_text(&b));
        assert_eq!(key_digest(&a), key_digest(&b));
    }
}
