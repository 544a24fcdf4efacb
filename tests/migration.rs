//! The migration state and the fence, against a real Postgres: phases move only along the
//! program (forward → fenced → reversed …), a move re-run is no move, an illegal one is
//! refused naming the table and both phases; the daemon's /metrics and /status show each
//! table's phase; a fenced table refuses the application's writes with the documented error
//! and takes those of sluice's reverse session (recognised by its replication origin).

use std::process::Stdio;
use std::time::Duration;

use sluice::migration::{fence, Direction, Move, Phase, Step};
use sluice_core::TableName;

use crate::harness::{http_get, metric, sluice, sluice_output, wait_for, LogsOnPanic, TestDb};

const SCHEMA: &str = "CREATE TABLE accounts (id int8 PRIMARY KEY, n int8 NOT NULL);
  CREATE TABLE orders (id int8 PRIMARY KEY, total numeric);
  CREATE TABLE other (id int8 PRIMARY KEY);
  CREATE PUBLICATION p FOR TABLE accounts, orders;";

async fn client(db: &TestDb) -> tokio_postgres::Client {
    sluice_postgres::connect_sql(&db.connection()).await.unwrap()
}

/// Runs a sluice command: exit code, standard output, standard error.
fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    let out = sluice().args(args).output().expect("run sluice");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn error_text(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|e| format!("{} {}", e.code().code(), e.message()))
        .unwrap_or_else(|| error.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phases_move_along_the_program_and_the_daemon_shows_them() {
    let db = TestDb::new();
    db.sql(SCHEMA);
    let dir = tempfile::tempdir().unwrap();
    let port = sluice::localpg::free_port().unwrap();
    let config_path = db.config_file(dir.path(), "phases", "p", "[target]\nkind = \"null\"\n");
    let text = std::fs::read_to_string(&config_path).unwrap().replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\"\nslot_check_interval = \"1s\""),
    );
    std::fs::write(&config_path, text).unwrap();
    let config = sluice::config::Config::load(&config_path).unwrap();
    let sql = client(&db).await;
    sluice::migration::ensure_state_tables(&sql, &config.migration).await.unwrap();

    // forward → fenced, twice: the second is no move.
    let move_ = |step| {
        sluice::migration::transition(&sql, &config.migration, "default", "public.accounts", step, "ada")
    };
    assert_eq!(move_(Step::Fence).await.unwrap(), Move::To(Phase::Fenced));
    assert_eq!(move_(Step::Fence).await.unwrap(), Move::AlreadyThere);
    // Illegal from fenced: named with the table and both phases; nothing changes.
    let refused = move_(Step::Finish).await.unwrap_err().to_string();
    assert!(
        refused.contains("public.accounts") && refused.contains("fenced") && refused.contains("reversed"),
        "{refused}"
    );
    assert_eq!(move_(Step::Reverse).await.unwrap(), Move::To(Phase::Reversed));
    let phases = sluice::migration::phases(&sql, &config.migration, "default").await.unwrap();
    assert_eq!(phases.get("public.accounts"), Some(&Phase::Reversed));
    assert_eq!(phases.get("public.orders"), None, "a table never moved has no row: it is forward");
    let history = sluice::migration::history(&sql, &config.migration, "default").await.unwrap();
    let moves: Vec<(&str, &str, &str)> =
        history.iter().map(|m| (m.from.as_str(), m.to.as_str(), m.command.as_str())).collect();
    assert_eq!(moves, [("forward", "fenced", "cutover"), ("fenced", "reversed", "cutover")]);
    assert!(history[0].changed_by.starts_with("ada (role postgres)"), "{}", history[0].changed_by);
    // Another pipeline's phases are its own.
    let other = sluice::migration::phases(&sql, &config.migration, "other").await.unwrap();
    assert!(other.is_empty());

    // Two tables in two phases, as the command shows them.
    let (code, out, err) = cli(&["migration", "--json", "--history", "-c", config_path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tables = json["tables"].as_array().unwrap();
    let phase_of = |name: &str| {
        tables.iter().find(|t| t["table"] == name).map(|t| t["phase"].clone()).unwrap_or_default()
    };
    assert_eq!(phase_of("public.accounts"), "reversed");
    assert_eq!(phase_of("public.orders"), "forward");
    assert_eq!(json["history"].as_array().unwrap().len(), 2);

    // The daemon: /metrics and /status carry each published table's phase.
    let log = dir.path().join("daemon.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let mut daemon = sluice()
        .args(["run", "-c", config_path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let series = |table: &str, phase: &str| {
        format!("sluice_migration_phase{{phase=\"{phase}\",pipeline=\"default\",table=\"{table}\"}}")
    };
    wait_for("the phases in /metrics", Duration::from_secs(60), || async {
        http_get(port, "/metrics").is_some_and(|(_, body)| {
            metric(&body, &series("public.accounts", "reversed")) == Some(1.0)
                && metric(&body, &series("public.accounts", "forward")) == Some(0.0)
                && metric(&body, &series("public.orders", "forward")) == Some(1.0)
        })
    })
    .await;
    // A move is seen at the next inspection.
    assert_eq!(move_(Step::StartRollback).await.unwrap(), Move::To(Phase::RollingBack));
    wait_for("the new phase in /status", Duration::from_secs(60), || async {
        http_get(port, "/status").is_some_and(|(_, body)| {
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|s| {
                s["migration"]["public.accounts"] == "rolling_back"
                    && s["migration"]["public.orders"] == "forward"
            })
        })
    })
    .await;
    let (code, out, err) = cli(&["status", "-c", config_path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("migration public.accounts") && out.contains("rolling_back"), "{out}");
    std::process::Command::new("kill").arg("-TERM").arg(daemon.id().to_string()).status().unwrap();
    assert!(daemon.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_table_refuses_the_applications_writes_and_takes_the_reverse_sessions() {
    let db = TestDb::new();
    db.sql(SCHEMA);
    db.sql("INSERT INTO accounts VALUES (1, 1)");
    let dir = tempfile::tempdir().unwrap();
    let config_path = db.config_file(dir.path(), "fence", "p", "[target]\nkind = \"null\"\n");
    let path = config_path.to_str().unwrap();

    let (code, out) =
        sluice_output(&["fence", "--table", "public.accounts", "-c", path], Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("fenced public.accounts at "), "{out}");
    // Again: already fenced, still fine.
    let (code, out) =
        sluice_output(&["fence", "--table", "public.accounts", "-c", path], Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}");

    let app = client(&db).await;
    for statement in [
        "INSERT INTO accounts VALUES (2, 2)",
        "UPDATE accounts SET n = 5",
        "DELETE FROM accounts",
        "TRUNCATE accounts",
    ] {
        let error = app.batch_execute(statement).await.unwrap_err();
        let text = error_text(&error);
        assert!(
            text.starts_with(fence::REFUSED_SQLSTATE)
                && text.contains("table public.accounts is fenced by sluice pipeline default"),
            "{statement}: {text}"
        );
    }
    // The other table of the pipeline is not fenced.
    app.batch_execute("INSERT INTO orders VALUES (1, 1)").await.unwrap();
    // sluice's forward session is refused too; its reverse session writes.
    let forward = client(&db).await;
    let slot = db.slot_name("fence");
    fence::as_origin(&forward, &slot, Direction::Forward).await.unwrap();
    assert!(forward.batch_execute("INSERT INTO accounts VALUES (3, 3)").await.is_err());
    let reverse = client(&db).await;
    fence::as_origin(&reverse, &slot, Direction::Reverse).await.unwrap();
    reverse
        .batch_execute("INSERT INTO accounts VALUES (4, 4); UPDATE accounts SET n = n + 1 WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(db.sql("SELECT string_agg(id || ':' || n, ',' ORDER BY id) FROM accounts").trim(), "1:2,4:4");
    // Faking the setting alone is not enough: the session needs the origin.
    let faker = client(&db).await;
    faker.batch_execute(&format!("SET sluice.origin = 'sluice_{slot}_reverse'")).await.unwrap();
    assert!(faker.batch_execute("INSERT INTO accounts VALUES (5, 5)").await.is_err());

    let (code, out, err) = cli(&["migration", "-c", path]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.lines().any(|l| l.starts_with("public.accounts") && l.ends_with("yes")), "{out}");

    // A table outside the pipeline is refused, naming the publication; nothing is fenced.
    let (code, out) =
        sluice_output(&["fence", "--table", "public.other", "-c", path], Duration::from_secs(60));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("table public.other is not in publication \"p\""), "{out}");
    assert!(!fence::is_fenced(&app, &TableName::new("public", "other")).await.unwrap());

    // A role that may not create triggers gets the privilege named.
    let role = format!("{}_app", db.name);
    db.sql(&format!(
        "CREATE ROLE {role} LOGIN; GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}; GRANT CREATE ON SCHEMA public TO {role}"
    ));
    let mut command = sluice();
    command
        .args(["fence", "--table", "public.orders", "-c", path])
        .env("SLUICE__SOURCE__CONNECTION__USER", &role);
    let out = command.output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&format!("GRANT TRIGGER ON public.orders TO {role}")), "{text}");

    let (code, out) =
        sluice_output(&["unfence", "--table", "public.accounts", "-c", path], Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("public.accounts: fence taken down"), "{out}");
    app.batch_execute("INSERT INTO accounts VALUES (6, 6)").await.unwrap();
    db.sql(&format!("DROP OWNED BY {role}; DROP ROLE {role}"));
}

/// No loops: a transaction sluice wrote into the source with the reverse direction's origin is
/// never sent forward (its commit still advances the slot); the application's are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forward_stream_drops_sluices_own_reverse_writes_by_their_origin() {
    let db = TestDb::new();
    db.sql(SCHEMA);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("changes.jsonl");
    let config_path = db.config_file(
        dir.path(),
        "origins",
        "p",
        &format!("[target]\nkind = \"jsonl\"\npath = \"{}\"\n", out.display()),
    );
    let path = config_path.to_str().unwrap();
    // The first run creates the slot.
    let now = db.insert_lsn().to_string();
    let (code, _, err) = cli(&["run", "-c", path, "--until-lsn", &now]);
    assert_eq!(code, Some(0), "{err}");
    db.sql("INSERT INTO accounts VALUES (1, 1)");
    let reverse = client(&db).await;
    fence::as_origin(&reverse, &db.slot_name("origins"), Direction::Reverse).await.unwrap();
    reverse
        .batch_execute("INSERT INTO accounts VALUES (2, 2); UPDATE accounts SET n = 10 WHERE id = 1")
        .await
        .unwrap();
    // Another tool's origin is not sluice's: delivered.
    let other = client(&db).await;
    other
        .batch_execute(
            &format!(
                "SELECT pg_replication_origin_create('other_{slot}'); SELECT pg_replication_origin_session_setup('other_{slot}'); \
                 INSERT INTO accounts VALUES (3, 3)",
                slot = db.slot_name("origins")
            ),
        )
        .await
        .unwrap();
    db.sql("INSERT INTO accounts VALUES (4, 4)");
    let end = db.insert_lsn();
    let (code, _, err) = cli(&["run", "-c", path, "--until-lsn", &end.to_string()]);
    assert_eq!(code, Some(0), "{err}");
    let ids: Vec<i64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["op"] == "insert" || e["op"] == "update")
        .map(|e| e["new"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [1, 3, 4], "the reverse session's insert and update never came forward");
    // The slot moved past them all the same.
    assert!(db.slot_confirmed("origins").unwrap() >= end);
}
