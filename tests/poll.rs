//! The polling outbox source (no logical replication) into a real Kafka-protocol broker,
//! consumed back with rdkafka: transactions that commit out of id order, concurrent writers,
//! two pollers at once, and kill -9 of the active poller.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{kill_9, sluice, stop, wait_for, Consumed, Kafka, LogsOnPanic, TestDb};
use crate::operations::start;

const OUTBOX: &str = "CREATE TABLE audit (n int8);
  CREATE TABLE outbox (id bigserial PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL,
                       type text NOT NULL, payload jsonb, seq int8, published_at timestamptz);";

/// A config file polling `public.outbox` into Kafka at `brokers`, plus `extra` sections.
fn poll_config(db: &TestDb, dir: &Path, name: &str, brokers: &str, poll_extra: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let connection = db.connection();
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nretry_for = \"10s\"\n[monitoring]\nlisten = \"127.0.0.1:0\"\n\
             [source.connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"\n\
             [source.poll]\ntable = \"public.outbox\"\ninterval = \"100ms\"\nbatch_size = 50\n{poll_extra}\n\
             [target]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\nretry_for = \"2m\"\n\
             [target.outbox]\ntable = \"public.outbox\"\n{extra}\n",
            connection.port, connection.dbname
        ),
    )
    .unwrap();
    path
}

/// `(aggregate id, seq)` of a record.
fn event(record: &Consumed) -> (String, i64) {
    let payload: serde_json::Value = serde_json::from_str(record.value.as_deref().unwrap()).unwrap();
    (record.key.clone().unwrap(), payload["seq"].as_i64().unwrap())
}

/// `writers` concurrent writers, each appending `per_writer` events (seq 0, 1, …) to its own
/// aggregate `w<n>`, one transaction per event. Half the transactions write to another table
/// first (taking their transaction id early), and each one sleeps a random while between the
/// insert and the commit, so transactions commit out of id order all the time.
async fn concurrent_writers(connection: sluice_postgres::ConnectionConfig, writers: usize, per_writer: i64) {
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let connection = connection.clone();
        tasks.push(tokio::spawn(async move {
            let sql = sluice_postgres::connect_sql(&connection).await.unwrap();
            for seq in 0..per_writer {
                let early = if seq % 2 == 0 { "INSERT INTO audit VALUES (1);" } else { "" };
                sql.batch_execute(&format!(
                    "BEGIN; {early} INSERT INTO outbox (aggregatetype, aggregateid, type, payload, seq) \
                     VALUES ('Order', 'w{writer}', 'Step', jsonb_build_object('seq', {seq}), {seq}); \
                     SELECT pg_sleep(random() * 0.02); COMMIT;"
                ))
                .await
                .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Every aggregate's events arrived complete, their first deliveries in order; returns how
/// many records were duplicates.
fn check_per_aggregate(records: &[Consumed], writers: usize, per_writer: i64) -> usize {
    let mut by_aggregate: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut sorted: Vec<&Consumed> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for record in sorted {
        let (aggregate, seq) = event(record);
        by_aggregate.entry(aggregate).or_default().push(seq);
    }
    assert_eq!(by_aggregate.len(), writers, "every writer's aggregate: {:?}", by_aggregate.keys());
    let mut duplicates = 0;
    for (aggregate, seqs) in &by_aggregate {
        let mut seen = BTreeSet::new();
        let first: Vec<i64> = seqs.iter().copied().filter(|s| seen.insert(*s)).collect();
        assert_eq!(
            first,
            (0..per_writer).collect::<Vec<_>>(),
            "{aggregate}: nothing skipped, first deliveries in order: {seqs:?}"
        );
        duplicates += seqs.len() - first.len();
    }
    duplicates
}

fn distinct(records: &[Consumed]) -> usize {
    records.iter().map(event).collect::<BTreeSet<_>>().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_events_wait_for_older_open_transactions_and_concurrent_writers_lose_nothing() {
    let kafka = Kafka::start(None);
    kafka.create_topic("outbox.event.Order", 1).await;
    let db = TestDb::new();
    db.sql(OUTBOX);
    let dir = tempfile::tempdir().unwrap();
    let config = poll_config(&db, dir.path(), "poll", &kafka.brokers, "", "");
    let log = dir.path().join("sluice.log");
    let _logs = LogsOnPanic(vec![log.clone()]);

    let (code, out) = {
        let out = sluice().args(["validate", "-c"]).arg(&config).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    assert_eq!(code, Some(0), "validate accepts the polled table: {out}");
    let child = start(&config, &log);

    // An older transaction takes id 1 and stays open; a younger one takes id 2 and commits.
    // The younger row is committed and visible for a second of polls, yet must wait: the
    // older transaction could still commit (it does), and its event comes first.
    let older = sluice_postgres::connect_sql(&db.connection()).await.unwrap();
    older.batch_execute("BEGIN; INSERT INTO outbox (aggregatetype, aggregateid, type, payload, seq) VALUES ('Order', 'first', 'Step', '{\"seq\": 0}', 0)").await.unwrap();
    db.sql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload, seq) VALUES ('Order', 'second', 'Step', '{\"seq\": 0}', 0)");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        kafka.consume_all("outbox.event.Order", Duration::from_millis(500)).is_empty(),
        "nothing passes an open older transaction"
    );
    older.batch_execute("COMMIT").await.unwrap();
    let records = kafka.consume("outbox.event.Order", Duration::from_secs(30), |r| r.len() >= 2);
    let keys: Vec<_> = records.iter().map(|r| r.key.clone().unwrap()).collect();
    assert_eq!(keys, ["first", "second"], "transaction order, not commit order");

    concurrent_writers(db.connection(), 8, 60).await;
    let records = kafka.consume("outbox.event.Order", Duration::from_secs(90), |r| distinct(r) >= 2 + 8 * 60);
    wait_for("the outbox table to empty", Duration::from_secs(30), || async {
        db.sql("SELECT count(*) FROM outbox").trim() == "0"
    })
    .await;
    let status = sluice().args(["status", "--json", "-c"]).arg(&config).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["outbox_backlog_rows"], 0, "{status}");
    for lsn_only in ["received_lsn", "durable_lsn", "confirmed_lsn", "apply_lag_bytes", "slot"] {
        assert!(status.get(lsn_only).is_none(), "a polled source has no {lsn_only}: {status}");
    }
    let text = sluice().args(["status", "-c"]).arg(&config).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(!text.contains("lsn") && !text.contains("slot"), "{text}");
    stop(child);
    let records: Vec<Consumed> =
        records.into_iter().filter(|r| r.key.as_deref().is_some_and(|k| k.starts_with('w'))).collect();
    let duplicates = check_per_aggregate(&records, 8, 60);
    assert_eq!(duplicates, 0, "without a crash, every event is published once");
    assert_eq!(
        kafka.consume_all("outbox.event.Order", Duration::from_secs(2)).len(),
        2 + 8 * 60,
        "nothing was published twice"
    );
    let first = &records[0];
    assert!(
        first.header("id").is_some_and(|id| id.parse::<i64>().is_ok()),
        "the id header is the row id: {:?}",
        first.headers
    );
    assert_eq!(first.header("type"), Some("Step"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pollers_without_the_ha_lock_never_publish_a_row_twice() {
    let kafka = Kafka::start(None);
    kafka.create_topic("outbox.event.Order", 3).await;
    let db = TestDb::new();
    db.sql(OUTBOX);
    let dir = tempfile::tempdir().unwrap();
    // Both poll at once: only the row locks keep them apart. Rows are marked, not deleted.
    let config = poll_config(
        &db,
        dir.path(),
        "poll",
        &kafka.brokers,
        "after_publish = \"mark\"\n",
        "[ha]\nenabled = false\n",
    );
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let _logs = LogsOnPanic(logs.to_vec());
    let a = start(&config, &logs[0]);
    let b = start(&config, &logs[1]);
    concurrent_writers(db.connection(), 6, 80).await;
    let records = kafka.consume("outbox.event.Order", Duration::from_secs(90), |r| distinct(r) >= 6 * 80);
    wait_for("every row to be marked", Duration::from_secs(30), || async {
        db.sql("SELECT count(*) FROM outbox WHERE published_at IS NULL").trim() == "0"
    })
    .await;
    stop(a);
    stop(b);
    assert_eq!(check_per_aggregate(&records, 6, 80), 0, "no row published twice");
    let all = kafka.consume_all("outbox.event.Order", Duration::from_secs(2));
    assert_eq!(check_per_aggregate(&all, 6, 80), 0, "no row published twice, however long one waits");
    assert_eq!(db.sql("SELECT count(*) FROM outbox").trim(), "480", "marked rows stay");
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(!text.contains("ERROR"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_active_poller_hands_over_to_the_standby_and_loses_nothing() {
    let kafka = Kafka::start(None);
    kafka.create_topic("outbox.event.Order", 3).await;
    let db = TestDb::new();
    db.sql(OUTBOX);
    let dir = tempfile::tempdir().unwrap();
    let config =
        poll_config(&db, dir.path(), "poll", &kafka.brokers, "", "[ha]\nretry_interval = \"200ms\"\n");
    let logs = [dir.path().join("active.log"), dir.path().join("standby.log")];
    let _logs = LogsOnPanic(logs.to_vec());
    let mut active = start(&config, &logs[0]);
    wait_for("the first replica to hold the HA lock", Duration::from_secs(30), || async {
        std::fs::read_to_string(&logs[0]).unwrap_or_default().contains("holding the HA lock")
    })
    .await;
    let standby = start(&config, &logs[1]);
    wait_for("the second replica to stand by", Duration::from_secs(30), || async {
        std::fs::read_to_string(&logs[1]).unwrap_or_default().contains("standing by")
    })
    .await;
    let writer = tokio::spawn(concurrent_writers(db.connection(), 4, 150));
    kafka.consume("outbox.event.Order", Duration::from_secs(60), |r| r.len() >= 100);
    kill_9(&mut active);
    writer.await.unwrap();
    let records = kafka.consume("outbox.event.Order", Duration::from_secs(120), |r| distinct(r) >= 4 * 150);
    wait_for("the outbox table to empty", Duration::from_secs(30), || async {
        db.sql("SELECT count(*) FROM outbox").trim() == "0"
    })
    .await;
    stop(standby);
    drop(records);
    let records = kafka.consume_all("outbox.event.Order", Duration::from_secs(2));
    let duplicates = check_per_aggregate(&records, 4, 150);
    // The README: a crash republishes at most the batch that was in flight.
    assert!(duplicates <= 50, "duplicates only from the batch in flight at the kill: {duplicates}");
    assert!(
        std::fs::read_to_string(&logs[1]).unwrap().contains("holding the HA lock"),
        "the standby took over"
    );
}

#[test]
fn validate_names_a_polled_table_that_does_not_exist_or_lacks_the_mark_column() {
    let db = TestDb::new();
    db.sql(OUTBOX);
    let dir = tempfile::tempdir().unwrap();
    let config =
        poll_config(&db, dir.path(), "missing", "127.0.0.1:9", "", "").to_string_lossy().into_owned();
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap().replace("public.outbox", "public.missing"),
    )
    .unwrap();
    let (code, out) = crate::harness::sluice_output(&["validate", "-c", &config], Duration::from_secs(30));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("source.poll: source.poll.table: table public.missing does not exist"), "{out}");

    let config = poll_config(
        &db,
        dir.path(),
        "mark",
        "127.0.0.1:9",
        "after_publish = \"mark\"\nmark_column = \"sent_at\"\n",
        "",
    );
    let (code, out) =
        crate::harness::sluice_output(&["validate", "-c", config.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("table public.outbox has no column \"sent_at\""), "{out}");
}
