//! `sluice status`: the pipeline as its running daemon reports it (`GET /status` on
//! `monitoring.listen`), or, when no daemon answers there, the slot as Postgres shows it.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_core::retry::RetryPolicy;
use sluice_postgres::ReadSession;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Config, SourceMode};
use crate::error::{CommandContext, CommandError};
use crate::targets::TargetConfig;

/// Prints the status (a table, or JSON with `as_json`).
pub async fn print(config: &Config, as_json: bool) -> Result<(), CommandError> {
    let answer = match config.monitoring.listen {
        Some(listen) => from_daemon(listen).await,
        None => None,
    };
    let status = match answer {
        Some(status) => status,
        None => from_postgres(config).await?,
    };
    let text = if as_json {
        serde_json::to_string_pretty(&status).context("cannot write the status as JSON")? + "\n"
    } else {
        table(&status)
    };
    crate::error::print(&text).context("cannot write the status to standard output")
}

/// The daemon's `/status`, if it answers within ten seconds (it reads the slot for the answer,
/// which a loaded server can make slow).
async fn from_daemon(mut addr: std::net::SocketAddr) -> Option<Value> {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(
                format!("GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") {
            return None;
        }
        let mut status: Value = serde_json::from_str(body).ok()?;
        status["source_of_status"] = json!(format!("daemon at {addr}"));
        Some(status)
    };
    tokio::time::timeout(Duration::from_secs(10), fetch).await.ok().flatten()
}

async fn from_postgres(config: &Config) -> Result<Value, CommandError> {
    if let Some(kafka) = config.source.kafka() {
        return Err(CommandError::invalid(format!(
            "no applier answered on monitoring.listen; an applier ([source.kafka]) reads no database, so its status is its \
             /status, and the group's offsets are the broker's (consumer group {:?})",
            kafka.group_id
        )));
    }
    // A short budget: an operator is waiting for the answer.
    let policy = RetryPolicy::new(config.pipeline.retry_for.min(Duration::from_secs(10)));
    let mut sql = ReadSession::connect(&config.source.connection, "sluice status", policy)
        .await
        .context("no daemon answered on monitoring.listen, and Postgres (source.connection)")?;
    let mut migration = None;
    let (slot, backlog) = match &config.source.mode {
        SourceMode::Replication(replication) => {
            let mut slot = sql
                .run(async |c| Ok(crate::monitor::inspect_slot(c, &replication.slot).await?))
                .await
                .with_context(|| {
                    format!("cannot read replication slot {:?} from pg_replication_slots", replication.slot)
                })?;
            if let Some(primary) = config.source.heartbeat_connection.as_ref().filter(|_| slot.on_standby) {
                // Best effort: the standby's own answer stands without the primary's position.
                if let Ok(mut primary) = ReadSession::connect(primary, "sluice status", policy).await {
                    let read = primary
                        .run(async |c| {
                            let mut read = slot.clone();
                            crate::monitor::read_primary(&mut read, c).await?;
                            Ok(read)
                        })
                        .await;
                    if let Ok(read) = read {
                        slot = read;
                    }
                }
            }
            let phases = sql
                .run(async |c| {
                    Ok(crate::migration::published_phases(
                        c,
                        &config.migration,
                        &config.pipeline.name,
                        &replication.publication,
                    )
                    .await
                    .ok())
                })
                .await
                .ok()
                .flatten();
            migration = phases.map(|p| json!(p));
            (json!(slot), Value::Null)
        }
        SourceMode::Poll(poll) => {
            let rows = sql
                .run(async |c| sluice_postgres::poll::backlog(c, poll).await)
                .await
                .with_context(|| format!("cannot count the rows of outbox table {}", poll.table))?;
            (Value::Null, json!(rows))
        }
        SourceMode::Kafka(_) => unreachable!("answered above"),
    };
    let dead_letter = match &config.target {
        TargetConfig::Dynamodb(dynamo) => &dynamo.dead_letter,
        TargetConfig::Kafka(kafka) => &kafka.dead_letter,
        TargetConfig::Postgres(pg) => &pg.dead_letter,
        TargetConfig::Jsonl(_) | TargetConfig::Null => &None,
    };
    let dead_lettered = match dead_letter {
        Some(path) => match std::fs::read(path) {
            Ok(bytes) => json!(bytes.iter().filter(|&&b| b == b'\n').count()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!(0),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot read the dead-letter file {} (target.dead_letter)", path.display())
                })
            }
        },
        None => Value::Null,
    };
    let mut status = json!({
        "pipeline": config.pipeline.name,
        "role": "unknown (no daemon answered; read from Postgres)",
        "source_of_status": "postgres",
        "dead_lettered": dead_lettered,
    });
    // Only what applies to the source kind: a slot, or a polled table's backlog.
    match &config.source.mode {
        SourceMode::Replication(_) => status["slot"] = slot,
        SourceMode::Poll(_) => status["outbox_backlog_rows"] = backlog,
        SourceMode::Kafka(_) => {}
    }
    if let Some(migration) = migration {
        status["migration"] = migration;
    }
    Ok(status)
}

/// Two columns, for people: what the daemon (or Postgres) said, in a fixed order.
fn table(status: &Value) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let show = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    };
    for key in [
        "pipeline",
        "source_of_status",
        "role",
        "streaming",
        "ready",
        "not_ready_reason",
        "received_lsn",
        "durable_lsn",
        "confirmed_lsn",
        "apply_lag_bytes",
        "lag_seconds",
        "events",
        "applied",
        "already_applied",
        "retries",
        "dead_lettered",
        "reconnects",
        "outbox_backlog_rows",
    ] {
        if let Some(value) = status.get(key) {
            rows.push((key.replace('_', " "), show(value)));
        }
    }
    match status.get("slot") {
        Some(Value::Object(slot)) if slot.get("exists") == Some(&Value::Bool(false)) => {
            rows.push(("slot".into(), format!("{} (does not exist)", show(&slot["name"]))));
        }
        Some(Value::Object(slot)) => {
            for key in [
                "name",
                "active",
                "active_pid",
                "wal_status",
                "confirmed_flush_lsn",
                "restart_lsn",
                "server_wal_lsn",
                "lag_bytes",
                "retained_wal_bytes",
                "safe_wal_size_bytes",
            ] {
                rows.push((
                    format!("slot {}", key.replace('_', " ")),
                    show(slot.get(key).unwrap_or(&Value::Null)),
                ));
            }
            if slot.get("on_standby") == Some(&Value::Bool(true)) {
                rows.push(("slot server".into(), standby_text(slot)));
            }
            if let Some(Value::Object(failover)) = slot.get("failover") {
                rows.push(("slot failover".into(), failover_text(failover)));
            }
        }
        // A polling source has no slot (nor LSNs).
        _ if status.get("outbox_backlog_rows").is_some_and(|b| !b.is_null())
            || (status.get("source_of_status") != Some(&Value::String("postgres".into()))
                && status.get("received_lsn").is_none()) => {}
        _ => rows.push(("slot".into(), "not inspected yet".into())),
    }
    if let Some(Value::Object(phases)) = status.get("migration") {
        for (table, phase) in phases {
            rows.push((format!("migration {table}"), show(phase)));
        }
    }
    if let Some(Value::Object(verify)) = status.get("verify") {
        let pass = |key: &str| match verify.get(key) {
            Some(Value::Object(pass)) => {
                let wrong: u64 = match pass.get("differences") {
                    Some(Value::Object(tables)) => tables.values().filter_map(Value::as_u64).sum(),
                    _ => 0,
                };
                format!(
                    "{} rows, {wrong} differences, finished {} s ago",
                    show(pass.get("rows").unwrap_or(&Value::Null)),
                    pass.get("finished_at")
                        .and_then(Value::as_u64)
                        .map(|at| {
                            let now = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map(|d| d.as_secs())
                                .unwrap_or(at);
                            now.saturating_sub(at)
                        })
                        .unwrap_or(0)
                )
            }
            _ => "none yet".into(),
        };
        rows.push(("verify last pass".into(), pass("last_pass")));
        rows.push(("verify last full pass".into(), pass("last_full_pass")));
        if let Some(Value::String(error)) = verify.get("last_error") {
            rows.push(("verify last error".into(), error.clone()));
        }
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}

/// Where a slot on a standby stands relative to the primary, in words.
fn standby_text(slot: &serde_json::Map<String, Value>) -> String {
    match (slot.get("primary_wal_lsn"), slot.get("standby_replay_lag_bytes"), slot.get("lag_behind_primary_bytes")) {
        (Some(Value::String(primary)), Some(replay), Some(behind)) => format!(
            "a standby: server wal lsn is its replay position, {replay} bytes behind the primary's {primary}; \
             the slot confirmed {behind} bytes behind the primary"
        ),
        _ => "a standby: server wal lsn is its replay position, behind the primary by its replication lag \
              (set source.heartbeat_connection to the primary to see by how much)"
            .into(),
    }
}

/// A failover slot's state in words.
fn failover_text(failover: &serde_json::Map<String, Value>) -> String {
    if failover.get("failover") != Some(&Value::Bool(true)) {
        return "no (not a failover slot)".into();
    }
    if failover.get("synced") == Some(&Value::Bool(true)) {
        return "yes, synchronised from the primary".into();
    }
    if let Some(Value::String(warning)) = failover.get("warning") {
        return format!("yes, NOT protected: {warning}");
    }
    let standbys: Vec<&str> = match failover.get("standby_slots") {
        Some(Value::Array(slots)) => slots
            .iter()
            .filter_map(|s| s.as_array().and_then(|pair| pair.first()).and_then(Value::as_str))
            .collect(),
        _ => Vec::new(),
    };
    format!("yes, kept in step by {}", standbys.join(", "))
}
