//! `sluice bench --appliers 1,2,4`: the apply side scaled out through a consumer group. The
//! rows go once through sluice's Kafka target into a topic with a partition per applier (of
//! the largest count); then, for each count, that many `sluice run` processes of one fresh
//! consumer group apply the topic into a fresh table of the DynamoDB-API server. The baseline,
//! measured in the same run on the same server, is a plain client's unconditional
//! BatchWriteItem of the same items.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{batch_write_baseline, drop_slots, median, BenchArgs, BenchResult};
use crate::localpg::{ClusterOptions, LocalPostgres};

/// One applier count's figures in one run.
struct Sample {
    appliers: usize,
    baseline: f64,
    /// Items/s from the processes' start to the group's last commit.
    overall: f64,
    /// Items/s from the group's first commit to its last (joining and fencing left out).
    steady: f64,
    /// Seconds from the start to the group's first commit.
    first_commit_s: f64,
}

pub async fn run(args: &BenchArgs) -> BenchResult<()> {
    let endpoint = args.dynamodb_endpoint.clone().ok_or("--appliers needs --dynamodb-endpoint")?;
    let brokers = args.kafka_brokers.clone().ok_or("--appliers needs --kafka-brokers")?;
    if args.appliers.contains(&0) {
        return Err("--appliers: every count must be at least 1".into());
    }
    let partitions = args.appliers.iter().copied().max().unwrap_or(1) as i32;
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(&ClusterOptions::default())).await??;
    let client =
        sluice_dynamodb::DynamoClient::connect(&sluice_dynamodb::ClientOptions::local(&endpoint)).await;
    let pid = std::process::id();
    let topic = format!("bench.appliers.{pid}");
    sluice_kafka::create_topics(&brokers, &[(&topic, partitions)]).await?;
    println!(
        "sluice bench --appliers {}: {} rows through sluice's Kafka target into {partitions} partitions, then applied \
         by consumer groups into DynamoDB (write_mode {}, concurrency {} per applier), {} runs",
        args.appliers.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        args.rows,
        args.write_mode,
        args.concurrency,
        args.runs
    );
    let dir = tempfile::tempdir()?;
    tokio::task::block_in_place(|| fill(&pg, args, &brokers, &topic, dir.path()))?;

    println!(
        "{:>4} {:>9} {:>18} {:>17} {:>7} {:>16} {:>7} {:>14}",
        "run",
        "appliers",
        "BatchWriteItem/s",
        "overall items/s",
        "ratio",
        "steady items/s",
        "ratio",
        "first commit s"
    );
    let mut samples = Vec::new();
    for run in 0..args.runs {
        let base_table = format!("bench_appliers_base_{run}_{pid}");
        client.create_table(&base_table, "pk", None).await?;
        let baseline = batch_write_baseline(&client, &base_table, args.rows, args.concurrency).await?;
        for &appliers in &args.appliers {
            let table = format!("bench_appliers_{run}_{appliers}_{pid}");
            client.create_table(&table, "pk", None).await?;
            let group = format!("bench-appliers-{run}-{appliers}-{pid}");
            let config = applier_config(args, dir.path(), &endpoint, &brokers, &topic, &group, &table)?;
            let (overall, steady, first_commit_s) =
                apply(args, &config, appliers, &brokers, &group, &topic, partitions).await?;
            let sample = Sample { appliers, baseline, overall, steady, first_commit_s };
            println!(
                "{:>4} {:>9} {:>18.0} {:>17.0} {:>7.3} {:>16.0} {:>7.3} {:>14.1}",
                run + 1,
                appliers,
                baseline,
                overall,
                overall / baseline,
                steady,
                steady / baseline,
                first_commit_s
            );
            samples.push(sample);
        }
    }
    println!("medians:");
    for &appliers in &args.appliers {
        let of: Vec<&Sample> = samples.iter().filter(|s| s.appliers == appliers).collect();
        println!(
            "{:>4} {:>9} {:>18.0} {:>17.0} {:>7.3} {:>16.0} {:>7.3} {:>14.1}",
            "",
            appliers,
            median(&of, |s| s.baseline),
            median(&of, |s| s.overall),
            median(&of, |s| s.overall / s.baseline),
            median(&of, |s| s.steady),
            median(&of, |s| s.steady / s.baseline),
            median(&of, |s| s.first_commit_s)
        );
    }
    println!(
        "(a group's progress is read from its committed offsets, which the appliers commit every 200 ms once durable)"
    );
    Ok(())
}

/// Loads `--rows` rows and streams them once with `sluice run --until-lsn` into `topic`.
fn fill(
    pg: &LocalPostgres,
    args: &BenchArgs,
    brokers: &str,
    topic: &str,
    dir: &std::path::Path,
) -> BenchResult<()> {
    let db = "bench_appliers";
    pg.create_database(db)?;
    pg.psql(db, "CREATE TABLE bench (id bigint PRIMARY KEY, name text NOT NULL, amount numeric NOT NULL); CREATE PUBLICATION bench_pub FOR TABLE bench;")?;
    pg.psql(db, "SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')")?;
    pg.psql(
        db,
        &format!(
            "DO $$ BEGIN FOR t IN 0..{last} LOOP \
               INSERT INTO bench SELECT g, 'name-' || g, g * 1.5 FROM generate_series(t * {tx} + 1, LEAST((t + 1) * {tx}, {rows})) g; \
               COMMIT; END LOOP; END $$",
            last = args.rows.div_ceil(args.tx_rows) - 1,
            tx = args.tx_rows,
            rows = args.rows
        ),
    )?;
    let end = pg.psql(db, "SELECT pg_current_wal_insert_lsn()")?;
    let config = dir.join("forward.toml");
    std::fs::write(
        &config,
        format!(
            "[monitoring]\nlisten = \"\"\n[source.connection]\nport = {}\ndbname = \"{db}\"\n[source.replication]\nslot = \"sluice\"\n\
             publication = \"bench_pub\"\ncreate_slot = false\n[target]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\n\
             topics = {{ \"public.bench\" = \"{topic}\" }}\n",
            pg.port
        ),
    )?;
    let started = Instant::now();
    let status = Command::new(std::env::current_exe()?)
        .args(["run", "-c"])
        .arg(&config)
        .args(["--until-lsn", &end])
        .env("SLUICE_LOG", "warn")
        .stdin(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("filling the topic with sluice run failed: {status}").into());
    }
    println!("filled {topic}: {} records in {:.1} s", args.rows, started.elapsed().as_secs_f64());
    drop_slots(pg, db, &["sluice"])?;
    Ok(())
}

/// The appliers' configuration file.
fn applier_config(
    args: &BenchArgs,
    dir: &std::path::Path,
    endpoint: &str,
    brokers: &str,
    topic: &str,
    group: &str,
    table: &str,
) -> BenchResult<std::path::PathBuf> {
    let mapping = dir.join(format!("{table}.mapping.toml"));
    std::fs::write(
        &mapping,
        format!(
            "[[tables]]\nsource = \"public.bench\"\ntarget = \"{table}\"\npartition_key = {{ attribute = \"pk\", template = \"ROW#{{id}}\" }}\n"
        ),
    )?;
    let config = dir.join(format!("{table}.toml"));
    std::fs::write(
        &config,
        format!(
            "[monitoring]\nlisten = \"\"\n[source.kafka]\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\n\
             commit_interval = \"200ms\"\n[target]\nkind = \"dynamodb\"\nmapping = \"{}\"\nendpoint_url = \"{endpoint}\"\n\
             region = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nconcurrency = {}\nwrite_mode = \"{}\"\n",
            mapping.display(),
            args.concurrency,
            args.write_mode
        ),
    )?;
    Ok(config)
}

/// Starts `appliers` members on `config` and waits for the group to commit every record:
/// (overall items/s, steady items/s, seconds to the first commit).
async fn apply(
    args: &BenchArgs,
    config: &std::path::Path,
    appliers: usize,
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BenchResult<(f64, f64, f64)> {
    let started = Instant::now();
    let mut members: Vec<Child> = Vec::new();
    for _ in 0..appliers {
        members.push(
            Command::new(std::env::current_exe()?)
                .args(["run", "-c"])
                .arg(config)
                .env("SLUICE_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()?,
        );
    }
    let rows = args.rows as i64;
    let mut first: Option<(Instant, i64)> = None;
    let outcome = loop {
        let (brokers, group, topic) = (brokers.to_owned(), group.to_owned(), topic.to_owned());
        let done = tokio::task::spawn_blocking(move || {
            sluice_kafka::committed_total(&brokers, &group, &topic, partitions)
        })
        .await??;
        let now = Instant::now();
        if done > 0 && first.is_none() {
            first = Some((now, done));
        }
        if done >= rows {
            let (first_at, first_done) = first.unwrap_or((now, done));
            let steady_s = now.duration_since(first_at).as_secs_f64();
            break Ok((
                rows as f64 / now.duration_since(started).as_secs_f64(),
                if steady_s > 0.0 { (rows - first_done) as f64 / steady_s } else { f64::NAN },
                first_at.duration_since(started).as_secs_f64(),
            ));
        }
        if let Some(exited) = members.iter_mut().find_map(|m| m.try_wait().ok().flatten()) {
            break Err(format!("an applier exited early: {exited}").into());
        }
        if started.elapsed() > Duration::from_secs(900) {
            break Err(format!("the group committed {done} of {rows} records within 900 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for member in &mut members {
        let _ = Command::new("kill").arg("-TERM").arg(member.id().to_string()).status();
    }
    for member in &mut members {
        let _ = member.wait();
    }
    outcome
}
