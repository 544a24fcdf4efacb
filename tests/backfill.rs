//! Backfill beside the stream, verify and reconcile, against a real Postgres and a real
//! DynamoDB-API server (moto), through the `sluice` binary.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use sluice_dynamodb::{Attr, DynamoClient, Item};

use crate::harness::{
    differences, dynamo_client, kill_9, moto, sluice, stop, verify_report, wait_for, wait_for_exit,
    LogsOnPanic, Moto, Outage, TestDb,
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
    setup_with(slot, backfill, |_| String::new()).await
}

/// `setup` with more `[target]` settings, made from the test's directory.
async fn setup_with(slot: &str, backfill: &str, target: impl FnOnce(&std::path::Path) -> String) -> Setup {
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
    let extra = target(dir.path());
    let config = db.config_file(
        dir.path(),
        slot,
        "p",
        &format!(
            "{}\n[backfill]\npoll_interval = \"200ms\"\n{backfill}",
            crate::dynamodb::target_toml(&mapping, &moto.url, &extra)
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

/// Asserts that `tables` were each read in at least `at_least` key ranges, all of them done.
fn assert_ranges_done(db: &TestDb, tables: &[&str], at_least: usize) {
    let stored = ranges_done(db);
    for table in tables {
        let counts = stored
            .split(',')
            .find_map(|entry| entry.strip_prefix(&format!("{table}:")))
            .and_then(|counts| counts.split_once('/'))
            .and_then(|(done, all)| Some((done.parse::<usize>().ok()?, all.parse::<usize>().ok()?)));
        assert!(
            matches!(counts, Some((done, all)) if done == all && all >= at_least),
            "{table}: at least {at_least} key ranges, all done: {stored}"
        );
    }
}

/// Each request's table with its key ranges done and stored: `public.t:2/3,…`.
fn ranges_done(db: &TestDb) -> String {
    db.sql(
        "SELECT string_agg(source_table || ':' || (SELECT count(*) FROM jsonb_array_elements(ranges) r WHERE (r->>'done')::bool) \
                || '/' || coalesce(jsonb_array_length(ranges), 0), ',' ORDER BY source_table) FROM sluice_backfill",
    )
    .trim()
    .to_owned()
}

fn table<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["tables"].as_array().unwrap().iter().find(|t| t["table"] == name).unwrap()
}

/// Updates, inserts, deletes and key changes on both tables, `steps` of them.
async fn churn(connection: sluice_postgres::ConnectionConfig, customers: i64, steps: i64) {
    let sql = sluice_postgres::connect_sql(&connection).await.unwrap();
    for step in 0..steps {
        let id = (step * 7919) % customers + 1;
        let statement = match step % 7 {
            0 => format!("UPDATE customers SET balance = balance + 1, email = 'u{step}@x' WHERE id = {id}"),
            1 => format!("INSERT INTO customers (id, email) VALUES ({}, 'new{step}@x') ON CONFLICT DO NOTHING", customers + step),
            2 => format!("DELETE FROM orders WHERE customer_id = {id}"),
            3 => format!("UPDATE customers SET status = CASE status WHEN 'banned' THEN 'active' ELSE 'banned' END WHERE id = {id}"),
            4 => format!("UPDATE customers SET bio = bio || '!' WHERE id = {}", (id / 100 + 1) * 100),
            // A key change: the row moves from wherever it was to past the table's end (the
            // last key range of a backfill split into ranges).
            5 => format!("UPDATE customers SET id = id + {} WHERE id = {id}", customers * 10),
            _ => format!("DELETE FROM customers WHERE id = {id}"),
        };
        sql.batch_execute(&statement).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_beside_concurrent_writes_leaves_the_target_equal_to_the_source() {
    // Three readers per table, each a key range.
    let setup = setup("bf", "chunk_size = 150\ntable_concurrency = 3\n").await;
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
    // Three readers took each table's key ranges (more of them than readers) from one queue.
    assert_ranges_done(db, &["public.customers", "public.orders"], 4);

    // Verify while rows change: the rows caught in flight are checked again once the stream
    // has passed them, and are not reported.
    let writer = tokio::spawn(churn(db.connection(), 1500, 400));
    let report = setup.verify().await;
    writer.await.unwrap();
    assert_eq!(differences(&report), 0, "{report:#}");
    assert_eq!(report["recheck_note"], serde_json::Value::Null);

    // A reader that closes the pipe at once (`verify --json | head -c0`): no panic, and the
    // exit code still says the target matches.
    let mut verify = sluice()
        .args(["verify", "--json", "-c", setup.config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(verify.stdout.take());
    let out = tokio::task::spawn_blocking(move || verify.wait_with_output().unwrap()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stop(child);
}

/// A table of many pages is split at keys of pages spread over all of it, so that its key
/// ranges hold about as many rows each (keys of a few whole pages, as `TABLESAMPLE SYSTEM`
/// gives, left ranges of one to fifteen chunks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_ranges_of_a_large_table_hold_about_as_many_rows_each() {
    const ROWS: i64 = 40_000;
    let db = TestDb::new();
    db.sql(&format!(
        "CREATE TABLE wide (id int8 PRIMARY KEY, n int NOT NULL); \
         INSERT INTO wide SELECT g, g FROM generate_series(1, {ROWS}) g; CREATE PUBLICATION p FOR TABLE wide"
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = db.config_file(
        dir.path(),
        "spread",
        "p",
        "[backfill]\nchunk_size = 1000\ntable_concurrency = 2\n[target]\nkind = \"null\"\n",
    );
    let log = dir.path().join("run.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let child = crate::operations::start(&config, &log);
    db.wait_slot_active(&db.slot_name("spread")).await;
    let mut snapshot = sluice();
    snapshot.args(["snapshot", "-c", config.to_str().unwrap()]);
    let out = tokio::task::spawn_blocking(move || snapshot.output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    stop(child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("backfill started") && text.contains("resuming=false"), "{text}");
    assert_ranges_done(&db, &["public.wide"], 8);
    // Each range's rows, counted in the table from the range before's last key (`after` is
    // the range's progress by now) through its own.
    let counts = db.sql(
        "WITH bounds AS (SELECT o, (r->'upto'->>0)::int8 AS upto, lag((r->'upto'->>0)::int8) OVER (ORDER BY o) AS after \
                          FROM sluice_backfill, jsonb_array_elements(ranges) WITH ORDINALITY AS x(r, o)) \
         SELECT string_agg((SELECT count(*) FROM wide w WHERE (after IS NULL OR w.id > after) \
                              AND (upto IS NULL OR w.id <= upto))::text, ',' ORDER BY o) FROM bounds",
    );
    let counts: Vec<i64> = counts.trim().split(',').map(|c| c.parse().unwrap()).collect();
    assert_eq!(counts.iter().sum::<i64>(), ROWS, "the ranges cover every row once: {counts:?}");
    let mean = ROWS / counts.len() as i64;
    assert!(
        counts.iter().all(|&c| c > mean * 7 / 10 && c < mean * 13 / 10),
        "every range within 30 % of {mean} rows: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_backfill_resumes_at_the_last_finished_chunk() {
    let setup = setup("resume", "chunk_size = 250\nmax_rows_per_second = 600\ntable_concurrency = 3\n").await;
    let db = &setup.db;
    preload(db, 3000);
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
    assert!(at_kill < 3000, "killed mid-backfill: {at_kill}");
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
    assert_eq!(done(), 3000, "resumed after the last finished chunk ({at_kill} rows were done at the kill)");
    let log = std::fs::read_to_string(&logs[1]).unwrap();
    assert!(log.contains("backfill started") && log.contains("resuming=true"), "{log}");
    // Each range resumed where it stopped.
    assert_ranges_done(db, &["public.customers"], 4);
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
    // This test's database only: other tests of the cluster run verify passes of their own.
    let verify_sessions =
        "FROM pg_stat_activity WHERE application_name = 'sluice verify' AND datname = current_database()";
    // The backend of the verify before this one may still be ending on a loaded server.
    wait_for("earlier verify sessions to end", Duration::from_secs(30), || async {
        db.sql(&format!("SELECT count(*) {verify_sessions}")).trim() == "0"
    })
    .await;
    let mut command = sluice();
    command.args(["verify", "--json", "--chunk-size", "50", "--max-rows-per-second", "300", "-c"]);
    command.arg(&setup.config);
    let run = tokio::task::spawn_blocking(move || command.output().expect("run sluice verify"));
    wait_for("verify to connect", Duration::from_secs(60), || async {
        db.sql(&format!("SELECT count(*) {verify_sessions}")).trim() != "0"
    })
    .await;
    // 900 rows at 300 rows/s: a second in, the pass is reading.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut = db.sql(&format!("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) {verify_sessions}"));
    // At least its one session: on a loaded server a connection attempt that timed out on
    // verify's side may linger beside it for a moment. That the live one was cut shows below,
    // in the reconnect.
    assert!(cut.trim().parse::<u32>().unwrap() >= 1, "verify's source session was cut: {cut}");
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

/// Two pipelines of one database, both left at the default `pipeline.name`: the second is
/// refused at start; once named apart, neither serves a request meant for the other, nor one
/// for a table outside its own publication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipelines_on_one_database_never_serve_each_others_backfill_requests() {
    let setup = setup("xa", "").await;
    let db = &setup.db;
    db.sql(
        "CREATE TABLE notes (id int8 PRIMARY KEY, body text);
         INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 3) g;
         CREATE PUBLICATION q FOR TABLE notes;",
    );
    let other = tempfile::tempdir().unwrap();
    let output = other.path().join("out.jsonl");
    let jsonl_config = db.config_file(
        other.path(),
        "xb",
        "q",
        &format!("[target]\nkind = \"jsonl\"\npath = \"{}\"\nfsync = true\n", output.display()),
    );
    let logs =
        [setup.log("dynamodb.log"), other.path().join("same-name.log"), other.path().join("notes.log")];
    let _logs = LogsOnPanic(logs.to_vec());
    let dynamodb = setup.start("dynamodb.log");
    db.wait_slot_active(&db.slot_name("xa")).await;

    // Same name, same database, another slot: refused, naming the key that sets them apart.
    let same_name = sluice()
        .args(["run", "-c", jsonl_config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&logs[1]).unwrap())
        .spawn()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let mut child = same_name;
        child.wait().unwrap()
    });
    let status =
        tokio::time::timeout(Duration::from_secs(60), status).await.expect("refused within 60 s").unwrap();
    let log = std::fs::read_to_string(&logs[1]).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("another sluice process already runs pipeline \"default\"")
            && log.contains("pipeline.name"),
        "{log}"
    );

    // A snapshot through the DynamoDB pipeline's config, of a table it does not publish.
    let (code, out) = setup.command(&["snapshot", "--no-wait", "--table", "public.notes"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("table public.notes is not in publication \"p\""), "{out}");
    let count = |sql: &str| db.sql(sql).trim().parse::<i64>().unwrap();
    assert_eq!(count("SELECT count(*) FROM sluice_backfill"), 0, "nothing was requested");

    // Named apart, the jsonl pipeline runs beside the DynamoDB one.
    let text = std::fs::read_to_string(&jsonl_config).unwrap();
    std::fs::write(&jsonl_config, text.replacen("[pipeline]\n", "[pipeline]\nname = \"notes\"\n", 1))
        .unwrap();
    let notes = sluice()
        .args(["run", "-c", jsonl_config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&logs[2]).unwrap())
        .spawn()
        .unwrap();
    db.wait_slot_active(&db.slot_name("xb")).await;

    // Requests written by hand, as an older sluice or a script would: one for the DynamoDB
    // pipeline's slot but a table it does not publish fails with the reason; one with no slot
    // is left to the pipeline that publishes the table.
    let slot = db.slot_name("xa");
    let foreign: i64 = db
        .sql(&format!(
            "INSERT INTO sluice_backfill (pipeline, slot, source_table) VALUES ('default', '{slot}', 'public.notes') RETURNING id"
        ))
        .trim()
        .parse()
        .unwrap();
    let unslotted: i64 = db
        .sql("INSERT INTO sluice_backfill (pipeline, source_table) VALUES ('default', 'public.notes') RETURNING id")
        .trim()
        .parse()
        .unwrap();
    wait_for("the foreign request to fail", Duration::from_secs(60), || async {
        db.sql(&format!("SELECT state FROM sluice_backfill WHERE id = {foreign}")).trim() == "failed"
    })
    .await;
    let error = db.sql(&format!("SELECT error FROM sluice_backfill WHERE id = {foreign}"));
    assert!(error.contains("public.notes is not in publication p"), "{error}");
    wait_for(
        "the DynamoDB pipeline to pass over the request without a slot",
        Duration::from_secs(60),
        || async {
            std::fs::read_to_string(&logs[0])
                .unwrap()
                .contains("leaving it to the pipeline that streams the table")
        },
    )
    .await;
    assert_eq!(
        db.sql(&format!("SELECT state FROM sluice_backfill WHERE id = {unslotted}")).trim(),
        "pending"
    );

    // The jsonl pipeline's own snapshot goes to its own target, and only there.
    let mut command = sluice();
    command.args(["snapshot", "-c", jsonl_config.to_str().unwrap()]);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = || std::fs::read_to_string(&output).unwrap_or_default();
    wait_for("the notes to reach the jsonl output", Duration::from_secs(60), || async {
        lines().lines().filter(|l| l.contains("\"public.notes\"")).count() >= 3
    })
    .await;
    assert_eq!(count("SELECT count(*) FROM sluice_backfill WHERE pipeline = 'notes' AND state = 'done'"), 1);
    assert_eq!(
        db.sql(&format!("SELECT state FROM sluice_backfill WHERE id = {unslotted}")).trim(),
        "pending"
    );
    let items = setup.client.scan_all(&setup.table).await.unwrap();
    assert!(items.is_empty(), "no note reached DynamoDB: {} items", items.len());
    stop(notes);
    stop(dynamodb);
}

/// A change the mapping cannot translate (a numeric past DynamoDB's 38 digits) and an item
/// DynamoDB refuses (over 400 KB) are dead-lettered with their key and row; once the mapping is
/// fixed, `dead-letter replay` re-drives both through the guarded path, and only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_the_row_and_replay_once_the_mapping_is_fixed() {
    let setup =
        setup_with("dl", "", |dir| format!("dead_letter = \"{}\"\n", dir.join("dead.jsonl").display())).await;
    let db = &setup.db;
    let logs = [setup.log("first.log"), setup.log("second.log")];
    let _logs = LogsOnPanic(logs.to_vec());
    let first = setup.start("first.log");
    db.wait_slot_active(&db.slot_name("dl")).await;
    db.sql("INSERT INTO customers (id, email) VALUES (1, 'a@x')");
    db.sql("INSERT INTO orders VALUES (1, 1, 1234567890123456789012345678901234567890.5)");
    db.sql("INSERT INTO customers (id, bio) SELECT 2, string_agg(md5(g::text), '') FROM generate_series(1, 15000) g");
    let dead = setup.dir.path().join("dead.jsonl");
    let entries = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&dead)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    wait_for("two dead letters", Duration::from_secs(60), || async { entries().len() == 2 }).await;
    let lines = entries();
    assert_eq!(lines[0]["table"], "public.orders");
    assert_eq!(
        lines[0]["change"]["op"], "insert",
        "the translation failure carries its change: {}",
        lines[0]
    );
    assert_eq!(lines[0]["change"]["new"]["customer_id"], 1);
    assert_eq!(lines[0]["change"]["new"]["id"], 1);
    assert_eq!(lines[1]["key"]["pk"]["S"], "CUSTOMER#2", "{}", lines[1]);

    let (code, out) = setup.command(&["dead-letter", "list"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("2 entries, 2 not replayed") && out.contains("public.orders") && out.contains("waiting"),
        "{out}"
    );
    assert!(!out.contains("12345678901234567890"), "no values without --json: {out}");

    // Fix the mapping: the total as a string, the bio dropped; the daemon restarts with it.
    stop(first);
    let mapping = setup.dir.path().join("mapping.toml");
    let text = std::fs::read_to_string(&mapping).unwrap();
    let text = text.replace("drop = [\"password_hash\"]", "drop = [\"password_hash\", \"bio\"]");
    let text = text.replace(
        "sort_key = { attribute = \"sk\", template = \"ORDER#{id}\" }",
        "sort_key = { attribute = \"sk\", template = \"ORDER#{id}\" }\ncolumns = { total = { as = \"string\" } }",
    );
    std::fs::write(&mapping, text).unwrap();
    let second = setup.start("second.log");
    db.wait_slot_active(&db.slot_name("dl")).await;
    let (code, out) = setup.command(&["dead-letter", "replay"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replayed 2 entries"), "{out}");
    let order =
        item(&setup.client, &setup.table, "CUSTOMER#1", "ORDER#1").await.expect("the order was replayed");
    assert_eq!(order.get("total"), Some(&s("1234567890123456789012345678901234567890.5")));
    assert!(
        item(&setup.client, &setup.table, "CUSTOMER#2", "PROFILE").await.is_some(),
        "the customer was replayed"
    );

    let (code, out) = setup.command(&["dead-letter", "list"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("2 entries, 0 not replayed"), "{out}");
    let (code, out) = setup.command(&["dead-letter", "replay"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("nothing to replay"), "{out}");
    stop(second);
}

/// A snapshot says at once that no daemon serves the pipeline; its estimate is not 0 before
/// ANALYZE; a pending request and a running one can be cancelled, and the follower says how
/// its requests ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_says_when_no_daemon_serves_it_and_requests_can_be_cancelled() {
    let setup = setup("cancel", "chunk_size = 100\nmax_rows_per_second = 500\n").await;
    let db = &setup.db;
    preload(db, 3000);
    let follower_log = setup.log("follower.log");
    let daemon_log = setup.log("daemon.log");
    let _logs = LogsOnPanic(vec![follower_log.clone(), daemon_log.clone()]);
    let never_analyzed = db.sql("SELECT reltuples < 0 FROM pg_class WHERE relname = 'customers'");
    let mut follower = sluice()
        .args(["snapshot", "--table", "public.customers", "-c", setup.config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&follower_log).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&follower_log).unwrap_or_default();
    wait_for("the follower to say no daemon serves it", Duration::from_secs(30), || async {
        log().contains("no sluice process runs pipeline \"default\" against this database")
    })
    .await;
    let id: i64 = db
        .sql("SELECT id FROM sluice_backfill WHERE source_table = 'public.customers'")
        .trim()
        .parse()
        .unwrap();
    let estimate: i64 =
        db.sql(&format!("SELECT rows_estimate FROM sluice_backfill WHERE id = {id}")).trim().parse().unwrap();
    if never_analyzed.trim() == "t" {
        assert_eq!(estimate, 3000, "a table never analyzed is counted");
    } else {
        assert!(estimate > 1000, "{estimate}");
    }
    let (code, out) = setup.command(&["snapshot", "--cancel", &id.to_string()]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("cancelled request {id} (public.customers)")), "{out}");
    let status = tokio::task::spawn_blocking(move || follower.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(1), "{}", log());
    assert!(log().contains("backfill ended: 0 done, 0 failed, 1 cancelled"), "{}", log());
    let (code, out) = setup.command(&["snapshot", "--cancel", &id.to_string()]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("request {id} has already ended (cancelled)")), "{out}");

    // A running request stops after its current chunk; the cancelled one is never served.
    let daemon = setup.start("daemon.log");
    db.wait_slot_active(&db.slot_name("cancel")).await;
    let (code, out) = setup.command(&["snapshot", "--no-wait", "--table", "public.orders"]).await;
    assert_eq!(code, Some(0), "{out}");
    let orders: i64 =
        db.sql("SELECT id FROM sluice_backfill WHERE source_table = 'public.orders'").trim().parse().unwrap();
    let done = |id: i64| {
        db.sql(&format!("SELECT rows_done FROM sluice_backfill WHERE id = {id}"))
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    wait_for("some chunks of orders", Duration::from_secs(60), || async { done(orders) >= 200 }).await;
    let (code, out) = setup.command(&["snapshot", "--cancel", &orders.to_string()]).await;
    assert_eq!(code, Some(0), "{out}");
    wait_for("the daemon to stop the request", Duration::from_secs(30), || async {
        std::fs::read_to_string(&daemon_log).unwrap().contains("backfill cancelled")
    })
    .await;
    let stopped_at = done(orders);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(done(orders), stopped_at, "nothing more was copied");
    assert!(stopped_at < 6000, "{stopped_at}");
    assert_eq!(db.sql(&format!("SELECT state FROM sluice_backfill WHERE id = {orders}")).trim(), "cancelled");
    assert_eq!(
        db.sql(&format!("SELECT state || ':' || rows_done FROM sluice_backfill WHERE id = {id}")).trim(),
        "cancelled:0"
    );
    stop(daemon);
}

/// In a shared single-table design another writer's items (keys no mapping of this pipeline
/// produces) are reported apart and do not fail verify; an item whose version attribute was
/// removed is named with the reason, and `reconcile --force` rewrites it from the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_leaves_other_writers_items_apart_and_reconcile_force_restores_a_lost_version() {
    let setup = setup("shared", "initial = true\n").await;
    let db = &setup.db;
    preload(db, 200);
    let _logs = LogsOnPanic(vec![setup.log("sluice.log")]);
    let child = setup.start("sluice.log");
    db.wait_slot_active(&db.slot_name("shared")).await;
    wait_for("the initial backfill", Duration::from_secs(120), || async {
        db.sql("SELECT to_regclass('sluice_backfill') IS NOT NULL").trim() == "t"
            && db.sql("SELECT count(*) FROM sluice_backfill WHERE state = 'done'").trim() == "2"
    })
    .await;
    setup.wait_confirmed_past_now("shared").await;
    // Another service's items in the same table.
    setup
        .client
        .batch_put(
            &setup.table,
            vec![
                Item::from([
                    ("pk".into(), s("SESSION#1")),
                    ("sk".into(), s("TOKEN")),
                    ("owner".into(), s("auth")),
                ]),
                Item::from([("pk".into(), s("SESSION#2")), ("sk".into(), s("TOKEN"))]),
            ],
        )
        .await
        .unwrap();
    let report = setup.verify().await;
    assert_eq!(differences(&report), 0, "{report:#}");
    let foreign = report["foreign"].as_array().unwrap();
    assert_eq!(foreign.len(), 1, "{report:#}");
    assert_eq!(foreign[0]["target"], setup.table.as_str());
    assert_eq!(foreign[0]["items"], 2);

    // The version attribute removed behind sluice's back: the stream's guard cannot overwrite
    // the item any more.
    let mut customer = item(&setup.client, &setup.table, "CUSTOMER#7", "PROFILE").await.expect("customer 7");
    customer.remove("_version");
    setup.client.batch_put(&setup.table, vec![customer]).await.unwrap();
    let report = setup.verify().await;
    assert_eq!(differences(&report), 1, "{report:#}");
    let different = &table(&report, "public.customers")["different_keys"][0];
    assert_eq!(different["key"]["id"], "7");
    assert!(different["reason"].as_str().unwrap().contains("reconcile --force"), "{different}");
    // Plain reconcile goes through the guard, which holds: still different.
    let (code, out) = setup.command(&["reconcile", "--json"]).await;
    assert_eq!(code, Some(3), "{out}");
    let (code, out) = setup.command(&["reconcile", "--force", "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let restored = item(&setup.client, &setup.table, "CUSTOMER#7", "PROFILE").await.expect("customer 7");
    assert!(restored.contains_key("_version"), "{restored:?}");
    assert!(
        item(&setup.client, &setup.table, "SESSION#1", "TOKEN").await.is_some(),
        "other writers' items stay"
    );
    stop(child);
}

/// Progress moves within a chunk: one chunk of 1,000 rows applied in parts of 100 through a
/// slow link to the target shows rows durable before the chunk is recorded, and the request
/// ends with every row counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_progress_moves_within_a_chunk() {
    let setup = setup_with("inchunk", "chunk_size = 5000\n", |_| "concurrency = 2\n".into()).await;
    let db = &setup.db;
    preload(db, 1000);
    let link = Outage::start(setup._moto.port).await;
    let text = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(&setup.config, text.replace(&setup._moto.url, &link.url())).unwrap();
    let _logs = LogsOnPanic(vec![setup.log("daemon.log")]);
    let daemon = setup.start_with("daemon.log", &[("SLUICE__PIPELINE__BATCH_MAX_EVENTS", "100")]);
    db.wait_slot_active(&db.slot_name("inchunk")).await;
    // Each write waits 20 ms on the way: two at a time, 1,000 rows take at least 10 s.
    link.slow(Duration::from_millis(20));
    let (code, out) = setup.command(&["snapshot", "--no-wait", "--table", "public.customers"]).await;
    assert_eq!(code, Some(0), "{out}");
    let progress = || {
        let row = db.sql(
            "SELECT state || ' ' || rows_done || ' ' || chunk_rows_durable FROM sluice_backfill \
             WHERE source_table = 'public.customers'",
        );
        let fields: Vec<String> = row.split_whitespace().map(str::to_owned).collect();
        (fields[0].clone(), fields[1].parse::<i64>().unwrap(), fields[2].parse::<i64>().unwrap())
    };
    let mut seen = Vec::new();
    wait_for("rows durable within the chunk, before it is recorded", Duration::from_secs(60), || {
        let now = progress();
        seen.push(now.clone());
        async move { now.0 == "running" && now.1 == 0 && now.2 > 0 && now.2 < 1000 }
    })
    .await;
    let first = seen.last().unwrap().2;
    wait_for("more rows durable within the chunk", Duration::from_secs(60), || {
        let now = progress();
        async move { now.1 == 0 && now.2 > first || now.1 == 1000 }
    })
    .await;
    link.slow(Duration::ZERO);
    wait_for("the request to finish", Duration::from_secs(120), || async { progress().0 == "done" }).await;
    assert_eq!(progress(), ("done".to_owned(), 1000, 0), "every row counted once, the chunk recorded");
    stop(daemon);
}
