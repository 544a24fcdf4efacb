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
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, Delete, KeySchemaElement, KeyType, Put, PutRequest, ScalarAttributeType,
    TransactWriteItem, Update, WriteRequest,
};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::Client;

use crate::attr::{Attr, Item};
use crate::error::{DynamoError, ErrorKind};

/// How to reach DynamoDB.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// A DynamoDB-API endpoint other than AWS's (a local server).
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    /// Static credentials; otherwise the AWS default chain (environment, profile, web identity, IMDS).
    pub static_credentials: Option<(String, String)>,
    pub request_timeout: Option<Duration>,
}

impl ClientOptions {
    /// A local DynamoDB-API server (moto, dynalite): region us-east-1, placeholder credentials.
    pub fn local(endpoint_url: &str) -> Self {
        ClientOptions {
            endpoint_url: Some(endpoint_url.to_owned()),
            region: Some("us-east-1".into()),
            static_credentials: Some(("local".into(), "local".into())),
            request_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// One position-guarded write.
#[derive(Clone, Debug, PartialEq)]
pub struct GuardedWrite {
    pub table: String,
    /// The key attributes (partition key, and sort key when the table has one).
    pub key: Item,
    /// The attribute checked with `attribute_not_exists` (the partition key's name).
    pub partition_key: String,
    pub version_attribute: String,
    /// The source position as a decimal number.
    pub version: String,
    pub action: WriteAction,
}

#[derive(Clone, Debug, PartialEq)]
pub enum WriteAction {
    /// Replace the whole item with these attributes (key and version are added).
    Put(Item),
    /// Set these attributes and keep the others (a row whose unchanged TOAST columns were not
    /// sent); removes the listed attributes (a tombstone marker).
    Update { set: Item, remove: Vec<String> },
    /// Delete the item.
    Delete,
}

/// What a guarded write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
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
        let mut names = HashMap::from([("#pk".to_string(), write.partition_key.clone()), ("#v".to_string(), write.version_attribute.clone())]);
        let version = AttributeValue::N(write.version.clone());
        let mut values = HashMap::from([(":v".to_string(), version.clone())]);
        let key = || write.key.iter().map(|(k, v)| (k.clone(), v.to_sdk())).collect::<HashMap<_, _>>();
        let operation = match &write.action {
            WriteAction::Put(attributes) => {
                let mut item: HashMap<String, AttributeValue> = attributes.iter().map(|(k, v)| (k.clone(), v.to_sdk())).collect();
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

#[derive(Clone, Debug)]
pub struct DynamoClient {
    client: Client,
}

impl DynamoClient {
    pub async fn connect(options: &ClientOptions) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &options.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &options.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((id, secret)) = &options.static_credentials {
            loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "sluice-config"));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_dynamodb::config::Builder::from(&shared);
        if let Some(timeout) = options.request_timeout {
            builder = builder.timeout_config(
                aws_config::timeout::TimeoutConfig::builder().operation_attempt_timeout(timeout).connect_timeout(timeout).build(),
            );
        }
        if shared.region().is_none() {
            builder = builder.region(Region::new("us-east-1"));
        }
        DynamoClient { client: Client::from_conf(builder.build()) }
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
                    .map(drop)
                    .map_err(|e| classify(e, &write.table))
            };
        }
        let result = match operation {
            Operation::Put(item) => guarded!(self.client.put_item().set_item(Some(item))),
            Operation::Update { key, expression } => guarded!(self.client.update_item().set_key(Some(key)).update_expression(expression)),
            Operation::Delete(key) => guarded!(self.client.delete_item().set_key(Some(key))),
        };
        match result {
            Ok(()) => Ok(Outcome::Applied),
            Err(e) if e.kind == ErrorKind::ConditionFailed => Ok(Outcome::AlreadyApplied),
            Err(e) => Err(e),
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
            let items: Vec<TransactWriteItem> = remaining.iter().map(|&i| Prepared::new(&writes[i]).into_transact_item(&writes[i].table)).collect();
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
                        .map(|c| c.cancellation_reasons().iter().map(|r| r.code().map(str::to_owned)).collect());
                    let Some(reasons) = reasons.filter(|r| r.len() == remaining.len()) else {
                        return Err(classify(error, table));
                    };
                    let mut again = Vec::new();
                    for (&i, reason) in remaining.iter().zip(&reasons) {
                        match reason.as_deref() {
                            Some("ConditionalCheckFailed") => outcomes[i] = Some(Outcome::AlreadyApplied),
                            None | Some("None") => again.push(i),
                            Some("ThrottlingError" | "TransactionConflict" | "ProvisionedThroughputExceeded") => {
                                return Err(DynamoError::new(ErrorKind::Transient, &writes[i].table, format!("transaction cancelled: {}", reason.as_deref().unwrap_or(""))));
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

    /// Unconditional BatchWriteItem of up to 25 puts, retrying unprocessed items (the
    /// benchmark's baseline, and test set-up).
    pub async fn batch_put(&self, table: &str, items: Vec<Item>) -> Result<(), DynamoError> {
        let mut requests: Vec<WriteRequest> = items
            .into_iter()
            .map(|item| {
                let item = item.into_iter().map(|(k, v)| (k, v.to_sdk())).collect();
                WriteRequest::builder().put_request(PutRequest::builder().set_item(Some(item)).build().expect("item set")).build()
            })
            .collect();
        let mut delay = Duration::from_millis(20);
        while !requests.is_empty() {
            let out = self
                .client
                .batch_write_item()
                .request_items(table, std::mem::take(&mut requests))
                .send()
                .await
                .map_err(|e| classify(e, table))?;
            requests = out.unprocessed_items.and_then(|mut u| u.remove(table)).unwrap_or_default();
            if !requests.is_empty() {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
        Ok(())
    }

    /// Creates an on-demand table with a string partition key and optional string sort key;
    /// an existing table is fine.
    pub async fn create_table(&self, table: &str, partition_key: &str, sort_key: Option<&str>) -> Result<(), DynamoError> {
        let mut request = self
            .client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(AttributeDefinition::builder().attribute_name(partition_key).attribute_type(ScalarAttributeType::S).build().expect("definition"))
            .key_schema(KeySchemaElement::builder().attribute_name(partition_key).key_type(KeyType::Hash).build().expect("schema"));
        if let Some(sort_key) = sort_key {
            request = request
                .attribute_definitions(AttributeDefinition::builder().attribute_name(sort_key).attribute_type(ScalarAttributeType::S).build().expect("definition"))
                .key_schema(KeySchemaElement::builder().attribute_name(sort_key).key_type(KeyType::Range).build().expect("schema"));
        }
        match request.send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().and_then(|s| s.code()) == Some("ResourceInUseException") => Ok(()),
            Err(e) => Err(classify(e, table)),
        }
    }

    /// Every item of a table (paginated scan).
    pub async fn scan_all(&self, table: &str) -> Result<Vec<Item>, DynamoError> {
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(table)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify(e, table))?;
            for raw in out.items.unwrap_or_default() {
                let item = raw
                    .iter()
                    .map(|(k, v)| Attr::from_sdk(v).map(|a| (k.clone(), a)))
                    .collect::<Option<Item>>()
                    .ok_or_else(|| DynamoError::new(ErrorKind::Fatal, table, "item with an attribute type sluice does not read"))?;
                items.push(item);
            }
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(items),
            }
        }
    }
}

/// Sorts an SDK failure into retry, stop, dead-letter, or "condition failed".
fn classify<E>(error: SdkError<E, HttpResponse>, table: &str) -> DynamoError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = error.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
    let kind = match &error {
        SdkError::ServiceError(service) => match service.err().code() {
            Some("ConditionalCheckFailedException") => ErrorKind::ConditionFailed,
            Some(
                "ProvisionedThroughputExceededException" | "ThrottlingException" | "RequestLimitExceeded" | "InternalServerError"
                | "ServiceUnavailable" | "TransactionConflictException",
            ) => ErrorKind::Transient,
            Some("ValidationException" | "ItemCollectionSizeLimitExceededException") => ErrorKind::Poison,
            _ if status >= 500 => ErrorKind::Transient,
            _ => ErrorKind::Fatal,
        },
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => ErrorKind::Transient,
        _ => ErrorKind::Fatal,
    };
    let message = match error.as_service_error() {
        Some(service) => match (service.code(), service.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            (None, message) => format!("HTTP {status}{}", message.map(|m| format!(": {m}")).unwrap_or_default()),
        },
        None => aws_sdk_dynamodb::error::DisplayErrorContext(&error).to_string(),
    };
    DynamoError::new(kind, table, message)
}
