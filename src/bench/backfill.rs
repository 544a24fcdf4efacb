//! `sluice bench --backfill`: the backfill's read rate against `COPY (SELECT …) TO STDOUT` of
//! the same table in the same run, and, with `--dynamodb-endpoint`, verify's rate over the
//! backfilled DynamoDB table.
//!
//! Each run: the baseline copies the table to /dev/null through psql; then a `sluice run`
//! streams to the null target and serves one backfill request of the whole table, timed by
//! the progress table itself (`finished_at - started_at`, so process start-up and polling do
//! not count). The order alternates between runs. The table is loaded once.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{median, peak_rss_kib, BenchArgs, BenchResult};
use crate::localpg::{ClusterOptions, LocalPostgres};

const DB: &str = "bench_backfill";

pub async fn run(args: BenchArgs) -> BenchResult<()> {
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(&ClusterOptions::default())).await??;
    let sluice = std::env::current_exe()?;
    println!(
        "sluice bench --backfill: {} rows (id bigint, name text, amount numeric), chunk_size {}, table_concurrency {}, {} runs",
        args.rows,
        args.chunk_size,
        args.table_concurrency.unwrap_or_else(|| crate::config::BackfillConfig::default().readers_per_table()),
        args.runs
    );
    pg.create_database(DB)?;
    pg.psql(
        DB,
        &format!(
            "{}; CREATE PUBLICATION bench_pub FOR TABLE bench;
             INSERT INTO bench SELECT g, 'name-' || g, g * 1.5 FROM generate_series(1, {}) g;",
            super::BENCH_TABLE,
            args.rows
        ),
    )?;
    pg.psql(DB, "VACUUM ANALYZE bench")?;
    pg.psql(DB, "CHECKPOINT")?;
    println!(
        "{:>4} {:>16} {:>16} {:>7} {:>14} {:>16} {:>18} {:>22}",
        "run",
        "COPY rows/s",
        "backfill rows/s",
        "ratio",
        "peak RSS MiB",
        "sluice CPU s/1M",
        "COPY server s/1M",
        "backfill server s/1M"
    );
    let mut samples: Vec<(Copied, Backfilled)> = Vec::new();
    for run in 0..args.runs {
        let (copy, backfilled) = if run % 2 == 0 {
            let copy = copy_rate(&pg, args.rows)?;
            (copy, backfill_rate(&pg, &sluice, &args, run, None).await?)
        } else {
            let backfill = backfill_rate(&pg, &sluice, &args, run, None).await?;
            (copy_rate(&pg, args.rows)?, backfill)
        };
        println!(
            "{:>4} {:>16.0} {:>16.0} {:>7.3} {:>14.1} {:>16.2} {:>18.2} {:>22.2}",
            run + 1,
            copy.rate,
            backfilled.rate,
            backfilled.rate / copy.rate,
            backfilled.peak_rss_kib as f64 / 1024.0,
            backfilled.cpu_per_million,
            copy.server_cpu_per_million,
            backfilled.server_cpu_per_million
        );
        samples.push((copy, backfilled));
    }
    println!(
        "median {:>14.0} {:>16.0} {:>7.3} {:>14.1} {:>16.2} {:>18.2} {:>22.2}",
        median(&samples, |s| s.0.rate),
        median(&samples, |s| s.1.rate),
        median(&samples, |s| s.1.rate / s.0.rate),
        median(&samples, |s| s.1.peak_rss_kib as f64 / 1024.0),
        median(&samples, |s| s.1.cpu_per_million),
        median(&samples, |s| s.0.server_cpu_per_million),
        median(&samples, |s| s.1.server_cpu_per_million)
    );
    if let Some(endpoint) = &args.dynamodb_endpoint {
        verify_rate(&pg, &sluice, &args, endpoint).await?;
    } else if args.target == super::BenchTarget::Postgres {
        verify_rate_postgres(&pg, &sluice, &args).await?;
    }
    Ok(())
}

/// The baseline as measured.
struct Copied {
    rate: f64,
    /// The cluster's CPU seconds for it, per 1M rows.
    server_cpu_per_million: f64,
}

/// Rows/s of `COPY (SELECT * FROM bench) TO STDOUT` into /dev/null.
fn copy_rate(pg: &LocalPostgres, rows: u64) -> BenchResult<Copied> {
    let server_before = super::cluster_cpu_seconds(pg).unwrap_or(0.0);
    let started = Instant::now();
    let status = pg
        .client_command("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "-q", "-d", DB, "-p"])
        .arg(pg.port.to_string())
        .args(["-c", "COPY (SELECT * FROM bench ORDER BY id) TO STDOUT"])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("psql COPY failed: {status}").into());
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    let server = super::cluster_cpu_seconds(pg).unwrap_or(0.0) - server_before;
    Ok(Copied { rate, server_cpu_per_million: server * 1e6 / rows as f64 })
}

fn config_text(pg: &LocalPostgres, args: &BenchArgs, slot: &str, target: &str) -> String {
    format!(
        "[monitoring]\nlisten = \"\"\n[source.connection]\nport = {}\ndbname = \"{DB}\"\n\
         [source.replication]\nslot = \"{slot}\"\npublication = \"bench_pub\"\n\
         [backfill]\nchunk_size = {}\npoll_interval = \"100ms\"\n{}{target}",
        pg.port,
        args.chunk_size,
        args.table_concurrency.map_or(String::new(), |n| format!("table_concurrency = {n}\n"))
    )
}

/// One backfill run as measured.
struct Backfilled {
    /// Rows/s, by the progress table's own timestamps.
    rate: f64,
    peak_rss_kib: u64,
    /// sluice's CPU seconds (user + system) from the request to its end, per 1M rows.
    cpu_per_million: f64,
    /// The cluster's CPU seconds (backends, walsender, background processes) over the same
    /// span, per 1M rows.
    server_cpu_per_million: f64,
}

/// Starts `sluice run`, requests a backfill of the whole table, waits for it.
async fn backfill_rate(
    pg: &LocalPostgres,
    sluice: &Path,
    args: &BenchArgs,
    run: usize,
    target: Option<&str>,
) -> BenchResult<Backfilled> {
    let dir = tempfile::tempdir()?;
    let slot = format!("bench_backfill_{run}");
    let config = dir.path().join("bench.toml");
    std::fs::write(&config, config_text(pg, args, &slot, target.unwrap_or("[target]\nkind = \"null\"\n")))?;
    let mut child = Command::new(sluice)
        .args(["run", "-c"])
        .arg(&config)
        .env("SLUICE_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?;
    let sql = sluice_postgres::connect_sql(&pg.connection(DB)).await?;
    // Wait until the slot streams, then request.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sql
        .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active", &[&slot])
        .await?
        .is_none()
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("sluice did not start streaming within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config_parsed = crate::config::Config::load(&config)?;
    crate::backfill::ensure_progress_table(&sql, &config_parsed.backfill).await?;
    let cpu_before = super::cpu_seconds(child.id()).unwrap_or(0.0);
    let server_before = super::cluster_cpu_seconds(pg).unwrap_or(0.0);
    let id = crate::backfill::request(
        &sql,
        &config_parsed.backfill,
        &crate::backfill::Scope::of(&config_parsed).ok_or("the bench pipeline reads a replication slot")?,
        "public.bench",
        None,
    )
    .await?;
    let mut peak = 0;
    let seconds: f64 = loop {
        peak = peak.max(peak_rss_kib(child.id()).unwrap_or(0));
        let row = sql
            .query_one("SELECT state, extract(epoch FROM finished_at - started_at)::float8 FROM sluice_backfill WHERE id = $1", &[&id])
            .await?;
        let state: String = row.get(0);
        match state.as_str() {
            "done" => break row.get(1),
            "failed" => return Err("the backfill failed".into()),
            _ => {}
        }
        if let Some(status) = child.try_wait()? {
            return Err(format!("sluice run exited: {status}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu = super::cpu_seconds(child.id()).unwrap_or(0.0) - cpu_before;
    let server = super::cluster_cpu_seconds(pg).unwrap_or(0.0) - server_before;
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
    let _ = child.wait();
    sql.execute("DELETE FROM sluice_backfill", &[]).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sql.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("slot {slot} still active after 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Backfilled {
        rate: args.rows as f64 / seconds.max(1e-6),
        peak_rss_kib: peak,
        cpu_per_million: cpu * 1e6 / args.rows as f64,
        server_cpu_per_million: server * 1e6 / args.rows as f64,
    })
}

/// Backfills the table into DynamoDB once, then times `sluice verify` over it `runs` times.
async fn verify_rate(pg: &LocalPostgres, sluice: &Path, args: &BenchArgs, endpoint: &str) -> BenchResult<()> {
    let client =
        sluice_dynamodb::DynamoClient::connect(&sluice_dynamodb::ClientOptions::local(endpoint)).await;
    let table = format!("bench_verify_{}", std::process::id());
    client.create_table(&table, "pk", None).await?;
    // Some servers create tables asynchronously: wait until the table answers.
    let probe = sluice_dynamodb::Item::from([("pk".to_string(), sluice_dynamodb::Attr::S("probe".into()))]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get_items(&table, std::slice::from_ref(&probe)).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("DynamoDB table {table} did not become usable within 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dir = tempfile::tempdir()?;
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(&mapping, format!("[[tables]]\nsource = \"public.bench\"\ntarget = \"{table}\"\npartition_key = {{ attribute = \"pk\", template = \"ROW#{{id}}\" }}\n"))?;
    let target = format!(
        "[target]\nkind = \"dynamodb\"\nmapping = \"{}\"\nendpoint_url = \"{endpoint}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nconcurrency = {}\nwrite_mode = \"batch\"\n",
        mapping.display(),
        args.concurrency
    );
    let rate = backfill_rate(pg, sluice, args, 1000, Some(&target)).await?.rate;
    println!("\nbackfill into DynamoDB ({endpoint}, write_mode batch): {rate:.0} rows/s");
    let config = dir.path().join("verify.toml");
    std::fs::write(&config, config_text(pg, args, "bench_verify", &target))?;
    time_verify(sluice, &config, args.runs)
}

/// Backfills the table into a second database of the cluster once (the Postgres target), then
/// times `sluice verify` over it `runs` times.
async fn verify_rate_postgres(pg: &LocalPostgres, sluice: &Path, args: &BenchArgs) -> BenchResult<()> {
    let dir = tempfile::tempdir()?;
    let target = super::postgres_target(pg, &format!("{DB}_target"), dir.path())?;
    let rate = backfill_rate(pg, sluice, args, 1000, Some(&target)).await?.rate;
    println!("\nbackfill into a Postgres target (a second database, same cluster): {rate:.0} rows/s");
    let config = dir.path().join("verify.toml");
    std::fs::write(&config, config_text(pg, args, "bench_verify", &target))?;
    time_verify(sluice, &config, args.runs)
}

/// Runs `sluice verify` `runs` times and prints its rates and their median.
fn time_verify(sluice: &Path, config: &Path, runs: usize) -> BenchResult<()> {
    println!("{:>4} {:>16}", "run", "verify rows/s");
    let mut rates = Vec::new();
    for run in 0..runs {
        let out = Command::new(sluice)
            .args(["verify", "--json", "--chunk-size", "1000", "-c"])
            .arg(config)
            .env("SLUICE_LOG", "warn")
            .output()?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("verify output: {e}: {}", String::from_utf8_lossy(&out.stderr)))?;
        let rate = report["rows_per_second"].as_f64().unwrap_or(0.0);
        let differences: u64 = report["tables"]
            .as_array()
            .map(|t| {
                t.iter()
                    .map(|t| {
                        t["missing"].as_u64().unwrap_or(0)
                            + t["different"].as_u64().unwrap_or(0)
                            + t["extra"].as_u64().unwrap_or(0)
                    })
                    .sum()
            })
            .unwrap_or(0);
        println!("{:>4} {:>16.0}   ({differences} differences)", run + 1, rate);
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!("median {:>14.0}", rates[rates.len() / 2]);
    Ok(())
}
