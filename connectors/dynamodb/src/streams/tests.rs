//! The reader against recorded DynamoDB Streams answers (the JSON protocol's requests and
//! responses, in `recorded/`): shard lineage across DescribeStream pages, a trimmed parent,
//! iterator expiry and trimmed data. moto serves one shard that never splits, expires or
//! trims, so these cases are tested here; the integration tests read moto's real stream.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value;

use super::*;
use crate::attr::Attr;

const ARN: &str = "arn:aws:dynamodb:us-east-1:123456789012:table/shop/stream/2026-12-01T00:00:00.000";
const A: &str = "shardId-00000001764547200000-aaaaaaaa";
const B: &str = "shardId-00000001764561600000-bbbbbbbb";
const C: &str = "shardId-00000001764561600000-cccccccc";

/// Replays a recorded exchange: each request must be one the recording has, answered as
/// recorded; every call is logged.
struct Recorded {
    exchanges: Mutex<BTreeMap<(&'static str, String), VecDeque<Value>>>,
    calls: Mutex<Vec<String>>,
}

impl Recorded {
    fn load(json: &str) -> Arc<Self> {
        let recording: Value = serde_json::from_str(json).expect("a recording");
        let mut exchanges: BTreeMap<(&'static str, String), VecDeque<Value>> = BTreeMap::new();
        for operation in ["describe", "get_shard_iterator", "get_records"] {
            for exchange in recording[operation].as_array().expect("a list of exchanges") {
                exchanges
                    .entry((operation, request_key(&exchange["request"])))
                    .or_default()
                    .push_back(exchange.clone());
            }
        }
        Arc::new(Recorded { exchanges: Mutex::new(exchanges), calls: Mutex::new(Vec::new()) })
    }

    fn answer(&self, operation: &'static str, request: Value) -> Result<Value, StreamsError> {
        let key = request_key(&request);
        self.calls.lock().unwrap().push(format!("{operation} {key}"));
        let mut exchanges = self.exchanges.lock().unwrap();
        let queue = exchanges
            .get_mut(&(operation, key.clone()))
            .unwrap_or_else(|| panic!("no recorded answer to {operation} {key}"));
        // The last answer repeats (an open shard's empty pages).
        let exchange = if queue.len() > 1 { queue.pop_front().unwrap() } else { queue[0].clone() };
        match exchange.get("error") {
            Some(error) => Err(recorded_error(error)),
            None => Ok(exchange["response"].clone()),
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

fn request_key(request: &Value) -> String {
    serde_json::to_string(request).expect("json")
}

/// An error answer as the SDK client classifies it (`sdk::StreamsClient::failed`).
fn recorded_error(error: &Value) -> StreamsError {
    let kind = error["__type"].as_str().unwrap_or_default();
    match kind.rsplit('#').next() {
        Some("TrimmedDataAccessException") => {
            StreamsError::Trimmed { table: "shop".into(), shard: String::new(), position: String::new() }
        }
        Some("ExpiredIteratorException") => StreamsError::ExpiredIterator,
        _ => StreamsError::Request(crate::DynamoError::new(crate::ErrorKind::Fatal, "shop", kind)),
    }
}

fn attr(value: &Value) -> Attr {
    let (kind, value) = value.as_object().and_then(|o| o.iter().next()).expect("one type descriptor");
    let strings = || value.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect();
    match kind.as_str() {
        "S" => Attr::S(value.as_str().unwrap().into()),
        "N" => Attr::N(value.as_str().unwrap().into()),
        "BOOL" => Attr::Bool(value.as_bool().unwrap()),
        "NULL" => Attr::Null,
        "SS" => Attr::Ss(strings()),
        "NS" => Attr::Ns(strings()),
        "L" => Attr::L(value.as_array().unwrap().iter().map(attr).collect()),
        "M" => Attr::M(value.as_object().unwrap().iter().map(|(k, v)| (k.clone(), attr(v))).collect()),
        other => panic!("type {other} is not in the recordings"),
    }
}

fn image(value: &Value) -> Option<Item> {
    value.as_object().map(|o| o.iter().map(|(k, v)| (k.clone(), attr(v))).collect())
}

impl StreamsApi for Recorded {
    async fn describe(
        &self,
        stream_arn: &str,
        start_after: Option<&str>,
    ) -> Result<DescribePage, StreamsError> {
        let mut request = serde_json::json!({ "StreamArn": stream_arn });
        if let Some(start) = start_after {
            request["ExclusiveStartShardId"] = start.into();
        }
        let response = self.answer("describe", request)?;
        let description = &response["StreamDescription"];
        let text = |v: &Value| v.as_str().map(str::to_owned);
        Ok(DescribePage {
            status: text(&description["StreamStatus"]).unwrap_or_default(),
            view_type: text(&description["StreamViewType"]).unwrap_or_default(),
            shards: description["Shards"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| Shard {
                    id: text(&s["ShardId"]).unwrap(),
                    parent: text(&s["ParentShardId"]),
                    ending_sequence: text(&s["SequenceNumberRange"]["EndingSequenceNumber"]),
                })
                .collect(),
            last_evaluated_shard: text(&description["LastEvaluatedShardId"]),
        })
    }

    async fn iterator(
        &self,
        _stream_arn: &str,
        shard: &str,
        start: &ShardStart,
    ) -> Result<String, StreamsError> {
        let request = match start {
            ShardStart::TrimHorizon => {
                serde_json::json!({ "ShardId": shard, "ShardIteratorType": "TRIM_HORIZON" })
            }
            ShardStart::After(sequence) => serde_json::json!({
                "ShardId": shard, "ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": sequence
            }),
        };
        Ok(self.answer("get_shard_iterator", request)?["ShardIterator"].as_str().unwrap().to_owned())
    }

    async fn records(&self, iterator: &str) -> Result<RecordsPage, StreamsError> {
        let response = self.answer("get_records", serde_json::json!({ "ShardIterator": iterator }))?;
        let records = response["Records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let change = &r["dynamodb"];
                StreamRecord {
                    event: match r["eventName"].as_str().unwrap() {
                        "INSERT" => RecordEvent::Insert,
                        "MODIFY" => RecordEvent::Modify,
                        _ => RecordEvent::Remove,
                    },
                    sequence_number: change["SequenceNumber"].as_str().unwrap().into(),
                    keys: image(&change["Keys"]).unwrap(),
                    new_image: image(&change["NewImage"]),
                    old_image: image(&change["OldImage"]),
                    created_at: change["ApproximateCreationDateTime"].as_f64(),
                    by_ttl: r["userIdentity"]["PrincipalId"] == "dynamodb.amazonaws.com"
                        && r["userIdentity"]["Type"] == "Service",
                    unsupported: None,
                }
            })
            .collect();
        Ok(RecordsPage { records, next_iterator: response["NextShardIterator"].as_str().map(str::to_owned) })
    }
}

fn reader(api: &Arc<Recorded>, positions: &[(&str, &str)]) -> StreamReader<Recorded> {
    StreamReader::new(
        Arc::clone(api),
        "shop",
        ARN,
        positions.iter().map(|(s, p)| (s.to_string(), p.to_string())).collect(),
        Vec::new(),
        sluice_core::RetryPolicy::new(Duration::from_secs(1)),
    )
}

/// Runs the reader until `count` batches arrived (or 10 s passed), then stops it.
async fn batches(
    reader: StreamReader<Recorded>,
    count: usize,
) -> (Vec<ShardBatch>, Result<(), StreamsError>) {
    let (trigger, shutdown) = sluice_core::Shutdown::new();
    let (tx, mut rx) = mpsc::channel(16);
    let running = tokio::spawn(reader.run(tx, shutdown));
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < count {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            // A shard found at its end says so; these tests count the records' batches.
            Ok(Some(batch)) if batch.read_to.is_some() => {
                assert!(batch.records.is_empty() && !batch.finished)
            }
            Ok(Some(batch)) => got.push(batch),
            _ => break,
        }
    }
    trigger.trigger();
    let ended = running.await.expect("the reader ends");
    (got, ended)
}

#[tokio::test]
async fn a_child_shard_is_read_only_after_its_parent_and_a_trimmed_parent_makes_a_root() {
    let api = Recorded::load(include_str!("recorded/split.json"));
    let (got, ended) = batches(reader(&api, &[]), 4).await;
    ended.expect("no error");
    let summary: Vec<(String, Vec<String>, bool)> = got
        .iter()
        .map(|b| (b.shard.clone(), b.records.iter().map(|r| r.sequence_number.clone()).collect(), b.finished))
        .collect();
    // A's two pages, the second its last; B's record only after A's end; C (orphaned) at any
    // time, since its parent is trimmed.
    let of = |shard: &str| summary.iter().filter(|s| s.0 == shard).cloned().collect::<Vec<_>>();
    assert_eq!(
        of(A),
        vec![
            (A.to_string(), vec!["100000000000000000001".to_string()], false),
            (A.to_string(), vec!["100000000000000000002".to_string()], true)
        ]
    );
    assert_eq!(of(B), vec![(B.to_string(), vec!["200000000000000000001".to_string()], false)]);
    assert_eq!(of(C), vec![(C.to_string(), vec!["300000000000000000001".to_string()], false)]);
    let position = |shard: &str, finished: bool| summary.iter().position(|s| s.0 == shard && s.2 == finished);
    assert!(position(A, true).unwrap() < position(B, false).unwrap(), "{summary:?}");
    // B's iterator was asked for only after A's last page was read.
    let calls = api.calls();
    let call = |needle: &str| calls.iter().position(|c| c.contains(needle)).unwrap_or(usize::MAX);
    assert!(call("iterator-A-1") < call(&format!("\"ShardId\":\"{B}\"")), "{calls:#?}");
    // Both DescribeStream pages were read.
    assert!(calls.iter().any(|c| c.contains("ExclusiveStartShardId")), "{calls:#?}");
    // The records carry what the stream sent: images, a TTL removal, sets and numbers as text.
    let remove = &got.iter().find(|b| b.shard == B).unwrap().records[0];
    assert_eq!(remove.event, RecordEvent::Remove);
    assert!(remove.by_ttl && remove.new_image.is_none() && remove.old_image.is_some());
    let insert = &got.iter().find(|b| b.shard == C).unwrap().records[0];
    let new = insert.new_image.as_ref().unwrap();
    assert_eq!(new["tags"], Attr::Ss(vec!["x".into(), "y".into()]));
    assert_eq!(new["n"], Attr::N("12.50".into()));
    assert!(!format!("{insert:?}").contains("12.50"), "Debug shows no values: {insert:?}");
}

#[tokio::test]
async fn a_finished_parent_from_the_checkpoint_lets_its_child_start_at_once() {
    let api = Recorded::load(include_str!("recorded/split.json"));
    let reader = StreamReader::new(
        Arc::clone(&api),
        "shop",
        ARN,
        BTreeMap::new(),
        vec![A.to_string()],
        sluice_core::RetryPolicy::new(Duration::from_secs(1)),
    );
    let (got, ended) = batches(reader, 2).await;
    ended.expect("no error");
    assert!(got.iter().all(|b| b.shard != A), "a finished shard is not read again");
    assert!(!api.calls().iter().any(|c| c.contains("iterator-A")));
}

#[tokio::test]
async fn an_expired_iterator_is_renewed_after_the_last_record_read() {
    let api = Recorded::load(include_str!("recorded/expiry.json"));
    let (got, ended) = batches(reader(&api, &[]), 2).await;
    ended.expect("no error");
    let sequences: Vec<&str> =
        got.iter().flat_map(|b| b.records.iter().map(|r| r.sequence_number.as_str())).collect();
    assert_eq!(sequences, ["100000000000000000001", "100000000000000000002"], "none lost, none twice");
    assert!(api.calls().iter().any(|c| c.contains("AFTER_SEQUENCE_NUMBER")), "{:#?}", api.calls());
}

#[test]
fn an_iterator_is_renewed_before_its_fifteen_minutes_are_up() {
    let mut cursor = ShardCursor::new("shop", ARN, A, ShardStart::TrimHorizon);
    let now = Instant::now();
    assert!(cursor.needs_iterator(now), "no iterator yet");
    cursor.iterator = Some(("iterator".into(), now));
    assert!(!cursor.needs_iterator(now + Duration::from_secs(13 * 60)));
    assert!(cursor.needs_iterator(now + ITERATOR_RENEW_AFTER));
    assert!(ITERATOR_RENEW_AFTER < Duration::from_secs(15 * 60));
}

#[tokio::test]
async fn trimmed_data_stops_the_reader_naming_the_table_shard_and_position() {
    let api = Recorded::load(include_str!("recorded/trimmed.json"));
    let (got, ended) = batches(reader(&api, &[(A, "100000000000000000005")]), 1).await;
    assert!(got.is_empty(), "nothing is skipped over: {got:?}");
    let error = ended.expect_err("a stop");
    let message = error.to_string();
    assert!(matches!(error, StreamsError::Trimmed { .. }), "{message}");
    for part in ["table shop", A, "sequence number 100000000000000000005", "24 h"] {
        assert!(message.contains(part), "{part} in {message}");
    }
    assert!(!error.is_transient());
}

#[test]
fn lineage_starts_each_shard_once() {
    let shard = |id: &str, parent: Option<&str>| Shard {
        id: id.into(),
        parent: parent.map(Into::into),
        ending_sequence: None,
    };
    let mut lineage = Lineage::default();
    lineage.update(vec![
        shard("p", None),
        shard("c1", Some("p")),
        shard("c2", Some("p")),
        shard("g", Some("c1")),
    ]);
    let ids = |v: Vec<Shard>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(ids(lineage.take_ready()), ["p"]);
    assert!(lineage.take_ready().is_empty(), "p is started, its children wait");
    lineage.finish("p");
    assert_eq!(ids(lineage.take_ready()), ["c1", "c2"]);
    assert_eq!(lineage.reading(), 2);
    // p trimmed away: nothing changes for the started children; g waits for c1.
    lineage.update(vec![shard("c1", Some("p")), shard("c2", Some("p")), shard("g", Some("c1"))]);
    assert!(lineage.take_ready().is_empty());
    lineage.finish("c1");
    assert_eq!(ids(lineage.take_ready()), ["g"]);
}
