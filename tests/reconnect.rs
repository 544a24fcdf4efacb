//! The server restarts mid-stream: sluice reconnects with backoff and continues where it left
//! off, losing nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use sluice::localpg::LocalPostgres;

use crate::harness::{inserted_ids, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_stream_reconnects_and_loses_nothing() {
    let pg = Arc::new(LocalPostgres::start(&Default::default()).unwrap());
    let db = TestDb::in_cluster(Arc::clone(&pg));
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let mut stream = db.stream(db.replication("restart", "p")).await;
    db.sql("INSERT INTO t VALUES (1)");
    assert_eq!(inserted_ids(&stream.commits(1).await), vec![1]);

    pg.stop("fast").unwrap();
    pg.restart().unwrap();
    db.sql("INSERT INTO t VALUES (2)");
    db.sql("INSERT INTO t SELECT g FROM generate_series(3, 1000) g");
    let events = stream.commits(2).await;
    assert_eq!(
        inserted_ids(&events),
        (2..=1000).collect::<Vec<_>>(),
        "everything after the restart, once, in order"
    );
    assert!(stream.stats.reconnects.load(Ordering::Relaxed) >= 1, "the source reconnected");

    // A second outage while the source waits to reconnect.
    pg.stop("immediate").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    pg.restart().unwrap();
    db.sql("INSERT INTO t VALUES (1001)");
    assert_eq!(inserted_ids(&stream.commits(1).await), vec![1001]);
    stream.stop().await.unwrap();
}
