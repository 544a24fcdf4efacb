//! What depends on the server's major version: settings an older server cannot honour are
//! refused with the setting and the version named, and where the server can, they work:
//! failover slots (17+), `origin = none` and protocol 4's parallel streaming (16+). These run on
//! every version of the matrix (`bash .ci/setup test`), each asserting its version's behaviour.

use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_core::ChangeEvent;
use sluice_postgres::{OriginFilter, ReplicationConfig, Streaming};

use crate::harness::{inserted_ids, wait_for, Stream, TestDb};

/// Starts a source with `repl` and expects it to stop at set-up with an error naming `setting`,
/// the version it needs and the server's version; returns the message.
async fn refused(db: &TestDb, repl: ReplicationConfig, setting: &str, needs: u32) -> String {
    let stream = Stream::start(db.connection(), repl);
    let result = tokio::time::timeout(Duration::from_secs(60), stream.task)
        .await
        .expect("the source gives up at set-up")
        .expect("source task");
    let message = result.expect_err("refused").to_string();
    assert!(
        message.contains(&format!("{setting} needs Postgres {needs} or later")),
        "names {setting} and the version it needs: {message}"
    );
    assert!(message.contains(&db.server_version()), "names the server's version: {message}");
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_is_created_on_17_and_refused_before() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let repl = ReplicationConfig { failover: true, ..db.replication("fo", "p") };
    if db.server_major() < 17 {
        refused(&db, repl, "source.replication.failover = true", 17).await;
        assert_eq!(
            db.sql(&format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
                db.slot_name("fo")
            )),
            "0"
        );
        return;
    }
    let mut stream = db.stream(repl).await;
    assert_eq!(
        db.sql(&format!(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = '{}'",
            db.slot_name("fo")
        )),
        "t"
    );
    db.sql("INSERT INTO t VALUES (1)");
    assert_eq!(inserted_ids(&stream.commits(1).await), vec![1]);
    // No standby keeps it in step: reported, not refused.
    let sql = sluice_postgres::connect_sql(&db.connection()).await.unwrap();
    let state = sluice_postgres::setup::failover_state(&sql, &db.slot_name("fo")).await.unwrap().unwrap();
    assert!(state.failover, "{state:?}");
    assert!(
        state.warning.as_deref().is_some_and(|w| w.contains("synchronized_standby_slots is empty")),
        "{state:?}"
    );
    stream.stop().await.unwrap();

    // An existing slot that is not a failover slot becomes one.
    db.sql(&format!("SELECT pg_create_logical_replication_slot('{}', 'pgoutput')", db.slot_name("plain")));
    let stream = db.stream(ReplicationConfig { failover: true, ..db.replication("plain", "p") }).await;
    assert_eq!(
        db.sql(&format!(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = '{}'",
            db.slot_name("plain")
        )),
        "t"
    );
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_none_leaves_out_replicated_changes_on_16_and_is_refused_before() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let repl = ReplicationConfig { origin: OriginFilter::None, ..db.replication("on", "p") };
    if db.server_major() < 16 {
        refused(&db, repl, "source.replication.origin = \"none\"", 16).await;
        return;
    }
    let mut stream = db.stream(repl).await;
    let origin = format!("{}_elsewhere", db.name);
    // A change replicated from elsewhere (it carries an origin), then a local one.
    db.sql(&format!(
        "SELECT pg_replication_origin_create('{origin}'); SELECT pg_replication_origin_session_setup('{origin}'); \
         INSERT INTO t VALUES (1); SELECT pg_replication_origin_session_reset(); INSERT INTO t VALUES (2)"
    ));
    let events = stream.commits(1).await;
    assert_eq!(inserted_ids(&events), vec![2], "the replicated change is not sent");
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_4_parallel_streaming_decodes_interleaved_transactions_on_16_and_is_refused_before() {
    let repl = |db: &TestDb| ReplicationConfig {
        proto_version: 4,
        streaming: Streaming::Parallel,
        ..db.replication("par", "p")
    };
    let db = TestDb::new();
    if db.server_major() < 16 {
        db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
        let message = refused(&db, repl(&db), "source.replication.streaming = \"parallel\"", 16).await;
        assert!(message.contains("source.replication.proto_version = 4 needs Postgres 16"), "{message}");
        return;
    }
    drop(db);
    // Its own cluster: the open transactions would hold up other tests' slot creation.
    let db = TestDb::in_cluster(std::sync::Arc::new(
        sluice::localpg::LocalPostgres::start(&sluice::localpg::ClusterOptions::default()).unwrap(),
    ));
    db.sql(&format!("ALTER DATABASE \"{}\" SET logical_decoding_work_mem = '64kB'", db.name));
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY, pad text); CREATE PUBLICATION p FOR TABLE t");
    let mut stream = db.stream(repl(&db)).await;
    let stats = std::sync::Arc::clone(&stream.stats);
    let (a, b) = (
        sluice_postgres::connect_sql(&db.connection()).await.unwrap(),
        sluice_postgres::connect_sql(&db.connection()).await.unwrap(),
    );
    // Two large transactions in progress at once, their streamed blocks interleaved; one
    // subtransaction of the first and the whole second roll back.
    let insert = |from: i64, to: i64, pad: &str| {
        format!("INSERT INTO t SELECT g, repeat('{pad}', 100) FROM generate_series({from}, {to}) g")
    };
    a.batch_execute(&format!("BEGIN; {}", insert(1, 3000, "a"))).await.unwrap();
    b.batch_execute(&format!("BEGIN; {}", insert(100_001, 103_000, "b"))).await.unwrap();
    a.batch_execute(&format!("SAVEPOINT s; {}; ROLLBACK TO SAVEPOINT s", insert(200_001, 203_000, "x")))
        .await
        .unwrap();
    b.batch_execute(&insert(103_001, 106_000, "b")).await.unwrap();
    a.batch_execute(&insert(3001, 6000, "a")).await.unwrap();
    wait_for("both transactions to be spilled", Duration::from_secs(60), || {
        let spilled = stats.spilled_bytes.load(Ordering::Relaxed);
        async move { spilled > 500_000 }
    })
    .await;
    assert!(stream.nothing_delivered(), "nothing of an open transaction is delivered");
    b.batch_execute("ROLLBACK").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    let events = stream.commits(1).await;
    assert_eq!(inserted_ids(&events), (1..=6000).collect::<Vec<_>>(), "the committed rows, in order, once");
    assert!(events.iter().all(|e| !matches!(e, ChangeEvent::Delete { .. } | ChangeEvent::Update { .. })));
    wait_for("the second transaction's abort", Duration::from_secs(30), || {
        let aborts = stats.streamed_aborts.load(Ordering::Relaxed);
        async move { aborts >= 1 }
    })
    .await;
    let abort_lsn = sluice_core::Lsn(stats.last_abort_lsn.load(Ordering::Relaxed));
    assert!(
        abort_lsn > sluice_core::Lsn::ZERO && abort_lsn < db.insert_lsn(),
        "the abort's LSN came along: {abort_lsn}"
    );
    b.batch_execute(&insert(300_001, 300_002, "c")).await.unwrap();
    assert_eq!(inserted_ids(&stream.commits(1).await), vec![300_001, 300_002]);
    assert_eq!(stats.spilled_bytes.load(Ordering::Relaxed), 0, "nothing stays spilled");
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_columns_arrive_when_an_18_publication_publishes_them() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY, price int NOT NULL, doubled int GENERATED ALWAYS AS (price * 2) STORED)");
    let eighteen = db.server_major() >= 18;
    db.sql(if eighteen {
        "CREATE PUBLICATION p FOR TABLE t WITH (publish_generated_columns = stored)"
    } else {
        "CREATE PUBLICATION p FOR TABLE t"
    });
    let mut stream = db.stream(db.replication("gen", "p")).await;
    db.sql("INSERT INTO t (id, price) VALUES (1, 21)");
    let events = stream.commits(1).await;
    let Some(ChangeEvent::Insert { relation, new, .. }) =
        events.iter().find(|e| matches!(e, ChangeEvent::Insert { .. }))
    else {
        panic!("an insert: {events:?}")
    };
    let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
    if eighteen {
        assert_eq!(names, ["id", "price", "doubled"]);
        assert_eq!(new[2], sluice_core::Value::Int4(42), "the generated value as stored");
    } else {
        assert_eq!(names, ["id", "price"], "before 18 a publication never carries generated columns");
    }
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_for_idleness_on_18_is_named_so() {
    // Its own cluster: the timeout applies to every slot of the cluster.
    let pg = std::sync::Arc::new(sluice::localpg::LocalPostgres::start(&Default::default()).unwrap());
    let db = TestDb::in_cluster(pg);
    if db.server_major() < 18 {
        let err = db.pg.psql("postgres", "SHOW idle_replication_slot_timeout").unwrap_err().to_string();
        assert!(
            err.contains("unrecognized configuration parameter"),
            "no idle invalidation before 18: {err}"
        );
        return;
    }
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let slot = db.slot_name("idle");
    db.sql(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"));
    db.pg.psql("postgres", "ALTER SYSTEM SET idle_replication_slot_timeout = '1s'").unwrap();
    db.pg.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    wait_for("the idle slot to be invalidated at a checkpoint", Duration::from_secs(60), || {
        db.sql("CHECKPOINT");
        let reason = db
            .sql(&format!("SELECT invalidation_reason FROM pg_replication_slots WHERE slot_name = '{slot}'"));
        async move { reason == "idle_timeout" }
    })
    .await;
    let stream = Stream::start(db.connection(), db.replication("idle", "p"));
    let result =
        tokio::time::timeout(Duration::from_secs(60), stream.task).await.expect("stops").expect("task");
    let message = result.expect_err("an invalidated slot stops the stream").to_string();
    assert!(message.contains(&slot) && message.contains("idle_replication_slot_timeout (1s)"), "{message}");
    assert!(message.contains("on_slot_lost"), "says what to do: {message}");
}

/// Generated columns (before 18, and virtual ones on 18) and columns a publication's column
/// list leaves out (15+) never arrive through the stream: a backfill leaves them out alike, and
/// `validate` names a mapping that renames one, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_the_publication_leaves_out_are_left_out_of_backfill_and_named_by_validate() {
    let db = TestDb::new();
    let major = db.server_major();
    let virtual_column =
        if major >= 18 { ", tripled int GENERATED ALWAYS AS (price * 3) VIRTUAL" } else { "" };
    db.sql(&format!(
        "CREATE TABLE t (id int8 PRIMARY KEY, price int NOT NULL, \
         doubled int GENERATED ALWAYS AS (price * 2) STORED, note text{virtual_column});
         INSERT INTO t (id, price, note) SELECT g, g, 'n' FROM generate_series(1, 3) g;"
    ));
    // A column list needs 15; before it, every plain column is published.
    db.sql(if major >= 15 {
        "CREATE PUBLICATION p FOR TABLE t (id, price)"
    } else {
        "CREATE PUBLICATION p FOR TABLE t"
    });
    let carried: &[&str] = if major >= 15 { &["id", "price"] } else { &["id", "note", "price"] };

    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.jsonl");
    let config = db.config_file(
        dir.path(),
        "lo",
        "p",
        &format!("[target]\nkind = \"jsonl\"\npath = \"{}\"\nfsync = true\n", output.display()),
    );
    let log = dir.path().join("run.log");
    let mut child = crate::operations::start(&config, &log);
    let _logs = crate::harness::LogsOnPanic(vec![log]);
    db.wait_slot_active(&db.slot_name("lo")).await;
    db.sql("INSERT INTO t (id, price, note) VALUES (4, 4, 'n')");
    let mut snapshot = crate::harness::sluice();
    snapshot.args(["snapshot", "-c", config.to_str().unwrap()]);
    let out = tokio::task::spawn_blocking(move || snapshot.output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&output)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|l: &serde_json::Value| l["op"] == "insert" || l["op"] == "read")
            .collect()
    };
    wait_for("the streamed row and the four backfilled ones", Duration::from_secs(60), || {
        let n = rows().len();
        async move { n >= 5 }
    })
    .await;
    for row in rows() {
        let mut columns: Vec<&str> = row["new"].as_object().unwrap().keys().map(String::as_str).collect();
        columns.sort();
        assert_eq!(columns, carried, "streamed and backfilled rows carry the same columns: {row}");
    }
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());

    // A Postgres target whose mapping renames the generated column.
    let target = TestDb::in_cluster(std::sync::Arc::clone(&db.pg));
    target.sql("CREATE TABLE t2 (id int8 PRIMARY KEY, price int, twice int, note text)");
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(
        &mapping,
        "[[tables]]\nsource = \"public.t\"\ntarget = \"public.t2\"\nrename = { doubled = \"twice\" }\n",
    )
    .unwrap();
    let pg_config = db.config_file(
        dir.path(),
        "lo2",
        "p",
        &format!(
            "[target]\nkind = \"postgres\"\nmapping = \"{}\"\n[target.connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"\nuser = \"postgres\"\n",
            mapping.display(),
            target.pg.port,
            target.name
        ),
    );
    let run =
        crate::harness::sluice().args(["validate", "-c", pg_config.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned() + &String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stdout}");
    assert!(
        stdout.contains("target.mapping.tables[0].rename")
            && stdout.contains("column doubled is not carried by the publication")
            && stdout.contains("generated column"),
        "{stdout}"
    );

    // Without the rename, the rows stream into the target, and verify compares them as the
    // stream carries them: the left-out columns are no difference.
    std::fs::write(&mapping, "[[tables]]\nsource = \"public.t\"\ntarget = \"public.t2\"\n").unwrap();
    let run_to_now = || crate::harness::run_to_now(&db, &pg_config);
    run_to_now(); // creates the slot
    db.sql("INSERT INTO t (id, price, note) VALUES (5, 5, 'n')");
    run_to_now();
    assert_eq!(target.sql("SELECT count(*) FROM t2 WHERE twice IS NULL AND id = 5"), "1", "the streamed row");
    target.sql("INSERT INTO t2 (id, price) SELECT g, g FROM generate_series(1, 4) g");
    if major < 15 {
        target.sql("UPDATE t2 SET note = 'n'");
    }
    let report = crate::harness::verify_report(&pg_config).await;
    assert_eq!(crate::harness::differences(&report), 0, "{report:#}");
    assert_eq!(report["tables"][0]["matched"], 5, "{report:#}");
    target.sql("UPDATE t2 SET price = 40 WHERE id = 4");
    let report = crate::harness::verify_report(&pg_config).await;
    assert_eq!(crate::harness::differences(&report), 1, "a real difference still counts: {report:#}");
}
