//! kill -9 of sluice mid-stream, then a restart: every change is delivered at least once, in
//! commit order, none lost, and the slot never confirms more than the target made durable.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sluice_core::Lsn;

use crate::harness::{kill_9, sluice, wait_for, TestDb};

const TRANSACTIONS: i64 = 300;
const ROWS_PER_TRANSACTION: i64 = 3;

/// The parsed lines of the jsonl output; a torn last line (the process was killed mid-write) is skipped.
fn read_output(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

fn commit_ends(lines: &[serde_json::Value]) -> BTreeSet<Lsn> {
    lines
        .iter()
        .filter(|l| l["op"] == "commit")
        .map(|l| l["end_lsn"].as_str().unwrap().parse::<Lsn>().unwrap())
        .collect()
}

fn start_sluice(config: &Path, log: &Path) -> Child {
    sluice()
        .arg("run")
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start sluice")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_delivers_every_change_in_order_and_never_confirms_early() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id bigserial PRIMARY KEY, tx int8 NOT NULL, n int8 NOT NULL); CREATE PUBLICATION p FOR TABLE t");
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.jsonl");
    let config = db.config_file(
        dir.path(),
        "crash",
        "p",
        &format!("[target]\nkind = \"jsonl\"\npath = \"{}\"\nfsync = true\n", output.display()),
    );
    let mut first = start_sluice(&config, &dir.path().join("first.log"));
    let _logs =
        crate::harness::LogsOnPanic(vec![dir.path().join("first.log"), dir.path().join("second.log")]);
    db.wait_slot_active(&db.slot_name("crash")).await;

    let connection = db.connection();
    let writer = tokio::spawn(async move {
        let client = sluice_postgres::connect_sql(&connection).await.unwrap();
        for tx in 0..TRANSACTIONS {
            let rows: Vec<String> = (0..ROWS_PER_TRANSACTION).map(|n| format!("({tx}, {n})")).collect();
            client
                .batch_execute(&format!("BEGIN; INSERT INTO t (tx, n) VALUES {}; COMMIT", rows.join(", ")))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });

    // While it streams, sample the slot's confirmed position together with what the file holds
    // durably at that moment; checked against the complete output at the end.
    let mut samples: Vec<(Lsn, BTreeSet<Lsn>)> = Vec::new();
    wait_for("100 transactions in the output", Duration::from_secs(60), || {
        let confirmed = db.slot_confirmed("crash").unwrap_or_default();
        let lines = read_output(&output);
        let done = lines.iter().filter(|l| l["op"] == "commit").count() >= 100;
        samples.push((confirmed, commit_ends(&lines)));
        async move { done }
    })
    .await;
    kill_9(&mut first);
    let confirmed_at_kill = db.slot_confirmed("crash").unwrap();
    samples.push((confirmed_at_kill, commit_ends(&read_output(&output))));

    writer.await.unwrap();
    // What the first run wrote: on a loaded machine it may have written (and even confirmed)
    // the last transaction before the kill.
    let written_before = read_output(&output).len();
    let mut second = start_sluice(&config, &dir.path().join("second.log"));
    // Done when the second run wrote the last transaction's commit, or the slot is confirmed
    // past it (the first run confirmed it, so the second does not replay it). (Not "the commit
    // ends near the server's insert position": other tests write WAL in the same cluster.)
    wait_for("every transaction after the restart", Duration::from_secs(60), || {
        let lines = read_output(&output);
        let last = lines
            .iter()
            .find(|l| l["op"] == "insert" && l["new"]["tx"] == TRANSACTIONS - 1)
            .map(|l| l["commit_lsn"].clone());
        let commit = last.and_then(|lsn| {
            lines.iter().enumerate().rfind(|(_, l)| l["op"] == "commit" && l["commit_lsn"] == lsn)
        });
        let done = commit.is_some_and(|(at, line)| {
            at >= written_before
                || db.slot_confirmed("crash").unwrap_or_default()
                    >= line["end_lsn"].as_str().unwrap().parse::<Lsn>().unwrap()
        });
        async move { done }
    })
    .await;
    // SIGTERM drains and exits 0, confirming what it delivered.
    Command::new("kill").arg("-TERM").arg(second.id().to_string()).status().unwrap();
    let status = tokio::task::spawn_blocking(move || second.wait()).await.unwrap().unwrap();
    assert!(status.success(), "sluice exits 0 on SIGTERM: {status}");
    let lines = read_output(&output);
    let all_commits = commit_ends(&lines);
    assert!(
        db.slot_confirmed("crash").unwrap() >= *all_commits.last().unwrap(),
        "the final position is confirmed"
    );
    // The slot never confirmed a transaction the file did not yet hold durably.
    assert!(samples.len() > 2);
    for (confirmed, durable) in &samples {
        for end in all_commits.iter().filter(|end| *end <= confirmed) {
            assert!(
                durable.contains(end),
                "slot confirmed {confirmed} while transaction ending {end} was not durable"
            );
        }
    }

    // Nothing lost.
    let rows: BTreeSet<(i64, i64)> = lines
        .iter()
        .filter(|l| l["op"] == "insert")
        .map(|l| (l["new"]["tx"].as_i64().unwrap(), l["new"]["n"].as_i64().unwrap()))
        .collect();
    assert_eq!(rows.len() as i64, TRANSACTIONS * ROWS_PER_TRANSACTION, "every row delivered");
    // In commit order: first occurrences of each change, in file order, never go backwards.
    let mut seen = BTreeSet::new();
    let mut last: (Lsn, u64) = (Lsn::ZERO, 0);
    let mut last_tx = -1;
    let mut duplicates = 0;
    for line in &lines {
        let position =
            (line["commit_lsn"].as_str().unwrap().parse::<Lsn>().unwrap(), line["ordinal"].as_u64().unwrap());
        if !seen.insert(position) {
            duplicates += 1;
            continue;
        }
        assert!(position > last, "change {position:?} after {last:?}: out of commit order");
        last = position;
        if line["op"] == "insert" {
            let tx = line["new"]["tx"].as_i64().unwrap();
            assert!(tx >= last_tx, "transaction {tx} after {last_tx}");
            last_tx = tx;
        }
    }
    // Only transactions the slot had not confirmed are delivered twice.
    let mut counts = std::collections::BTreeMap::new();
    for line in lines.iter().filter(|l| l["op"] == "commit") {
        *counts.entry(line["end_lsn"].as_str().unwrap().parse::<Lsn>().unwrap()).or_insert(0) += 1;
    }
    for (end, count) in counts {
        assert!(
            count == 1 || end > confirmed_at_kill,
            "transaction ending {end} replayed though {confirmed_at_kill} was confirmed"
        );
    }
    eprintln!("delivered {} lines, {duplicates} replayed after the kill", lines.len());
}

/// A transaction too large to finish between two kills still finishes: each run writes the
/// pipeline's checkpoint (the position inside the transaction through which the file is
/// durable) every `checkpoint_interval`, and the next run skips the replayed changes through it instead of
/// writing them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_finishes_across_repeated_kill_9_and_each_run_skips_what_is_durable() {
    const ROWS: usize = 400_000;
    let db = TestDb::new();
    db.sql("CREATE TABLE big (id int8 PRIMARY KEY, n int8 NOT NULL); CREATE PUBLICATION p FOR TABLE big");
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.jsonl");
    let config = db.config_file(
        dir.path(),
        "bigtx",
        "p",
        &format!("[target]\nkind = \"jsonl\"\npath = \"{}\"\nfsync = true\n", output.display()),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[pipeline]\n", "[pipeline]\ncheckpoint_interval = \"100ms\"\nbatch_max_events = 64\n");
    std::fs::write(&config, text).unwrap();
    let logs: Vec<_> = (0..20).map(|n| dir.path().join(format!("run{n}.log"))).collect();
    let _logs = crate::harness::LogsOnPanic(logs.clone());
    // The slot first; then the transaction, whole in the WAL before the first run starts, so
    // that every run begins alike: decoding the transaction from its first change.
    crate::harness::run_to_now(&db, &config);
    let end =
        db.commit_lsn_of(&format!("INSERT INTO big SELECT g, g % 13 FROM generate_series(1, {ROWS}) g"));
    let mut child = start_sluice(&config, &logs[0]);

    let inserts = |lines: &[serde_json::Value]| -> Vec<i64> {
        lines.iter().filter(|l| l["op"] == "insert").map(|l| l["new"]["id"].as_i64().unwrap()).collect()
    };
    // Kill each run once its checkpoint has moved an eighth of the transaction past where the
    // run began, until the slot is confirmed past the commit. `cuts` are the insert counts
    // in the file at each kill.
    let mut cuts: Vec<usize> = vec![0];
    let deadline = std::time::Instant::now() + crate::harness::patience(Duration::from_secs(300));
    loop {
        let born = std::time::Instant::now();
        let finished = loop {
            assert!(std::time::Instant::now() < deadline, "the transaction was not confirmed: cuts {cuts:?}");
            if db.slot_confirmed("bigtx").unwrap() >= end {
                eprintln!("finished after {:?}", born.elapsed());
                break true;
            }
            // The checkpoint's ordinal: the last insert of the durable prefix (ordinal 1 is
            // the transaction's first insert).
            let checkpoint =
                db.sql("SELECT tx_ordinal FROM sluice_checkpoint").trim().parse::<usize>().unwrap_or(0);
            if checkpoint >= cuts.last().unwrap() + ROWS / 8 {
                eprintln!("kill after {:?} at checkpoint {checkpoint}", born.elapsed());
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if finished {
            break;
        }
        kill_9(&mut child);
        cuts.push(inserts(&read_output(&output)).len());
        assert!(cuts.len() < logs.len(), "more than {} runs: cuts {cuts:?}", logs.len() - 1);
        child = start_sluice(&config, &logs[cuts.len() - 1]);
    }
    crate::harness::stop(child);

    let ids = inserts(&read_output(&output));
    eprintln!("large transaction: inserts in the file at each kill {cuts:?}, {} in all", ids.len());
    assert!(cuts.len() >= 3, "the transaction outlived at least two runs: cuts {cuts:?}");
    // Every row arrived, each with its value.
    let distinct: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), ROWS, "every row of the transaction is in the file");
    assert_eq!((*distinct.first().unwrap(), *distinct.last().unwrap()), (1, ROWS as i64));
    // Each run after a kill wrote again only the little that was not yet in its checkpoint
    // (what it wrote after its last checkpoint), never the transaction from its first row:
    // that would be at least the eighth of it the run before made durable.
    let mut seen = BTreeSet::new();
    let mut bounds = cuts.clone();
    bounds.push(ids.len());
    for (run, window) in bounds.windows(2).enumerate() {
        let segment = &ids[window[0]..window[1]];
        let again = segment.iter().filter(|id| seen.contains(*id)).count();
        assert!(
            again < ROWS / 10,
            "run {run} wrote {again} rows an earlier run had made durable: cuts {cuts:?}"
        );
        if run > 0 {
            let log = std::fs::read_to_string(&logs[run]).unwrap();
            assert!(log.contains("durable in the target: skipped"), "run {run} skipped nothing: {log}");
        }
        seen.extend(segment.iter().copied());
    }
}

/// Where the large transaction goes.
pub(crate) enum LargeTarget {
    /// A one-partition topic, so that its offsets order every record.
    Kafka(crate::harness::Kafka),
    DynamoDb {
        moto: std::sync::Arc<crate::harness::Moto>,
        table: String,
    },
}

/// The test above, into Kafka or DynamoDB, where each change is a request (the tests live in
/// those modules, which run on one Postgres version only):
/// each run after a kill makes about as many requests as it moves the checkpoint on, never the
/// transaction again from its first change. The requests are the records each run added to the
/// topic, and for DynamoDB each run's `sluice_target_writes_total` just before it is killed.
pub(crate) async fn a_large_transaction_into(target: LargeTarget, rows: usize) {
    let db = TestDb::new();
    db.sql("CREATE TABLE big (id int8 PRIMARY KEY, n int8 NOT NULL); CREATE PUBLICATION p FOR TABLE big");
    let dir = tempfile::tempdir().unwrap();
    let section = match &target {
        LargeTarget::Kafka(kafka) => {
            kafka.create_topic("bigtx.big", 1).await;
            format!(
                "[target]\nkind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"bigtx.{{table}}\"\n",
                kafka.brokers
            )
        }
        LargeTarget::DynamoDb { moto, table } => {
            let client = crate::harness::dynamo_client(&moto.url).await;
            client.create_table(table, "pk", None).await.unwrap();
            let mapping = dir.path().join("mapping.toml");
            std::fs::write(
                &mapping,
                format!(
                    "[[tables]]\nsource = \"public.big\"\ntarget = \"{table}\"\n\
                     partition_key = {{ attribute = \"pk\", template = \"BIG#{{id}}\" }}\n"
                ),
            )
            .unwrap();
            crate::dynamodb::target_toml(&mapping, &moto.url, "")
        }
    };
    let config = db.config_file(dir.path(), "bigtx", "p", &section);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[pipeline]\n", "[pipeline]\ncheckpoint_interval = \"100ms\"\nbatch_max_events = 256\n");
    std::fs::write(&config, text).unwrap();
    let logs: Vec<_> = (0..20).map(|n| dir.path().join(format!("run{n}.log"))).collect();
    let _logs = crate::harness::LogsOnPanic(logs.clone());
    crate::harness::run_to_now(&db, &config);
    let end =
        db.commit_lsn_of(&format!("INSERT INTO big SELECT g, g % 13 FROM generate_series(1, {rows}) g"));
    let port = sluice::localpg::free_port().unwrap();
    let start = |log: &Path| {
        sluice()
            .args(["run", "-c"])
            .arg(&config)
            .env("SLUICE__MONITORING__LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start sluice")
    };
    let requests = || {
        let (_, body) = crate::harness::http_get(port, "/metrics")?;
        let count = |outcome: &str| {
            crate::harness::metric(
                &body,
                &format!("sluice_target_writes_total{{outcome=\"{outcome}\",pipeline=\"default\"}}"),
            )
        };
        Some(count("applied").unwrap_or(0.0) + count("already_applied").unwrap_or(0.0))
    };
    // Kafka: the records in the topic (its one partition's high watermark), since a run can
    // move an eighth of the transaction on faster than the counters are published.
    let in_topic = || match &target {
        LargeTarget::Kafka(kafka) => {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &kafka.brokers)
                .create()
                .expect("consumer");
            Some(
                consumer.fetch_watermarks("bigtx.big", 0, Duration::from_secs(30)).expect("watermarks").1
                    as f64,
            )
        }
        LargeTarget::DynamoDb { .. } => None,
    };
    let checkpoint =
        || db.sql("SELECT tx_ordinal FROM sluice_checkpoint").trim().parse::<usize>().unwrap_or(0);

    // Each run is killed once its checkpoint moved an eighth of the transaction past where the
    // run began; `runs` holds (checkpoint at the start, at the kill, requests made).
    let mut child = start(&logs[0]);
    let mut runs: Vec<(usize, usize, f64)> = Vec::new();
    let deadline = std::time::Instant::now() + crate::harness::patience(Duration::from_secs(600));
    loop {
        let began = checkpoint();
        let topic_before = in_topic();
        let mut made = 0.0;
        let finished = loop {
            assert!(std::time::Instant::now() < deadline, "the transaction was not confirmed: runs {runs:?}");
            if db.slot_confirmed("bigtx").unwrap() >= end {
                break true;
            }
            made = requests().unwrap_or(made);
            if checkpoint() >= began + rows / 8 {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if finished {
            break;
        }
        // The requests as late as possible: the counters are published about once a second.
        made = requests().unwrap_or(made);
        kill_9(&mut child);
        if let (Some(before), Some(after)) = (topic_before, in_topic()) {
            made = after - before;
        }
        runs.push((began, checkpoint(), made));
        assert!(runs.len() < logs.len(), "more than {} runs: {runs:?}", logs.len() - 1);
        child = start(&logs[runs.len()]);
    }
    crate::harness::stop(child);
    eprintln!("large transaction of {rows} rows: runs (checkpoint at start, at the kill, requests) {runs:?}");
    assert!(runs.len() >= 2, "the transaction outlived at least two runs: {runs:?}");
    for (run, &(began, killed, made)) in runs.iter().enumerate().skip(1) {
        let progress = killed.saturating_sub(began) as f64;
        assert!(
            made < progress + rows as f64 / 10.0,
            "run {run} made {made} requests to move the checkpoint {progress} changes on: it wrote again \
             what an earlier run had made durable ({runs:?})"
        );
        let log = std::fs::read_to_string(&logs[run]).unwrap();
        assert!(log.contains("durable in the target: skipped"), "run {run} skipped nothing: {log}");
    }

    // Every row arrived.
    match target {
        LargeTarget::Kafka(kafka) => {
            let records = kafka.consume_all("bigtx.big", Duration::from_secs(5));
            let ids: BTreeSet<i64> = records
                .iter()
                .map(|r| {
                    serde_json::from_str::<serde_json::Value>(r.value.as_deref().unwrap()).unwrap()["new"]
                        ["id"]
                        .as_i64()
                        .unwrap()
                })
                .collect();
            assert_eq!(ids.len(), rows, "every row of the transaction is in the topic");
            eprintln!("large transaction into Kafka: {} records for {rows} rows", records.len());
        }
        LargeTarget::DynamoDb { moto, table } => {
            let client = crate::harness::dynamo_client(&moto.url).await;
            assert_eq!(client.scan_all(&table).await.unwrap().len(), rows, "every row has its item");
        }
    }
}
