//! Slot life cycle: an existing slot is reused and resumes exactly after the confirmed position;
//! a temporary slot disappears with the connection; `create_slot = false` refuses a missing slot.

use sluice_core::{ChangeEvent, Lsn};

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
    assert_eq!(
        inserted_ids(&stream.commits(2).await),
        vec![2, 3],
        "only what was not confirmed before the stop"
    );
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
    crate::harness::wait_for(
        "the temporary slot to be dropped",
        std::time::Duration::from_secs(30),
        || async { db.slot_confirmed("temp").is_none() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_slot_without_create_slot_is_an_error() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let repl = ReplicationConfig { create_slot: false, ..db.replication("absent", "p") };
    let stream = crate::harness::Stream::start(db.connection(), repl);
    let result =
        tokio::time::timeout(std::time::Duration::from_secs(30), stream.task).await.unwrap().unwrap();
    let err = result.expect_err("a missing slot must not be created");
    assert!(
        matches!(err, Error::Setup(ref m) if m.contains("does not exist and create_slot = false")),
        "{err}"
    );
    assert_eq!(db.slot_confirmed("absent"), None);
}

/// The commit LSN of each insert, by id.
fn insert_commits(events: &[ChangeEvent]) -> Vec<(i64, Lsn)> {
    let ids = inserted_ids(events);
    let commits = events.iter().filter_map(|e| match e {
        ChangeEvent::Insert { position, .. } => Some(position.commit_lsn),
        _ => None,
    });
    ids.into_iter().zip(commits).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_changes_lie_at_or_below_the_redelivery_horizon_and_new_ones_above_it() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let mut stream = db.stream(db.replication("horizon", "p")).await;
    stream.acknowledge = false;
    db.sql("INSERT INTO t VALUES (1)");
    let first = insert_commits(&stream.commits(1).await);
    assert!(
        first[0].1 > stream.redelivery_horizon,
        "a change made while streaming is new: {first:?} vs {}",
        stream.redelivery_horizon
    );
    stream.abort().await;

    db.sql("INSERT INTO t VALUES (2)");
    let mut stream = db.stream(db.replication("horizon", "p")).await;
    db.sql("INSERT INTO t VALUES (3)");
    let again = insert_commits(&stream.commits(3).await);
    let horizon = stream.redelivery_horizon;
    assert_eq!(again.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2, 3], "nothing was confirmed");
    assert!(
        again[0].1 <= horizon,
        "the redelivered change is at or below the horizon: {again:?} vs {horizon}"
    );
    assert!(again[1].1 <= horizon, "made before this session streamed: may have been delivered, so not new");
    assert!(again[2].1 > horizon, "made while this session streamed: new");
    stream.stop().await.unwrap();
}

/// Two processes starting at once (a daemon and `sluice snapshot`, or two replicas) both create
/// the progress and checkpoint tables; plain `CREATE TABLE IF NOT EXISTS` collides on `pg_type`
/// then (CI hit it). Every one of many concurrent creations must succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creations_of_one_table_all_succeed() {
    let db = TestDb::new();
    for round in 0..5 {
        let table = format!("public.created_{round}");
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let connection = db.connection();
            let table = table.clone();
            tasks.spawn(async move {
                let sql = sluice_postgres::connect_sql(&connection).await.unwrap();
                sluice_postgres::setup::create_table_if_missing(&sql, &table, "(id int8 PRIMARY KEY)").await
            });
        }
        while let Some(created) = tasks.join_next().await {
            created.unwrap().unwrap_or_else(|e| panic!("a concurrent creation of {table} failed: {e:?}"));
        }
        assert_eq!(db.sql(&format!("SELECT count(*) FROM {table}")), "0");
    }
}
