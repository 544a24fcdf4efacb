//! The Kafka target against a real Kafka-protocol broker (tansu) on 127.0.0.1, consumed back
//! with rdkafka: plain CDC records, the outbox event router (WAL rows and logical messages),
//! kill -9 of sluice, and a broker outage.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{kill_9, wait_for, Consumed, Kafka, LogsOnPanic, Outage, TestDb};
use crate::operations::start;

/// The application's tables; the outbox publication holds only the outbox table, as in the
/// usual outbox set-up (business tables are not streamed).
const OUTBOX: &str = "CREATE TABLE orders (id int8 PRIMARY KEY, status text NOT NULL);
  CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text, aggregateid text NOT NULL,
                       type text NOT NULL, payload jsonb, seq int8);
  CREATE PUBLICATION p FOR TABLE outbox;";

fn kafka_config(db: &TestDb, dir: &Path, slot: &str, brokers: &str, extra: &str) -> PathBuf {
    db.config_file(
        dir,
        slot,
        "p",
        &format!("[target]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\nretry_for = \"2m\"\n{extra}"),
    )
}

/// Records per key, in offset order (one key lives in one partition).
fn by_key(records: &[Consumed]) -> BTreeMap<String, Vec<&Consumed>> {
    let mut keys: BTreeMap<String, Vec<&Consumed>> = BTreeMap::new();
    for record in records {
        keys.entry(record.key.clone().unwrap_or_default()).or_default().push(record);
    }
    for records in keys.values_mut() {
        records.sort_by_key(|r| (r.partition, r.offset));
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_changes_become_records_keyed_by_identity_in_order_with_tombstones() {
    let kafka = Kafka::start(None);
    kafka.create_topic("cdc.orders", 3).await;
    let db = TestDb::new();
    db.sql(OUTBOX);
    // Only the business table: the outbox table's plain CDC topic (cdc.outbox) does not exist,
    // and the start checks would refuse it.
    db.sql("ALTER PUBLICATION p SET TABLE orders");
    let dir = tempfile::tempdir().unwrap();
    // Rows from before the slot reach the topic through the initial backfill, as reads.
    db.sql("INSERT INTO orders SELECT g, 'old' FROM generate_series(101, 105) g");
    let config = kafka_config(
        &db,
        dir.path(),
        "cdc",
        &kafka.brokers,
        "topic = \"cdc.{table}\"\n[backfill]\ninitial = true\n",
    );
    let log = dir.path().join("sluice.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let mut child = start(&config, &log);
    db.wait_slot_active(&db.slot_name("cdc")).await;
    let op = |record: &Consumed| {
        let value: serde_json::Value = serde_json::from_str(record.value.as_deref().unwrap()).unwrap();
        (record.header("sluice.op").unwrap().to_owned(), value["op"].as_str().unwrap().to_owned())
    };
    let backfilled = kafka.consume("cdc.orders", Duration::from_secs(60), |r| r.len() >= 5);
    let mut reads: Vec<(String, (String, String))> =
        backfilled.iter().map(|r| (r.key.clone().unwrap(), op(r))).collect();
    reads.sort();
    let expected: Vec<(String, (String, String))> =
        (101..=105).map(|id| (format!("{{\"id\":{id}}}"), ("read".into(), "read".into()))).collect();
    assert_eq!(reads, expected, "each preloaded row once, as a read (header and value)");
    let positions: BTreeSet<&str> = backfilled.iter().map(|r| r.header("sluice.position").unwrap()).collect();
    assert_eq!(
        positions.len(),
        5,
        "each copied row has a position of its own, to deduplicate by: {positions:?}"
    );

    db.sql("INSERT INTO orders SELECT g, 'new' FROM generate_series(1, 20) g");
    for step in ["paid", "shipped"] {
        db.sql(&format!("UPDATE orders SET status = '{step}' WHERE id <= 10"));
    }
    db.sql("DELETE FROM orders WHERE id = 3");
    // 5 backfilled reads, 20 inserts, 20 updates, 1 delete and its tombstone.
    let records = kafka.consume("cdc.orders", Duration::from_secs(60), |r| r.len() >= 47);
    assert_eq!(records.len(), 47);
    let keys = by_key(&records);
    assert_eq!(keys.len(), 25, "one key per row");
    assert_eq!(op(keys["{\"id\":15}"][0]), ("insert".to_owned(), "insert".to_owned()));
    let statuses = |key: &str| -> Vec<String> {
        keys[key]
            .iter()
            .map(|r| match &r.value {
                Some(v) => serde_json::from_str::<serde_json::Value>(v).unwrap()["new"]["status"]
                    .as_str()
                    .unwrap_or("-")
                    .to_owned(),
                None => "tombstone".into(),
            })
            .collect()
    };
    assert_eq!(statuses("{\"id\":1}"), ["new", "paid", "shipped"], "per-key order");
    assert_eq!(
        statuses("{\"id\":3}"),
        ["new", "paid", "shipped", "-", "tombstone"],
        "delete, then a tombstone"
    );
    assert_eq!(statuses("{\"id\":15}"), ["new"]);
    let update = keys["{\"id\":1}"][1];
    assert_eq!(update.header("sluice.op"), Some("update"));
    assert_eq!(update.header("sluice.table"), Some("public.orders"));
    let position = update.header("sluice.position").unwrap();
    let value: serde_json::Value = serde_json::from_str(update.value.as_deref().unwrap()).unwrap();
    assert_eq!(position, format!("{}/{}", value["commit_lsn"].as_str().unwrap(), value["ordinal"]));
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_and_messages_become_events_per_aggregate_in_order() {
    let kafka = Kafka::start(None);
    kafka.create_topic("outbox.event.Order", 3).await;
    kafka.create_topic("outbox.event.Customer", 1).await;
    let db = TestDb::new();
    db.sql(OUTBOX);
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(
        &db,
        dir.path(),
        "outbox",
        &kafka.brokers,
        "[target.outbox]\ntable = \"public.outbox\"\nmessage_prefix = \"outbox\"\n",
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let (code, stderr) = crate::harness::sluice_output(
        &["validate", "--offline", "-c", config.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("target.outbox.message_prefix: needs source.replication.messages = true"),
        "{stderr}"
    );
    std::fs::write(
        &config,
        text.replace("status_interval = \"1s\"", "status_interval = \"1s\"\nmessages = true"),
    )
    .unwrap();
    let (code, out) =
        crate::harness::sluice_output(&["validate", "-c", config.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(code, Some(0), "the outbox table fits the router: {out}");
    // A router naming a column the table lacks is caught against the live catalog.
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("[target.outbox]\n", "[target.outbox]\naggregate_id_column = \"aggregate_id\"\n"),
    )
    .unwrap();
    let (code, stderr) =
        crate::harness::sluice_output(&["validate", "-c", wrong.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "target.outbox.aggregate_id_column: table public.outbox has no column \"aggregate_id\""
        ),
        "{stderr}"
    );
    // Plain CDC of the same table: its topic is checked on the broker.
    let cdc = dir.path().join("cdc.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&cdc, &text[..text.find("[target.outbox]").unwrap()]).unwrap();
    let (code, stderr) =
        crate::harness::sluice_output(&["validate", "-c", cdc.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "target.topic: Kafka topic \"public.outbox\" (for table public.outbox) does not exist on"
        ),
        "{stderr}"
    );
    let log = dir.path().join("sluice.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let mut child = start(&config, &log);
    db.wait_slot_active(&db.slot_name("outbox")).await;

    // The application's pattern: business row and event in one transaction, the outbox row
    // deleted at once (the event still travels through the WAL).
    for (order, kind) in [(1, "Created"), (2, "Created"), (1, "Paid"), (2, "Cancelled"), (1, "Shipped")] {
        db.sql(&format!(
            "BEGIN;
             INSERT INTO orders VALUES ({order}, '{kind}') ON CONFLICT (id) DO UPDATE SET status = excluded.status;
             WITH e AS (INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
                        VALUES ('Order', 'order-{order}', 'Order{kind}', jsonb_build_object('order', {order}, 'status', '{kind}')) RETURNING id)
             DELETE FROM outbox WHERE id IN (SELECT id FROM e);
             COMMIT"
        ));
    }
    db.sql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'order-2', 'OrderForgotten', NULL)");
    db.sql(
        "SELECT pg_logical_emit_message(true, 'outbox', '{\"id\":\"m-1\",\"aggregatetype\":\"Customer\",\"aggregateid\":\"c-9\",\"type\":\"CustomerRenamed\",\"payload\":{\"name\":\"Ada\"}}')",
    );
    let orders = kafka.consume("outbox.event.Order", Duration::from_secs(60), |r| r.len() >= 6);
    assert_eq!(orders.len(), 6, "one event per outbox row");
    let keys = by_key(&orders);
    let types =
        |key: &str| keys[key].iter().map(|r| r.header("type").unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(types("order-1"), ["OrderCreated", "OrderPaid", "OrderShipped"]);
    assert_eq!(types("order-2"), ["OrderCreated", "OrderCancelled", "OrderForgotten"]);
    let paid = keys["order-1"][1];
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(paid.value.as_deref().unwrap()).unwrap(),
        serde_json::json!({"order": 1, "status": "Paid"})
    );
    assert_eq!(paid.header("id").map(str::len), Some(36), "the event id (a uuid) travels as a header");
    assert!(paid.header("sluice.position").is_some());
    assert_eq!(keys["order-2"][2].value, None, "a NULL payload is a tombstone");

    let customers = kafka.consume("outbox.event.Customer", Duration::from_secs(60), |r| !r.is_empty());
    assert_eq!(customers[0].key.as_deref(), Some("c-9"));
    assert_eq!(customers[0].value.as_deref(), Some("{\"name\":\"Ada\"}"));
    assert_eq!(customers[0].header("id"), Some("m-1"));
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}

/// Writes outbox events `seq` in `from..to`, over 10 aggregates, one transaction each.
async fn write_events(connection: sluice_postgres::ConnectionConfig, from: i64, to: i64, pause: Duration) {
    let sql = sluice_postgres::connect_sql(&connection).await.unwrap();
    for seq in from..to {
        sql.batch_execute(&event_insert(seq)).await.unwrap();
        tokio::time::sleep(pause).await;
    }
}

/// The insert of outbox event `seq`; aggregates `order-0` to `order-9` take turns.
fn event_insert(seq: i64) -> String {
    format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, seq) VALUES ('Order', 'order-{}', 'Step', jsonb_build_object('seq', {seq}), {seq})",
        seq % 10
    )
}

fn seqs(records: &[&Consumed]) -> Vec<i64> {
    records
        .iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(r.value.as_deref().unwrap()).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect()
}

/// Every event arrived, and per aggregate the first deliveries are in order; a redelivered
/// run only repeats what came before it (at-least-once, in order).
fn assert_complete_and_ordered(records: &[Consumed], count: i64) {
    let delivered: BTreeSet<i64> = records.iter().map(|r| seqs(&[r])[0]).collect();
    assert_eq!(delivered, (0..count).collect::<BTreeSet<_>>(), "no event lost");
    for (key, records) in by_key(records) {
        let seqs = seqs(&records);
        let mut seen = BTreeSet::new();
        let mut first_deliveries = Vec::new();
        for seq in &seqs {
            if seen.insert(*seq) {
                first_deliveries.push(*seq);
            }
        }
        assert!(first_deliveries.windows(2).all(|w| w[0] < w[1]), "{key}: events in order: {seqs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_sluice_loses_no_event() {
    let kafka = Kafka::start(None);
    kafka.create_topic("outbox.event.Order", 3).await;
    let db = TestDb::new();
    db.sql(OUTBOX);
    let dir = tempfile::tempdir().unwrap();
    let config =
        kafka_config(&db, dir.path(), "kill", &kafka.brokers, "[target.outbox]\ntable = \"public.outbox\"\n");
    let (first_log, second_log) = (dir.path().join("first.log"), dir.path().join("second.log"));
    let _logs = LogsOnPanic(vec![first_log.clone(), second_log.clone()]);
    let mut first = start(&config, &first_log);
    db.wait_slot_active(&db.slot_name("kill")).await;
    let writer = tokio::spawn(write_events(db.connection(), 0, 400, Duration::from_millis(3)));
    kafka.consume("outbox.event.Order", Duration::from_secs(60), |r| r.len() >= 80);
    kill_9(&mut first);
    let confirmed_at_kill = db.slot_confirmed("kill").unwrap();
    writer.await.unwrap();
    let mut second = start(&config, &second_log);
    let records = kafka.consume("outbox.event.Order", Duration::from_secs(90), |r| {
        r.iter().map(|r| seqs(&[r])[0]).collect::<BTreeSet<_>>().len() >= 400
    });
    assert_complete_and_ordered(&records, 400);
    // Duplicates only where the README says: changes after the position confirmed at the kill.
    let mut seen = BTreeSet::new();
    for record in &records {
        if !seen.insert(seqs(&[record])[0]) {
            let position = record.header("sluice.position").unwrap();
            let commit_lsn: sluice_core::Lsn = position.rsplit_once('/').unwrap().0.parse().unwrap();
            assert!(
                commit_lsn >= confirmed_at_kill,
                "a duplicate of a confirmed change: {position} (confirmed {confirmed_at_kill})"
            );
        }
    }
    std::process::Command::new("kill").arg("-TERM").arg(second.id().to_string()).status().unwrap();
    assert!(second.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_stream_loses_nothing_and_confirms_nothing_early() {
    // Clients reach the broker through a proxy that the test can cut.
    let proxy_port = sluice::localpg::free_port().unwrap();
    let kafka = Kafka::start(Some(proxy_port));
    let outage = Outage::start_on(proxy_port, kafka.port).await;
    kafka.create_topic("outbox.event.Order", 3).await;
    let db = TestDb::new();
    db.sql(OUTBOX);
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(
        &db,
        dir.path(),
        "outage",
        &kafka.brokers,
        "[target.outbox]\ntable = \"public.outbox\"\n",
    );
    let log = dir.path().join("sluice.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let mut child = start(&config, &log);
    db.wait_slot_active(&db.slot_name("outage")).await;

    write_events(db.connection(), 0, 100, Duration::ZERO).await;
    kafka.consume("outbox.event.Order", Duration::from_secs(60), |r| r.len() >= 100);
    outage.begin();
    let first = db.commit_lsn_of(&event_insert(100));
    write_events(db.connection(), 101, 200, Duration::ZERO).await;
    // While the broker is unreachable the outage's first event is not confirmed, nor anything after it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let confirmed = db.slot_confirmed("outage").unwrap();
    assert!(confirmed < first, "nothing confirmed while the broker is down: {confirmed} < {first}");
    outage.end();
    let records = kafka.consume("outbox.event.Order", Duration::from_secs(120), |r| {
        r.iter().map(|r| seqs(&[r])[0]).collect::<BTreeSet<_>>().len() >= 200
    });
    assert_complete_and_ordered(&records, 200);
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_named_at_once_and_nothing_is_confirmed() {
    let kafka = Kafka::start(None);
    let db = TestDb::new();
    db.sql(OUTBOX);
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(
        &db,
        dir.path(),
        "missing",
        &kafka.brokers,
        "[target.outbox]\ntable = \"public.outbox\"\n",
    );
    let log = dir.path().join("sluice.log");
    let mut child = start(&config, &log);
    db.wait_slot_active(&db.slot_name("missing")).await;
    let commit = db.commit_lsn_of("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Invoice', 'i-1', 'Issued', '{}')");
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("Kafka topic \"outbox.event.Invoice\" (for public.outbox) does not exist"), "{log}");
    assert!(db.slot_confirmed("missing").unwrap() < commit, "the event was not confirmed");

    // With missing_topic = "dead_letter" the event waits in the dead-letter file, whole, and
    // the events whose topics exist flow on.
    kafka.create_topic("outbox.event.Order", 1).await;
    let dead = dir.path().join("dead.jsonl");
    let other = dir.path().join("dead-letter");
    std::fs::create_dir_all(&other).unwrap();
    let config = kafka_config(
        &db,
        &other,
        "missing_dl",
        &kafka.brokers,
        &format!(
            "dead_letter = \"{}\"\n[target.outbox]\ntable = \"public.outbox\"\nmissing_topic = \"dead_letter\"\n",
            dead.display()
        ),
    );
    let log = other.join("sluice.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let mut child = start(&config, &log);
    db.wait_slot_active(&db.slot_name("missing_dl")).await;
    db.sql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Invoice', 'i-2', 'Issued', '{\"n\": 2}')");
    let last = db.commit_lsn_of("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'o-1', 'Placed', '{}')");
    let records = kafka.consume("outbox.event.Order", Duration::from_secs(60), |r| {
        r.iter().any(|r| r.key.as_deref() == Some("o-1"))
    });
    assert!(records.iter().any(|r| r.key.as_deref() == Some("o-1")));
    wait_for("the slot to confirm past both events", Duration::from_secs(60), || async {
        db.slot_confirmed("missing_dl").unwrap() >= last
    })
    .await;
    let entries: Vec<serde_json::Value> =
        std::fs::read_to_string(&dead).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let invoices: Vec<&serde_json::Value> = entries.iter().filter(|e| e["key"] == "i-2").collect();
    assert_eq!(invoices.len(), 1, "{entries:?}");
    assert_eq!(invoices[0]["topic"], "outbox.event.Invoice");
    assert!(invoices[0]["payload"].as_str().unwrap().contains("\"n\": 2"), "{}", invoices[0]);
    assert!(invoices[0]["reason"].as_str().unwrap().contains("missing_topic"), "{}", invoices[0]);
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_tls_only_broker_and_an_unknown_certificate_authority_is_refused() {
    // The broker is reachable only through a TLS-terminating proxy, which it advertises.
    let certs = tempfile::tempdir().unwrap();
    crate::harness::certificates(certs.path());
    let proxy_port = sluice::localpg::free_port().unwrap();
    let mut kafka = Kafka::start(Some(proxy_port));
    crate::harness::tls_proxy(proxy_port, kafka.port, certs.path()).await;
    let ca = certs.path().join("ca.crt");
    kafka.client_properties = vec![
        ("security.protocol".into(), "ssl".into()),
        ("ssl.ca.location".into(), ca.display().to_string()),
    ];
    kafka.create_topic("outbox.event.Order", 1).await;
    let db = TestDb::new();
    db.sql(OUTBOX);
    let dir = tempfile::tempdir().unwrap();
    let tls = |ca: &Path| {
        format!("properties = {{ \"security.protocol\" = \"ssl\", \"ssl.ca.location\" = \"{}\" }}\n[target.outbox]\ntable = \"public.outbox\"\n", ca.display())
    };
    let config = kafka_config(&db, dir.path(), "tls", &kafka.brokers, &tls(&ca));
    let log = dir.path().join("sluice.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let child = start(&config, &log);
    db.wait_slot_active(&db.slot_name("tls")).await;
    write_events(db.connection(), 0, 20, Duration::ZERO).await;
    let records = kafka.consume("outbox.event.Order", Duration::from_secs(60), |r| r.len() >= 20);
    assert_complete_and_ordered(&records, 20);
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let mut child = child;
    assert!(child.wait().unwrap().success());

    // The broker's certificate is not signed by this CA: nothing is produced or confirmed.
    let wrong =
        kafka_config(&db, dir.path(), "tls", &kafka.brokers, &tls(&certs.path().join("other_ca.crt")));
    std::fs::write(
        &wrong,
        std::fs::read_to_string(&wrong).unwrap().replace("retry_for = \"2m\"", "retry_for = \"5s\""),
    )
    .unwrap();
    let wrong_log = dir.path().join("wrong.log");
    let mut child = start(&wrong, &wrong_log);
    let commit = db.commit_lsn_of(&event_insert(20));
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    let text = std::fs::read_to_string(&wrong_log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    let error =
        text.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("an error line: {text}"));
    assert!(error.contains("certificate verify failed"), "the error names the certificate problem: {error}");
    let warnings = text.lines().filter(|l| l.contains("certificate verify failed")).count();
    // (The start check's own client adds its two lines.)
    assert!(
        warnings <= 10,
        "the repeated TLS failure is logged a few times, not at every retry: {warnings} lines\n{text}"
    );
    let confirmed = db.slot_confirmed("tls").unwrap();
    assert!(confirmed < commit, "the event was not confirmed: {confirmed} < {commit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_finishes_across_repeated_kill_9_without_writing_it_again() {
    let kafka = Kafka::start(None);
    crate::crash::a_large_transaction_into(crate::crash::LargeTarget::Kafka(kafka), 200_000).await;
}
