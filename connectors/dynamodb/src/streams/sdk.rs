//! [`StreamsApi`] through aws-sdk-dynamodbstreams, and its answers in the reader's SDK-free
//! types.

use std::collections::HashMap;

use aws_sdk_dynamodbstreams::error::ProvideErrorMetadata;
use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, ShardIteratorType};
use aws_sdk_dynamodbstreams::Client;

use super::{
    DescribePage, RecordEvent, RecordsPage, Shard, ShardStart, StreamRecord, StreamsApi, StreamsError,
};
use crate::attr::{Attr, Item};
use crate::client::{classify, sdk_config, ClientOptions};

/// GetRecords' largest page.
const RECORDS_PER_PAGE: i32 = 1000;

/// A DynamoDB Streams client for one table's stream.
#[derive(Clone, Debug)]
pub struct StreamsClient {
    client: Client,
    table: String,
}

impl StreamsClient {
    /// A client for these options (the same endpoint, region and credentials as the
    /// DynamoDB client's), for the stream of `table` (named in errors).
    pub async fn connect(options: &ClientOptions, table: &str) -> Self {
        StreamsClient { client: Client::new(&sdk_config(options).await), table: table.to_owned() }
    }

    fn failed<E>(
        &self,
        error: aws_sdk_dynamodbstreams::error::SdkError<
            E,
            aws_sdk_dynamodbstreams::config::http::HttpResponse,
        >,
    ) -> StreamsError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match error.as_service_error().and_then(|e| e.code()) {
            Some("TrimmedDataAccessException") => StreamsError::Trimmed {
                table: self.table.clone(),
                shard: String::new(),
                position: String::new(),
            },
            Some("ExpiredIteratorException") => StreamsError::ExpiredIterator,
            Some("LimitExceededException") => StreamsError::Request(crate::DynamoError::new(
                crate::ErrorKind::Transient,
                &self.table,
                "LimitExceededException: too many DynamoDB Streams requests",
            )),
            _ => StreamsError::Request(classify(error, &self.table)),
        }
    }
}

impl StreamsApi for StreamsClient {
    async fn describe(
        &self,
        stream_arn: &str,
        start_after: Option<&str>,
    ) -> Result<DescribePage, StreamsError> {
        let output = self
            .client
            .describe_stream()
            .stream_arn(stream_arn)
            .set_exclusive_start_shard_id(start_after.map(str::to_owned))
            .send()
            .await
            .map_err(|e| self.failed(e))?;
        let Some(description) = output.stream_description() else {
            return Ok(DescribePage::default());
        };
        Ok(DescribePage {
            status: description.stream_status().map(|s| s.as_str().to_owned()).unwrap_or_default(),
            view_type: description.stream_view_type().map(|v| v.as_str().to_owned()).unwrap_or_default(),
            shards: description
                .shards()
                .iter()
                .filter_map(|shard| {
                    Some(Shard {
                        id: shard.shard_id()?.to_owned(),
                        parent: shard.parent_shard_id().map(str::to_owned),
                        ending_sequence: shard
                            .sequence_number_range()
                            .and_then(|r| r.ending_sequence_number())
                            .map(str::to_owned),
                    })
                })
                .collect(),
            last_evaluated_shard: description.last_evaluated_shard_id().map(str::to_owned),
        })
    }

    async fn iterator(
        &self,
        stream_arn: &str,
        shard: &str,
        start: &ShardStart,
    ) -> Result<String, StreamsError> {
        let request = self.client.get_shard_iterator().stream_arn(stream_arn).shard_id(shard);
        let request = match start {
            ShardStart::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            ShardStart::After(sequence) => {
                request.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).sequence_number(sequence)
            }
        };
        let output = request.send().await.map_err(|e| self.failed(e))?;
        output.shard_iterator().map(str::to_owned).ok_or_else(|| {
            StreamsError::Request(crate::DynamoError::new(
                crate::ErrorKind::Fatal,
                &self.table,
                format!("GetShardIterator returned no iterator for shard {shard}"),
            ))
        })
    }

    async fn records(&self, iterator: &str) -> Result<RecordsPage, StreamsError> {
        let output = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(RECORDS_PER_PAGE)
            .send()
            .await
            .map_err(|e| self.failed(e))?;
        Ok(RecordsPage {
            records: output.records().iter().filter_map(record).collect(),
            next_iterator: output.next_shard_iterator().map(str::to_owned),
        })
    }
}

/// A record in the reader's terms; `None` for one without its stream record or sequence
/// number (the service always sends both).
fn record(record: &aws_sdk_dynamodbstreams::types::Record) -> Option<StreamRecord> {
    let change = record.dynamodb()?;
    let event = match record.event_name()? {
        OperationType::Insert => RecordEvent::Insert,
        OperationType::Modify => RecordEvent::Modify,
        OperationType::Remove => RecordEvent::Remove,
        _ => return None,
    };
    let mut unsupported = None;
    let mut image = |image: Option<&HashMap<String, AttributeValue>>| {
        image.map(|image| {
            let mut item = Item::new();
            for (name, value) in image {
                match attr(value) {
                    Some(value) => {
                        item.insert(name.clone(), value);
                    }
                    None => unsupported = Some(name.clone()),
                }
            }
            item
        })
    };
    let keys = image(change.keys()).unwrap_or_default();
    let (new_image, old_image) = (image(change.new_image()), image(change.old_image()));
    Some(StreamRecord {
        event,
        sequence_number: change.sequence_number()?.to_owned(),
        keys,
        new_image,
        old_image,
        created_at: change.approximate_creation_date_time().map(|t| t.as_secs_f64()),
        by_ttl: record.user_identity().is_some_and(|identity| {
            identity.principal_id() == Some("dynamodb.amazonaws.com") && identity.r#type() == Some("Service")
        }),
        unsupported,
    })
}

/// A streams attribute value as an [`Attr`]; `None` for a type sluice does not map (binary
/// sets).
fn attr(value: &AttributeValue) -> Option<Attr> {
    Some(match value {
        AttributeValue::S(s) => Attr::S(s.clone()),
        AttributeValue::N(n) => Attr::N(n.clone()),
        AttributeValue::B(b) => Attr::B(b.as_ref().to_vec()),
        AttributeValue::Bool(b) => Attr::Bool(*b),
        AttributeValue::Null(_) => Attr::Null,
        AttributeValue::L(items) => Attr::L(items.iter().map(attr).collect::<Option<_>>()?),
        AttributeValue::M(map) => {
            Attr::M(map.iter().map(|(k, v)| Some((k.clone(), attr(v)?))).collect::<Option<_>>()?)
        }
        AttributeValue::Ss(items) => Attr::Ss(items.clone()),
        AttributeValue::Ns(items) => Attr::Ns(items.clone()),
        _ => return None,
    })
}
