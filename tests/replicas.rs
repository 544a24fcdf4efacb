//! Streaming beside physical replicas (Postgres 17+; `bash .ci/setup test` runs these on 17 and
//! 18 only): a failover slot carries the stream across a standby's promotion.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sluice::localpg::{ClusterOptions, LocalPostgres};
use sluice_postgres::{ConnectionConfig, ReplicationConfig, SessionAttrs, SourceOptions};

use crate::harness::{inserted_ids, wait_for, LogsOnPanic, Stream, TestDb};

/// A primary and its physical standby, which synchronises failover slots
/// (`sync_replication_slots`); the primary's logical walsenders send nothing the standby has
/// not flushed (`synchronized_standby_slots`).
fn primary_and_standby() -> (Arc<LocalPostgres>, LocalPostgres) {
    let options = ClusterOptions {
        settings: vec![("log_min_messages".into(), "log".into())],
        ..ClusterOptions::default()
    };
    let primary = Arc::new(LocalPostgres::start(&options).unwrap());
    let version: u32 = primary.psql("postgres", "SHOW server_version_num").unwrap().parse().unwrap();
    assert!(
        version >= 170000,
        "these tests need Postgres 17 or later (failover slots); SLUICE_TEST_PG_BIN points at {version}"
    );
    let standby = primary.standby("standby1", &[("sync_replication_slots", "on")]).unwrap();
    primary.psql("postgres", "ALTER SYSTEM SET synchronized_standby_slots = 'standby1'").unwrap();
    primary.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    (primary, standby)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_carries_the_stream_across_a_promotion() {
    let (primary, standby) = primary_and_standby();
    let _logs = LogsOnPanic(vec![primary.log_path(), standby.log_path()]);
    let db = TestDb::in_cluster(Arc::clone(&primary));
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let slot = db.slot_name("fo");
    // Both servers, in order; whichever is the primary is used.
    let conn = ConnectionConfig {
        host: format!("127.0.0.1:{},127.0.0.1:{}", primary.port, standby.port),
        target_session_attrs: SessionAttrs::Primary,
        ..db.connection()
    };
    // No heartbeats: the test reads batches only when it collects, so idle WAL is confirmed
    // through keepalives, as nothing is outstanding.
    let repl =
        ReplicationConfig { failover: true, heartbeat_interval: Duration::ZERO, ..db.replication("fo", "p") };
    let options = SourceOptions { retry_for: Duration::from_secs(120), ..SourceOptions::default() };
    let mut stream = Stream::start_with(conn, repl, options);
    db.wait_slot_active(&slot).await;

    for id in 1..=100 {
        db.sql(&format!("INSERT INTO t VALUES ({id})"));
    }
    let first = stream.commits(100).await;
    assert_eq!(inserted_ids(&first), (1..=100).collect::<Vec<_>>());
    let confirmed = db.slot_confirmed("fo").unwrap();
    let standby_slot = |what: &str| {
        standby
            .psql("postgres", &format!("SELECT {what} FROM pg_replication_slots WHERE slot_name = '{slot}'"))
    };
    wait_for("the standby to synchronise the slot", Duration::from_secs(120), || {
        // The standby takes the slot once its catalog xmin passed the standby's own, which moves
        // when a running-transactions record is decoded and confirmed: write one now.
        primary.psql("postgres", "SELECT pg_log_standby_snapshot()").unwrap();
        let synced = standby_slot("synced").unwrap_or_default() == "t";
        let caught_up = standby_slot("confirmed_flush_lsn")
            .ok()
            .and_then(|l| l.parse::<sluice_core::Lsn>().ok())
            .unwrap_or_default();
        async move { synced && caught_up >= confirmed }
    })
    .await;

    // What validate, status and the metrics report: kept in step by the standby's slot.
    let on_primary = sluice_postgres::connect_sql(&db.connection()).await.unwrap();
    let state = sluice_postgres::setup::failover_state(&on_primary, &slot).await.unwrap().unwrap();
    assert!(state.failover && state.warning.is_none(), "{state:?}");
    assert_eq!(state.standby_slots, vec![("standby1".to_owned(), Some(true))]);
    let on_standby =
        sluice_postgres::connect_sql(&ConnectionConfig { port: standby.port, ..db.connection() })
            .await
            .unwrap();
    let state = sluice_postgres::setup::failover_state(&on_standby, &slot).await.unwrap().unwrap();
    assert!(state.failover && state.synced, "{state:?}");

    // More changes, sent to sluice but not acknowledged; then the primary crashes.
    for id in 101..=150 {
        db.sql(&format!("INSERT INTO t VALUES ({id})"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    primary.stop("immediate").unwrap();
    standby.promote().unwrap();
    for id in 151..=200 {
        standby.psql(&db.name, &format!("INSERT INTO t VALUES ({id})")).unwrap();
    }
    let after =
        stream.collect_until(Duration::from_secs(180), |events| inserted_ids(events).contains(&200)).await;

    // Nothing lost: every row the new primary has was delivered. Nothing delivered that it does
    // not have (a change the old primary sent before the standby had it). Replays only repeat.
    let survived: BTreeSet<i64> = standby
        .psql(&db.name, "SELECT id FROM t ORDER BY id")
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let delivered: Vec<i64> = inserted_ids(&first).into_iter().chain(inserted_ids(&after)).collect();
    let delivered_set: BTreeSet<i64> = delivered.iter().copied().collect();
    assert_eq!(delivered_set, survived, "delivered rows are the new primary's rows");
    assert!(survived.contains(&1) && survived.contains(&200));
    let mut first_seen = Vec::new();
    for id in &delivered {
        if !first_seen.contains(id) {
            first_seen.push(*id);
        }
    }
    assert!(first_seen.windows(2).all(|w| w[0] < w[1]), "in commit order");
    let on_new_primary = standby
        .psql("postgres", &format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"));
    assert_eq!(on_new_primary.unwrap(), "t", "sluice streams from the promoted standby's slot");
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_decoded_while_the_primary_takes_the_writes_and_the_heartbeats() {
    let (primary, standby) = primary_and_standby();
    let _logs = LogsOnPanic(vec![primary.log_path(), standby.log_path()]);
    let db = TestDb::in_cluster(Arc::clone(&primary));
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY, note text); CREATE PUBLICATION p FOR TABLE t");
    let slot = db.slot_name("sb");
    let on_standby = |sql: &str| standby.psql(&db.name, sql).unwrap();
    wait_for("the standby to replay the publication", Duration::from_secs(60), || {
        let replayed = standby.psql(&db.name, "SELECT count(*) FROM pg_publication WHERE pubname = 'p'").ok();
        async move { replayed.as_deref() == Some("1") }
    })
    .await;
    let conn = ConnectionConfig { port: standby.port, ..db.connection() };
    let options = SourceOptions {
        retry_for: Duration::from_secs(60),
        heartbeat_connection: Some(db.connection()),
        ..SourceOptions::default()
    };
    let repl =
        ReplicationConfig { heartbeat_interval: Duration::from_millis(500), ..db.replication("sb", "p") };
    let mut stream = Stream::start_with(conn, repl, options);
    let stats = Arc::clone(&stream.stats);
    wait_for("the slot on the standby to stream", Duration::from_secs(90), || {
        let active = standby
            .psql("postgres", &format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"))
            .ok();
        let streaming = stats.streaming.load(std::sync::atomic::Ordering::Relaxed);
        async move { streaming && active.as_deref() == Some("t") }
    })
    .await;
    assert_eq!(
        db.sql(&format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'")),
        "0",
        "the slot lives on the standby only"
    );

    for id in 1..=50 {
        db.sql(&format!("INSERT INTO t VALUES ({id}, 'n{id}')"));
    }
    let events = stream.commits(50).await;
    assert_eq!(
        inserted_ids(&events),
        (1..=50).collect::<Vec<_>>(),
        "the primary's writes, decoded on the standby"
    );
    db.sql("UPDATE t SET note = 'changed' WHERE id <= 10");
    let events = stream.commits(1).await;
    let updates = events.iter().filter(|e| matches!(e, sluice_core::ChangeEvent::Update { .. })).count();
    assert_eq!(updates, 10);
    assert_eq!(on_standby("SELECT count(*) FROM t"), "50");

    // Heartbeats are written on the primary and come back through the standby's slot.
    wait_for("heartbeats through the standby", Duration::from_secs(60), || {
        let sent = stats.heartbeats_sent.load(std::sync::atomic::Ordering::Relaxed);
        let received = stats.heartbeats_received.load(std::sync::atomic::Ordering::Relaxed);
        async move { sent >= 2 && received >= 2 }
    })
    .await;
    stream.stop().await.unwrap();
    let confirmed: sluice_core::Lsn = standby
        .psql(
            "postgres",
            &format!("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        )
        .unwrap()
        .parse()
        .unwrap();
    let last_update: sluice_core::Lsn = on_standby("SELECT pg_last_wal_replay_lsn()").parse().unwrap();
    assert!(
        confirmed > sluice_core::Lsn::ZERO && confirmed <= last_update,
        "confirmed {confirmed}, replayed {last_update}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_a_standby_shows_how_far_the_slot_and_the_replay_trail_the_primary() {
    use crate::harness::metric;
    use crate::operations::{scrape, start, status, wait_for_metrics, with_monitoring};

    let (primary, standby) = primary_and_standby();
    let db = TestDb::in_cluster(Arc::clone(&primary));
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    wait_for("the standby to replay the publication", Duration::from_secs(60), || {
        let replayed = standby.psql(&db.name, "SELECT count(*) FROM pg_publication WHERE pubname = 'p'").ok();
        async move { replayed.as_deref() == Some("1") }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = sluice::localpg::free_port().unwrap();
    let config = db.config_file(dir.path(), "st", "p", "[target]\nkind = \"null\"\n");
    let config =
        with_monitoring(config, &format!("listen = \"127.0.0.1:{port}\"\nslot_check_interval = \"1s\""));
    // The source is the standby; heartbeats and the primary's position come from the primary.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("port = {}\n", primary.port), &format!("port = {}\n", standby.port))
        .replace(
            "status_interval = \"1s\"",
            &format!(
                "status_interval = \"1s\"\nheartbeat_interval = \"500ms\"\n\n\
                 [source.heartbeat_connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"",
                primary.port, db.name
            ),
        );
    std::fs::write(&config, text).unwrap();
    let mut child = start(&config, &dir.path().join("sluice.log"));
    let _logs = LogsOnPanic(vec![dir.path().join("sluice.log"), primary.log_path(), standby.log_path()]);
    // Created (which waits for the primary's snapshot to replay) and streaming.
    wait_for_metrics(port, "the slot on the standby to stream", Duration::from_secs(90), |body| {
        metric(body, "sluice_source_streaming") == Some(1.0)
            && metric(body, "sluice_lag_behind_primary_bytes").is_some()
    })
    .await;

    // Replay paused: the primary moves on, the standby and the slot stay behind, by about as
    // much as the primary wrote since.
    standby.psql("postgres", "SELECT pg_wal_replay_pause()").unwrap();
    let before: sluice_core::Lsn = db.sql("SELECT pg_current_wal_lsn()").parse().unwrap();
    db.sql("INSERT INTO t SELECT g FROM generate_series(1, 20000) g");
    let after: sluice_core::Lsn = db.sql("SELECT pg_current_wal_lsn()").parse().unwrap();
    let written = (after.0 - before.0) as f64;
    wait_for_metrics(port, "the standby's replay lag to show", Duration::from_secs(60), |body| {
        metric(body, "sluice_standby_replay_lag_bytes").is_some_and(|b| b >= written)
            && metric(body, "sluice_lag_behind_primary_bytes").is_some_and(|b| b >= written)
    })
    .await;
    let (code, out) = status(&config, true);
    assert_eq!(code, Some(0), "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let slot = &json["slot"];
    assert_eq!(slot["on_standby"], true, "{out}");
    let primary_lsn: sluice_core::Lsn = slot["primary_wal_lsn"].as_str().unwrap().parse().unwrap();
    let replayed: sluice_core::Lsn = slot["server_wal_lsn"].as_str().unwrap().parse().unwrap();
    assert!(primary_lsn >= after && replayed < after, "{out}");
    assert_eq!(slot["standby_replay_lag_bytes"].as_i64(), Some((primary_lsn.0 - replayed.0) as i64), "{out}");
    let (code, out) = status(&config, false);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("bytes behind the primary's") && out.contains(&primary_lsn.to_string()), "{out}");

    // Replay resumed: the standby catches up, and the slot follows it to the primary's position.
    standby.psql("postgres", "SELECT pg_wal_replay_resume()").unwrap();
    wait_for_metrics(port, "the slot to catch up with the primary", Duration::from_secs(90), |body| {
        metric(body, "sluice_standby_replay_lag_bytes").is_some_and(|b| b < written)
            && metric(body, "sluice_lag_behind_primary_bytes").is_some_and(|b| b < written)
            && metric(body, "sluice_events_total{op=\"insert\",pipeline=\"default\",table=\"public.t\"}")
                == Some(20000.0)
    })
    .await;
    let body = scrape(port);
    assert!(metric(&body, "sluice_heartbeats_received_total").is_some_and(|n| n >= 1.0), "{body}");
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}
