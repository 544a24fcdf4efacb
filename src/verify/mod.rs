//! `sluice verify` and `sluice reconcile`: is the target (DynamoDB, or Postgres: see
//! `postgres.rs`) equal to the source, key by key, through the mapping — and if not, re-drive
//! exactly the keys that differ.
//!
//! Verify reads each mapped table in primary-key chunks inside one consistent snapshot
//! (a read-only REPEATABLE READ transaction), translates every row as the stream would (the
//! same translator: renames, drops, types, filters, key templates), and reads the items those
//! rows must be with consistent BatchGetItem. A row whose item is absent (or a tombstone) is
//! *missing*; an item whose attributes differ is *different*, named by attribute (values only
//! with `--values`: they may be personal data). Then it scans each DynamoDB table whose
//! source tables were all verified, a page at a time: a live item no row produced is *extra*
//! (the pass keeps a 16-byte digest of each expected key for this). Its source key is
//! recovered from the key templates (or from the item's own attributes), so that reconcile can
//! re-drive it.
//!
//! Rows change while verify runs. Every key found wrong is checked again once the stream has
//! passed the WAL position at the end of the pass (the slot's confirmed position, waited for up
//! to `--recheck-timeout`), with a fresh read of the row and the item, and again (up to three
//! rounds) past the newest position while keys stay wrong: only keys still wrong are reported.
//!
//! Reconcile verifies, then asks the running daemon to backfill exactly the wrong keys (a
//! request in the progress table with a key list, served between watermarks like any chunk:
//! rows present in the source are written, keys the source no longer has are deleted, all
//! through the position guard), follows the request, and verifies those keys again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use sluice_dynamodb::{Attr, DynamoClient, Item, WriteAction};
use sluice_postgres::catalog::Table;

use crate::config::Config;
use crate::targets::dynamodb::mapping::{parse_template, Mapping, Segment, TableMapping};
use crate::targets::dynamodb::translate::DynamoTranslator;
use crate::targets::TargetConfig;
use crate::translate::TranslateError;
use sluice_core::{ChangeEvent, Lsn, Position, Value};

mod postgres;

#[derive(Clone, Debug, clap::Args)]
pub struct VerifyArgs {
    #[arg(short, long)]
    pub config: std::path::PathBuf,
    /// A source table (`schema.table`) to verify; repeat for several. Default: every mapped table.
    #[arg(long = "table", value_name = "TABLE")]
    pub tables: Vec<String>,
    /// Keys listed per table and kind of difference.
    #[arg(long, default_value_t = 10)]
    pub show: usize,
    /// Also print the differing values (they may be personal data).
    #[arg(long)]
    pub values: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Rows per chunk.
    #[arg(long, default_value_t = 1000)]
    pub chunk_size: usize,
    /// Most rows read per second; 0 for no limit.
    #[arg(long, default_value_t = 0)]
    pub max_rows_per_second: u64,
    /// Verify a random fraction of the rows (0 < f ≤ 1); extra items are not looked for then.
    #[arg(long)]
    pub sample: Option<f64>,
    /// How long to wait for the stream to pass the end of the pass before re-checking.
    #[arg(long, default_value = "60s", value_parser = sluice_core::duration::parse)]
    pub recheck_timeout: Duration,
}

/// A source key: the primary key's values as text, by column.
pub type SourceKey = BTreeMap<String, String>;

/// Differing attributes' values: (from the source through the mapping, stored in the target).
pub type DifferentValues = BTreeMap<String, (Option<String>, Option<String>)>;

#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    pub key: SourceKey,
    pub attributes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<DifferentValues>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Extra {
    /// The item's key.
    pub item_key: BTreeMap<String, String>,
    /// The source key the item's key templates lead back to, when they do.
    pub source_key: Option<SourceKey>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TableReport {
    pub table: String,
    pub target: String,
    pub rows: u64,
    pub matched: u64,
    pub missing: u64,
    pub different: u64,
    pub extra: u64,
    /// Rows the mapping cannot translate (the stream dead-letters them).
    pub untranslatable: u64,
    pub missing_keys: Vec<SourceKey>,
    pub different_keys: Vec<Difference>,
    pub extra_keys: Vec<Extra>,
    /// Whether extra items were looked for (the whole DynamoDB table was covered).
    pub extra_checked: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub tables: Vec<TableReport>,
    pub rows_per_second: f64,
    pub seconds: f64,
    /// Whether the keys found wrong were checked again after the stream passed the pass's end.
    pub rechecked: bool,
    pub recheck_note: Option<String>,
}

impl Report {
    pub fn differences(&self) -> u64 {
        self.tables.iter().map(|t| t.missing + t.different + t.extra).sum()
    }
}

/// What one key is found to be.
enum Finding {
    Matched,
    Missing,
    Different(Vec<String>, DifferentValues),
    /// Filtered out by the mapping: no item expected.
    NotExpected,
    Untranslatable,
}

struct Verifier {
    config: Config,
    sql: tokio_postgres::Client,
    /// The mapped source tables.
    tables: HashMap<String, Table>,
    /// (source table, target table) of every table mapping, in mapping order.
    pairs: Vec<(String, String)>,
    side: Side,
}

/// The target side of a comparison.
enum Side {
    Dynamo(DynamoSide),
    Postgres(postgres::PgSide),
}

struct DynamoSide {
    mapping: Mapping,
    translator: DynamoTranslator,
    client: DynamoClient,
}

impl Verifier {
    async fn open(config: &Config) -> anyhow::Result<Self> {
        let (side, pairs): (Side, Vec<(String, String)>) = match &config.target {
            TargetConfig::Dynamodb(dynamo) => {
                let Some(path) = &dynamo.mapping else {
                    anyhow::bail!(
                        "verify needs target.mapping: an outbox event log has no row-for-item mapping"
                    )
                };
                let mapping = Mapping::load(path).map_err(|p| {
                    anyhow::anyhow!("{}", p.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
                })?;
                let client =
                    DynamoClient::connect(&crate::targets::dynamodb::apply::client_options(dynamo)).await;
                let pairs = mapping.tables.iter().map(|t| (t.source.clone(), t.target.clone())).collect();
                (
                    Side::Dynamo(DynamoSide { translator: DynamoTranslator::new(&mapping), mapping, client }),
                    pairs,
                )
            }
            TargetConfig::Postgres(pg) => {
                let side = postgres::PgSide::open(pg).await?;
                let pairs = side.pairs();
                (Side::Postgres(side), pairs)
            }
            _ => anyhow::bail!(
                "verify compares a DynamoDB or Postgres target with its source; target.kind is neither"
            ),
        };
        let sql = sluice_postgres::connect_sql(&config.source.connection)
            .await
            .context("cannot connect to the source database")?;
        let mut tables = HashMap::new();
        for (source, _) in &pairs {
            let found = sluice_postgres::catalog::required_table(&sql, source, "mapping source").await?;
            if found.primary_key.is_empty() {
                anyhow::bail!("table {source} has no primary key; verify reads in primary-key order");
            }
            tables.insert(source.clone(), found);
        }
        Ok(Verifier { config: config.clone(), sql, tables, pairs, side })
    }

    fn selected(&self, names: &[String]) -> anyhow::Result<Vec<(String, String)>> {
        for name in names {
            if !self.pairs.iter().any(|(source, _)| source == name) {
                anyhow::bail!("table {name} is not in the mapping");
            }
        }
        Ok(self
            .pairs
            .iter()
            .filter(|(source, _)| names.is_empty() || names.contains(source))
            .cloned()
            .collect())
    }

    /// Compares rows of `source` with what `target` holds for them; returns each row's key, the
    /// digest of the target key it must have (none when filtered out or untranslatable), and
    /// the finding.
    async fn check_rows(
        &self,
        source: &str,
        target: &str,
        rows: Vec<Vec<Value>>,
    ) -> anyhow::Result<Vec<(SourceKey, Option<u128>, Finding)>> {
        let table = &self.tables[source];
        match &self.side {
            Side::Dynamo(side) => side.check_rows(target, table, rows).await,
            Side::Postgres(side) => side.check_rows(target, table, rows).await,
        }
    }

    /// Rows of `table` with these keys, in a fresh snapshot.
    async fn rows_by_key(&self, table: &Table, keys: &[SourceKey]) -> anyhow::Result<Vec<Vec<Value>>> {
        let names: Vec<&String> =
            table.primary_key.iter().map(|&i| &table.relation.columns[i].name).collect();
        let lists: Vec<Vec<String>> = keys
            .iter()
            .map(|k| names.iter().map(|n| k.get(*n).cloned().unwrap_or_default()).collect())
            .collect();
        let mut rows = Vec::new();
        for group in lists.chunks(1000) {
            for row in self.sql.query(&table.keys_query(&table.select_list(true), group), &[]).await? {
                rows.push(decode_row(table, &row)?);
            }
        }
        Ok(rows)
    }
}

impl DynamoSide {
    fn mapping(&self, source: &str) -> &TableMapping {
        self.mapping.tables.iter().find(|m| m.source == source).expect("mapped")
    }

    /// The item a row must be (key and attributes), or why there is none.
    fn expected(&self, table: &Table, row: Vec<Value>) -> Result<Option<(Item, Item)>, ()> {
        let event = ChangeEvent::Insert {
            position: Position::default(),
            relation: std::sync::Arc::new(table.relation.clone()),
            new: row,
            snapshot: true,
        };
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

    async fn check_rows(
        &self,
        target: &str,
        table: &Table,
        rows: Vec<Vec<Value>>,
    ) -> anyhow::Result<Vec<(SourceKey, Option<u128>, Finding)>> {
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
                            compare(&want, item, &self.mapping.version_attribute)
                        }
                    };
                    (Some(key_digest(&item_key)), finding)
                }
            };
            out.push((key, finding.0, finding.1));
        }
        Ok(out)
    }

    fn is_tombstone(&self, item: &Item) -> bool {
        item.get(&self.mapping.tombstones.marker_attribute) == Some(&Attr::Bool(true))
    }

    /// Live items of `target` that no verified row produced (`expected` holds their digests),
    /// each with the source table it is reported under.
    async fn extras(
        &self,
        target: &str,
        sources: &[String],
        expected: &HashSet<u128>,
        tables: &HashMap<String, Table>,
    ) -> anyhow::Result<Vec<(String, Extra)>> {
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
        Ok(extras)
    }

    /// For a wrong key whose row is gone: the item's key when a live item is still there.
    async fn left_behind(
        &self,
        target: &str,
        table: &Table,
        key: &SourceKey,
    ) -> anyhow::Result<Option<BTreeMap<String, String>>> {
        let texts: Vec<String> = table
            .primary_key
            .iter()
            .map(|&i| key.get(&table.relation.columns[i].name).cloned().unwrap_or_default())
            .collect();
        let mut row = vec![Value::Null; table.relation.columns.len()];
        for (&i, value) in table.primary_key.iter().zip(table.decode_key(&texts).unwrap_or_default()) {
            row[i] = value;
        }
        let Some(item_key) = self.translator.key_for(&table.relation, &row) else { return Ok(None) };
        let item = self.client.get_items(target, std::slice::from_ref(&item_key)).await?.pop().flatten();
        Ok(item
            .filter(|i| !self.is_tombstone(i))
            .map(|_| item_key.iter().map(|(k, v)| (k.clone(), attr_text(v))).collect()))
    }

    /// Whether an extra item is still live and still produced by no row.
    async fn still_extra(&self, verifier: &Verifier, source: &str, extra: &Extra) -> anyhow::Result<bool> {
        let mapping = self.mapping(source);
        let table = &verifier.tables[source];
        let key_names = key_attributes(&[mapping]);
        let key: Item = key_names
            .iter()
            .filter_map(|n| extra.item_key.get(n).map(|v| (n.clone(), Attr::S(v.clone()))))
            .collect();
        let item = self.client.get_items(&mapping.target, std::slice::from_ref(&key)).await?.pop().flatten();
        let live = item.as_ref().is_some_and(|i| !self.is_tombstone(i));
        let produced = match &extra.source_key {
            Some(source) => {
                let rows = verifier.rows_by_key(table, std::slice::from_ref(source)).await?;
                rows.into_iter().any(|row| matches!(self.expected(table, row), Ok(Some((k, _))) if key_text(&k) == key_text(&key)))
            }
            None => false,
        };
        Ok(live && !produced)
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn decode_row(table: &Table, row: &tokio_postgres::Row) -> anyhow::Result<Vec<Value>> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in table.relation.columns.iter().enumerate() {
        values.push(
            column
                .decode_text(row.get(i))
                .map_err(|e| anyhow::anyhow!("table {}: {e}", table.relation.qualified_name()))?,
        );
    }
    Ok(values)
}

/// A row's primary key as text (the values' Postgres text form, which casts back exactly).
fn source_key(table: &Table, row: &[Value]) -> SourceKey {
    table.primary_key.iter().map(|&i| (table.relation.columns[i].name.clone(), pg_text(&row[i]))).collect()
}

fn pg_text(value: &Value) -> String {
    match value {
        Value::Text(s) | Value::Enum(s) | Value::Json(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The attributes whose values differ (the version attribute aside), and their values.
fn compare(expected: &Item, stored: &Item, version_attribute: &str) -> Finding {
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
        other => format!("{other:?}"),
    }
}

/// A 128-bit digest of an item key: what verify keeps in memory per row to find extra items
/// (16 bytes a row; two keys colliding is beyond any table's size).
fn key_digest(key: &Item) -> u128 {
    digest(&key_text(key))
}

/// A 128-bit digest of a key's text.
fn digest(text: &str) -> u128 {
    use std::hash::{Hash, Hasher};
    let mut high = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut high);
    let mut low = std::collections::hash_map::DefaultHasher::new();
    "sluice-verify".hash(&mut low);
    text.hash(&mut low);
    ((high.finish() as u128) << 64) | low.finish() as u128
}

fn key_text(key: &Item) -> String {
    format!("{:?}", key.iter().map(|(k, v)| (k, normalized(v))).collect::<Vec<_>>())
}

/// The source key a DynamoDB key leads back to through a table's key templates, with the
/// item's attributes as a fallback for columns no template holds.
fn source_key_of(mapping: &TableMapping, table: &Table, item: &Item) -> Option<SourceKey> {
    let mut found: HashMap<String, String> = HashMap::new();
    let mut templates = vec![(&mapping.partition_key.attribute, &mapping.partition_key.template)];
    if let Some(sort) = &mapping.sort_key {
        templates.push((&sort.attribute, &sort.template));
    }
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

/// Matches `text` against literal and column segments (each column takes the shortest text up
/// to the next literal); the columns' values, or None when the text does not fit.
fn match_template(segments: &[Segment], text: &str) -> Option<Vec<(String, String)>> {
    let mut values = Vec::new();
    let mut rest = text;
    let mut iter = segments.iter().peekable();
    while let Some(segment) = iter.next() {
        match segment {
            Segment::Literal(literal) => rest = rest.strip_prefix(literal.as_str())?,
            Segment::Column(column) => {
                let value = match iter.peek() {
                    Some(Segment::Literal(next)) => {
                        let end = rest.find(next.as_str())?;
                        let (value, after) = rest.split_at(end);
                        rest = after;
                        value
                    }
                    Some(Segment::Column(_)) => return None,
                    None => std::mem::take(&mut rest),
                };
                values.push((column.clone(), value.to_owned()));
            }
        }
    }
    rest.is_empty().then_some(values)
}

/// Runs a verify pass and the re-check; the report.
pub async fn verify(config: &Config, args: &VerifyArgs) -> anyhow::Result<Report> {
    verify_with(&Verifier::open(config).await?, args).await
}

async fn verify_with(verifier: &Verifier, args: &VerifyArgs) -> anyhow::Result<Report> {
    let selected = verifier.selected(&args.tables)?;
    let started = Instant::now();
    let mut reports: Vec<TableReport> = Vec::new();
    let mut expected_keys: HashMap<String, HashSet<u128>> = HashMap::new();
    let mut rows_read: u64 = 0;
    // One snapshot for the whole pass.
    verifier.sql.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    let pass = async {
        for (source, target) in &selected {
            let table = &verifier.tables[source];
            let mut report =
                TableReport { table: source.clone(), target: target.clone(), ..TableReport::default() };
            let mut after: Option<Vec<String>> = None;
            let sample = args.sample.map(|f| format!("random() < {f}"));
            loop {
                let statement = table.page_query(
                    &table.select_list(true),
                    after.as_deref(),
                    args.chunk_size,
                    sample.as_deref(),
                );
                let rows = verifier.sql.query(&statement, &[]).await?;
                let Some(last_row) = rows.last() else { break };
                after = Some(
                    table
                        .primary_key
                        .iter()
                        .map(|&i| last_row.get::<_, Option<String>>(i).unwrap_or_default())
                        .collect(),
                );
                let count = rows.len();
                let decoded =
                    rows.iter().map(|r| decode_row(table, r)).collect::<anyhow::Result<Vec<_>>>()?;
                for (key, digest, finding) in verifier.check_rows(source, target, decoded).await? {
                    report.rows += 1;
                    if let Some(digest) = digest {
                        expected_keys.entry(target.clone()).or_default().insert(digest);
                    }
                    tally(&mut report, key, finding);
                }
                rows_read += count as u64;
                progress_line(source, report.rows, rows_read, started);
                throttle(args.max_rows_per_second, rows_read, started).await;
                if count < args.chunk_size && args.sample.is_none() {
                    break;
                }
            }
            reports.push(report);
        }
        anyhow::Ok(())
    };
    let outcome = pass.await;
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    let end_lsn: Option<Lsn> = verifier
        .sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .ok()
        .and_then(|r| r.get::<_, String>(0).parse().ok());
    verifier.sql.batch_execute("COMMIT").await?;
    outcome?;

    // Extra items: only in target tables whose every source table was verified whole.
    if args.sample.is_none() {
        let targets: HashSet<&String> = selected.iter().map(|(_, target)| target).collect();
        for target in targets {
            let sources: Vec<String> =
                verifier.pairs.iter().filter(|(_, t)| t == target).map(|(s, _)| s.clone()).collect();
            if !sources.iter().all(|m| selected.iter().any(|(s, _)| s == m)) {
                continue;
            }
            let expected = expected_keys.remove(target.as_str()).unwrap_or_default();
            let extras = match &verifier.side {
                Side::Dynamo(side) => side.extras(target, &sources, &expected, &verifier.tables).await?,
                Side::Postgres(side) => side.extras(target, &sources, &expected, &verifier.tables).await?,
            };
            for (report_table, extra) in extras {
                let report = reports.iter_mut().find(|r| r.table == report_table).expect("verified table");
                report.extra += 1;
                report.extra_keys.push(extra);
            }
            for report in reports.iter_mut().filter(|r| &r.target == target) {
                report.extra_checked = true;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut report = Report {
        tables: reports,
        rows_per_second: rows_read as f64 / seconds.max(0.001),
        seconds,
        rechecked: false,
        recheck_note: None,
    };
    // A key can be caught again by a write after the pass: re-check up to three times, each
    // time once the stream has passed the newest position. Real drift stays through all.
    let mut end = end_lsn;
    for _ in 0..3 {
        if report.differences() == 0 {
            break;
        }
        recheck(verifier, &mut report, end, args.recheck_timeout).await?;
        if !report.rechecked {
            break;
        }
        end = verifier
            .sql
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .ok()
            .and_then(|r| r.get::<_, String>(0).parse().ok());
    }
    Ok(report)
}

fn key_attributes(sources: &[&TableMapping]) -> Vec<String> {
    let mut names = vec![sources[0].partition_key.attribute.clone()];
    if let Some(sort) = &sources[0].sort_key {
        names.push(sort.attribute.clone());
    }
    names
}

/// A progress line on a terminal (standard error), rewritten in place.
fn progress_line(table: &str, table_rows: u64, rows: u64, started: Instant) {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprint!(
            "\rverify: {table} {table_rows} rows, {rows} in all, {:.0} rows/s   ",
            rows as f64 / started.elapsed().as_secs_f64().max(0.001)
        );
    }
}

fn tally(report: &mut TableReport, key: SourceKey, finding: Finding) {
    match finding {
        Finding::Matched => report.matched += 1,
        Finding::NotExpected => {}
        Finding::Untranslatable => report.untranslatable += 1,
        Finding::Missing => {
            report.missing += 1;
            report.missing_keys.push(key);
        }
        Finding::Different(attributes, values) => {
            report.different += 1;
            report.different_keys.push(Difference { key, attributes, values: Some(values) });
        }
    }
}

async fn throttle(max_rows_per_second: u64, rows: u64, started: Instant) {
    if max_rows_per_second > 0 {
        let due = Duration::from_secs_f64(rows as f64 / max_rows_per_second as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Waits until the slot has confirmed `end`, then checks every wrong key again with fresh
/// reads; keeps only what is still wrong.
async fn recheck(
    verifier: &Verifier,
    report: &mut Report,
    end: Option<Lsn>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let (Some(end), Some(replication)) = (end, &verifier.config.source.replication) else {
        report.recheck_note = Some("not re-checked: no logical replication source".into());
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    loop {
        let confirmed: Option<String> = verifier
            .sql
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&replication.slot],
            )
            .await?
            .and_then(|r| r.get(0));
        if confirmed.and_then(|c| c.parse::<Lsn>().ok()).is_some_and(|c| c >= end) {
            break;
        }
        if Instant::now() >= deadline {
            report.recheck_note = Some(format!(
                "not re-checked: slot {} did not confirm {end} within {timeout:?} (is the pipeline running?)",
                replication.slot
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for table_report in &mut report.tables {
        let (source, target) = (table_report.table.clone(), table_report.target.clone());
        let table = &verifier.tables[&source];
        let mut keys: Vec<SourceKey> = table_report.missing_keys.drain(..).collect();
        keys.extend(table_report.different_keys.drain(..).map(|d| d.key));
        let extras = std::mem::take(&mut table_report.extra_keys);
        table_report.matched += table_report.missing + table_report.different;
        table_report.missing = 0;
        table_report.different = 0;
        table_report.extra = 0;
        let rows = verifier.rows_by_key(table, &keys).await?;
        let present: HashSet<SourceKey> = rows.iter().map(|r| source_key(table, r)).collect();
        for (key, _, finding) in verifier.check_rows(&source, &target, rows).await? {
            if !matches!(finding, Finding::Matched | Finding::NotExpected) {
                table_report.matched = table_report.matched.saturating_sub(1);
            }
            tally(table_report, key, finding);
        }
        // A wrong key whose row is gone now: its target row or item must be gone too.
        for key in keys.into_iter().filter(|k| !present.contains(k)) {
            let left = match &verifier.side {
                Side::Dynamo(side) => side.left_behind(&target, table, &key).await?,
                Side::Postgres(side) => side.left_behind(&source, &target, table, &key).await?,
            };
            if let Some(item_key) = left {
                table_report.matched = table_report.matched.saturating_sub(1);
                table_report.extra += 1;
                table_report.extra_keys.push(Extra { item_key, source_key: Some(key) });
            }
        }
        // Extras: still there, and still produced by no row?
        for extra in extras {
            let still = match &verifier.side {
                Side::Dynamo(side) => side.still_extra(verifier, &source, &extra).await?,
                Side::Postgres(side) => side.still_extra(verifier, &source, &target, &extra).await?,
            };
            if still {
                table_report.extra += 1;
                table_report.extra_keys.push(extra);
            }
        }
    }
    report.rechecked = true;
    Ok(())
}

/// Prints a report: a table per source table, the first `show` keys of each kind.
pub fn print(report: &Report, args: &VerifyArgs) -> anyhow::Result<()> {
    let mut report = report.clone();
    for table in &mut report.tables {
        table.missing_keys.truncate(args.show);
        table.different_keys.truncate(args.show);
        table.extra_keys.truncate(args.show);
        if !args.values {
            for difference in &mut table.different_keys {
                difference.values = None;
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{:<28} {:>10} {:>10} {:>9} {:>10} {:>7}",
        "table", "rows", "matched", "missing", "different", "extra"
    );
    for t in &report.tables {
        let extra = if t.extra_checked { t.extra.to_string() } else { "-".into() };
        println!(
            "{:<28} {:>10} {:>10} {:>9} {:>10} {:>7}",
            t.table, t.rows, t.matched, t.missing, t.different, extra
        );
        for key in &t.missing_keys {
            println!("  missing    {}", show_key(key));
        }
        for d in &t.different_keys {
            println!("  different  {}  attributes: {}", show_key(&d.key), d.attributes.join(", "));
            if let Some(values) = &d.values {
                for (name, (want, have)) in values {
                    println!(
                        "             {name}: source {} / target {}",
                        want.as_deref().unwrap_or("(absent)"),
                        have.as_deref().unwrap_or("(absent)")
                    );
                }
            }
        }
        for e in &t.extra_keys {
            let item: Vec<String> = e.item_key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "  extra      {}{}",
                item.join(" "),
                e.source_key.as_ref().map(|k| format!("  (source key {})", show_key(k))).unwrap_or_default()
            );
        }
    }
    println!("{:.0} rows/s over {:.1} s", report.rows_per_second, report.seconds);
    if let Some(note) = &report.recheck_note {
        println!("{note}");
    }
    Ok(())
}

fn show_key(key: &SourceKey) -> String {
    key.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// `sluice reconcile`: verify, re-drive the wrong keys through the daemon, verify them again.
pub async fn reconcile(config: &Config, args: &VerifyArgs) -> anyhow::Result<Report> {
    let verifier = Verifier::open(config).await?;
    let report = verify_with(&verifier, args).await?;
    if report.differences() == 0 {
        eprintln!("nothing to reconcile: the target equals the source");
        return Ok(report);
    }
    let sql = &verifier.sql;
    crate::backfill::ensure_progress_table(sql, &config.backfill).await?;
    let mut ids = Vec::new();
    let mut unreachable = 0;
    for table_report in &report.tables {
        let table = &verifier.tables[&table_report.table];
        let names: Vec<&String> =
            table.primary_key.iter().map(|&i| &table.relation.columns[i].name).collect();
        let mut keys: Vec<Vec<String>> = Vec::new();
        let as_list = |key: &SourceKey| {
            names.iter().map(|n| key.get(*n).cloned().unwrap_or_default()).collect::<Vec<_>>()
        };
        keys.extend(table_report.missing_keys.iter().map(as_list));
        keys.extend(table_report.different_keys.iter().map(|d| as_list(&d.key)));
        for extra in &table_report.extra_keys {
            match &extra.source_key {
                Some(key) => keys.push(as_list(key)),
                None => unreachable += 1,
            }
        }
        if keys.is_empty() {
            continue;
        }
        let id = crate::backfill::request(
            sql,
            &config.backfill,
            &config.pipeline.name,
            &table_report.table,
            Some(&keys),
        )
        .await?;
        eprintln!("requested reconcile {id}: {} keys of {}", keys.len(), table_report.table);
        ids.push(id);
    }
    if unreachable > 0 {
        eprintln!("{unreachable} extra items lead back to no source key (their key templates do not parse); delete them by hand");
    }
    crate::backfill::follow(sql, &config.backfill, &config.pipeline.name, &ids).await?;
    // Verify again: the keys were re-driven through the stream, so the whole check applies.
    verify_with(&verifier, args).await
}
