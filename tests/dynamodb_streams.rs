//! The DynamoDB Streams reader against moto's real stream, through aws-sdk-dynamodb (the
//! writes, as an application makes them) and aws-sdk-dynamodbstreams (the reads).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::{RetryPolicy, Shutdown};
use sluice_dynamodb::streams::sdk::StreamsClient;
use sluice_dynamodb::streams::{RecordEvent, ShardBatch, StreamReader, StreamRecord};
use sluice_dynamodb::{Attr, ClientOptions, Item};
use tokio::sync::mpsc;

use crate::harness::{dynamo_client, moto};

fn item(pairs: &[(&str, Attr)]) -> Item {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// Reads the stream from `positions` until `count` records arrived (60 s at most), then
/// stops the reader.
async fn read(
    options: &ClientOptions,
    table: &str,
    arn: &str,
    positions: BTreeMap<String, String>,
    count: usize,
) -> Vec<(String, StreamRecord)> {
    let api = Arc::new(StreamsClient::connect(options, table).await);
    let reader =
        StreamReader::new(api, table, arn, positions, Vec::new(), RetryPolicy::new(Duration::from_secs(60)));
    let (trigger, shutdown) = Shutdown::new();
    let (tx, mut rx) = mpsc::channel::<ShardBatch>(8);
    let running = tokio::spawn(reader.run(tx, shutdown));
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while records.len() < count {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(batch)) => records.extend(batch.records.into_iter().map(|r| (batch.shard.clone(), r))),
            _ => panic!("{} of {count} records within 60 s: {records:?}", records.len()),
        }
    }
    trigger.trigger();
    running.await.unwrap().expect("the reader stops cleanly");
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_follows_moto_s_stream_in_order_with_both_images_and_resumes_after_a_position() {
    let moto = moto();
    let options = ClientOptions::local(&moto.url);
    let client = dynamo_client(&moto.url).await;
    let table = "streams_reader";
    client.create_table(table, "pk", Some("sk")).await.unwrap();
    assert_eq!(client.stream_of(table).await.unwrap(), None, "no stream before it is enabled");
    client.enable_stream(table, "NEW_AND_OLD_IMAGES").await.unwrap();
    let stream = client.stream_of(table).await.unwrap().expect("a stream");
    assert_eq!(stream.view_type, "NEW_AND_OLD_IMAGES");

    // An application's writes: a put, a put over it, a delete, another put.
    let key = item(&[("pk", Attr::S("CUSTOMER#1".into())), ("sk", Attr::S("PROFILE".into()))]);
    let mut first = key.clone();
    first.insert("email".into(), Attr::S("a@example.com".into()));
    client.batch_put(table, vec![first]).await.unwrap();
    let mut changed = key.clone();
    changed.insert("email".into(), Attr::S("b@example.com".into()));
    changed.insert("v".into(), Attr::N("7".into()));
    client.batch_put(table, vec![changed]).await.unwrap();
    client.delete_item(table, &key).await.unwrap();
    let mut second = item(&[("pk", Attr::S("CUSTOMER#2".into())), ("sk", Attr::S("PROFILE".into()))]);
    second.insert("tags".into(), Attr::Ss(vec!["x".into()]));
    client.batch_put(table, vec![second]).await.unwrap();

    let records = read(&options, table, &stream.arn, BTreeMap::new(), 4).await;
    let events: Vec<RecordEvent> = records.iter().map(|(_, r)| r.event).collect();
    assert_eq!(events, [RecordEvent::Insert, RecordEvent::Modify, RecordEvent::Remove, RecordEvent::Insert]);
    let (_, modify) = &records[1];
    assert_eq!(modify.keys, key);
    assert_eq!(modify.old_image.as_ref().unwrap()["email"], Attr::S("a@example.com".into()));
    let new = modify.new_image.as_ref().unwrap();
    assert_eq!(new["email"], Attr::S("b@example.com".into()));
    assert_eq!(new["v"], Attr::N("7".into()), "a version attribute is in the image");
    let (_, remove) = &records[2];
    assert!(remove.new_image.is_none() && remove.old_image.is_some() && !remove.by_ttl);
    assert_eq!(records[3].1.new_image.as_ref().unwrap()["tags"], Attr::Ss(vec!["x".into()]));
    assert!(records.iter().all(|(_, r)| r.unsupported.is_none()));
    let sequences: Vec<u128> = records.iter().map(|(_, r)| r.sequence_number.parse().unwrap()).collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "ascending within the shard: {sequences:?}");

    // Resuming after the MODIFY gives the REMOVE first: nothing before it again, nothing lost.
    let (shard, _) = &records[1];
    let positions = BTreeMap::from([(shard.clone(), records[1].1.sequence_number.clone())]);
    let resumed = read(&options, table, &stream.arn, positions, 2).await;
    let resumed: Vec<&str> = resumed.iter().map(|(_, r)| r.sequence_number.as_str()).collect();
    assert_eq!(resumed, [records[2].1.sequence_number.as_str(), records[3].1.sequence_number.as_str()]);
}
