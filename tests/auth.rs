//! Authentication (trust, md5, SCRAM-SHA-256) and TLS (require, verify-full) on both the
//! replication and the SQL connection.

use std::sync::Arc;
use std::time::Duration;

use sluice::localpg::{ClusterOptions, LocalPostgres};
use sluice_core::{ChangeEvent, EventBatch, Lsn, Secret};
use sluice_postgres::{ConnectionConfig, Error, ReplicationSource, SourceOptions, SslMode};
use tokio::sync::{mpsc, watch};

use crate::harness::{row_changes, Stream, TestDb};

/// Streams one insert through `conn` and checks it arrives.
async fn streams_one_insert(db: &TestDb, conn: ConnectionConfig, slot: &str) {
    let mut stream = Stream::start(conn, db.replication(slot, "p"));
    db.wait_slot_active(&db.slot_name(slot)).await;
    db.sql("INSERT INTO t VALUES (default)");
    let events = stream.commits(1).await;
    assert!(matches!(row_changes(&events)[..], [ChangeEvent::Insert { .. }]));
    stream.stop().await.unwrap();
}

/// Runs a source that must fail at once; returns its error.
async fn fails(db: &TestDb, conn: ConnectionConfig, slot: &str) -> Error {
    let source = ReplicationSource::new(
        conn,
        db.replication(slot, "p"),
        SourceOptions { retry_for: Duration::ZERO, ..Default::default() },
    );
    let (tx, _rx) = mpsc::channel::<EventBatch>(1);
    let (_durable_tx, durable) = watch::channel(Lsn::ZERO);
    let (_shutdown_tx, shutdown) = sluice_core::Shutdown::new();
    tokio::time::timeout(Duration::from_secs(30), source.run(tx, durable, shutdown))
        .await
        .expect("fails quickly")
        .expect_err("must fail")
}

fn user(db: &TestDb, name: &str, password: &str) -> ConnectionConfig {
    ConnectionConfig { user: name.into(), password: Some(Secret::new(password)), ..db.connection() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_scram_logins_stream() {
    let pg = Arc::new(
        LocalPostgres::start(&ClusterOptions {
            hba: vec![
                "host all md5user 127.0.0.1/32 md5".into(),
                "host all scramuser 127.0.0.1/32 scram-sha-256".into(),
            ],
            ..Default::default()
        })
        .unwrap(),
    );
    let db = TestDb::in_cluster(pg);
    db.sql(
        "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'md5 secret';
         SET password_encryption = 'scram-sha-256'; CREATE ROLE scramuser LOGIN REPLICATION PASSWORD 'scram secret';
         CREATE TABLE t (id serial PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t",
    );
    assert!(db.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'md5user'").starts_with("md5"));
    streams_one_insert(&db, user(&db, "md5user", "md5 secret"), "md5").await;
    streams_one_insert(&db, user(&db, "scramuser", "scram secret"), "scram").await;
    let err = fails(&db, user(&db, "scramuser", "nope"), "bad").await;
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    let err = fails(&db, ConnectionConfig { password: None, ..user(&db, "md5user", "") }, "none").await;
    assert!(err.to_string().contains("none is configured"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_require_and_verify_full_work_and_a_wrong_ca_is_refused() {
    let certs = tempfile::tempdir().unwrap();
    crate::harness::certificates(certs.path());
    let read = |name: &str| std::fs::read(certs.path().join(name)).unwrap();
    let pg = Arc::new(
        LocalPostgres::start(&ClusterOptions {
            hba: vec![
                "hostssl all tlsuser 127.0.0.1/32 scram-sha-256".into(),
                "host all tlsuser 127.0.0.1/32 reject".into(),
            ],
            settings: vec![
                ("ssl".into(), "on".into()),
                ("ssl_cert_file".into(), "server.crt".into()),
                ("ssl_key_file".into(), "server.key".into()),
            ],
            files: vec![("server.crt".into(), read("server.crt")), ("server.key".into(), read("server.key"))],
            ..Default::default()
        })
        .unwrap(),
    );
    let db = TestDb::in_cluster(pg);
    db.sql("CREATE ROLE tlsuser LOGIN REPLICATION PASSWORD 'tls secret'; CREATE TABLE t (id serial PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let base = user(&db, "tlsuser", "tls secret");
    streams_one_insert(&db, ConnectionConfig { sslmode: SslMode::Require, ..base.clone() }, "require").await;
    let verified = ConnectionConfig {
        sslmode: SslMode::VerifyFull,
        sslrootcert: Some(certs.path().join("ca.crt")),
        ..base.clone()
    };
    streams_one_insert(&db, verified.clone(), "verify").await;

    let wrong_ca = ConnectionConfig { sslrootcert: Some(certs.path().join("other_ca.crt")), ..verified };
    let err = fails(&db, wrong_ca, "wrongca").await;
    assert!(matches!(err, Error::Tls { .. }), "{err}");
    let err = fails(&db, base, "plain").await;
    assert!(err.to_string().contains("no pg_hba.conf entry") || err.to_string().contains("rejects"), "{err}");
}
