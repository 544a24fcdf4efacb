//! Cut-over and the way back, against two real databases (the old one, which the forward
//! pipeline reads, and the new one, which it writes and the way back reads): a table moves
//! forward → reversed → forward → reversed → finished with the application writing on
//! whichever side is authoritative; every change reaches the other side exactly once (a
//! trigger counts the row writes on each side) and never comes back; both commands survive a
//! kill -9 at each step; bad input is refused with nothing fenced or moved.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use sluice::migration::fence;
use sluice_core::TableName;

use crate::harness::{
    differences, kill_9, sluice, sluice_output, verify_report, wait_for, LogsOnPanic, TestDb,
};

/// Counts the row writes on `table` in table `writes`: a change applied twice counts twice.
fn count_writes(table: &str) -> String {
    format!(
        "CREATE TABLE writes (n int8 NOT NULL); INSERT INTO writes VALUES (0);
         CREATE FUNCTION count_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE writes SET n = n + 1; RETURN NULL; END $$;
         CREATE TRIGGER counted AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION count_write();"
    )
}

fn writes(db: &TestDb) -> i64 {
    db.sql("SELECT n FROM writes").trim().parse().unwrap()
}

/// The orders of each side, as text, in key order.
fn orders(db: &TestDb) -> String {
    db.sql("SELECT customer_id, id, total FROM orders ORDER BY 1, 2")
}

fn new_orders(new: &TestDb) -> String {
    new.sql("SELECT customer_id, id, total FROM v2.orders ORDER BY 1, 2")
}

/// `sluice run` (`reverse`: the way back) until killed.
fn daemon(config: &Path, reverse: bool, log: &Path) -> Child {
    let mut command = sluice();
    command.arg("run").arg("-c").arg(config);
    if reverse {
        command.arg("--reverse");
    }
    command.stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap()).spawn().expect("start sluice")
}

/// Runs a move command to its end: (exit code, standard error).
fn move_tables(command: &str, table: &str, config: &Path, kill_at: Option<&str>) -> (Option<i32>, String) {
    let mut args = vec![command, "--table", table, "-c", config.to_str().unwrap()];
    args.extend(["--drain-timeout", "120s"]);
    match kill_at {
        None => sluice_output(&args, Duration::from_secs(300)),
        Some(point) => {
            let out = sluice()
                .args(&args)
                .env("SLUICE_TEST_KILL_AT", point)
                .stdout(Stdio::null())
                .output()
                .expect("run sluice");
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

fn phase(config: &Path, table: &str) -> String {
    let (code, out, err) = {
        let out = sluice().args(["migration", "--json", "-c", config.to_str().unwrap()]).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json["tables"].as_array().unwrap().iter().find(|t| t["table"] == table).unwrap()["phase"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn fenced(db: &TestDb, table: &str) -> bool {
    let sql = sluice_postgres::connect_sql(&db.connection()).await.unwrap();
    fence::is_fenced(&sql, &table.parse::<TableName>().unwrap()).await.unwrap()
}

/// The application's write, refused by the fence with its SQLSTATE.
async fn refused(db: &TestDb, statement: &str) {
    let sql = sluice_postgres::connect_sql(&db.connection()).await.unwrap();
    let error = sql.batch_execute(statement).await.expect_err("the fence refuses the write");
    let code = error.as_db_error().map(|e| e.code().code().to_owned()).unwrap_or_default();
    assert_eq!(code, fence::REFUSED_SQLSTATE, "{statement}: {error}");
}

/// Waits until the forward stream passed everything written to the old database so far: a
/// customer inserted now (the forward table) reaches the new side only after it.
async fn forward_passed(db: &TestDb, new: &TestDb, id: i64) {
    db.sql(&format!("INSERT INTO customers (id, email) VALUES ({id}, 'barrier')"));
    wait_for("the forward stream to pass a barrier row", Duration::from_secs(120), || async {
        new.sql(&format!("SELECT count(*) FROM v2.customers WHERE customer_id = {id}")).trim() == "1"
    })
    .await;
}

struct Migration {
    db: TestDb,
    new: TestDb,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    slot: String,
    forward: Child,
    back: Child,
}

impl Migration {
    /// Old and new databases with counting triggers on the orders, both directions running,
    /// and the first rows streamed forward.
    async fn start(slot: &str) -> Migration {
        let (db, new, dir, config) = crate::pg_target::setup(slot, "");
        db.sql(&count_writes("orders"));
        new.sql(&count_writes("v2.orders"));
        let forward = daemon(&config, false, &dir.path().join("forward.log"));
        let back = daemon(&config, true, &dir.path().join("reverse.log"));
        let slot = db.slot_name(slot);
        let migration = Migration { db, new, dir, config, slot, forward, back };
        migration.db.wait_slot_active(&migration.forward_slot()).await;
        migration.new.wait_slot_active(&migration.reverse_slot()).await;
        migration.db.sql(
            "INSERT INTO customers (id, email) SELECT i, 'c' || i FROM generate_series(1, 20) i;
             INSERT INTO orders SELECT i % 5, i, i FROM generate_series(1, 50) i;",
        );
        migration.wait_equal("the first orders to stream forward").await;
        migration
    }

    fn forward_slot(&self) -> String {
        self.slot.clone()
    }

    fn reverse_slot(&self) -> String {
        format!("{}_reverse", self.forward_slot())
    }

    fn logs(&self) -> LogsOnPanic {
        LogsOnPanic(vec![self.dir.path().join("forward.log"), self.dir.path().join("reverse.log")])
    }

    async fn wait_equal(&self, what: &str) {
        wait_for(what, Duration::from_secs(120), || async { orders(&self.db) == new_orders(&self.new) })
            .await;
    }

    async fn verify_clean(&self) {
        let report = verify_report(&self.config).await;
        assert_eq!(differences(&report), 0, "{report:#}");
    }

    fn stop(mut self) {
        kill_9(&mut self.forward);
        kill_9(&mut self.back);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_cuts_over_rolls_back_and_finishes_with_every_change_applied_once_and_no_echo() {
    let m = Migration::start("cut").await;
    let _logs = m.logs();
    let (db, new) = (&m.db, &m.new);
    m.verify_clean().await;
    db.sql("UPDATE writes SET n = 0");
    new.sql("UPDATE writes SET n = 0");

    // Cut-over: checks, fence, drain, verify, reversed.
    let (code, out) = move_tables("cutover", "public.orders", &m.config, None);
    assert_eq!(code, Some(0), "{out}");
    for step in ["1/5 checks", "2/5 fenced at", "3/5 drained", "4/5 verified: 0 differences", "5/5 reversed"]
    {
        assert!(out.contains(step), "{step}: {out}");
    }
    assert_eq!(phase(&m.config, "public.orders"), "reversed");
    assert_eq!(phase(&m.config, "public.customers"), "forward", "one table at a time");
    refused(db, "INSERT INTO orders VALUES (1, 1000, 1)").await;

    // The application writes to the new database only: inserts, updates, deletes, a key change.
    new.sql(
        "INSERT INTO v2.orders (customer_id, id, total) SELECT 9, i, i FROM generate_series(101, 110) i;
         UPDATE v2.orders SET total = total + 1 WHERE customer_id = 9 AND id <= 105;
         DELETE FROM v2.orders WHERE customer_id = 9 AND id IN (106, 107, 108);
         UPDATE v2.orders SET id = 1110 WHERE customer_id = 9 AND id = 110;",
    );
    m.wait_equal("the new side's changes to reach the old orders").await;
    // The forward stream drops the way back's transactions but still confirms past them: the
    // old database keeps no WAL for them.
    let written = db.sql("SELECT pg_current_wal_lsn()");
    let confirmed = format!(
        "SELECT confirmed_flush_lsn >= '{}'::pg_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
        written.trim(),
        m.forward_slot()
    );
    wait_for("the forward slot to confirm past the way back's writes", Duration::from_secs(120), || async {
        db.sql(&confirmed).trim() == "t"
    })
    .await;
    // The other table still flows forward meanwhile.
    db.sql("INSERT INTO customers (id, email) VALUES (100, 'late')");
    wait_for("a forward customer", Duration::from_secs(60), || async {
        new.sql("SELECT count(*) FROM v2.customers WHERE customer_id = 100").trim() == "1"
    })
    .await;
    // Exactly once and no echo: 19 row writes on the new side (10 + 5 + 3 + 1), 20 on the old
    // (the key change is a delete and an insert there); once the forward stream passed the
    // way back's writes, still 19.
    forward_passed(db, new, 901).await;
    assert_eq!(writes(new), 19);
    assert_eq!(writes(db), 20);
    m.verify_clean().await;

    // Rollback: the new side fenced, the way back drained, verify, forward.
    let (code, out) = move_tables("rollback", "public.orders", &m.config, None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("5/5 forward"), "{out}");
    assert_eq!(phase(&m.config, "public.orders"), "forward");
    refused(new, "INSERT INTO v2.orders VALUES (9, 5000, 1)").await;
    assert!(!fenced(db, "public.orders").await);
    db.sql("INSERT INTO orders VALUES (9, 2000, 1); UPDATE orders SET total = 0 WHERE id = 1");
    m.wait_equal("the old side's writes to flow forward again").await;
    forward_passed(db, new, 902).await;
    assert_eq!((writes(db), writes(new)), (22, 21), "each change once per side, no echo");
    m.verify_clean().await;

    // Cut over again (the new side's fence comes down), and finish: the point of no return.
    let (code, out) = move_tables("cutover", "public.orders", &m.config, None);
    assert_eq!(code, Some(0), "{out}");
    new.sql("INSERT INTO v2.orders VALUES (9, 3000, 1)");
    m.wait_equal("a write after the second cut-over to reach the old side").await;
    let (code, out) = move_tables("finish", "public.orders", &m.config, None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("2/2 finished"), "{out}");
    assert_eq!(phase(&m.config, "public.orders"), "finished");
    let (code, out) = move_tables("rollback", "public.orders", &m.config, None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("public.orders is finished"), "{out}");
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_and_rollback_killed_at_every_step_end_in_their_phase_when_run_again() {
    let m = Migration::start("cutkill").await;
    let _logs = m.logs();
    let (db, new) = (&m.db, &m.new);
    db.sql("UPDATE writes SET n = 0");
    new.sql("UPDATE writes SET n = 0");
    for step in 1..=4 {
        let point = format!("cutover-{step}");
        let (code, out) = move_tables("cutover", "public.orders", &m.config, Some(&point));
        assert_eq!(code, None, "killed at {point}: {out}");
        let (code, out) = move_tables("cutover", "public.orders", &m.config, None);
        assert_eq!(code, Some(0), "re-run after {point}: {out}");
        assert_eq!(phase(&m.config, "public.orders"), "reversed", "{point}");
        assert!(!fenced(new, "v2.orders").await, "{point}");
        new.sql(&format!("INSERT INTO v2.orders VALUES (7, {}, 1)", 100 + step));
        m.wait_equal(&format!("the write after {point} to reach the old side")).await;

        let point = format!("rollback-{step}");
        let (code, out) = move_tables("rollback", "public.orders", &m.config, Some(&point));
        assert_eq!(code, None, "killed at {point}: {out}");
        let (code, out) = move_tables("rollback", "public.orders", &m.config, None);
        assert_eq!(code, Some(0), "re-run after {point}: {out}");
        assert_eq!(phase(&m.config, "public.orders"), "forward", "{point}");
        assert!(!fenced(db, "public.orders").await, "{point}");
        db.sql(&format!("INSERT INTO orders VALUES (8, {}, 1)", 200 + step));
        m.wait_equal(&format!("the write after {point} to reach the new side")).await;
    }
    forward_passed(db, new, 903).await;
    // Four rows written on each side, each applied once on the other: 8 row writes a side.
    assert_eq!((writes(db), writes(new)), (8, 8));
    m.verify_clean().await;
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_refuses_bad_input_with_nothing_fenced_or_moved() {
    let (db, new, dir, config) = crate::pg_target::setup("cutbad", "");
    let path = config.to_str().unwrap();
    let unmoved = |db: &TestDb| db.sql("SELECT count(*) FROM pg_trigger WHERE tgname = 'sluice_fence'");

    // The wrong phase, named with both phases.
    let (code, out) = move_tables("finish", "public.orders", &config, None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("table public.orders is forward: finish needs it reversed"), "{out}");
    // No stream running: the forward slot is named, and how to start it.
    let (code, out) = move_tables("cutover", "public.orders", &config, None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("sluice run"), "{out}");
    // A table outside the mapping.
    let (code, out) = move_tables("cutover", "public.nothing", &config, None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("public.nothing"), "{out}");

    // Both directions running, but the new side holds a row the old one lacks: verify fails
    // and nothing is fenced.
    let forward = daemon(&config, false, &dir.path().join("forward.log"));
    let back = daemon(&config, true, &dir.path().join("reverse.log"));
    let _logs = LogsOnPanic(vec![dir.path().join("forward.log"), dir.path().join("reverse.log")]);
    let mut children = [forward, back];
    let slot = db.slot_name("cutbad");
    db.wait_slot_active(&slot).await;
    new.wait_slot_active(&format!("{slot}_reverse")).await;
    db.sql("INSERT INTO orders SELECT 1, i, i FROM generate_series(1, 10) i");
    wait_for("the orders to stream", Duration::from_secs(60), || async {
        new.sql("SELECT count(*) FROM v2.orders").trim() == "10"
    })
    .await;
    new.sql("INSERT INTO v2.orders VALUES (2, 99, 1)");
    let (code, out) = move_tables("cutover", "public.orders", &config, None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("nothing was fenced"), "{out}");
    assert_eq!(unmoved(&db).trim(), "0");
    assert_eq!(phase(&config, "public.orders"), "forward");
    new.sql("DELETE FROM v2.orders WHERE customer_id = 2");

    // The forward stream behind (its daemon stopped with SIGSTOP, its connection still open):
    // above the lag bound, refused before anything is verified or fenced.
    let signal = |sig: &str| {
        let pid = children[0].id().to_string();
        assert!(std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success());
    };
    signal("-STOP");
    db.sql("INSERT INTO orders SELECT 3, i, i FROM generate_series(1, 100) i");
    let (code, out) = sluice_output(
        &["cutover", "--table", "public.orders", "--max-lag-bytes", "1", "-c", path],
        Duration::from_secs(120),
    );
    signal("-CONT");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("bytes of WAL behind, above --max-lag-bytes 1"), "{out}");
    assert_eq!(unmoved(&db).trim(), "0");
    assert_eq!(phase(&config, "public.orders"), "forward");

    // A mapping the way back cannot invert.
    let shared = dir.path().join("shared.toml");
    std::fs::write(
        &shared,
        "[[tables]]\nsource = \"public.customers\"\ntarget = \"v2.orders\"\nconstants = { kind = \"c\" }\n\
         [[tables]]\nsource = \"public.orders\"\ntarget = \"v2.orders\"\nconstants = { kind = \"o\" }\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    let mapping_line = text.lines().find(|l| l.starts_with("mapping = ")).unwrap().to_owned();
    let other = dir.path().join("shared-config.toml");
    std::fs::write(&other, text.replace(&mapping_line, &format!("mapping = \"{}\"", shared.display())))
        .unwrap();
    let (code, out) = move_tables("cutover", "public.orders", &other, None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("cannot tell their rows apart"), "{out}");
    assert_eq!(unmoved(&db).trim(), "0");
    for child in &mut children {
        kill_9(child);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_background_verify_keeps_the_drift_between_the_stores_on_the_dashboard() {
    let (db, new, dir, config) = crate::pg_target::setup("bgverify", "");
    let port = sluice::localpg::free_port().unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[monitoring]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[monitoring]\nlisten = \"127.0.0.1:{port}\"\n"),
    ) + "\n[verify]\nmax_rows_per_second = 5000\ninterval = \"1s\"\nchunk_size = 100\nrecheck_timeout = \"5s\"\n";
    std::fs::write(&config, text).unwrap();
    let mut forward = daemon(&config, false, &dir.path().join("forward.log"));
    let _logs = LogsOnPanic(vec![dir.path().join("forward.log")]);
    db.wait_slot_active(&db.slot_name("bgverify")).await;
    db.sql("INSERT INTO orders SELECT i % 7, i, i FROM generate_series(1, 300) i");
    let scrape = || crate::harness::http_get(port, "/metrics").map(|(_, body)| body).unwrap_or_default();
    let series = |name: &str| format!("{name}{{pipeline=\"default\",table=\"public.orders\"}}");
    let clean_full_pass_after = |body: &str, at: f64| {
        crate::harness::metric(body, &series("sluice_verify_last_full_timestamp_seconds"))
            .is_some_and(|t| t > at)
            && crate::harness::metric(body, &series("sluice_verify_last_full_mismatches")) == Some(0.0)
            && crate::harness::metric(body, &series("sluice_verify_mismatches")) == Some(0.0)
    };
    wait_for("a clean full pass over the streamed orders", Duration::from_secs(120), || async {
        let body = scrape();
        clean_full_pass_after(&body, 0.0)
            && crate::harness::metric(&body, &series("sluice_verify_rows_checked_total"))
                .is_some_and(|n| n >= 300.0)
    })
    .await;

    // Drift made behind sluice's back in the new store (a changed row, a lost row, a row no
    // source row maps to) shows as three keys, through the re-check.
    new.sql(
        "UPDATE v2.orders SET total = -1 WHERE customer_id = 1 AND id = 1;
         DELETE FROM v2.orders WHERE customer_id = 2 AND id = 2;
         INSERT INTO v2.orders VALUES (9, 9999, 1);",
    );
    wait_for("the drift to show in the mismatch gauges", Duration::from_secs(120), || async {
        let body = scrape();
        crate::harness::metric(&body, &series("sluice_verify_mismatches")) == Some(3.0)
            && crate::harness::metric(&body, &series("sluice_verify_last_full_mismatches")) == Some(3.0)
    })
    .await;
    let out = sluice().args(["status", "--json", "-c"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["verify"]["passes"].as_u64().is_some_and(|n| n >= 2), "{json:#}");
    let log = std::fs::read_to_string(dir.path().join("forward.log")).unwrap();
    assert!(log.contains("background verify found keys that differ"), "{log}");
    assert!(!log.contains("9999"), "no key or value of a row in the log: {log}");

    // Repaired (the source rows written again, the stray row removed): clean again.
    let repaired = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    db.sql("UPDATE orders SET total = total WHERE (customer_id, id) IN ((1, 1), (2, 2))");
    new.sql("DELETE FROM v2.orders WHERE id = 9999");
    wait_for("the repaired stores to verify clean", Duration::from_secs(120), || async {
        clean_full_pass_after(&scrape(), repaired)
    })
    .await;
    kill_9(&mut forward);
}
