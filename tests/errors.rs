//! Bad input gets one clear error naming the cause, a non-zero exit, and nothing acknowledged.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use sluice::localpg::{free_port, ClusterOptions, LocalPostgres};

use crate::harness::{sluice_output, TestDb};

const LIMIT: Duration = Duration::from_secs(60);

fn run(config: &std::path::Path) -> (Option<i32>, String) {
    sluice_output(&["run", "-c", config.to_str().unwrap()], LIMIT)
}

fn null_target() -> &'static str {
    "[target]\nkind = \"null\"\n"
}

#[test]
fn malformed_config_names_the_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[source.connection]\ndbname = \"app\"\nprot = 5432\n[source.replication]\nslot = \"s\"\npublication = \"p\"\n[target]\nkind = \"null\"\n",
    )
    .unwrap();
    let (code, stderr) = sluice_output(&["validate", "-c", path.to_str().unwrap()], LIMIT);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("source.connection") && stderr.contains("prot"), "{stderr}");

    std::fs::write(
        &path,
        "[pipeline]\nmax_in_flight = 0\n[source.connection]\ndbname = \"app\"\n[source.replication]\nslot = \"Bad Slot\"\npublication = \"p\"\n\
         status_interval = \"soon\"\n[target]\nkind = \"null\"\n",
    )
    .unwrap();
    let (code, stderr) = run(&path);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("source.replication.status_interval"), "{stderr}");

    std::fs::write(
        &path,
        "[pipeline]\nmax_in_flight = 0\n[source.connection]\ndbname = \"app\"\n[source.replication]\nslot = \"Bad Slot\"\npublication = \"p\"\n[target]\nkind = \"null\"\n",
    )
    .unwrap();
    let (code, stderr) = run(&path);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("pipeline.max_in_flight") && stderr.contains("source.replication.slot"),
        "every problem: {stderr}"
    );

    std::fs::write(&path, "[source.connection\n").unwrap();
    let (code, stderr) = run(&path);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not valid TOML"), "{stderr}");
}

#[test]
fn missing_publication_is_named_and_no_slot_is_created() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let config = db.config_file(dir.path(), "nopub", "no_such_pub", null_target());
    let (code, stderr) = run(&config);
    assert_eq!(code, Some(2), "refused by the start checks: {stderr}");
    assert!(stderr.contains("publication \"no_such_pub\" does not exist"), "{stderr}");
    assert_eq!(db.slot_confirmed("nopub"), None, "nothing created, nothing acknowledged");
}

#[test]
fn wal_level_below_logical_is_named() {
    let pg = Arc::new(
        LocalPostgres::start(&ClusterOptions { wal_level_replica: true, ..Default::default() }).unwrap(),
    );
    let db = TestDb::in_cluster(pg);
    db.sql("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let dir = tempfile::tempdir().unwrap();
    let config = db.config_file(dir.path(), "s", "p", null_target());
    let (code, stderr) = run(&config);
    assert_eq!(code, Some(2), "refused by the start checks: {stderr}");
    assert!(
        stderr.contains("wal_level is \"replica\"") && stderr.contains("wal_level = logical"),
        "{stderr}"
    );
}

#[test]
fn slot_in_use_by_another_client_is_named_and_left_alone() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let slot = db.slot_name("busy");
    db.sql(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"));
    let mut holder = db
        .pg
        .client_command("pg_recvlogical")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "--start",
            "-f",
            "/dev/null",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=p",
        ])
        .arg("-p")
        .arg(db.pg.port.to_string())
        .arg("-d")
        .arg(&db.name)
        .arg("-S")
        .arg(&slot)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    crate::harness::wait_for_blocking("pg_recvlogical to hold the slot", LIMIT, || {
        db.sql(&format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active"))
            == "1"
    });
    let holder_pid = format!("SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'");
    let held_by = db.sql(&holder_pid);
    let dir = tempfile::tempdir().unwrap();
    let config = db.config_file(dir.path(), "busy", "p", null_target());
    let (code, stderr) = run(&config);
    // Left alone: the slot is still there, held by the same connection. (Its confirmed position
    // is pg_recvlogical's to move.)
    let still_held_by = db.sql(&holder_pid);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("replication slot \"{slot}\" is in use by another client")), "{stderr}");
    assert_eq!(still_held_by, held_by, "the slot is still held by pg_recvlogical");
}

#[test]
fn unreachable_host_is_named_after_bounded_retries() {
    let port = free_port().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nretry_for = \"1s\"\n[monitoring]\nlisten = \"127.0.0.1:0\"\n[source.connection]\nport = {port}\ndbname = \"app\"\nconnect_timeout = \"2s\"\n\
             [source.replication]\nslot = \"s\"\npublication = \"p\"\n{}",
            null_target()
        ),
    )
    .unwrap();
    let (code, stderr) = run(&path);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot connect to Postgres at 127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("retrying"), "transient failures are retried first: {stderr}");
}

/// A config (`c.toml` in `dir`) whose source is a free port where nothing listens, retried
/// for `retry_for`; and that port.
fn unreachable_source(dir: &std::path::Path, retry_for: &str) -> (std::path::PathBuf, u16) {
    let port = free_port().unwrap();
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nretry_for = \"{retry_for}\"\n[source.connection]\nport = {port}\ndbname = \"app\"\nconnect_timeout = \"2s\"\n\
             [source.replication]\nslot = \"s\"\npublication = \"p\"\n{}",
            null_target()
        ),
    )
    .unwrap();
    (path, port)
}

/// A pod stopped while its source is down: SIGTERM during the start checks' retries ends
/// the run at once with exit 0, not after `retry_for`, and not killed by the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_start_checks_retry_an_unreachable_source_exits_0_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = unreachable_source(dir.path(), "10m");
    let log = dir.path().join("run.log");
    let mut child = crate::harness::sluice()
        .args(["run", "-c", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    crate::harness::wait_for_blocking("the start checks to retry", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).unwrap().contains("retrying")
    });
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let status =
        crate::harness::wait_for_exit(&mut child, crate::harness::patience(Duration::from_secs(10))).await;
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status}\n{stderr}");
    assert!(stderr.contains("signal received during the start checks"), "{stderr}");
}

#[test]
fn wrong_password_is_named_and_not_retried() {
    let pg = Arc::new(
        LocalPostgres::start(&ClusterOptions {
            hba: vec!["host all app 127.0.0.1/32 scram-sha-256".into()],
            ..Default::default()
        })
        .unwrap(),
    );
    let db = TestDb::in_cluster(pg);
    db.sql("CREATE ROLE app LOGIN REPLICATION PASSWORD 'right'; CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let dir = tempfile::tempdir().unwrap();
    let config = db.config_file(dir.path(), "s", "p", null_target());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[source.connection]\n", "[source.connection]\nuser = \"app\"\npassword = \"wrong\"\n");
    std::fs::write(&config, text).unwrap();
    let (code, stderr) = run(&config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("refused the login of user \"app\"")
            && stderr.contains("password authentication failed"),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong"), "the password never appears: {stderr}");
    assert!(!stderr.contains("retrying"), "authentication failures are fatal: {stderr}");
}

/// Every line of standard error as JSON (`--log-format json`): the last one says why sluice
/// stopped.
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{stderr}")))
        .collect()
}

#[test]
fn with_json_logs_even_the_last_words_are_json() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let config = db.config_file(dir.path(), "jsonpub", "no_such_pub", null_target());
    let (code, stderr) =
        sluice_output(&["--log-format", "json", "run", "-c", config.to_str().unwrap()], LIMIT);
    assert_eq!(code, Some(2), "{stderr}");
    let lines = json_lines(&stderr);
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{stderr}");
    assert!(last["message"].as_str().unwrap().contains("the pipeline cannot start"), "{stderr}");
    assert!(
        last["problems"].as_str().unwrap().contains("publication \"no_such_pub\" does not exist"),
        "{stderr}"
    );

    // A failure after retries, and a configuration that does not parse.
    let (path, port) = unreachable_source(dir.path(), "1s");
    let (code, stderr) = sluice_output(&["--log-format", "json", "run", "-c", path.to_str().unwrap()], LIMIT);
    assert_eq!(code, Some(1), "{stderr}");
    let lines = json_lines(&stderr);
    let retrying =
        lines.iter().find(|l| l["message"].as_str().unwrap_or("").contains("retrying")).expect(&stderr);
    assert!(retrying["gives_up_in_s"].is_u64(), "a retry says how long it keeps trying: {stderr}");
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains(&format!("cannot connect to Postgres at 127.0.0.1:{port}")),
        "{stderr}"
    );
    std::fs::write(&path, "[source.connection\n").unwrap();
    let (code, stderr) = sluice_output(&["--log-format", "json", "run", "-c", path.to_str().unwrap()], LIMIT);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        json_lines(&stderr).last().unwrap()["problems"].as_str().unwrap().contains("not valid TOML"),
        "{stderr}"
    );
}
