//! Protocol 2 streamed transactions (spilled locally until their commit), large transactions
//! with bounded memory, idle-WAL confirmation, logical messages and truncates.

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sluice_core::ChangeEvent;

use crate::harness::{inserted_ids, sluice, wait_for, TestDb};

/// A database whose walsenders stream transactions past 64 kB (protocol 2 `streaming`).
fn streaming_db() -> TestDb {
    // Its own cluster: the open transactions here would hold up slot creation in every other
    // test's database (a logical slot waits for the transactions running cluster-wide).
    let db = TestDb::in_cluster(std::sync::Arc::new(
        sluice::localpg::LocalPostgres::start(&sluice::localpg::ClusterOptions::default()).unwrap(),
    ));
    db.sql(&format!("ALTER DATABASE \"{}\" SET logical_decoding_work_mem = '64kB'", db.name));
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY, pad text); CREATE PUBLICATION p FOR TABLE t");
    db
}

fn streaming_replication(db: &TestDb, slot: &str) -> sluice_postgres::ReplicationConfig {
    sluice_postgres::ReplicationConfig {
        proto_version: 2,
        streaming: sluice_postgres::Streaming::On,
        ..db.replication(slot, "p")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_transaction_is_held_on_disk_until_commit_and_aborted_ones_vanish() {
    let db = streaming_db();
    let mut stream = db.stream(streaming_replication(&db, "v2")).await;
    let writer = sluice_postgres::connect_sql(&db.connection()).await.unwrap();

    // In progress: streamed to sluice and spilled, but not delivered.
    writer
        .batch_execute("BEGIN; INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    let stats = std::sync::Arc::clone(&stream.stats);
    wait_for("the open transaction to be spilled", Duration::from_secs(30), || {
        let spilled = stats.spilled_bytes.load(Ordering::Relaxed);
        async move { spilled > 100_000 }
    })
    .await;
    assert!(stream.nothing_delivered(), "nothing of an open transaction reaches the target");
    writer.batch_execute("COMMIT").await.unwrap();
    let events = stream.commits(1).await;
    assert_eq!(inserted_ids(&events), (1..=5000).collect::<Vec<_>>());
    assert_eq!(stats.spilled_bytes.load(Ordering::Relaxed), 0, "the spill file is gone after the commit");

    // Rolled back: spilled, then dropped; the next transaction arrives alone.
    writer
        .batch_execute("BEGIN; INSERT INTO t SELECT g, repeat('y', 100) FROM generate_series(10001, 15000) g")
        .await
        .unwrap();
    wait_for("the doomed transaction to be spilled", Duration::from_secs(30), || {
        let spilled = stats.spilled_bytes.load(Ordering::Relaxed);
        async move { spilled > 100_000 }
    })
    .await;
    writer.batch_execute("ROLLBACK").await.unwrap();
    writer.batch_execute("INSERT INTO t VALUES (20000, 'after')").await.unwrap();
    let events = stream.commits(1).await;
    assert_eq!(inserted_ids(&events), vec![20000]);
    assert_eq!(stats.spilled_bytes.load(Ordering::Relaxed), 0);

    // A subtransaction rolled back inside a streamed transaction: only its rows vanish.
    writer
        .batch_execute(
            "BEGIN; INSERT INTO t SELECT g, repeat('a', 100) FROM generate_series(30001, 33000) g;
             SAVEPOINT s; INSERT INTO t SELECT g, repeat('b', 100) FROM generate_series(40001, 43000) g;
             ROLLBACK TO SAVEPOINT s; INSERT INTO t SELECT g, repeat('c', 100) FROM generate_series(50001, 53000) g; COMMIT",
        )
        .await
        .unwrap();
    let events = stream.commits(1).await;
    let expected: Vec<i64> = (30001..=33000).chain(50001..=53000).collect();
    assert_eq!(inserted_ids(&events), expected);
    stream.stop().await.unwrap();
}

/// Runs `sluice run` to the null target until `until` is durable; returns (peak RSS KiB, seconds).
fn run_to_null(db: &TestDb, slot: &str, replication_extra: &str, until: sluice_core::Lsn) -> (u64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let spill = format!("spill_dir = \"{}\"\n", dir.path().display());
    let config = db.config_file(dir.path(), slot, "p", "[target]\nkind = \"null\"\n");
    let text = std::fs::read_to_string(&config).unwrap();
    let text =
        text.replace("[target]", &format!("create_slot = false\n{replication_extra}{spill}\n[target]"));
    std::fs::write(&config, text).unwrap();
    let started = Instant::now();
    let mut child = sluice()
        .args(["run", "-c", config.to_str().unwrap(), "--until-lsn", &until.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0;
    loop {
        peak = peak.max(sluice::bench::peak_rss_kib(child.id()).unwrap_or(0));
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "sluice run: {status}");
            return (peak, started.elapsed().as_secs_f64());
        }
        assert!(started.elapsed() < Duration::from_secs(300), "sluice did not finish the large transaction");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_million_row_transaction_streams_with_bounded_memory_in_both_protocols() {
    // A cluster of its own: other tests' slots need not read through this WAL.
    let pg = std::sync::Arc::new(sluice::localpg::LocalPostgres::start(&Default::default()).unwrap());
    let db = TestDb::in_cluster(pg);
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY, pad text); CREATE PUBLICATION p FOR TABLE t");
    for slot in ["v1", "v2"] {
        db.sql(&format!("SELECT pg_create_logical_replication_slot('{}', 'pgoutput')", db.slot_name(slot)));
    }
    // About 120 MB of change data in one transaction.
    db.sql("INSERT INTO t SELECT g, repeat('z', 80) FROM generate_series(1, 1000000) g");
    let until = db.insert_lsn();
    db.sql("INSERT INTO t VALUES (0, 'marker')");
    let (v1_peak, v1_secs) = run_to_null(&db, "v1", "", until);
    let (v2_peak, v2_secs) = run_to_null(&db, "v2", "proto_version = 2\nstreaming = true\n", until);
    eprintln!("1M-row transaction: v1 {v1_secs:.1}s peak {v1_peak} KiB; v2 {v2_secs:.1}s peak {v2_peak} KiB");
    for (name, peak) in [("protocol 1", v1_peak), ("protocol 2 streaming", v2_peak)] {
        assert!(peak > 0, "RSS was measured");
        assert!(peak < 64 * 1024, "{name}: peak RSS {peak} KiB for a ~120 MB transaction");
    }
    // `until` is at or after the end of the large transaction. The walsender applies the final
    // status update as it winds down, just after sluice exits.
    crate::harness::wait_for_blocking(
        "both slots to confirm the whole transaction",
        Duration::from_secs(30),
        || db.slot_confirmed("v1").unwrap() >= until && db.slot_confirmed("v2").unwrap() >= until,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_publication_still_advances_the_slot_while_other_tables_churn() {
    let db = TestDb::new();
    db.sql("CREATE TABLE published (id int PRIMARY KEY); CREATE TABLE other (id serial PRIMARY KEY, pad text); CREATE PUBLICATION p FOR TABLE published");
    let mut stream = db.stream(db.replication("idle", "p")).await;
    db.sql("INSERT INTO published VALUES (1)");
    stream.commits(1).await;
    for _ in 0..20 {
        db.sql("INSERT INTO other (pad) SELECT repeat('w', 200) FROM generate_series(1, 1000)");
    }
    let churned_to = db.insert_lsn();
    wait_for("the slot to confirm past the unpublished churn", Duration::from_secs(30), || {
        let confirmed = db.slot_confirmed("idle").unwrap_or_default();
        async move { confirmed.0 + 4096 >= churned_to.0 }
    })
    .await;
    assert!(stream.nothing_delivered(), "unpublished tables deliver nothing");
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_messages_and_truncates_are_delivered() {
    let db = TestDb::new();
    db.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE a, b");
    let repl = sluice_postgres::ReplicationConfig { messages: true, ..db.replication("msg", "p") };
    let mut stream = db.stream(repl).await;
    db.sql(
        "BEGIN; INSERT INTO a VALUES (1); SELECT pg_logical_emit_message(true, 'outbox', 'in-tx'); COMMIT",
    );
    db.sql("SELECT pg_logical_emit_message(false, 'heartbeat', 'alone')");
    db.sql("TRUNCATE a, b");
    let events = stream
        .collect_until(Duration::from_secs(60), |events| {
            events.iter().any(|e| matches!(e, ChangeEvent::Truncate { .. }))
        })
        .await;
    let messages: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ChangeEvent::Message { transactional, prefix, content, .. } => {
                Some((*transactional, prefix.as_str(), content.as_ref()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(messages, vec![(true, "outbox", &b"in-tx"[..]), (false, "heartbeat", &b"alone"[..])]);
    let Some(ChangeEvent::Truncate { relations, cascade, .. }) =
        events.iter().find(|e| matches!(e, ChangeEvent::Truncate { .. }))
    else {
        unreachable!()
    };
    let mut names: Vec<_> = relations.iter().map(|r| r.qualified_name()).collect();
    names.sort();
    assert_eq!(names, ["public.a", "public.b"]);
    assert!(!cascade);
    stream.stop().await.unwrap();
}

/// `host` as a directory path connects over the server's Unix-domain socket, for the
/// replication stream and the SQL sessions alike (set-up, status).
#[test]
fn a_unix_domain_socket_carries_the_stream_and_the_sql_sessions() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.jsonl");
    let config = db.config_file(
        dir.path(),
        "ux",
        "p",
        &format!("[target]\nkind = \"jsonl\"\npath = \"{}\"\n", output.display()),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("host = \"127.0.0.1\"", &format!("host = \"{}\"", db.pg.socket_dir().display()));
    std::fs::write(&config, text).unwrap();
    let run_to_now = || crate::harness::run_to_now(&db, &config);
    run_to_now(); // creates the slot
    db.sql("INSERT INTO t SELECT g FROM generate_series(1, 100) g");
    run_to_now();
    let lines = std::fs::read_to_string(&output).unwrap();
    assert_eq!(lines.lines().filter(|l| l.contains("\"insert\"")).count(), 100, "{lines}");
    let socket = format!("{}/.s.PGSQL.{}", db.pg.socket_dir().display(), db.pg.port);
    let status = sluice().args(["status", "--json", "-c", config.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{stdout}{}", String::from_utf8_lossy(&status.stderr));
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["slot"]["exists"], true, "{stdout}");
    // A server that is not there is named by its socket path.
    let missing =
        std::fs::read_to_string(&config).unwrap().replace(&format!("port = {}", db.pg.port), "port = 1");
    std::fs::write(&config, missing).unwrap();
    let (code, stderr) = crate::harness::sluice_output(
        &["run", "-c", config.to_str().unwrap(), "--until-lsn", "0/1"],
        Duration::from_secs(90),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&socket.replace(&db.pg.port.to_string(), "1")), "names the socket: {stderr}");
}
