//! Slot life cycle: an existing slot is reused and resumes exactly after the confirmed position;
//! a temporary slot disappears with the connection; `create_slot = false` refuses a missing slot.

use sluice_postgres::{Error, ReplicationConfig};

use crate::harness::{inserted_ids, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_slot_resumes_after_a_graceful_stop_without_duplicates() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let mut stream = db.stream(db.replication("resume", "p")).await;
    db.sql("INSERT INTO t VALUES (1)");
    assert_eq!(inserted_ids(&stream.commits(1).await), vec![1]);
    stream.stop().await.unwrap();

    db.sql("INSERT INTO t VALUES (2)");
    db.sql("INSERT INTO t VALUES (3)");
    let mut stream = db.stream(db.replication("resume", "p")).await;
    assert_eq!(inserted_ids(&stream.commits(2).await), vec![2, 3], "only what was not confirmed before the stop");
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_slot_disappears_with_the_connection() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let repl = ReplicationConfig { temporary_slot: true, ..db.replication("temp", "p") };
    let mut stream = db.stream(repl).await;
    db.sql("INSERT INTO t VALUES (1)");
    assert_eq!(inserted_ids(&stream.commits(1).await), vec![1]);
    stream.stop().await.unwrap();
    crate::harness::wait_for("the temporary slot to be dropped", std::time::Duration::from_secs(30), || async {
        db.slot_confirmed("temp").is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_slot_without_create_slot_is_an_error() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let repl = ReplicationConfig { create_slot: false, ..db.replication("absent", "p") };
    let stream = crate::harness::Stream::start(db.connection(), repl);
    let result = tokio::time::timeout(std::time::Duration::from_secs(30), stream.task).await.unwrap().unwrap();
    let err = result.expect_err("a missing slot must not be created");
    assert!(matches!(err, Error::Setup(ref m) if m.contains("does not exist and create_slot = false")), "{err}");
    assert_eq!(db.slot_confirmed("absent"), None);
}
