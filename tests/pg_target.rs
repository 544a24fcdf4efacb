//! The Postgres target: a second database in the test cluster follows the source through a
//! mapping, each change applied once, in order, across kill -9; refused rows are dead-lettered.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::harness::{kill_9, sluice, sluice_output, verify_report, wait_for, LogsOnPanic, TestDb};

const SOURCE_SCHEMA: &str = "CREATE TABLE customers (id int8 PRIMARY KEY, email text, password_hash text, status text NOT NULL DEFAULT 'active',
    balance numeric(12,2), created_at timestamptz, tags text[], prefs jsonb, bio text);
  ALTER TABLE customers ALTER COLUMN bio SET STORAGE EXTERNAL;
  CREATE TABLE orders (customer_id int8, id int8, total numeric, PRIMARY KEY (customer_id, id));
  CREATE PUBLICATION p FOR TABLE customers, orders;";

const TARGET_SCHEMA: &str = "CREATE SCHEMA v2;
  CREATE TABLE v2.customers (customer_id int8 PRIMARY KEY, email_address text, status text NOT NULL, balance numeric(12,2) CHECK (balance >= 0),
    created_at timestamptz, tags text[], prefs jsonb, bio text, origin text NOT NULL);
  CREATE TABLE v2.orders (customer_id int8, id int8, total numeric, PRIMARY KEY (customer_id, id));";

/// The worked example (`schemas/postgres/examples/shop_v2.toml`), copied into `dir`.
fn mapping(dir: &Path) -> PathBuf {
    let path = dir.join("mapping.toml");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/postgres/examples/shop_v2.toml"), &path).unwrap();
    path
}

/// A config for streaming `db`'s publication `p` into `target` through the example mapping.
fn config(db: &TestDb, target: &TestDb, dir: &Path, slot: &str, extra: &str) -> PathBuf {
    let rest = format!(
        "[target]\nkind = \"postgres\"\nmapping = \"{}\"\ndead_letter = \"{}\"\nretry_for = \"30s\"\n{extra}\n\
         [target.connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"\nuser = \"postgres\"\n",
        mapping(dir).display(),
        dir.join("dead.jsonl").display(),
        target.pg.port,
        target.name
    );
    db.config_file(dir, slot, "p", &rest)
}

fn target_db(db: &TestDb) -> TestDb {
    let target = TestDb::in_cluster(db.pg.clone());
    target.sql(TARGET_SCHEMA);
    target
}

/// A source database with the shop schema, a target database with schema v2, a temp dir and
/// a config streaming slot `slot` into the target (`extra`: further `[target]` keys).
fn setup(slot: &str, extra: &str) -> (TestDb, TestDb, tempfile::TempDir, PathBuf) {
    let db = TestDb::new();
    db.sql(SOURCE_SCHEMA);
    let target = target_db(&db);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&db, &target, dir.path(), slot, extra);
    (db, target, dir, config)
}

/// Counts every row write on v2.orders in table `writes`: a change applied twice counts twice.
const COUNT_WRITES: &str = "CREATE TABLE writes (n int8 NOT NULL); INSERT INTO writes VALUES (0);
     CREATE FUNCTION count_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE writes SET n = n + 1; RETURN NULL; END $$;
     CREATE TRIGGER counted AFTER INSERT OR UPDATE OR DELETE ON v2.orders FOR EACH ROW EXECUTE FUNCTION count_write();";

/// Runs sluice until the stream passed everything written so far.
fn run_to_now(db: &TestDb, config: &Path) -> String {
    let end = db.insert_lsn();
    let (code, stderr) = sluice_output(&["run", "-c", config.to_str().unwrap(), "--until-lsn", &end.to_string()], Duration::from_secs(90));
    assert_eq!(code, Some(0), "{stderr}");
    stderr
}

/// The source customers as the mapping should render them, and the target's rows, as text.
fn customers(db: &TestDb, target: &TestDb) -> (String, String) {
    let expected = db.sql(
        "SELECT id, email, status, balance, created_at, tags, prefs, md5(bio), 'legacy' FROM customers WHERE status <> 'deleted' ORDER BY id",
    );
    let actual = target.sql("SELECT customer_id, email_address, status, balance, created_at, tags, prefs, md5(bio), origin FROM v2.customers ORDER BY customer_id");
    (expected, actual)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_apply_through_the_mapping_and_the_target_equals_the_source() {
    let (db, target, dir, config) = setup("pgt", "");
    // The first run creates the slot (and the checkpoint table); nothing to apply yet.
    run_to_now(&db, &config);

    db.sql(
        "INSERT INTO customers (id, email, password_hash, status, balance, created_at, tags, prefs, bio)
           SELECT i, 'c' || i || '@example.com', 'hash' || i, 'active', i * 1.5, '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 hour',
                  ARRAY['a' || i, 'needs \"quotes\", and commas'], jsonb_build_object('n', i, 'nested', jsonb_build_object('ok', true)), repeat('b', 5000) || i
           FROM generate_series(1, 200) i;
         INSERT INTO orders SELECT i % 20, i, i * 2.25 FROM generate_series(1, 300) i;
         UPDATE customers SET email = 'it''s-' || id || '\\@x' WHERE id % 10 = 0;
         UPDATE customers SET status = 'vip' WHERE id % 7 = 0;
         UPDATE customers SET id = id + 1000, bio = 'short' WHERE id BETWEEN 11 AND 13;
         UPDATE customers SET status = 'deleted' WHERE id BETWEEN 20 AND 25;
         DELETE FROM customers WHERE id BETWEEN 30 AND 35;
         UPDATE customers SET balance = NULL, tags = NULL WHERE id = 40;
         BEGIN; INSERT INTO customers (id, email) VALUES (5000, 'short-lived'); DELETE FROM customers WHERE id = 5000; COMMIT;
         UPDATE orders SET total = total + 1 WHERE customer_id = 3;
         DELETE FROM orders WHERE customer_id = 4;",
    );
    run_to_now(&db, &config);
    let (expected, actual) = customers(&db, &target);
    assert_eq!(actual, expected);
    assert_eq!(target.sql("SELECT count(*) FROM v2.customers WHERE length(bio) > 5000"), "185", "the TOASTed bio arrived whole");
    assert_eq!(
        target.sql("SELECT customer_id, id, total FROM v2.orders ORDER BY 1, 2"),
        db.sql("SELECT customer_id, id, total FROM orders ORDER BY 1, 2")
    );

    // Unchanged TOAST columns keep their target values.
    db.sql("UPDATE customers SET status = 'gold' WHERE id BETWEEN 50 AND 59");
    db.sql("TRUNCATE orders; INSERT INTO orders VALUES (1, 1, 9.5)");
    run_to_now(&db, &config);
    let (expected, actual) = customers(&db, &target);
    assert_eq!(actual, expected);
    assert_eq!(target.sql("SELECT customer_id, id, total FROM v2.orders"), "1|1|9.5", "the truncate was mirrored");
    assert_eq!(std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap_or_default(), "", "nothing dead-lettered");
    let checkpoint = target.sql("SELECT commit_lsn FROM public.sluice_checkpoint");
    assert!(!checkpoint.is_empty(), "the checkpoint table holds the pipeline's position");
}

fn start(config: &Path, log: &Path) -> Child {
    sluice().arg("run").arg("-c").arg(config).stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap()).spawn().expect("start sluice")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_applies_every_change_exactly_once() {
    let db = TestDb::new();
    db.sql(SOURCE_SCHEMA);
    let target = target_db(&db);
    // Every row-level write the target sees is counted: a change applied twice counts twice.
    target.sql(COUNT_WRITES);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&db, &target, dir.path(), "pgk", "");
    let _logs = LogsOnPanic(vec![dir.path().join("first.log"), dir.path().join("second.log")]);
    let mut first = start(&config, &dir.path().join("first.log"));
    db.wait_slot_active(&db.slot_name("pgk")).await;

    const TRANSACTIONS: i64 = 400;
    const ROWS: i64 = 5;
    let connection = db.connection();
    let writer = tokio::spawn(async move {
        let client = sluice_postgres::connect_sql(&connection).await.unwrap();
        for tx in 0..TRANSACTIONS {
            // Five inserts, then an update of one of them: 6 row writes per transaction.
            client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO orders SELECT {tx}, n, n FROM generate_series(1, {ROWS}) n; UPDATE orders SET total = -1 WHERE customer_id = {tx} AND id = 1; COMMIT"
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    wait_for("a quarter of the transactions in the target", Duration::from_secs(60), || async {
        target.sql("SELECT count(*) FROM v2.orders").parse::<i64>().unwrap() >= TRANSACTIONS * ROWS / 4
    })
    .await;
    kill_9(&mut first);
    let at_kill: i64 = target.sql("SELECT count(*) FROM v2.orders").parse().unwrap();
    writer.await.unwrap();
    let mut second = start(&config, &dir.path().join("second.log"));
    wait_for("every transaction in the target", Duration::from_secs(90), || async {
        target.sql("SELECT count(*) FROM v2.orders").parse::<i64>().unwrap() == TRANSACTIONS * ROWS
            && target.sql(&format!("SELECT total FROM v2.orders WHERE customer_id = {} AND id = 1", TRANSACTIONS - 1)) == "-1"
    })
    .await;
    std::process::Command::new("kill").arg("-TERM").arg(second.id().to_string()).status().unwrap();
    assert!(second.wait().unwrap().success(), "sluice exits 0 on SIGTERM");

    assert!(at_kill < TRANSACTIONS * ROWS, "the kill came mid-stream ({at_kill} rows applied)");
    assert_eq!(
        target.sql("SELECT customer_id, id, total FROM v2.orders ORDER BY 1, 2"),
        db.sql("SELECT customer_id, id, total FROM orders ORDER BY 1, 2")
    );
    assert_eq!(target.sql("SELECT n FROM writes"), (TRANSACTIONS * (ROWS + 1)).to_string(), "each change applied exactly once");
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(log.contains("postgres target checkpoint"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_target_refuses_is_dead_lettered_without_its_values_and_the_rest_applies() {
    let (db, target, dir, config) = setup("pgd", "");
    run_to_now(&db, &config);
    // The target's CHECK (balance >= 0) refuses customer 3; the others in the same
    // transaction and the next ones apply.
    db.sql("INSERT INTO customers (id, email, balance) VALUES (1, 'a', 1), (2, 'b', 2), (3, 'refused-secret', -987.65), (4, 'd', 4)");
    db.sql("INSERT INTO customers (id, email, balance) VALUES (5, 'e', 5)");
    let stderr = run_to_now(&db, &config);
    assert_eq!(target.sql("SELECT customer_id FROM v2.customers ORDER BY 1"), "1\n2\n4\n5");
    let dead = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = dead.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{dead}");
    assert_eq!(lines[0]["table"], "public.customers");
    assert_eq!(lines[0]["target_table"], "v2.customers");
    let reason = lines[0]["reason"].as_str().unwrap();
    assert!(reason.contains("23514") && reason.contains("customers_balance_check"), "{reason}");
    for text in [&dead, &stderr] {
        assert!(!text.contains("987.65") && !text.contains("refused-secret"), "values never leave in logs or dead letters: {text}");
    }
    // The position moved past it: a restart does not apply or dead-letter it again.
    run_to_now(&db, &config);
    assert_eq!(std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap().lines().count(), 1);

    // A row that comes back into the filter while its TOASTed bio stays unchanged cannot be
    // written whole: that update is dead-lettered with the way to repair it.
    db.sql("INSERT INTO customers (id, email, bio) VALUES (6, 'f', repeat('t', 9000))");
    db.sql("UPDATE customers SET status = 'deleted' WHERE id = 6");
    db.sql("UPDATE customers SET status = 'active' WHERE id = 6");
    run_to_now(&db, &config);
    let dead = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(dead.lines().last().unwrap()).unwrap();
    assert_eq!(dead.lines().count(), 2, "{dead}");
    assert!(last["reason"].as_str().unwrap().contains("backfill the table") && last["operation"] == "update", "{last}");
    assert_eq!(target.sql("SELECT count(*) FROM v2.customers WHERE customer_id = 6"), "0");
}

#[test]
fn a_mapped_column_the_target_lacks_is_named_at_start() {
    let db = TestDb::new();
    db.sql(SOURCE_SCHEMA);
    let target = target_db(&db);
    target.sql("ALTER TABLE v2.customers DROP COLUMN origin");
    let dir = tempfile::tempdir().unwrap();
    let config = config(&db, &target, dir.path(), "pgm", "");
    let (code, stderr) = sluice_output(&["run", "-c", config.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("target table v2.customers has no column origin"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_drift_in_a_postgres_target_exactly_and_reconcile_repairs_it() {
    let db = TestDb::new();
    db.sql(SOURCE_SCHEMA);
    db.sql(
        "INSERT INTO customers (id, email, status, balance, tags, prefs, bio)
           SELECT i, 'c' || i || '@x', CASE WHEN i % 10 = 0 THEN 'deleted' ELSE 'active' END, i, ARRAY['t' || i], jsonb_build_object('b', i, 'a', 1), repeat('x', i)
           FROM generate_series(1, 300) i;
         INSERT INTO orders SELECT i % 30, i, i FROM generate_series(1, 500) i;",
    );
    let target = target_db(&db);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&db, &target, dir.path(), "pgv", "[backfill]\ninitial = true\n");
    let config = {
        // `[backfill]` must not sit inside `[target]`: move it to the end.
        let text = std::fs::read_to_string(&config).unwrap().replace("[backfill]\ninitial = true\n", "");
        std::fs::write(&config, format!("{text}\n[backfill]\ninitial = true\n")).unwrap();
        config
    };
    let _logs = LogsOnPanic(vec![dir.path().join("sluice.log")]);
    let mut child = start(&config, &dir.path().join("sluice.log"));
    db.wait_slot_active(&db.slot_name("pgv")).await;
    wait_for("the initial backfill of both tables", Duration::from_secs(60), || async {
        db.sql("SELECT to_regclass('sluice_backfill') IS NOT NULL") == "t" && db.sql("SELECT count(*) FROM sluice_backfill WHERE state = 'done'") == "2"
    })
    .await;
    wait_for("every customer in the target", Duration::from_secs(60), || async { target.sql("SELECT count(*) FROM v2.customers") == "270" }).await;
    let report = verify_report(&config).await;
    assert_eq!(report["tables"][0]["matched"], 270, "{report:#}");

    // Drift behind sluice's back: a row deleted, one changed, one added that no source row makes.
    target.sql(
        "DELETE FROM v2.customers WHERE customer_id = 7;
         UPDATE v2.customers SET email_address = 'changed@elsewhere', prefs = '{\"a\": 2}' WHERE customer_id = 8;
         INSERT INTO v2.customers (customer_id, status, origin) VALUES (999999, 'active', 'stray');
         DELETE FROM v2.orders WHERE customer_id = 3 AND id = 3;",
    );
    let report = verify_report(&config).await;
    let customers = report["tables"].as_array().unwrap().iter().find(|t| t["table"] == "public.customers").unwrap();
    assert_eq!((customers["missing"].as_u64(), customers["different"].as_u64(), customers["extra"].as_u64()), (Some(1), Some(1), Some(1)), "{report:#}");
    assert_eq!(customers["missing_keys"][0]["id"], "7");
    assert_eq!(customers["different_keys"][0]["key"]["id"], "8");
    let columns: Vec<&str> = customers["different_keys"][0]["attributes"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(columns, ["email_address", "prefs"]);
    assert!(customers["different_keys"][0].get("values").is_none(), "values only when asked for");
    assert_eq!(customers["extra_keys"][0]["source_key"]["id"], "999999");
    let orders = report["tables"].as_array().unwrap().iter().find(|t| t["table"] == "public.orders").unwrap();
    assert_eq!(orders["missing_keys"][0], serde_json::json!({ "customer_id": "3", "id": "3" }), "{report:#}");

    let mut command = sluice();
    command.args(["reconcile", "-c", config.to_str().unwrap()]);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("3 keys of public.customers") && text.contains("1 keys of public.orders"), "{text}");
    assert_eq!(target.sql("SELECT email_address FROM v2.customers WHERE customer_id IN (7, 8) ORDER BY 1"), "c7@x\nc8@x");
    assert_eq!(target.sql("SELECT count(*) FROM v2.customers WHERE customer_id = 999999"), "0", "the stray row is deleted");
    let report = verify_report(&config).await;
    assert_eq!(report["tables"][0]["matched"], 270, "{report:#}");
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn validate_checks_a_postgres_mapping_against_both_catalogs() {
    let (db, target, dir, config) = setup("pgval", "");
    let (code, stdout_or_err) = sluice_output(&["validate", "-c", config.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(0), "the worked example fits: {stdout_or_err}");

    // Mistakes on both sides.
    std::fs::write(
        dir.path().join("mapping.toml"),
        "[[tables]]\nsource = \"public.customers\"\ntarget = \"v2.customers\"\nrename = { id = \"customer_id\", mail = \"email_address\" }\n\
         drop = [\"password_hash\", \"email\"]\nconstants = { origin = \"legacy\" }\n\
         [[tables]]\nsource = \"public.orders\"\ntarget = \"v2.orders\"\n\
         [[tables]]\nsource = \"public.missing\"\ntarget = \"v2.orders\"\n",
    )
    .unwrap();
    target.sql("ALTER TABLE v2.orders ADD COLUMN channel text NOT NULL");
    db.sql("CREATE TABLE unpublished (id int8 PRIMARY KEY)");
    let (code, stderr) = sluice_output(&["validate", "-c", config.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(2), "{stderr}");
    for expected in [
        "target.mapping.tables[0].rename: column mail does not exist in public.customers",
        "target.mapping.tables[1].target: target column v2.orders.channel is NOT NULL without a default and written by no column of public.orders",
        "target.mapping.tables[2].source: table public.missing does not exist",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }

    // The target in the source's own database, with its tables published: a loop.
    let looped = db.config_file(
        dir.path(),
        "pgval",
        "p",
        &format!(
            "[target]\nkind = \"postgres\"\nmapping = \"{}\"\n[target.connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"\nuser = \"postgres\"\n",
            mapping(dir.path()).display(),
            db.pg.port,
            db.name
        ),
    );
    db.sql(TARGET_SCHEMA);
    db.sql("ALTER PUBLICATION p ADD TABLE v2.orders");
    let (code, stderr) = sluice_output(&["validate", "-c", looped.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("table v2.orders is written by sluice and published in \"p\""), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_server_restart_mid_stream_is_retried_and_each_change_still_applies_once() {
    let db = TestDb::new();
    db.sql(SOURCE_SCHEMA);
    // The target in a cluster of its own, which the test stops: commits there are synchronous,
    // so an immediate stop loses nothing it acknowledged.
    let options = sluice::localpg::ClusterOptions { settings: vec![("synchronous_commit".into(), "on".into())], ..Default::default() };
    let target = TestDb::in_cluster(std::sync::Arc::new(sluice::localpg::LocalPostgres::start(&options).unwrap()));
    target.sql(TARGET_SCHEMA);
    target.sql(COUNT_WRITES);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&db, &target, dir.path(), "pgr", "");
    let _logs = LogsOnPanic(vec![dir.path().join("sluice.log")]);
    let mut child = start(&config, &dir.path().join("sluice.log"));
    db.wait_slot_active(&db.slot_name("pgr")).await;

    const TRANSACTIONS: i64 = 300;
    let connection = db.connection();
    let writer = tokio::spawn(async move {
        let client = sluice_postgres::connect_sql(&connection).await.unwrap();
        for tx in 0..TRANSACTIONS {
            client.batch_execute(&format!("INSERT INTO orders SELECT {tx}, n, n FROM generate_series(1, 4) n")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    wait_for("some transactions in the target", Duration::from_secs(60), || async {
        target.sql("SELECT count(*) FROM v2.orders").parse::<i64>().unwrap() >= 100
    })
    .await;
    target.pg.stop("immediate").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    target.pg.restart().unwrap();
    writer.await.unwrap();
    wait_for("every transaction in the target", Duration::from_secs(90), || async {
        target.sql("SELECT count(*) FROM v2.orders").parse::<i64>().unwrap() == TRANSACTIONS * 4
    })
    .await;
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success(), "sluice exits 0 on SIGTERM");
    assert_eq!(target.sql("SELECT n FROM writes"), (TRANSACTIONS * 4).to_string(), "each change applied exactly once");
    let log = std::fs::read_to_string(dir.path().join("sluice.log")).unwrap();
    assert!(log.contains("postgres target: retrying"), "{log}");
}

#[test]
fn a_column_added_to_the_source_stops_sluice_until_the_target_has_it_and_loses_nothing() {
    let (db, target, _dir, config) = setup("pga", "");
    run_to_now(&db, &config);
    db.sql("ALTER TABLE customers ADD COLUMN nickname text; INSERT INTO customers (id, email, nickname) VALUES (1, 'a', 'ace')");
    let end = db.insert_lsn();
    let (code, stderr) = sluice_output(&["run", "-c", config.to_str().unwrap(), "--until-lsn", &end.to_string()], Duration::from_secs(60));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("has no column nickname"), "{stderr}");
    assert!(!stderr.contains("ace"), "no values in the error: {stderr}");
    target.sql("ALTER TABLE v2.customers ADD COLUMN nickname text");
    run_to_now(&db, &config);
    assert_eq!(target.sql("SELECT customer_id, nickname FROM v2.customers"), "1|ace", "the change waited in the slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_on_a_target_table_is_waited_out_with_warnings_and_loses_nothing() {
    let (db, target, dir, config) = setup("pgl", "lock_timeout = \"300ms\"");
    let _logs = LogsOnPanic(vec![dir.path().join("sluice.log")]);
    let mut child = start(&config, &dir.path().join("sluice.log"));
    db.wait_slot_active(&db.slot_name("pgl")).await;
    // A migration's DDL holds the table while changes arrive.
    let peek = db.peek_commits();
    let holder = sluice_postgres::connect_sql(&target.connection()).await.unwrap();
    holder.batch_execute("BEGIN; LOCK TABLE v2.orders IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let commit = peek.commit_lsn_of("INSERT INTO orders SELECT 1, n, n FROM generate_series(1, 50) n");
    wait_for("a lock timeout in the log", Duration::from_secs(30), || async {
        std::fs::read_to_string(dir.path().join("sluice.log")).unwrap_or_default().contains("lock timeout")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let confirmed = db.slot_confirmed("pgl").unwrap();
    assert!(confirmed < commit, "nothing confirmed while the table is locked: {confirmed} < {commit}");
    holder.batch_execute("COMMIT").await.unwrap();
    wait_for("the rows in the target", Duration::from_secs(30), || async { target.sql("SELECT count(*) FROM v2.orders") == "50" }).await;
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success(), "sluice exits 0 on SIGTERM");
}

#[test]
fn a_target_trigger_raising_an_error_stops_sluice_without_quoting_values() {
    let db = TestDb::new();
    db.sql(SOURCE_SCHEMA);
    let target = target_db(&db);
    target.sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'order total % refused', NEW.total; END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON v2.orders FOR EACH ROW EXECUTE FUNCTION refuse();",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = config(&db, &target, dir.path(), "pgt", "");
    run_to_now(&db, &config);
    db.sql("INSERT INTO orders VALUES (1, 1, 424242.17)");
    let end = db.insert_lsn();
    let (code, stderr) = sluice_output(&["run", "-c", config.to_str().unwrap(), "--until-lsn", &end.to_string()], Duration::from_secs(60));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("SQLSTATE P0001"), "the error is named: {stderr}");
    assert!(!stderr.contains("424242"), "no values in the error: {stderr}");
    assert_eq!(target.sql("SELECT count(*) FROM v2.orders"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_counts_a_row_the_target_type_refuses_as_untranslatable_without_quoting_it() {
    let db = TestDb::new();
    db.sql(SOURCE_SCHEMA);
    let target = target_db(&db);
    target.sql("ALTER TABLE v2.orders ALTER COLUMN total TYPE numeric(6,2)");
    let dir = tempfile::tempdir().unwrap();
    let config = config(&db, &target, dir.path(), "pgu", "");
    run_to_now(&db, &config);
    db.sql("INSERT INTO orders VALUES (1, 1, 5), (1, 2, 987654321.5), (1, 3, 7)");
    run_to_now(&db, &config);
    assert_eq!(target.sql("SELECT id FROM v2.orders ORDER BY 1"), "1\n3", "the overflowing row was dead-lettered");
    let report = verify_report(&config).await;
    let orders = report["tables"].as_array().unwrap().iter().find(|t| t["table"] == "public.orders").unwrap();
    assert_eq!((orders["rows"].as_u64(), orders["matched"].as_u64(), orders["untranslatable"].as_u64()), (Some(3), Some(2), Some(1)), "{report:#}");
    assert!(!report.to_string().contains("987654321"), "{report:#}");
}
