//! Backfill beside the stream, verify and reconcile, against a real Postgres and a real
//! DynamoDB-API server (moto), through the `sluice` binary.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use sluice_dynamodb::{Attr, DynamoClient, Item};

use crate::harness::{
    differences, dynamo_client, kill_9, moto, sluice, verify_report, wait_for, LogsOnPanic, Moto, TestDb,
};

const SCHEMA: &str = "CREATE TABLE customers (id int8 PRIMARY KEY, email text, password_hash text, status text NOT NULL DEFAULT 'active',
    balance numeric(12,2), created_at timestamptz, tags text[], prefs jsonb, bio text);
  CREATE TABLE orders (customer_id int8, id int8, total numeric, PRIMARY KEY (customer_id, id));
  CREATE PUBLICATION p FOR TABLE customers, orders;";

/// Rows present before sluice ever ran: only a backfill brings them over.
fn preload(db: &TestDb, customers: i64) {
    db.sql(&format!(
        "INSERT INTO customers (id, email, password_hash, status, balance, created_at, tags, prefs, bio)
           SELECT g, 'c' || g || '@x', 'h', CASE WHEN g % 50 = 0 THEN 'banned' ELSE 'active' END, g * 1.25,
                  '2024-01-01'::timestamptz + g * interval '1 minute', ARRAY['t' || (g % 3)], jsonb_build_object('n', g),
                  CASE WHEN g % 100 = 0 THEN repeat('long bio ', 2000) END
           FROM generate_series(1, {customers}) g;
         INSERT INTO orders SELECT g % {customers} + 1, g, g * 0.5 FROM generate_series(1, {}) g;",
        customers * 2
    ));
}

struct Setup {
    _moto: std::sync::Arc<Moto>,
    db: TestDb,
    client: DynamoClient,
    table: String,
    dir: tempfile::TempDir,
    config: PathBuf,
}

async fn setup(slot: &str, backfill: &str) -> Setup {
    let moto = moto();
    let db = TestDb::new();
    db.sql(SCHEMA);
    let table = format!("shop_{}", db.name);
    let client = dynamo_client(&moto.url).await;
    client.create_table(&table, "pk", Some("sk")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/examples/shop.toml")).unwrap();
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(&mapping, example.replace("target = \"shop\"", &format!("target = \"{table}\""))).unwrap();
    let config = db.config_file(
        dir.path(),
        slot,
        "p",
        &format!(
            "{}\n[backfill]\npoll_interval = \"200ms\"\n{backfill}",
            crate::dynamodb::target_toml(&mapping, &moto.url, "")
        ),
    );
    Setup { _moto: moto, db, client, table, dir, config }
}

impl Setup {
    fn start(&self, log: &str) -> Child {
        self.start_with(log, &[])
    }

    fn start_with(&self, log: &str, env: &[(&str, &str)]) -> Child {
        sluice()
            .args(["run", "-c", self.config.to_str().unwrap()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join(log)).unwrap())
            .spawn()
            .unwrap()
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs a sluice subcommand against the config: exit code, and standard output followed
    /// by standard error.
    async fn command(&self, args: &[&str]) -> (Option<i32>, String) {
        let mut command = sluice();
        command.args(args).args(["-c", self.config.to_str().unwrap()]);
        let out = tokio::task::spawn_blocking(move || command.output().expect("run sluice")).await.unwrap();
        (
            out.status.code(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    async fn verify(&self) -> serde_json::Value {
        verify_report(&self.config).await
    }

    async fn wait_confirmed_past_now(&self, slot: &str) {
        let now = self.db.insert_lsn();
        self.db.sql("SELECT pg_logical_emit_message(true, 'test', 'flush')");
        wait_for("the slot to confirm past now", Duration::from_secs(120), || async {
            self.db.slot_confirmed(slot).unwrap() > now
        })
        .await;
    }
}

fn stop(mut child: Child) {
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success(), "sluice exits 0 on SIGTERM");
}

fn table<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["tables"].as_array().unwrap().iter().find(|t| t["table"] == name).unwrap()
}

/// Updates, inserts, deletes and key changes on both tables, `steps` of them.
async fn churn(connection: sluice_postgres::ConnectionConfig, customers: i64, steps: i64) {
    let sql = sluice_postgres::connect_sql(&connection).await.unwrap();
    for step in 0..steps {
        let id = (step * 7919) % customers + 1;
        let statement = match step % 6 {
            0 => format!("UPDATE customers SET balance = balance + 1, email = 'u{step}@x' WHERE id = {id}"),
            1 => format!("INSERT INTO customers (id, email) VALUES ({}, 'new{step}@x') ON CONFLICT DO NOTHING", customers + step),
            2 => format!("DELETE FROM orders WHERE customer_id = {id}"),
            3 => format!("UPDATE customers SET status = CASE status WHEN 'banned' THEN 'active' ELSE 'banned' END WHERE id = {id}"),
            4 => format!("UPDATE customers SET bio = bio || '!' WHERE id = {}", (id / 100 + 1) * 100),
            _ => format!("DELETE FROM customers WHERE id = {id}"),
        };
        sql.batch_execute(&statement).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_beside_concurrent_writes_leaves_the_target_equal_to_the_source() {
    let setup = setup("bf", "chunk_size = 150\n").await;
    let db = &setup.db;
    preload(db, 1500);
    let _logs = LogsOnPanic(vec![setup.log("sluice.log")]);
    // Each chunk's window stays open 40 ms, so that the concurrent writes land inside windows
    // (a chunk read alone takes about a millisecond).
    let child = setup.start_with("sluice.log", &[("SLUICE_TEST_BACKFILL_WINDOW_DELAY_MS", "40")]);
    db.wait_slot_active(&db.slot_name("bf")).await;
    let writer = tokio::spawn(churn(db.connection(), 1500, 1200));
    let (code, out) = setup.command(&["snapshot"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("requested backfill")
            && out.contains("public.customers")
            && out.contains("public.orders"),
        "{out}"
    );
    writer.await.unwrap();
    setup.wait_confirmed_past_now("bf").await;

    let report = setup.verify().await;
    assert_eq!(differences(&report), 0, "{report:#}");
    let customers = table(&report, "public.customers");
    let rows: u64 = db.sql("SELECT count(*) FROM customers").trim().parse().unwrap();
    assert_eq!(customers["rows"].as_u64(), Some(rows));
    let live: u64 = db.sql("SELECT count(*) FROM customers WHERE status <> 'banned'").trim().parse().unwrap();
    assert_eq!(customers["matched"].as_u64(), Some(live), "banned rows are filtered out by the mapping");
    assert_eq!(customers["extra_checked"], true);
    assert!(table(&report, "public.orders")["matched"].as_u64().unwrap() > 1000);
    let progress = db
        .sql("SELECT string_agg(state || ':' || rows_done, ',' ORDER BY source_table) FROM sluice_backfill");
    assert!(progress.trim().starts_with("done:") && progress.contains(",done:"), "{progress}");

    // Verify while rows change: the rows caught in flight are checked again once the stream
    // has passed them, and are not reported.
    let writer = tokio::spawn(churn(db.connection(), 1500, 400));
    let report = setup.verify().await;
    writer.await.unwrap();
    assert_eq!(differences(&report), 0, "{report:#}");
    assert_eq!(report["recheck_note"], serde_json::Value::Null);
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_backfill_resumes_at_the_last_finished_chunk() {
    let setup = setup("resume", "chunk_size = 250\nmax_rows_per_second = 2500\n").await;
    let db = &setup.db;
    preload(db, 6000);
    let logs = [setup.log("first.log"), setup.log("second.log")];
    let _logs = LogsOnPanic(logs.to_vec());
    let mut first = setup.start("first.log");
    db.wait_slot_active(&db.slot_name("resume")).await;
    let (code, out) = setup.command(&["snapshot", "--no-wait", "--table", "public.customers"]).await;
    assert_eq!(code, Some(0), "{out}");
    let done = || {
        db.sql("SELECT rows_done FROM sluice_backfill WHERE source_table = 'public.customers'")
            .trim()
            .parse::<i64>()
            .unwrap_or(0)
    };
    wait_for("some chunks to finish", Duration::from_secs(60), || async { done() >= 1000 }).await;
    kill_9(&mut first);
    let at_kill = done();
    assert!(at_kill < 6000, "killed mid-backfill: {at_kill}");
    assert_eq!(
        db.sql("SELECT state FROM sluice_backfill WHERE source_table = 'public.customers'").trim(),
        "running"
    );
    let second = setup.start("second.log");
    let (code, out) = setup.command(&["snapshot", "--table", "public.orders"]).await;
    assert_eq!(code, Some(0), "{out}");
    wait_for("the customers backfill to finish", Duration::from_secs(120), || async {
        db.sql("SELECT state FROM sluice_backfill WHERE source_table = 'public.customers'").trim() == "done"
    })
    .await;
    // Progress counts each durable chunk once: a restart from the beginning would count more.
    assert_eq!(done(), 6000, "resumed after the last finished chunk ({at_kill} rows were done at the kill)");
    let log = std::fs::read_to_string(&logs[1]).unwrap();
    assert!(log.contains("backfill started") && log.contains("resume_after=Some(1)"), "{log}");
    setup.wait_confirmed_past_now("resume").await;
    let report = setup.verify().await;
    assert_eq!(differences(&report), 0, "{report:#}");
    stop(second);
}

fn s(v: &str) -> Attr {
    Attr::S(v.into())
}

async fn item(client: &DynamoClient, table: &str, pk: &str, sk: &str) -> Option<Item> {
    client
        .get_items(table, &[Item::from([("pk".into(), s(pk)), ("sk".into(), s(sk))])])
        .await
        .unwrap()
        .pop()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_injected_drift_exactly_and_reconcile_repairs_it() {
    // The initial backfill copies the tables at the first start, unasked.
    let setup = setup("drift", "initial = true\n").await;
    let (db, client, table) = (&setup.db, &setup.client, &setup.table);
    preload(db, 300);
    let _logs = LogsOnPanic(vec![setup.log("sluice.log")]);
    let child = setup.start("sluice.log");
    db.wait_slot_active(&db.slot_name("drift")).await;
    wait_for("the initial backfill of both tables", Duration::from_secs(60), || async {
        db.sql("SELECT to_regclass('sluice_backfill') IS NOT NULL").trim() == "t"
            && db.sql("SELECT count(*) FROM sluice_backfill WHERE state = 'done'").trim() == "2"
    })
    .await;
    setup.wait_confirmed_past_now("drift").await;
    assert_eq!(differences(&setup.verify().await), 0);
    verify_survives_a_lost_source_connection(&setup).await;

    // Drift made behind sluice's back: an item deleted, one modified, one added that no row
    // produces (a stray item of an earlier run: it carries a version).
    client
        .delete_item(table, &Item::from([("pk".into(), s("CUSTOMER#7")), ("sk".into(), s("PROFILE"))]))
        .await
        .unwrap();
    let mut modified = item(client, table, "CUSTOMER#8", "PROFILE").await.unwrap();
    modified.insert("emailAddress".into(), s("changed@elsewhere"));
    modified.insert("balance".into(), Attr::N("0".into()));
    let mut stray = modified.clone();
    client.batch_put(table, vec![modified]).await.unwrap();
    stray.insert("pk".into(), s("CUSTOMER#999999"));
    client.batch_put(table, vec![stray]).await.unwrap();

    let report = setup.verify().await;
    let customers = table_report(&report);
    assert_eq!(
        (customers["missing"].as_u64(), customers["different"].as_u64(), customers["extra"].as_u64()),
        (Some(1), Some(1), Some(1)),
        "{report:#}"
    );
    assert_eq!(customers["missing_keys"][0]["id"], "7");
    assert_eq!(customers["different_keys"][0]["key"]["id"], "8");
    let attributes: Vec<&str> = customers["different_keys"][0]["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(attributes, ["balance", "emailAddress"]);
    assert!(customers["different_keys"][0].get("values").is_none(), "values only when asked for");
    assert_eq!(customers["extra_keys"][0]["source_key"]["id"], "999999");
    assert_eq!(differences(&report), 3, "nothing else: {report:#}");

    let (code, out) = setup.command(&["reconcile"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("requested reconcile") && out.contains("3 keys of public.customers"), "{out}");
    assert!(item(client, table, "CUSTOMER#7", "PROFILE")
        .await
        .is_some_and(|i| i["emailAddress"] == s("c7@x")));
    assert!(item(client, table, "CUSTOMER#8", "PROFILE")
        .await
        .is_some_and(|i| i["emailAddress"] == s("c8@x")));
    assert!(
        item(client, table, "CUSTOMER#999999", "PROFILE")
            .await
            .is_some_and(|i| i.get("_deleted") == Some(&Attr::Bool(true))),
        "the stray item is a tombstone now"
    );
    assert_eq!(differences(&setup.verify().await), 0);
    stop(child);
}

/// The source connection is cut in the middle of a (throttled) verify pass: verify reconnects,
/// opens a new snapshot, reads on after the last key it had, and reports every row once.
async fn verify_survives_a_lost_source_connection(setup: &Setup) {
    let db = &setup.db;
    let mut command = sluice();
    command.args(["verify", "--json", "--chunk-size", "50", "--max-rows-per-second", "300", "-c"]);
    command.arg(&setup.config);
    let run = tokio::task::spawn_blocking(move || command.output().expect("run sluice verify"));
    let verify_sessions = "FROM pg_stat_activity WHERE application_name = 'sluice verify'";
    wait_for("verify to connect", Duration::from_secs(60), || async {
        db.sql(&format!("SELECT count(*) {verify_sessions}")).trim() != "0"
    })
    .await;
    // 900 rows at 300 rows/s: a second in, the pass is reading.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut = db.sql(&format!("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) {verify_sessions}"));
    assert_eq!(cut.trim(), "1", "verify's source session was cut");
    let out = run.await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    // Cut while idle (between throttled chunks) it reconnects before the next read; cut during
    // a read it retries that read.
    assert!(stderr.contains("reconnected to Postgres"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(differences(&report), 0, "{report:#}");
    assert_eq!(table(&report, "public.customers")["rows"], 300, "each row once: {report:#}");
    assert_eq!(table(&report, "public.orders")["rows"], 600, "each row once: {report:#}");
}

fn table_report(report: &serde_json::Value) -> &serde_json::Value {
    table(report, "public.customers")
}

/// A panic in the backfill task is a defect, not a failure to retry: the pipeline stops with
/// an error naming it (instead of streaming on beside a request that never finishes), and the
/// request stays open for the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_backfill_task_stops_the_pipeline() {
    let setup = setup("bfpanic", "").await;
    let db = &setup.db;
    preload(db, 10);
    let _logs = LogsOnPanic(vec![setup.log("run.log")]);
    let mut child = setup.start_with("run.log", &[("SLUICE_TEST_PANIC_IN", "backfill")]);
    db.wait_slot_active(&db.slot_name("bfpanic")).await;
    let (code, out) = setup.command(&["snapshot", "--no-wait", "--table", "public.customers"]).await;
    assert_eq!(code, Some(0), "{out}");
    let status = wait_for_exit(&mut child, Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(setup.log("run.log")).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("the backfill task panicked"), "the error names the task: {log}");
    assert_ne!(
        db.sql("SELECT state FROM sluice_backfill WHERE source_table = 'public.customers'").trim(),
        "done"
    );
}

/// Waits up to `limit` for the child to exit.
async fn wait_for_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "sluice still runs after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
