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
