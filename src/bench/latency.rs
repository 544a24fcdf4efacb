//! `sluice bench --latency`: how long a change takes from its commit at the source to durable
//! in the target while a real client (pgbench) commits a steady `--rate` of transactions,
//! read from sluice's own `sluice_apply_latency_seconds` histogram. With `--target kafka` the
//! path is source → Kafka target → an applier (`[source.kafka]`, null target), and the
//! histogram is the applier's: commit at the source to applied behind the topic.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{drop_slots, median, postgres_target, BenchArgs, BenchResult, BenchTarget, BENCH_TABLE};
use crate::localpg::{free_port, ClusterOptions, LocalPostgres};
use crate::metrics::{APPLY_BUCKETS, APPLY_LATENCY_SECONDS as HISTOGRAM};

/// One run's figures.
struct Sample {
    /// Transactions per second pgbench reached.
    tps: f64,
    /// Batches measured.
    count: u64,
    p50: f64,
    p99: f64,
    /// The upper bound of the bucket holding the slowest batch.
    max_bound: f64,
}

pub fn run(args: &BenchArgs) -> BenchResult<()> {
    if !matches!(args.target, BenchTarget::Null | BenchTarget::Postgres | BenchTarget::Kafka) {
        return Err(
            "--latency measures the null or the postgres target, or kafka (through an applier)".into()
        );
    }
    if args.target == BenchTarget::Kafka && args.kafka_brokers.is_none() {
        return Err("--latency --target kafka needs --kafka-brokers".into());
    }
    let pg = LocalPostgres::start(&ClusterOptions { bin: args.pg_bin.clone(), ..ClusterOptions::default() })?;
    println!("Postgres {}", pg.psql("postgres", "SHOW server_version")?);
    println!(
        "sluice bench --latency --target {}: pgbench at {} transactions/s (one upsert each, synchronous_commit on) for {} s, {} runs",
        match args.target {
            BenchTarget::Postgres => "postgres",
            BenchTarget::Kafka => "kafka (3 partitions, then an applier into null)",
            _ => "null",
        },
        args.rate,
        args.seconds,
        args.runs
    );
    println!(
        "{:>6} {:>12} {:>10} {:>10} {:>10} {:>12}",
        "run", "pgbench tps", "batches", "p50 ms", "p99 ms", "max ≤ ms"
    );
    let mut samples = Vec::new();
    for run in 0..args.runs {
        let sample = run_once(&pg, args, run)?;
        println!(
            "{:>6} {:>12.0} {:>10} {:>10.1} {:>10.1} {:>12.0}",
            run + 1,
            sample.tps,
            sample.count,
            sample.p50 * 1e3,
            sample.p99 * 1e3,
            sample.max_bound * 1e3
        );
        samples.push(sample);
    }
    println!(
        "{:>6} {:>12.0} {:>10.0} {:>10.1} {:>10.1} {:>12.0}",
        "median",
        median(&samples, |s| s.tps),
        median(&samples, |s| s.count as f64),
        median(&samples, |s| s.p50 * 1e3),
        median(&samples, |s| s.p99 * 1e3),
        median(&samples, |s| s.max_bound * 1e3)
    );
    let bounds: Vec<String> = APPLY_BUCKETS.iter().map(|b| format!("{}", b * 1e3)).collect();
    println!("(quantiles interpolated within the histogram's buckets, ms: {})", bounds.join(", "));
    Ok(())
}

fn run_once(pg: &LocalPostgres, args: &BenchArgs, run: usize) -> BenchResult<Sample> {
    let db = format!("bench_latency_{run}");
    pg.create_database(&db)?;
    // The benchmark cluster commits asynchronously (fast test set-up); a logical walsender
    // sends only flushed WAL, so an asynchronous commit would wait for the WAL writer
    // (`wal_writer_delay`, 200 ms) before any consumer could see it.
    pg.psql("postgres", &format!("ALTER DATABASE \"{db}\" SET synchronous_commit = on"))?;
    pg.psql(&db, &format!("{BENCH_TABLE}; CREATE PUBLICATION bench_pub FOR TABLE bench;"))?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let target_db = format!("{db}_target");
    let topic = format!("bench.latency.{}.{run}", std::process::id());
    let target = match (args.target, &args.kafka_brokers) {
        (BenchTarget::Postgres, _) => postgres_target(pg, &target_db, dir.path())?,
        (BenchTarget::Kafka, Some(brokers)) => {
            tokio::runtime::Handle::current()
                .block_on(sluice_kafka::create_topics(brokers, &[(&topic, 3)]))?;
            format!(
                "[target]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = {{ \"public.bench\" = \"{topic}\" }}\n"
            )
        }
        _ => "[target]\nkind = \"null\"\n".to_owned(),
    };
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[monitoring]\nlisten = \"127.0.0.1:{port}\"\n[source.connection]\nport = {}\ndbname = \"{db}\"\n\
             [source.replication]\nslot = \"sluice_latency\"\npublication = \"bench_pub\"\n{target}",
            pg.port
        ),
    )?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["run", "-c"])
        .arg(&config)
        .env("SLUICE_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?;
    // Through Kafka: an applier reads the topic, and its histogram is the one measured.
    let applier = match (args.target, &args.kafka_brokers) {
        (BenchTarget::Kafka, Some(brokers)) => {
            let applier_port = free_port()?;
            let applier_config = dir.path().join("applier.toml");
            std::fs::write(
                &applier_config,
                format!(
                    "[monitoring]\nlisten = \"127.0.0.1:{applier_port}\"\n[source.kafka]\nbrokers = \"{brokers}\"\n\
                     topics = [\"{topic}\"]\ngroup_id = \"bench-latency-{}-{run}\"\n[target]\nkind = \"null\"\n",
                    std::process::id()
                ),
            )?;
            let child = Command::new(std::env::current_exe()?)
                .args(["run", "-c"])
                .arg(&applier_config)
                .env("SLUICE_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()?;
            Some((child, applier_port))
        }
        _ => None,
    };
    let result = measure(pg, args, &db, applier.as_ref().map_or(port, |(_, p)| *p), dir.path());
    for pid in std::iter::once(child.id()).chain(applier.as_ref().map(|(c, _)| c.id())) {
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    }
    let _ = child.wait();
    if let Some((mut applier, _)) = applier {
        let _ = applier.wait();
    }
    drop_slots(pg, &db, &["sluice_latency"])?;
    pg.psql("postgres", &format!("DROP DATABASE \"{db}\" WITH (FORCE)"))?;
    if args.target == BenchTarget::Postgres {
        pg.psql("postgres", &format!("DROP DATABASE \"{target_db}\" WITH (FORCE)"))?;
    }
    result
}

fn measure(
    pg: &LocalPostgres,
    args: &BenchArgs,
    db: &str,
    port: u16,
    dir: &std::path::Path,
) -> BenchResult<Sample> {
    // Streaming: the slot is active and the daemon answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let active = pg.psql(
            db,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'sluice_latency' AND active",
        )?;
        // An applier must own its partitions too (it reports none until it joined).
        let ready = match args.target {
            BenchTarget::Kafka => partitions_assigned(port) > 0.0,
            _ => scrape(port).is_some(),
        };
        if active == "1" && ready {
            break;
        }
        if Instant::now() > deadline {
            return Err("sluice did not start streaming within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = buckets(&scrape(port).unwrap_or_default());
    let script = dir.join("upsert.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 100000000)\n\
         INSERT INTO bench (id, name, amount) VALUES (:id, 'name', 1) ON CONFLICT (id) DO UPDATE SET amount = bench.amount + 1;\n",
    )?;
    let out = pg
        .client_command("pgbench")
        .args(["-n", "-c", "4", "-j", "2", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(pg.port.to_string())
        .arg("-R")
        .arg(args.rate.to_string())
        .arg("-T")
        .arg(args.seconds.to_string())
        .arg("-f")
        .arg(&script)
        .arg(db)
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("pgbench failed: {}{}", text, String::from_utf8_lossy(&out.stderr)).into());
    }
    let tps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    // Caught up: the histogram stops growing.
    let mut after = buckets(&scrape(port).unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = buckets(&scrape(port).unwrap_or_default());
        let settled = total(&now) == total(&after);
        after = now;
        if settled || Instant::now() > deadline {
            break;
        }
    }
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|(bound, n)| (*bound, n - before.iter().find(|(b, _)| b == bound).map_or(0, |(_, m)| *m)))
        .collect();
    let count = total(&delta);
    if count == 0 {
        return Err("no batch was measured: is the histogram exported?".into());
    }
    Ok(Sample {
        tps,
        count,
        p50: quantile(&delta, 0.5),
        p99: quantile(&delta, 0.99),
        max_bound: delta.iter().find(|(_, n)| *n == count).map_or(f64::INFINITY, |(b, _)| *b),
    })
}

/// The daemon's `/metrics`, or none while it does not answer.
fn scrape(port: u16) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The partitions the applier with metrics on `port` owns (0 while it does not answer).
pub(super) fn partitions_assigned(port: u16) -> f64 {
    scrape(port)
        .and_then(|metrics| {
            metrics.lines().find_map(|l| {
                l.strip_prefix(crate::metrics::KAFKA_PARTITIONS_ASSIGNED)
                    .filter(|rest| rest.starts_with(['{', ' ']))
                    .and_then(|rest| rest.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
            })
        })
        .unwrap_or(0.0)
}

/// The histogram's cumulative buckets, `(upper bound, count)`, in order (`+Inf` last).
fn buckets(exposition: &str) -> Vec<(f64, u64)> {
    let mut found: Vec<(f64, u64)> = exposition
        .lines()
        .filter(|l| l.starts_with(&format!("{HISTOGRAM}_bucket{{")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            let count = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((bound, count))
        })
        .collect();
    found.sort_by(|a, b| a.0.total_cmp(&b.0));
    found
}

/// All samples: the `+Inf` bucket's count.
fn total(buckets: &[(f64, u64)]) -> u64 {
    buckets.last().map_or(0, |(_, n)| *n)
}

/// The `q` quantile of cumulative `buckets`, interpolated linearly within its bucket (as
/// Prometheus' `histogram_quantile` does); the last finite bound when it falls in `+Inf`.
fn quantile(buckets: &[(f64, u64)], q: f64) -> f64 {
    let rank = q * total(buckets) as f64;
    let mut lower = (0.0, 0u64);
    for &(bound, count) in buckets {
        if count as f64 >= rank {
            if bound.is_infinite() {
                return lower.0;
            }
            let within = (count - lower.1) as f64;
            let fraction = if within == 0.0 { 1.0 } else { (rank - lower.1 as f64) / within };
            return lower.0 + (bound - lower.0) * fraction;
        }
        lower = (bound, count);
    }
    lower.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_cumulative_buckets_like_histogram_quantile() {
        let exposition = "sluice_apply_latency_seconds_bucket{le=\"0.01\",pipeline=\"default\"} 10\n\
             sluice_apply_latency_seconds_bucket{le=\"0.05\",pipeline=\"default\"} 90\n\
             sluice_apply_latency_seconds_bucket{le=\"0.1\",pipeline=\"default\"} 100\n\
             sluice_apply_latency_seconds_bucket{le=\"+Inf\",pipeline=\"default\"} 100\n\
             sluice_apply_latency_seconds_count{pipeline=\"default\"} 100\n";
        let b = buckets(exposition);
        assert_eq!(b.len(), 4);
        assert_eq!(total(&b), 100);
        // The 50th of 100 lies halfway through the second bucket (10 → 90 over 0.01 → 0.05).
        assert!((quantile(&b, 0.5) - 0.03).abs() < 1e-9, "{}", quantile(&b, 0.5));
        assert!((quantile(&b, 0.99) - 0.095).abs() < 1e-9, "{}", quantile(&b, 0.99));
        assert!((quantile(&b, 0.05) - 0.005).abs() < 1e-9);
        // Past the last finite bound: that bound.
        let open = [(0.01, 1), (f64::INFINITY, 4)];
        assert_eq!(quantile(&open, 0.99), 0.01);
    }
}
