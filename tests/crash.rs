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
    let mut second = start_sluice(&config, &dir.path().join("second.log"));
    // Done when the last transaction's commit is in the file. (Not "the commit ends near the
    // server's insert position": other tests write WAL in the same cluster after it.)
    wait_for("every transaction after the restart", Duration::from_secs(60), || {
        let lines = read_output(&output);
        let last = lines
            .iter()
            .find(|l| l["op"] == "insert" && l["new"]["tx"] == TRANSACTIONS - 1)
            .map(|l| l["commit_lsn"].clone());
        let done =
            last.is_some_and(|lsn| lines.iter().any(|l| l["op"] == "commit" && l["commit_lsn"] == lsn));
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
