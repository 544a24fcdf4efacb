//! Operating sluice: metrics and health endpoints while streaming, heartbeats on an idle
//! database, the HA lock between two processes, the `status` command, JSON logs and the
//! invalidated-slot policy. Every test runs the real binary against real servers.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sluice::localpg::{free_port, ClusterOptions, LocalPostgres};

use crate::harness::{
    http_get, kill_9, metric, moto, sluice, sluice_output, wait_for, wait_for_blocking, Outage, TestDb,
};

pub(crate) fn start(config: &Path, log: &Path) -> Child {
    sluice()
        .args(["run", "-c"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start sluice")
}

/// A config from the harness with these `[monitoring]` settings instead of the default.
pub(crate) fn with_monitoring(config: PathBuf, monitoring: &str) -> PathBuf {
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[monitoring]\nlisten = \"127.0.0.1:0\"\n", &format!("[monitoring]\n{monitoring}\n"));
    std::fs::write(&config, text).unwrap();
    config
}

pub(crate) fn scrape(port: u16) -> String {
    let (code, body) = http_get(port, "/metrics").expect("the metrics endpoint answers");
    assert_eq!(code, 200, "{body}");
    body
}

/// Scrapes until `ready` holds for the exposition; at the deadline, panics showing the last one.
pub(crate) async fn wait_for_metrics(port: u16, what: &str, limit: Duration, ready: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        // Until the daemon listens, there is nothing to scrape yet.
        let body = match http_get(port, "/metrics") {
            Some((200, body)) => body,
            answer => format!("# no metrics yet: {answer:?}"),
        };
        if ready(&body) {
            return;
        }
        if std::time::Instant::now() > deadline {
            let series: Vec<&str> = body.lines().filter(|l| !l.starts_with('#')).collect();
            panic!("timed out after {limit:?} waiting for {what}; last scrape:\n{}", series.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn promtool() -> PathBuf {
    let path = std::env::var_os("SLUICE_TEST_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("promtool"));
    assert!(
        std::process::Command::new(&path).arg("--version").output().is_ok_and(|o| o.status.success()),
        "promtool is needed to check the exposition (apt-get install prometheus, or SLUICE_TEST_PROMTOOL)"
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_lag_falling_after_catch_up_and_rising_while_the_target_is_paused() {
    let moto = moto();
    let db = TestDb::new();
    db.sql("CREATE TABLE accounts (id int8 PRIMARY KEY, n int8 NOT NULL); CREATE PUBLICATION p FOR TABLE accounts");
    let table = format!("ops_{}", db.name);
    let client = crate::harness::dynamo_client(&moto.url).await;
    client.create_table(&table, "pk", None).await.unwrap();
    let outage = Outage::start(moto.port).await;
    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(&mapping, format!("[[tables]]\nsource = \"public.accounts\"\ntarget = \"{table}\"\npartition_key = {{ attribute = \"pk\", template = \"A#{{id}}\" }}\n")).unwrap();
    let port = free_port().unwrap();
    let config = db.config_file(
        dir.path(),
        "metrics",
        "p",
        &crate::dynamodb::target_toml(
            &mapping,
            &outage.url(),
            "request_timeout = \"3s\"\nretry_for = \"5m\"\n",
        ),
    );
    let config = with_monitoring(
        config,
        &format!("listen = \"127.0.0.1:{port}\"\nslot_check_interval = \"1s\"\nready_max_lag = \"3s\"\nretained_wal_warn_bytes = 1"),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("status_interval = \"1s\"", "status_interval = \"1s\"\nheartbeat_interval = \"1s\"");
    std::fs::write(&config, text).unwrap();
    let mut child = start(&config, &dir.path().join("sluice.log"));
    let _logs = crate::harness::LogsOnPanic(vec![dir.path().join("sluice.log")]);
    db.wait_slot_active(&db.slot_name("metrics")).await;

    db.sql("INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 200) g");
    db.sql("UPDATE accounts SET n = n + 1 WHERE id <= 50");
    // Caught up: nothing in flight, the slot confirmed up to the server's position, the last
    // durable commit (or heartbeat) seconds old at most, and ready.
    wait_for_metrics(port, "lag to fall to about zero", Duration::from_secs(60), |body| {
        metric(body, "sluice_apply_lag_bytes") == Some(0.0)
            && metric(body, "sluice_source_lag_bytes").is_some_and(|b| b < 64.0 * 1024.0)
            && metric(body, "sluice_lag_seconds").is_some_and(|s| s < 2.5)
            && metric(
                body,
                "sluice_events_total{op=\"insert\",pipeline=\"default\",table=\"public.accounts\"}",
            ) == Some(200.0)
            && metric(
                body,
                "sluice_events_total{op=\"update\",pipeline=\"default\",table=\"public.accounts\"}",
            ) == Some(50.0)
            // Both transactions applied: a loaded target may still be retrying the second one
            // when the first is already confirmed. A write that timed out but landed is found
            // applied when retried.
            && metric(body, "sluice_target_writes_total{outcome=\"applied\",pipeline=\"default\"}")
                .zip(metric(body, "sluice_target_writes_total{outcome=\"already_applied\",pipeline=\"default\"}").or(Some(0.0)))
                .is_some_and(|(applied, again)| applied + again == 250.0)
    })
    .await;
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200);
    let body = scrape(port);
    assert_eq!(
        metric(&body, "sluice_events_total{op=\"update\",pipeline=\"default\",table=\"public.accounts\"}"),
        Some(50.0)
    );
    assert_eq!(
        metric(&body, "sluice_target_writes_total{outcome=\"applied\",pipeline=\"default\"}"),
        Some(250.0)
    );
    assert!(
        metric(&body, "sluice_target_write_duration_seconds_count{pipeline=\"default\",target=\"dynamodb\"}")
            .is_some_and(|n| n >= 250.0),
        "{body}"
    );
    assert!(metric(&body, "sluice_heartbeats_received_total").is_some_and(|n| n >= 1.0));
    // Commit → durable, per batch: both transactions (and heartbeats) counted, each well under a minute.
    let count = metric(&body, "sluice_apply_latency_seconds_count").unwrap_or(0.0);
    let sum = metric(&body, "sluice_apply_latency_seconds_sum").unwrap_or(f64::MAX);
    assert!(count >= 2.0 && sum / count < 60.0, "{body}");
    assert_eq!(
        metric(&body, "sluice_apply_latency_seconds_bucket{le=\"+Inf\",pipeline=\"default\"}"),
        Some(count),
        "{body}"
    );
    assert!(metric(&body, "sluice_slot_retained_wal_bytes").is_some());
    assert_eq!(metric(&body, "sluice_slot_wal_status{pipeline=\"default\",status=\"reserved\"}"), Some(1.0));
    assert_eq!(metric(&body, "sluice_ha_active"), Some(1.0));

    let scrape_file = dir.path().join("scrape.txt");
    std::fs::write(&scrape_file, &body).unwrap();
    let check = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&scrape_file).unwrap())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // The target stops answering: lag in seconds and bytes rises, readiness fails, retries count.
    outage.begin();
    db.sql("INSERT INTO accounts SELECT g, 0 FROM generate_series(1001, 1100) g");
    wait_for_metrics(port, "lag to rise while the target is paused", Duration::from_secs(60), |body| {
        metric(body, "sluice_lag_seconds").is_some_and(|s| s > 4.0)
            && metric(body, "sluice_source_lag_bytes").is_some_and(|b| b > 0.0)
            && metric(body, "sluice_target_retries_total").is_some_and(|n| n > 0.0)
    })
    .await;
    let (code, reason) = http_get(port, "/readyz").unwrap();
    assert_eq!(code, 503, "{reason}");
    assert!(reason.contains("monitoring.ready_max_lag"), "{reason}");

    outage.end();
    wait_for_metrics(port, "lag to fall again after the target returns", Duration::from_secs(120), |body| {
        metric(body, "sluice_apply_lag_bytes") == Some(0.0)
            && metric(body, "sluice_lag_seconds").is_some_and(|s| s < 2.5)
    })
    .await;
    assert_eq!(client.scan_all(&table).await.unwrap().len(), 300, "nothing lost");

    // `sluice status` reads the running daemon, as a table and as JSON.
    let (code, out) = status(&config, false);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("daemon at 127.0.0.1")
            && out.contains("role")
            && out.contains("active")
            && out.contains("slot wal status"),
        "{out}"
    );
    let (code, out) = status(&config, true);
    assert_eq!(code, Some(0), "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["streaming"], true);
    assert_eq!(json["slot"]["active"], true);
    // The same counts as /metrics, and positions read in order: what sluice confirmed is never
    // ahead of the server's WAL position shown beside it.
    let body = scrape(port);
    let events: f64 = ["insert", "update"]
        .iter()
        .map(|op| {
            metric(
                &body,
                &format!("sluice_events_total{{op=\"{op}\",pipeline=\"default\",table=\"public.accounts\"}}"),
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(json["events"].as_f64(), Some(events), "{out}");
    // 350 changes, and any the source sent again after a reconnect during the outage.
    assert!(events >= 350.0, "{out}");
    assert_eq!(json["slot_fresh"], true, "{out}");
    let lsn = |v: &serde_json::Value| v.as_str().unwrap().parse::<sluice_core::Lsn>().unwrap();
    assert!(lsn(&json["confirmed_lsn"]) <= lsn(&json["slot"]["server_wal_lsn"]), "{out}");

    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.path().join("sluice.log")).unwrap();
    let warnings = log.matches("retains more WAL than monitoring.retained_wal_warn_bytes").count();
    assert!(
        (1..=3).contains(&warnings),
        "the retention warning (threshold 1 byte) is logged when crossed, not at every check: {log}"
    );
    // Without a daemon, status reads the slot from Postgres.
    let (code, out) = status(&config, true);
    assert_eq!(code, Some(0), "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["source_of_status"], "postgres");
    assert_eq!(json["slot"]["active"], false);
    assert_eq!(json["slot"]["exists"], true);
}

/// `sluice status` with its stdout (or stderr on failure).
pub(crate) fn status(config: &Path, json: bool) -> (Option<i32>, String) {
    let mut command = sluice();
    command.args(["status", "-c"]).arg(config);
    if json {
        command.arg("--json");
    }
    let out = command.output().unwrap();
    let text = if out.status.success() { out.stdout } else { out.stderr };
    (out.status.code(), String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_an_idle_slot_close_to_the_wal_end_while_unpublished_tables_churn() {
    // Its own cluster: the churn and its checkpoints would slow slot creation in other tests.
    let db = TestDb::in_cluster(Arc::new(LocalPostgres::start(&ClusterOptions::default()).unwrap()));
    db.sql("CREATE TABLE quiet (id int8 PRIMARY KEY); CREATE TABLE busy (id int8, payload text); CREATE PUBLICATION p FOR TABLE quiet");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let config = db.config_file(dir.path(), "idle", "p", "[target]\nkind = \"null\"\n");
    let config =
        with_monitoring(config, &format!("listen = \"127.0.0.1:{port}\"\nslot_check_interval = \"1s\""));
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("status_interval = \"1s\"", "status_interval = \"1s\"\nheartbeat_interval = \"500ms\"");
    std::fs::write(&config, text).unwrap();
    let mut child = start(&config, &dir.path().join("sluice.log"));
    let _logs = crate::harness::LogsOnPanic(vec![dir.path().join("sluice.log")]);
    db.wait_slot_active(&db.slot_name("idle")).await;

    // About 40 MB of WAL in tables the publication does not include.
    let start_lsn: sluice_core::Lsn = db.sql("SELECT pg_current_wal_lsn()").parse().unwrap();
    for _ in 0..8 {
        db.sql("INSERT INTO busy SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g; DELETE FROM busy; CHECKPOINT");
    }
    let end_lsn: sluice_core::Lsn = db.sql("SELECT pg_current_wal_lsn()").parse().unwrap();
    let churned = end_lsn.0 - start_lsn.0;
    assert!(churned > 20 << 20, "the churn wrote {churned} bytes of WAL");
    // The slot's confirmed position follows the WAL end, and its retained WAL stays far below the
    // churn. The slot gauges count only once sampled after the churn (a sample from before it
    // shows no lag either), and heartbeats came back through the stream, keeping it fresh.
    wait_for_metrics(port, "the slot to follow the WAL end", Duration::from_secs(90), |body| {
        metric(body, "sluice_server_wal_lsn").is_some_and(|lsn| lsn >= end_lsn.0 as f64)
            && metric(body, "sluice_source_lag_bytes").is_some_and(|b| b < 1024.0 * 1024.0)
            && metric(body, "sluice_slot_retained_wal_bytes").is_some_and(|b| b < (churned / 4) as f64)
            && metric(body, "sluice_heartbeats_received_total").is_some_and(|n| n >= 2.0)
            && metric(body, "sluice_lag_seconds").is_some_and(|s| s < 3.0)
    })
    .await;
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}

/// Inserted ids in a jsonl output file (a torn last line is skipped).
fn ids_in(path: &Path) -> Vec<i64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["op"] == "insert")
        .map(|line| {
            line["new"]["id"].as_str().map(|s| s.parse().unwrap()).or(line["new"]["id"].as_i64()).unwrap()
        })
        .collect()
}

pub(crate) fn streaming(port: u16) -> Option<bool> {
    let (code, body) = http_get(port, "/status")?;
    if code != 200 {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(&body).ok()?["streaming"].as_bool()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_one_streams_and_the_other_takes_over_after_kill_9() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let dir = tempfile::tempdir().unwrap();
    let replica = |name: &str| {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let port = free_port().unwrap();
        let output = sub.join("out.jsonl");
        let config = db.config_file(
            &sub,
            "ha",
            "p",
            &format!("[target]\nkind = \"jsonl\"\npath = \"{}\"\nfsync = true\n", output.display()),
        );
        let config = with_monitoring(config, &format!("listen = \"127.0.0.1:{port}\""));
        let text =
            std::fs::read_to_string(&config).unwrap().replace("retry_for = \"2s\"", "retry_for = \"30s\"");
        std::fs::write(&config, text).unwrap();
        (config, port, output, sub.join("sluice.log"))
    };
    let (config_a, port_a, out_a, log_a) = replica("a");
    let (config_b, port_b, out_b, log_b) = replica("b");
    let _logs = crate::harness::LogsOnPanic(vec![log_a.clone(), log_b.clone()]);
    let mut a = start(&config_a, &log_a);
    wait_for("replica a to stream", Duration::from_secs(30), || async { streaming(port_a) == Some(true) })
        .await;
    let mut b = start(&config_b, &log_b);
    wait_for("replica b to stand by", Duration::from_secs(30), || async {
        http_get(port_b, "/readyz")
            .is_some_and(|(code, body)| code == 503 && body.contains("another replica holds the HA lock"))
    })
    .await;
    assert_eq!(
        http_get(port_b, "/readyz?standby=ok").unwrap().0,
        200,
        "a healthy standby is ready for Kubernetes"
    );

    // A steady writer; both replicas are watched: never both streaming.
    let connection = db.connection();
    let writer = tokio::spawn(async move {
        let sql = sluice_postgres::connect_sql(&connection).await.unwrap();
        for id in 0..300i64 {
            sql.batch_execute(&format!("INSERT INTO t VALUES ({id})")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let watcher = std::thread::spawn(move || {
        let mut samples = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            let both = streaming(port_a) == Some(true) && streaming(port_b) == Some(true);
            assert!(!both, "both replicas streamed at once");
            samples += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        samples
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    kill_9(&mut a);
    let killed_at = std::time::Instant::now();
    wait_for("replica b to take over", Duration::from_secs(30), || async { streaming(port_b) == Some(true) })
        .await;
    let takeover = killed_at.elapsed();
    assert!(takeover < Duration::from_secs(10), "took over in {takeover:?}");
    writer.await.unwrap();
    let marker = db.commit_lsn_of("INSERT INTO t VALUES (-1)");
    wait_for("replica b to confirm everything", Duration::from_secs(60), || async {
        db.slot_confirmed("ha").unwrap() >= marker
    })
    .await;
    assert!(watcher.join().unwrap() > 50, "the watcher sampled both replicas");

    let delivered: BTreeSet<i64> = ids_in(&out_a).into_iter().chain(ids_in(&out_b)).collect();
    let expected: BTreeSet<i64> = (-1..300).collect();
    assert_eq!(delivered, expected, "nothing lost across the takeover");
    assert!(!ids_in(&out_b).is_empty() && !ids_in(&out_a).is_empty(), "both replicas streamed in turn");
    let log = std::fs::read_to_string(&log_b).unwrap();
    assert!(log.contains("standing by") && log.contains("holding the HA lock"), "{log}");
    std::process::Command::new("kill").arg("-TERM").arg(b.id().to_string()).status().unwrap();
    assert!(b.wait().unwrap().success());
}

#[test]
fn json_logs_are_one_object_per_line_without_secrets() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t; CREATE ROLE app LOGIN REPLICATION SUPERUSER PASSWORD 'hunter2'");
    let dir = tempfile::tempdir().unwrap();
    let config = db.config_file(dir.path(), "json", "p", "[target]\nkind = \"null\"\n");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[source.connection]\n", "[source.connection]\nuser = \"app\"\npassword = \"hunter2\"\n");
    std::fs::write(&config, text).unwrap();
    let end = db.insert_lsn();
    let (code, stderr) = sluice_output(
        &["--log-format", "json", "run", "-c", config.to_str().unwrap(), "--until-lsn", &end.to_string()],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["message"] == "streaming" && l["level"] == "INFO" && l["slot"].is_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn an_invalidated_slot_stops_with_a_clear_error_or_is_recreated_when_configured() {
    let pg = Arc::new(
        LocalPostgres::start(&ClusterOptions {
            settings: vec![
                ("max_slot_wal_keep_size".into(), "32MB".into()),
                ("max_wal_size".into(), "64MB".into()),
                ("min_wal_size".into(), "32MB".into()),
            ],
            ..Default::default()
        })
        .unwrap(),
    );
    let db = TestDb::in_cluster(pg);
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY, payload text); CREATE PUBLICATION p FOR TABLE t");
    let slot = db.slot_name("lost");
    db.sql(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"));
    // More WAL than max_slot_wal_keep_size, then checkpoints: the server invalidates the slot.
    wait_for_blocking("the slot to be invalidated", Duration::from_secs(120), || {
        db.sql("INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(1, 20000) g ON CONFLICT (id) DO UPDATE SET payload = excluded.payload; SELECT pg_switch_wal(); CHECKPOINT");
        db.sql(&format!("SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'")) == "lost"
    });
    let dir = tempfile::tempdir().unwrap();
    let config = db.config_file(dir.path(), "lost", "p", "[target]\nkind = \"null\"\n");
    let (code, stderr) = sluice_output(&["run", "-c", config.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(2), "refused by the start checks: {stderr}");
    assert!(
        stderr.contains(&format!("replication slot \"{slot}\" was invalidated"))
            && stderr.contains("on_slot_lost"),
        "{stderr}"
    );
    assert_eq!(
        db.sql(&format!("SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'")),
        "lost",
        "left alone"
    );

    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("status_interval = \"1s\"", "status_interval = \"1s\"\non_slot_lost = \"recreate\"");
    std::fs::write(&config, text).unwrap();
    db.sql("INSERT INTO t VALUES (-1, 'after')");
    let end = db.insert_lsn();
    db.sql("INSERT INTO t VALUES (-2, 'marker')");
    let (code, stderr) = sluice_output(
        &["run", "-c", config.to_str().unwrap(), "--until-lsn", &end.to_string()],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("invalidated and is recreated") && stderr.contains("backfill"), "{stderr}");
    assert_eq!(
        db.sql(&format!("SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'")),
        "reserved"
    );
}
