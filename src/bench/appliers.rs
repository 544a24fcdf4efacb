//! `sluice bench --appliers 1,2,4`: the apply side scaled out through a consumer group. For
//! each count, that many `sluice run` processes of one fresh consumer group join on a fresh
//! topic (a partition per applier of the largest count) and share its partitions; then the
//! rows go through sluice's Kafka target into the topic, and the appliers apply them into a
//! fresh table of the DynamoDB-API server. The time runs from the start of that fill to the
//! group's commit of the last record, so group formation is left out. The baseline, measured
//! in the same run on the same server, is a plain client's unconditional BatchWriteItem of the
//! same items.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{batch_write_baseline, drop_slots, median, BenchArgs, BenchResult};
use crate::localpg::{ClusterOptions, LocalPostgres};

/// One applier count's figures in one run.
struct Sample {
    appliers: usize,
    baseline: f64,
    /// Items/s from the start of the fill to the group's last commit.
    overall: f64,
    /// Items/s from the group's first commit to its last.
    steady: f64,
    /// Seconds from the start of the fill to the group's first commit.
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
    println!(
        "sluice bench --appliers {}: {} rows per run, through sluice's Kafka target into {partitions} partitions while the \
         group's members are in place, applied into DynamoDB (write_mode {}, concurrency {} per applier), {} runs",
        args.appliers.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        args.rows,
        args.write_mode,
        args.concurrency,
        args.runs
    );
    let dir = tempfile::tempdir()?;
    println!(
        "{:>4} {:>9} {:>18} {:>14} {:>7} {:>16} {:>7} {:>14}",
        "run",
        "appliers",
        "BatchWriteItem/s",
        "items/s",
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
            let topic = format!("bench.appliers.{run}.{appliers}.{pid}");
            sluice_kafka::create_topics(&brokers, &[(&topic, partitions)]).await?;
            let configs: Vec<_> = (0..appliers)
                .map(|member| {
                    applier_config(args, dir.path(), &endpoint, &brokers, &topic, &group, &table, member)
                })
                .collect::<BenchResult<_>>()?;
            let db = format!("bench_appliers_{run}_{appliers}");
            let (overall, steady, first_commit_s) =
                apply(&pg, args, &configs, &db, &brokers, &group, &topic, partitions, dir.path()).await?;
            let sample = Sample { appliers, baseline, overall, steady, first_commit_s };
            println!(
                "{:>4} {:>9} {:>18.0} {:>14.0} {:>7.3} {:>16.0} {:>7.3} {:>14.1}",
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
            "{:>4} {:>9} {:>18.0} {:>14.0} {:>7.3} {:>16.0} {:>7.3} {:>14.1}",
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

/// Loads `--rows` rows into database `db` and streams them once with `sluice run
/// --until-lsn` into `topic`.
fn fill(
    pg: &LocalPostgres,
    args: &BenchArgs,
    db: &str,
    brokers: &str,
    topic: &str,
    dir: &std::path::Path,
) -> BenchResult<()> {
    pg.create_database(db)?;
    pg.psql(db, "CREATE TABLE bench (id bigint PRIMARY KEY, name text NOT NULL, amount numeric NOT NULL); CREATE PUBLICATION bench_pub FOR TABLE bench;")?;
    pg.psql(db, "SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')")?;
    let end = super::load_rows(pg, db, args, 0)?;
    let config = dir.join(format!("{db}.forward.toml"));
    std::fs::write(
        &config,
        format!(
            "[monitoring]\nlisten = \"\"\n[source.connection]\nport = {}\ndbname = \"{db}\"\n[source.replication]\nslot = \"sluice\"\n\
             publication = \"bench_pub\"\ncreate_slot = false\n[target]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\n\
             topics = {{ \"public.bench\" = \"{topic}\" }}\n",
            pg.port
        ),
    )?;
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
    drop_slots(pg, db, &["sluice"])?;
    pg.psql("postgres", &format!("DROP DATABASE \"{db}\" WITH (FORCE)"))?;
    Ok(())
}

/// Member `member`'s configuration file and its metrics port.
#[allow(clippy::too_many_arguments)]
fn applier_config(
    args: &BenchArgs,
    dir: &std::path::Path,
    endpoint: &str,
    brokers: &str,
    topic: &str,
    group: &str,
    table: &str,
    member: usize,
) -> BenchResult<(std::path::PathBuf, u16)> {
    let port = crate::localpg::free_port()?;
    let mapping = dir.join(format!("{table}.mapping.toml"));
    std::fs::write(
        &mapping,
        format!(
            "[[tables]]\nsource = \"public.bench\"\ntarget = \"{table}\"\npartition_key = {{ attribute = \"pk\", template = \"ROW#{{id}}\" }}\n"
        ),
    )?;
    let config = dir.join(format!("{table}.{member}.toml"));
    std::fs::write(
        &config,
        format!(
            "[monitoring]\nlisten = \"127.0.0.1:{port}\"\n[source.kafka]\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\n\
             commit_interval = \"200ms\"\n[target]\nkind = \"dynamodb\"\nmapping = \"{}\"\nendpoint_url = \"{endpoint}\"\n\
             region = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nconcurrency = {}\nwrite_mode = \"{}\"\n",
            mapping.display(),
            args.concurrency,
            args.write_mode
        ),
    )?;
    Ok((config, port))
}

/// Starts the members (`configs`), waits until they share the topic's partitions, fills the
/// topic and waits for the group to commit every record: (items/s, steady items/s, seconds to
/// the first commit), all from the start of the fill.
#[allow(clippy::too_many_arguments)]
async fn apply(
    pg: &LocalPostgres,
    args: &BenchArgs,
    configs: &[(std::path::PathBuf, u16)],
    db: &str,
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    dir: &std::path::Path,
) -> BenchResult<(f64, f64, f64)> {
    let mut members: Vec<Child> = Vec::new();
    let outcome = async {
        // One at a time, each once the group has settled with it: members joining at once
        // make brokers rebalance over and over (tansu 0.6 more than Kafka).
        for (joined, (config, _)) in configs.iter().enumerate() {
            members.push(
                Command::new(std::env::current_exe()?)
                    .args(["run", "-c"])
                    .arg(config)
                    .env("SLUICE_LOG", "warn")
                    .stdin(Stdio::null())
                    .spawn()?,
            );
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let owned: Vec<f64> = configs[..=joined]
                    .iter()
                    .map(|(_, port)| super::latency::partitions_assigned(*port))
                    .collect();
                if owned.iter().all(|n| *n >= 1.0) && owned.iter().sum::<f64>() == f64::from(partitions) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(
                        format!("{} appliers did not share the partitions within 120 s", joined + 1).into()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let started = Instant::now();
        tokio::task::block_in_place(|| fill(pg, args, db, brokers, topic, dir))?;
        let rows = args.rows as i64;
        let mut first: Option<(Instant, i64)> = None;
        loop {
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
                return Ok((
                    rows as f64 / now.duration_since(started).as_secs_f64(),
                    if steady_s > 0.0 { (rows - first_done) as f64 / steady_s } else { f64::NAN },
                    first_at.duration_since(started).as_secs_f64(),
                ));
            }
            if let Some(exited) = members.iter_mut().find_map(|m| m.try_wait().ok().flatten()) {
                return Err(format!("an applier exited early: {exited}").into());
            }
            if started.elapsed() > Duration::from_secs(900) {
                return Err(format!("the group committed {done} of {rows} records within 900 s").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    .await;
    for member in &mut members {
        let _ = Command::new("kill").arg("-TERM").arg(member.id().to_string()).status();
    }
    for member in &mut members {
        let _ = member.wait();
    }
    outcome
}
