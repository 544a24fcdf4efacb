//! The DynamoDB client: position-guarded writes, table set-up and reads.
//!
//! Every write is conditional on the item's stored version: `attribute_not_exists(pk) OR
//! version < :v`. A replayed or late write (an older position) fails the condition and counts
//! as already applied, so applying the same change twice, or an older change after a newer
//! one, leaves the item as the newest change made it.

use std::collections::HashMap;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, Delete, DeleteRequest, KeySchemaElement, KeyType,
    KeysAndAttributes, Put, PutRequest, ScalarAttributeType, TransactWriteItem, Update, WriteRequest,
};
use aws_sdk_dynamodb::Client;

use crate::attr::{Attr, Item};
use crate::error::{DynamoError, ErrorKind};
use sluice_core::retry::retry;
use sluice_core::{Backoff, GaveUp, RetryPolicy, Secret, Shutdown};

/// How to reach DynamoDB.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// A DynamoDB-API endpoint other than AWS's (a local server).
    pub endpoint_url: Option<String>,
    /// The AWS region; the SDK's default chain when none.
    pub region: Option<String>,
    /// Static credentials (access key id, secret access key); otherwise the AWS default chain
    /// (environment, profile, web identity, IMDS). The secret never prints.
    pub static_credentials: Option<(String, Secret)>,
    /// How long one request may take before it is retried; the SDK's default when none.
    pub request_timeout: Option<Duration>,
    /// How long the reads and plain writes of commands (`get_items`, scans, `batch_put`,
    /// `delete_item`) retry transient failures (a timeout on a loaded server, throttling, 5xx)
    /// under the one retry policy; zero for no retry. Guarded writes are retried by their
    /// caller, which also decides about dead letters.
    pub retry_for: Duration,
}

impl ClientOptions {
    /// A local DynamoDB-API server (moto, dynalite): region us-east-1, placeholder credentials.
    pub fn local(endpoint_url: &str) -> Self {
        ClientOptions {
            endpoint_url: Some(endpoint_url.to_owned()),
            region: Some("us-east-1".into()),
            static_credentials: Some(("local".into(), Secret::new("local"))),
            request_timeout: Some(Duration::from_secs(30)),
            retry_for: Duration::from_secs(60),
        }
    }
}

/// One position-guarded write.
#[derive(Clone, Debug, PartialEq)]
pub struct GuardedWrite {
    /// The DynamoDB table.
    pub table: String,
    /// The key attributes (partition key, and sort key when the table has one).
    pub key: Item,
    /// The attribute checked with `attribute_not_exists` (the partition key's name).
    pub partition_key: String,
    /// The attribute holding the source position that guards the write.
    pub version_attribute: String,
    /// The source position as a decimal number.
    pub version: String,
    /// What the write does when the guard holds.
    pub action: WriteAction,
}

/// What a guarded write does to its item.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteAction {
    /// Replace the whole item with these attributes (key and version are added).
    Put(Item),
    /// Set these attributes and keep the others (a row whose unchanged TOAST columns were not
    /// sent); removes the listed attributes (a tombstone marker).
    Update {
        /// Attributes to set.
        set: Item,
        /// Attributes to remove.
        remove: Vec<String>,
    },
    /// Delete the item.
    Delete,
}

/// A table's primary key: each key attribute's name and type (`S`, `N` or `B`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySchema {
    /// The partition (hash) key.
    pub partition_key: (String, String),
    /// The sort (range) key, when the table has one.
    pub sort_key: Option<(String, String)>,
}

/// A table's DynamoDB stream (`DynamoClient::stream_of`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableStream {
    /// The stream's ARN (DescribeTable's `LatestStreamArn`).
    pub arn: String,
    /// What its records carry: `KEYS_ONLY`, `NEW_IMAGE`, `OLD_IMAGE` or `NEW_AND_OLD_IMAGES`.
    pub view_type: String,
}

/// Where a scan goes on (`DynamoClient::scan_page`).
#[derive(Debug, Default)]
pub struct ScanCursor(Option<HashMap<String, AttributeValue>>);

/// What a guarded write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The write was made.
    Applied,
    /// The item already holds this position or a newer one.
    AlreadyApplied,
}

const CONDITION: &str = "attribute_not_exists(#pk) OR #v < :v";

/// A guarded write in the SDK's terms: the operation, with the condition's names and values.
struct Prepared {
    operation: Operation,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

enum Operation {
    Put(HashMap<String, AttributeValue>),
    Update { key: HashMap<String, AttributeValue>, expression: String },
    Delete(HashMap<String, AttributeValue>),
}

impl Prepared {
    fn new(write: &GuardedWrite) -> Self {
        let mut names = HashMap::from([
            ("#pk".to_string(), write.partition_key.clone()),
            ("#v".to_string(), write.version_attribute.clone()),
        ]);
        let version = AttributeValue::N(write.version.clone());
        let mut values = HashMap::from([(":v".to_string(), version.clone())]);
        let key = || write.key.iter().map(|(k, v)| (k.clone(), v.to_sdk())).collect::<HashMap<_, _>>();
        let operation = match &write.action {
            WriteAction::Put(attributes) => {
                let mut item: HashMap<String, AttributeValue> =
                    attributes.iter().map(|(k, v)| (k.clone(), v.to_sdk())).collect();
                item.extend(key());
                item.insert(write.version_attribute.clone(), version);
                Operation::Put(item)
            }
            WriteAction::Update { set, remove } => {
                let mut assignments = vec!["#v = :v".to_string()];
                for (i, (name, value)) in set.iter().enumerate() {
                    names.insert(format!("#a{i}"), name.clone());
                    values.insert(format!(":a{i}"), value.to_sdk());
                    assignments.push(format!("#a{i} = :a{i}"));
                }
                let mut expression = format!("SET {}", assignments.join(", "));
                if !remove.is_empty() {
                    let removed: Vec<String> = remove
                        .iter()
                        .enumerate()
                        .map(|(i, name)| {
                            names.insert(format!("#r{i}"), name.clone());
                            format!("#r{i}")
                        })
                        .collect();
                    expression.push_str(&format!(" REMOVE {}", removed.join(", ")));
                }
                Operation::Update { key: key(), expression }
            }
            WriteAction::Delete => Operation::Delete(key()),
        };
        Prepared { operation, names, values }
    }

    fn into_transact_item(self, table: &str) -> TransactWriteItem {
        let (names, values) = (Some(self.names), Some(self.values));
        match self.operation {
            Operation::Put(item) => TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(table)
                        .set_item(Some(item))
                        .condition_expression(CONDITION)
                        .set_expression_attribute_names(names)
                        .set_expression_attribute_values(values)
                        .build()
                        .expect("table, item and condition are set"),
                )
                .build(),
            Operation::Update { key, expression } => TransactWriteItem::builder()
                .update(
                    Update::builder()
                        .table_name(table)
                        .set_key(Some(key))
                        .update_expression(expression)
                        .condition_expression(CONDITION)
                        .set_expression_attribute_names(names)
                        .set_expression_attribute_values(values)
                        .build()
                        .expect("table, key and expression are set"),
                )
                .build(),
            Operation::Delete(key) => TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(table)
                        .set_key(Some(key))
                        .condition_expression(CONDITION)
                        .set_expression_attribute_names(names)
                        .set_expression_attribute_values(values)
                        .build()
                        .expect("table and key are set"),
                )
                .build(),
        }
    }
}

/// A DynamoDB client with sluice's retry and position-guarded writes.
#[derive(Clone, Debug)]
pub struct DynamoClient {
    client: Client,
    /// The retry policy of reads and plain writes.
    retry: RetryPolicy,
}

impl DynamoClient {
    /// A client for these options (credentials from the options, or the SDK's default chain).
    pub async fn connect(options: &ClientOptions) -> Self {
        let shared = sdk_config(options).await;
        DynamoClient { client: Client::new(&shared), retry: RetryPolicy::new(options.retry_for) }
    }

    /// The backoff for items or keys a batch request left unprocessed (throttling): short
    /// delays for about ten seconds (as the eight doubling rounds before it), then a transient
    /// error for the caller's own retry, so the two budgets do not add up.
    fn unprocessed_backoff(&self) -> Backoff {
        Backoff::new(
            RetryPolicy::new(Duration::from_secs(10))
                .with_delays(Duration::from_millis(20), Duration::from_secs(2)),
        )
    }

    /// Runs one request, retrying transient failures under the client's retry policy.
    async fn retried<T, F, Fut>(&self, what: &str, request: F) -> Result<T, DynamoError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, DynamoError>>,
    {
        retry(self.retry, &Shutdown::never(), what, request, |_| {}).await.map_err(|gave_up| match gave_up {
            GaveUp::Failed { error, exhausted: true, failing_for } => DynamoError::new(
                error.kind,
                &error.table,
                format!("{} (still failing after {}s of retries)", error.message, failing_for.as_secs()),
            ),
            GaveUp::Failed { error, .. } => error,
            GaveUp::Shutdown => DynamoError::new(ErrorKind::Fatal, "", "stopped"),
        })
    }

    /// Applies one guarded write.
    pub async fn apply(&self, write: &GuardedWrite) -> Result<Outcome, DynamoError> {
        let Prepared { operation, names, values } = Prepared::new(write);
        // The three requests are different builder types with the same guard calls.
        macro_rules! guarded {
            ($request:expr) => {
                $request
                    .table_name(&write.table)
                    .condition_expression(CONDITION)
                    .set_expression_attribute_names(Some(names))
                    .set_expression_attribute_values(Some(values))
                    .send()
                    .await
            };
        }
        // A failed guard means the item already holds this position or a newer one.
        macro_rules! outcome {
            ($result:expr) => {
                match $result {
                    Ok(_) => Ok(Outcome::Applied),
                    Err(e) if condition_failed(&e) => Ok(Outcome::AlreadyApplied),
                    Err(e) => Err(classify(e, &write.table)),
                }
            };
        }
        match operation {
            Operation::Put(item) => outcome!(guarded!(self.client.put_item().set_item(Some(item)))),
            Operation::Update { key, expression } => {
                outcome!(guarded!(self.client.update_item().set_key(Some(key)).update_expression(expression)))
            }
            Operation::Delete(key) => outcome!(guarded!(self.client.delete_item().set_key(Some(key)))),
        }
    }

    /// Applies up to 100 guarded writes to distinct items in one TransactWriteItems request.
    /// When some guards fail, the transaction is cancelled whole: the writes whose guard failed
    /// were already applied, the others are applied again without them.
    pub async fn apply_transaction(&self, writes: &[GuardedWrite]) -> Result<Vec<Outcome>, DynamoError> {
        let mut outcomes = vec![None; writes.len()];
        let mut remaining: Vec<usize> = (0..writes.len()).collect();
        while !remaining.is_empty() {
            if remaining.len() == 1 {
                let i = remaining[0];
                outcomes[i] = Some(self.apply(&writes[i]).await?);
                break;
            }
            let items: Vec<TransactWriteItem> = remaining
                .iter()
                .map(|&i| Prepared::new(&writes[i]).into_transact_item(&writes[i].table))
                .collect();
            let table = &writes[remaining[0]].table;
            match self.client.transact_write_items().set_transact_items(Some(items)).send().await {
                Ok(_) => {
                    for &i in &remaining {
                        outcomes[i] = Some(Outcome::Applied);
                    }
                    break;
                }
                Err(error) => {
                    let reasons: Option<Vec<Option<String>>> = error
                        .as_service_error()
                        .and_then(|e| match e {
                            TransactWriteItemsError::TransactionCanceledException(c) => Some(c),
                            _ => None,
                        })
                        .map(|c| {
                            c.cancellation_reasons().iter().map(|r| r.code().map(str::to_owned)).collect()
                        });
                    let Some(reasons) = reasons.filter(|r| r.len() == remaining.len()) else {
                        return Err(classify(error, table));
                    };
                    let mut again = Vec::new();
                    for (&i, reason) in remaining.iter().zip(&reasons) {
                        match reason.as_deref() {
                            Some("ConditionalCheckFailed") => outcomes[i] = Some(Outcome::AlreadyApplied),
                            None | Some("None") => again.push(i),
                            Some(
                                "ThrottlingError" | "TransactionConflict" | "ProvisionedThroughputExceeded",
                            ) => {
                                return Err(DynamoError::new(
                                    ErrorKind::Transient,
                                    &writes[i].table,
                                    format!("transaction cancelled: {}", reason.as_deref().unwrap_or("")),
                                ));
                            }
                            // A write the server rejects (ValidationError…): applied alone, it is classified.
                            Some(_) => outcomes[i] = Some(self.apply(&writes[i]).await?),
                        }
                    }
                    if again.len() == remaining.len() {
                        return Err(classify(error, table));
                    }
                    remaining = again;
                }
            }
        }
        Ok(outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Applied)).collect())
    }

    /// Applies up to 100 puts and deletes to distinct items without per-write conditions, for
    /// `write_mode = "batch"`. The guard's rule still decides: one consistent BatchGetItem
    /// reads the stored versions, then BatchWriteItem (25 per request) writes only the items
    /// whose stored version is older, or that are absent. A write marked `fresh` is known to be
    /// newer than anything stored for its item (its position was never delivered before, and
    /// sluice is the only writer), so it is not read first.
    ///
    /// Nothing else may write these items between the read and the write, so this is correct
    /// only while sluice is the items' one writer (one active replica, which the HA lock
    /// ensures). Updates (partial rows) are not batchable: callers apply them with [`Self::apply`].
    pub async fn apply_batch(
        &self,
        writes: &[GuardedWrite],
        fresh: &[bool],
    ) -> Result<Vec<Outcome>, DynamoError> {
        let unknown: Vec<&GuardedWrite> =
            writes.iter().zip(fresh).filter(|(_, fresh)| !**fresh).map(|(w, _)| w).collect();
        let mut read = self.read_versions(&unknown).await?.into_iter();
        let stored =
            fresh
                .iter()
                .map(|&fresh| if fresh { Stored::Older } else { read.next().unwrap_or(Stored::Absent) });
        let mut outcomes = Vec::with_capacity(writes.len());
        let mut requests: Vec<(String, WriteRequest)> = Vec::new();
        for (write, stored) in writes.iter().zip(stored) {
            let due = match &stored {
                Stored::Older => true,
                Stored::Absent => !matches!(write.action, WriteAction::Delete),
                Stored::Version(version) => version_older(version, &write.version),
                Stored::Unversioned => false,
            };
            // An absent item needs no delete; the guard would have let it through as a no-op.
            let applied = due || matches!((&stored, &write.action), (Stored::Absent, WriteAction::Delete));
            outcomes.push(if applied { Outcome::Applied } else { Outcome::AlreadyApplied });
            if !due {
                continue;
            }
            let request = match Prepared::new(write).operation {
                Operation::Put(item) => WriteRequest::builder()
                    .put_request(PutRequest::builder().set_item(Some(item)).build().expect("item set"))
                    .build(),
                Operation::Delete(key) => WriteRequest::builder()
                    .delete_request(DeleteRequest::builder().set_key(Some(key)).build().expect("key set"))
                    .build(),
                Operation::Update { .. } => {
                    return Err(DynamoError::new(
                        ErrorKind::Fatal,
                        &write.table,
                        "an update is not batchable (internal error)",
                    ));
                }
            };
            requests.push((write.table.clone(), request));
        }
        for chunk in requests.chunks(25) {
            let mut items: HashMap<String, Vec<WriteRequest>> = HashMap::new();
            for (table, request) in chunk {
                items.entry(table.clone()).or_default().push(request.clone());
            }
            let table = chunk[0].0.clone();
            let mut unprocessed = self.unprocessed_backoff();
            loop {
                let out = self
                    .client
                    .batch_write_item()
                    .set_request_items(Some(items))
                    .send()
                    .await
                    .map_err(|e| classify(e, &table))?;
                items = out.unprocessed_items.unwrap_or_default();
                items.retain(|_, requests| !requests.is_empty());
                if items.is_empty() {
                    break;
                }
                let Some(delay) = unprocessed.next_delay() else {
                    return Err(DynamoError::new(
                        ErrorKind::Transient,
                        &table,
                        "BatchWriteItem left items unprocessed (throttled)",
                    ));
                };
                tokio::time::sleep(delay).await;
            }
        }
        Ok(outcomes)
    }

    /// The stored version of each write's item, read consistently with BatchGetItem.
    async fn read_versions(&self, writes: &[&GuardedWrite]) -> Result<Vec<Stored>, DynamoError> {
        let Some(first) = writes.first() else { return Ok(Vec::new()) };
        if writes.len() > 100 {
            return Err(DynamoError::new(
                ErrorKind::Fatal,
                &first.table,
                "more than 100 keys in one BatchGetItem (internal error)",
            ));
        }
        let mut request: HashMap<String, KeysAndAttributes> = HashMap::new();
        let mut tables: HashMap<&str, Vec<HashMap<String, AttributeValue>>> = HashMap::new();
        for write in writes {
            tables
                .entry(&write.table)
                .or_default()
                .push(write.key.iter().map(|(k, v)| (k.clone(), v.to_sdk())).collect());
        }
        for (table, keys) in tables {
            let write = writes.iter().find(|w| w.table == table).expect("a write of this table");
            let mut names = HashMap::from([("#v".to_string(), write.version_attribute.clone())]);
            let mut projection = vec!["#v".to_string()];
            for (i, name) in write.key.keys().enumerate() {
                names.insert(format!("#k{i}"), name.clone());
                projection.push(format!("#k{i}"));
            }
            let keys = KeysAndAttributes::builder()
                .set_keys(Some(keys))
                .projection_expression(projection.join(", "))
                .set_expression_attribute_names(Some(names))
                .consistent_read(true)
                .build()
                .expect("keys set");
            request.insert(table.to_owned(), keys);
        }
        let mut found: HashMap<(String, String), Option<String>> = HashMap::new();
        let mut unprocessed = self.unprocessed_backoff();
        loop {
            let out = self
                .client
                .batch_get_item()
                .set_request_items(Some(request))
                .send()
                .await
                .map_err(|e| classify(e, &first.table))?;
            for (table, items) in out.responses.unwrap_or_default() {
                let Some(write) = writes.iter().find(|w| w.table == table) else { continue };
                for item in items {
                    let key: Option<Item> = write
                        .key
                        .keys()
                        .map(|name| item.get(name).and_then(Attr::from_sdk).map(|a| (name.clone(), a)))
                        .collect();
                    let key = key.map(|key| key_text(&key));
                    let version = match item.get(&write.version_attribute) {
                        Some(AttributeValue::N(n)) => Some(n.clone()),
                        _ => None,
                    };
                    if let Some(key) = key {
                        found.insert((table.clone(), key), version);
                    }
                }
            }
            request = out.unprocessed_keys.unwrap_or_default();
            request.retain(|_, keys| !keys.keys().is_empty());
            if request.is_empty() {
                break;
            }
            let Some(delay) = unprocessed.next_delay() else {
                return Err(DynamoError::new(
                    ErrorKind::Transient,
                    &first.table,
                    "BatchGetItem left keys unprocessed (throttled)",
                ));
            };
            tokio::time::sleep(delay).await;
        }
        Ok(writes
            .iter()
            .map(|w| match found.remove(&(w.table.clone(), key_text(&w.key))) {
                None => Stored::Absent,
                Some(Some(version)) => Stored::Version(version),
                Some(None) => Stored::Unversioned,
            })
            .collect())
    }

    /// Unconditional BatchWriteItem of up to 25 puts, retrying unprocessed items (the
    /// benchmark's baseline, and test set-up).
    pub async fn batch_put(&self, table: &str, items: Vec<Item>) -> Result<(), DynamoError> {
        let mut requests: Vec<WriteRequest> = items
            .into_iter()
            .map(|item| {
                let item = item.into_iter().map(|(k, v)| (k, v.to_sdk())).collect();
                WriteRequest::builder()
                    .put_request(PutRequest::builder().set_item(Some(item)).build().expect("item set"))
                    .build()
            })
            .collect();
        let mut unprocessed = self.unprocessed_backoff();
        while !requests.is_empty() {
            let out = self
                .retried("DynamoDB BatchWriteItem", || async {
                    self.client
                        .batch_write_item()
                        .request_items(table, requests.clone())
                        .send()
                        .await
                        .map_err(|e| classify(e, table))
                })
                .await?;
            requests = out.unprocessed_items.and_then(|mut u| u.remove(table)).unwrap_or_default();
            if !requests.is_empty() {
                let Some(delay) = unprocessed.next_delay() else {
                    return Err(DynamoError::new(
                        ErrorKind::Transient,
                        table,
                        "BatchWriteItem left items unprocessed (throttled)",
                    ));
                };
                tokio::time::sleep(delay).await;
            }
        }
        Ok(())
    }

    /// Creates an on-demand table with a string partition key and optional string sort key;
    /// an existing table is fine.
    pub async fn create_table(
        &self,
        table: &str,
        partition_key: &str,
        sort_key: Option<&str>,
    ) -> Result<(), DynamoError> {
        let mut request = self
            .client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(partition_key)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("definition"),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(partition_key)
                    .key_type(KeyType::Hash)
                    .build()
                    .expect("schema"),
            );
        if let Some(sort_key) = sort_key {
            request = request
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(sort_key)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .expect("definition"),
                )
                .key_schema(
                    KeySchemaElement::builder()
                        .attribute_name(sort_key)
                        .key_type(KeyType::Range)
                        .build()
                        .expect("schema"),
                );
        }
        match request.send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().and_then(|s| s.code()) == Some("ResourceInUseException") => Ok(()),
            Err(e) => Err(classify(e, table)),
        }
    }

    /// DescribeTable, or `None` when the table does not exist; transient failures are retried
    /// under the client's policy.
    async fn describe(
        &self,
        table: &str,
    ) -> Result<Option<aws_sdk_dynamodb::types::TableDescription>, DynamoError> {
        self.retried(&format!("DescribeTable {table}"), || async {
            match self.client.describe_table().table_name(table).send().await {
                Ok(output) => Ok(output.table),
                Err(e)
                    if e.as_service_error().and_then(|s| s.code()) == Some("ResourceNotFoundException") =>
                {
                    Ok(None)
                }
                Err(e) => Err(classify(e, table)),
            }
        })
        .await
    }

    /// The table's primary key as DynamoDB describes it (DescribeTable), or `None` when the
    /// table does not exist; transient failures are retried under the client's policy.
    pub async fn key_schema(&self, table: &str) -> Result<Option<KeySchema>, DynamoError> {
        let Some(described) = self.describe(table).await? else { return Ok(None) };
        let type_of = |name: &str| {
            described
                .attribute_definitions()
                .iter()
                .find(|d| d.attribute_name() == name)
                .map(|d| d.attribute_type().as_str().to_owned())
                .unwrap_or_default()
        };
        let mut schema = KeySchema::default();
        for element in described.key_schema() {
            let name = element.attribute_name().to_owned();
            let key = (type_of(&name), name);
            match element.key_type() {
                KeyType::Hash => schema.partition_key = (key.1, key.0),
                _ => schema.sort_key = Some((key.1, key.0)),
            }
        }
        Ok(Some(schema))
    }

    /// Turns on the table's stream with `view_type` (`NEW_AND_OLD_IMAGES` for the way back);
    /// a stream already on with that view is fine.
    pub async fn enable_stream(&self, table: &str, view_type: &str) -> Result<(), DynamoError> {
        if self.stream_of(table).await?.is_some_and(|s| s.view_type == view_type) {
            return Ok(());
        }
        let specification = aws_sdk_dynamodb::types::StreamSpecification::builder()
            .stream_enabled(true)
            .stream_view_type(aws_sdk_dynamodb::types::StreamViewType::from(view_type))
            .build()
            .map_err(|e| DynamoError::new(ErrorKind::Fatal, table, e.to_string()))?;
        self.client
            .update_table()
            .table_name(table)
            .stream_specification(specification)
            .send()
            .await
            .map_err(|e| classify(e, table))?;
        Ok(())
    }

    /// The table's stream as DescribeTable gives it: its ARN and what its records carry
    /// (`NEW_AND_OLD_IMAGES`, …), or `None` when the table has no stream enabled; an error
    /// names a missing table.
    pub async fn stream_of(&self, table: &str) -> Result<Option<TableStream>, DynamoError> {
        let Some(described) = self.describe(table).await? else {
            return Err(DynamoError::new(
                ErrorKind::Fatal,
                table,
                "ResourceNotFoundException: the table does not exist",
            ));
        };
        let enabled = described.stream_specification().is_some_and(|s| s.stream_enabled());
        Ok(match (enabled, described.latest_stream_arn()) {
            (true, Some(arn)) => Some(TableStream {
                arn: arn.to_owned(),
                view_type: described
                    .stream_specification()
                    .and_then(|s| s.stream_view_type())
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default(),
            }),
            _ => None,
        })
    }

    /// The items with these keys, read consistently (BatchGetItem, 100 keys a request,
    /// unprocessed keys retried); `None` where there is no item.
    pub async fn get_items(&self, table: &str, keys: &[Item]) -> Result<Vec<Option<Item>>, DynamoError> {
        let mut found: HashMap<String, Item> = HashMap::new();
        for group in keys.chunks(100) {
            let sdk_keys: Vec<HashMap<String, AttributeValue>> =
                group.iter().map(|key| key.iter().map(|(k, v)| (k.clone(), v.to_sdk())).collect()).collect();
            let mut request = HashMap::from([(
                table.to_owned(),
                KeysAndAttributes::builder()
                    .set_keys(Some(sdk_keys))
                    .consistent_read(true)
                    .build()
                    .expect("keys set"),
            )]);
            let mut unprocessed = self.unprocessed_backoff();
            loop {
                let out = self
                    .retried("DynamoDB BatchGetItem", || async {
                        self.client
                            .batch_get_item()
                            .set_request_items(Some(request.clone()))
                            .send()
                            .await
                            .map_err(|e| classify(e, table))
                    })
                    .await?;
                for raw in out.responses.unwrap_or_default().remove(table).unwrap_or_default() {
                    let item = item_from_sdk(&raw, table)?;
                    let key: Item = group[0]
                        .keys()
                        .filter_map(|name| item.get(name).map(|a| (name.clone(), a.clone())))
                        .collect();
                    found.insert(key_text(&key), item);
                }
                request = out.unprocessed_keys.unwrap_or_default();
                request.retain(|_, keys| !keys.keys().is_empty());
                if request.is_empty() {
                    break;
                }
                let Some(delay) = unprocessed.next_delay() else {
                    return Err(DynamoError::new(
                        ErrorKind::Transient,
                        table,
                        "BatchGetItem left keys unprocessed (throttled)",
                    ));
                };
                tokio::time::sleep(delay).await;
            }
        }
        Ok(keys.iter().map(|key| found.remove(&key_text(key))).collect())
    }

    /// Deletes an item unconditionally (tests and repairs by hand).
    pub async fn delete_item(&self, table: &str, key: &Item) -> Result<(), DynamoError> {
        self.retried("DynamoDB DeleteItem", || async {
            self.client
                .delete_item()
                .table_name(table)
                .set_key(Some(key.iter().map(|(k, v)| (k.clone(), v.to_sdk())).collect()))
                .send()
                .await
                .map_err(|e| classify(e, table))
        })
        .await?;
        Ok(())
    }

    /// Deletes the item only while it has no `version_attribute` (it was written around
    /// sluice); true when it was deleted, false when it has one (or is gone).
    pub async fn delete_unversioned(
        &self,
        table: &str,
        key: &Item,
        version_attribute: &str,
    ) -> Result<bool, DynamoError> {
        self.retried("DynamoDB DeleteItem", || async {
            match self
                .client
                .delete_item()
                .table_name(table)
                .set_key(Some(key.iter().map(|(k, v)| (k.clone(), v.to_sdk())).collect()))
                .condition_expression("attribute_exists(#pk) AND attribute_not_exists(#v)")
                .expression_attribute_names("#pk", key.keys().next().cloned().unwrap_or_default())
                .expression_attribute_names("#v", version_attribute)
                .send()
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if condition_failed(&e) => Ok(false),
                Err(e) => Err(classify(e, table)),
            }
        })
        .await
    }

    /// Sets `version_attribute` to 0 on the item only while it has none (the application wrote
    /// it while the way back ran), so that a guarded write of any position overwrites it; true
    /// when it was set, false when the item has a version (or is gone).
    pub async fn stamp_unversioned(
        &self,
        table: &str,
        key: &Item,
        version_attribute: &str,
    ) -> Result<bool, DynamoError> {
        self.retried("DynamoDB UpdateItem", || async {
            match self
                .client
                .update_item()
                .table_name(table)
                .set_key(Some(key.iter().map(|(k, v)| (k.clone(), v.to_sdk())).collect()))
                .update_expression("SET #v = :zero")
                .condition_expression("attribute_exists(#pk) AND attribute_not_exists(#v)")
                .expression_attribute_names("#pk", key.keys().next().cloned().unwrap_or_default())
                .expression_attribute_names("#v", version_attribute)
                .expression_attribute_values(":zero", AttributeValue::N("0".into()))
                .send()
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if condition_failed(&e) => Ok(false),
                Err(e) => Err(classify(e, table)),
            }
        })
        .await
    }

    /// One page of a scan: its items, and where the next page starts (`None` after the last).
    /// Start with `ScanCursor::default()`.
    pub async fn scan_page(
        &self,
        table: &str,
        cursor: ScanCursor,
    ) -> Result<(Vec<Item>, Option<ScanCursor>), DynamoError> {
        let out = self
            .retried("DynamoDB Scan", || async {
                self.client
                    .scan()
                    .table_name(table)
                    .set_exclusive_start_key(cursor.0.clone())
                    .send()
                    .await
                    .map_err(|e| classify(e, table))
            })
            .await?;
        let mut items = Vec::new();
        for raw in out.items.unwrap_or_default() {
            let item = item_from_sdk(&raw, table)?;
            items.push(item);
        }
        let next = out.last_evaluated_key.filter(|key| !key.is_empty()).map(|key| ScanCursor(Some(key)));
        Ok((items, next))
    }

    /// Every item of a table (paginated scan).
    pub async fn scan_all(&self, table: &str) -> Result<Vec<Item>, DynamoError> {
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .retried("DynamoDB Scan", || async {
                    self.client
                        .scan()
                        .table_name(table)
                        .set_exclusive_start_key(start.clone())
                        .send()
                        .await
                        .map_err(|e| classify(e, table))
                })
                .await?;
            for raw in out.items.unwrap_or_default() {
                let item = item_from_sdk(&raw, table)?;
                items.push(item);
            }
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(items),
            }
        }
    }
}

/// An item's state as BatchGetItem read it.
enum Stored {
    /// Not read: known to be older than the write.
    Older,
    Absent,
    Version(String),
    /// The item exists without a numeric version: the guard would refuse every write to it.
    Unversioned,
}

/// A key's attributes as one comparable text (key attributes are S, N or B).
/// An item as the SDK returned it; an attribute type sluice does not read is an error.
fn item_from_sdk(raw: &HashMap<String, AttributeValue>, table: &str) -> Result<Item, DynamoError> {
    raw.iter().map(|(k, v)| Attr::from_sdk(v).map(|a| (k.clone(), a))).collect::<Option<Item>>().ok_or_else(
        || DynamoError::new(ErrorKind::Fatal, table, "item with an attribute type sluice does not read"),
    )
}

fn key_text(key: &Item) -> String {
    crate::attr::key_identity(key)
}

/// `stored < new` for the version attribute's decimal numbers, as DynamoDB compares them.
fn version_older(stored: &str, new: &str) -> bool {
    match (stored.parse::<u128>(), new.parse::<u128>()) {
        (Ok(stored), Ok(new)) => stored < new,
        _ => match (stored.parse::<f64>(), new.parse::<f64>()) {
            (Ok(stored), Ok(new)) => stored < new,
            _ => false,
        },
    }
}

/// The SDK configuration both DynamoDB clients (tables and streams) are built from: region
/// (us-east-1 when the chain finds none), endpoint, credentials and timeouts.
pub(crate) async fn sdk_config(options: &ClientOptions) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = &options.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &options.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some((id, secret)) = &options.static_credentials {
        loader =
            loader.credentials_provider(Credentials::new(id, secret.expose(), None, None, "sluice-config"));
    }
    if let Some(timeout) = options.request_timeout {
        loader = loader.timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(timeout)
                .connect_timeout(timeout)
                .build(),
        );
    }
    let shared = loader.load().await;
    if shared.region().is_none() {
        return shared.into_builder().region(Region::new("us-east-1")).build();
    }
    shared
}

/// True when a guarded write failed its condition: an outcome, not an error.
fn condition_failed<E>(error: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    error.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException")
}

/// Sorts an SDK failure into retry, dead-letter or stop.
pub(crate) fn classify<E>(error: SdkError<E, HttpResponse>, table: &str) -> DynamoError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = error.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
    let kind = match &error {
        SdkError::ServiceError(service) => match service.err().code() {
            Some(
                "ProvisionedThroughputExceededException"
                | "ThrottlingException"
                | "RequestLimitExceeded"
                | "InternalServerError"
                | "ServiceUnavailable"
                | "TransactionConflictException",
            ) => ErrorKind::Transient,
            Some("ValidationException" | "ItemCollectionSizeLimitExceededException") => ErrorKind::Poison,
            _ if status >= 500 => ErrorKind::Transient,
            _ => ErrorKind::Fatal,
        },
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            ErrorKind::Transient
        }
        _ => ErrorKind::Fatal,
    };
    let message = match error.as_service_error() {
        Some(service) => match (service.code(), service.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            (None, message) => {
                format!("HTTP {status}{}", message.map(|m| format!(": {m}")).unwrap_or_default())
            }
        },
        None => transport_message(&error),
    };
    DynamoError::new(kind, table, message)
}

/// A failure before any answer (no connection, a timeout) in one line: each cause of the
/// chain once, as it displays itself (the SDK's `Debug` forms never reach an operator).
fn transport_message(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers_not_text() {
        assert!(version_older("9", "10"));
        assert!(!version_older("10", "9"));
        assert!(!version_older("10", "10"));
        assert!(version_older("18446744073709551616", "18446744073709551617"), "past u64");
        assert!(version_older("9.5", "10"), "a decimal stored by another writer");
        assert!(!version_older("not a number", "10"), "unreadable: the guard's comparison would fail too");
    }

    #[test]
    fn keys_with_the_same_attributes_match() {
        let a =
            Item::from([("pk".to_string(), Attr::S("A".into())), ("sk".to_string(), Attr::N("1".into()))]);
        let b =
            Item::from([("sk".to_string(), Attr::N("1".into())), ("pk".to_string(), Attr::S("A".into()))]);
        assert_eq!(key_text(&a), key_text(&b));
        assert_ne!(
            key_text(&a),
            key_text(&Item::from([
                ("pk".to_string(), Attr::S("A".into())),
                ("sk".to_string(), Attr::S("1".into()))
            ]))
        );
    }
}

#[cfg(test)]
mod options_tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_secret_access_key() {
        let options = ClientOptions {
            static_credentials: Some(("AKIDEXAMPLE".into(), Secret::new("wJalrXUtnFEMI"))),
            ..ClientOptions::default()
        };
        let shown = format!("{options:?}");
        assert!(!shown.contains("wJalrXUtnFEMI"), "{shown}");
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
    }
}
