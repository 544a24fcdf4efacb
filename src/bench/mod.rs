//! `sluice bench`: the stream benchmark. For each shape — many transactions of `--tx-rows` rows,
//! and one transaction of all rows — it loads `--rows` rows into a fresh database of a throwaway
//! cluster with two identical slots, then drains one with `pg_recvlogical` (the baseline) and the
//! other with `sluice run` to the null target, in alternating order, `--runs` times. It prints
//! rows/s for both, their ratio and sluice's peak RSS, and the medians.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::localpg::{ClusterOptions, LocalPostgres};

mod appliers;
mod backfill;
mod cutover;
mod latency;
mod way_back;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The median of `f` over the samples (the upper one of an even count).
fn median<T>(samples: &[T], f: impl Fn(&T) -> f64) -> f64 {
    let mut values: Vec<f64> = samples.iter().map(f).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `sluice bench`'s arguments (see the README's Benchmark section).
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// The `bin` directory of the Postgres server to benchmark against (e.g. one that
    /// `bash .ci/setup pg 17` installed); the system's Postgres by default.
    #[arg(long)]
    pub pg_bin: Option<std::path::PathBuf>,
    /// Rows per shape and run.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Rows per transaction in the many-transactions shape.
    #[arg(long, default_value_t = 1_000)]
    pub tx_rows: u64,
    /// Runs per shape; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Which shapes to run.
    #[arg(long, value_enum, default_value_t = Shape::Both)]
    pub shape: Shape,
    /// pgoutput protocol version for both consumers.
    #[arg(long, default_value_t = 1)]
    pub proto_version: u8,
    /// Streaming of in-progress transactions (sluice spills them locally): `--streaming` or
    /// `--streaming on` (protocol 2+), `--streaming parallel` (protocol 4, PG 16+).
    #[arg(long, value_enum, num_args = 0..=1, default_value_t = BenchStreaming::Off, default_missing_value = "on")]
    pub streaming: BenchStreaming,
    /// pgoutput's binary value format for both consumers.
    #[arg(long)]
    pub binary: bool,
    /// Both consumers connect over the server's Unix-domain socket instead of TCP.
    #[arg(long)]
    pub unix: bool,
    /// `null`: the stream against pg_recvlogical. `kafka`: outbox events (the rows, routed by
    /// the outbox event router) produced to `--kafka-brokers`, against pg_recvlogical draining
    /// the same WAL. `dynamodb`: the DynamoDB target against a plain client's BatchWriteItem
    /// into the same server (`--dynamodb-endpoint`). `postgres`: the Postgres target writing
    /// the rows into a second database of the same cluster, against pg_recvlogical.
    #[arg(long, value_enum, default_value_t = BenchTarget::Null)]
    pub target: BenchTarget,
    /// The Kafka brokers for `--target kafka` (the topic `outbox.event.Order` is created).
    #[arg(long)]
    pub kafka_brokers: Option<String>,
    /// The DynamoDB-API server for `--target dynamodb` (credentials "test"/"test").
    #[arg(long)]
    pub dynamodb_endpoint: Option<String>,
    /// Concurrent writers for `--target dynamodb`, for sluice and for the baseline alike.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// The DynamoDB target's `write_mode`: `single`, `transaction` or `batch`.
    #[arg(long, default_value = "single")]
    pub write_mode: String,
    /// Start the consumer first and load the rows while it streams (a live stream, as in
    /// production), instead of draining a backlog loaded before it started: `--target
    /// dynamodb`, and the `null` target's many-transaction shape, where each consumer in turn
    /// (pg_recvlogical, sluice) streams its own load and is timed until its walsender has sent
    /// all of it.
    #[arg(long)]
    pub live: bool,
    /// `--target kafka`: where sluice reads the outbox rows. `wal`: logical replication.
    /// `poll`: the polling source drains the table (read, produce, delete), timed until the
    /// table is empty; the baseline stays pg_recvlogical on the same rows' WAL.
    #[arg(long, value_enum, default_value_t = BenchSource::Wal)]
    pub source: BenchSource,
    /// `--source poll`: rows per poll.
    #[arg(long, default_value_t = 1000)]
    pub poll_batch_size: usize,
    /// Benchmark the backfill instead of the stream: its read rate against `COPY (SELECT …)
    /// TO STDOUT` of the same table, and with `--dynamodb-endpoint` verify's rate too.
    #[arg(long)]
    pub backfill: bool,
    /// `--backfill`: rows per chunk.
    #[arg(long, default_value_t = 20_000)]
    pub chunk_size: usize,
    /// `--backfill`: readers of the table at once (`backfill.table_concurrency`); the
    /// default's (the machine's cores, at most 4) when not given.
    #[arg(long)]
    pub table_concurrency: Option<usize>,
    /// Benchmark a table's cut-over instead: the time from `sluice cutover` to `reversed`
    /// with the application writing, its write unavailability, and the way back's rows/s
    /// against the forward stream's on the same data (both directions Postgres).
    #[arg(long, conflicts_with = "backfill")]
    pub cutover: bool,
    /// `--cutover`, `--way-back`: the application's writes per second.
    #[arg(long, default_value_t = 200)]
    pub writes_per_second: u64,
    /// Benchmark the way back from DynamoDB instead (`--dynamodb-endpoint`, a server with
    /// DynamoDB Streams): its rows/s into Postgres against a plain client reading the same
    /// stream, and the lag from an application's write to its row at `--writes-per-second`.
    #[arg(long, conflicts_with_all = ["backfill", "cutover"])]
    pub way_back: bool,
    /// `--way-back`: how long the application writes at its steady rate for the lag.
    #[arg(long, default_value_t = 20)]
    pub lag_seconds: u64,
    /// Measure commit → durable latency instead: pgbench commits `--rate` transactions/s for
    /// `--seconds` while sluice streams into `--target` (null, postgres, or kafka: through an applier
    /// into null); p50 and p99 from sluice's `sluice_apply_latency_seconds` histogram.
    #[arg(long, conflicts_with_all = ["backfill", "cutover", "way_back"])]
    pub latency: bool,
    /// Benchmark appliers instead (README "Appliers"): for each count given (`--appliers
    /// 1,2,4`), that many `sluice run` processes of one consumer group join on a topic of one
    /// partition per applier of the largest count; then the rows go through sluice's Kafka
    /// target into it, and the group applies them into `--dynamodb-endpoint`. Their items/s
    /// against a plain client's BatchWriteItem rate on the same server. Needs
    /// `--kafka-brokers`.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["backfill", "cutover", "way_back", "latency"])]
    pub appliers: Vec<usize>,
    /// `--latency`: transactions per second pgbench commits.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// `--latency`: how long pgbench runs, seconds.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
/// Where sluice reads the outbox rows (`--source`).
pub enum BenchSource {
    /// Logical replication.
    Wal,
    /// The polling source.
    Poll,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
/// Where sluice writes (`--target`).
pub enum BenchTarget {
    /// Nowhere: the decoder and pipeline alone.
    Null,
    /// A Kafka broker (`--kafka-brokers`).
    Kafka,
    /// A DynamoDB-API server (`--dynamodb-endpoint`).
    Dynamodb,
    /// A second database of the same cluster.
    Postgres,
}

/// `--streaming`: pgoutput's `streaming` option for both consumers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchStreaming {
    /// Transactions arrive when they commit.
    Off,
    /// In-progress transactions, one at a time.
    On,
    /// In-progress transactions, interleaved (protocol 4).
    Parallel,
}

impl BenchStreaming {
    fn option(self) -> &'static str {
        match self {
            BenchStreaming::Off => "off",
            BenchStreaming::On => "on",
            BenchStreaming::Parallel => "parallel",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
/// How the rows are committed (`--shape`).
pub enum Shape {
    /// Transactions of `--tx-rows` rows.
    Many,
    /// One transaction of all rows.
    One,
    /// Both, one after the other.
    Both,
}

struct Sample {
    baseline_rows_per_s: f64,
    sluice_rows_per_s: f64,
    peak_rss_kib: u64,
    /// sluice's own CPU time (user + system), seconds.
    sluice_cpu_s: f64,
    /// What each consumer cost the server: its walsender's CPU and the TCP segments.
    baseline_cost: ServerCost,
    sluice_cost: ServerCost,
}

impl Sample {
    /// From the baseline's (rows/s, cost) and sluice's (rows/s, peak RSS KiB, CPU s, cost).
    fn new(
        (baseline_rows_per_s, baseline_cost): (f64, ServerCost),
        sluice: (f64, u64, f64, ServerCost),
    ) -> Self {
        let (sluice_rows_per_s, peak_rss_kib, sluice_cpu_s, sluice_cost) = sluice;
        Sample {
            baseline_rows_per_s,
            sluice_rows_per_s,
            peak_rss_kib,
            sluice_cpu_s,
            baseline_cost,
            sluice_cost,
        }
    }
}

/// What one consumer's run cost the server side.
#[derive(Clone, Copy, Debug, Default)]
struct ServerCost {
    /// The walsender backend's CPU time (user + system), seconds.
    walsender_cpu_s: f64,
    /// TCP segments received on this host during the run (`/proc/net/snmp` InSegs: both
    /// directions of a loopback connection, and anything else the host did meanwhile).
    tcp_segments: u64,
}

/// Watches the walsender that serves `slot` of `db` while `child` (its client) runs: its CPU
/// time as last seen, and the host's TCP segments over the run.
struct WalsenderWatch<'a> {
    pg: &'a LocalPostgres,
    db: &'a str,
    slot: &'static str,
    pid: Option<u32>,
    next_look: Instant,
    cost: ServerCost,
    segments_at_start: u64,
}

impl<'a> WalsenderWatch<'a> {
    fn new(pg: &'a LocalPostgres, db: &'a str, slot: &'static str) -> Self {
        WalsenderWatch {
            pg,
            db,
            slot,
            pid: None,
            next_look: Instant::now(),
            cost: ServerCost::default(),
            segments_at_start: tcp_segments_received().unwrap_or(0),
        }
    }

    /// One sample: finds the walsender (every 50 ms until it exists), then reads its CPU time.
    fn sample(&mut self) {
        if self.pid.is_none() && Instant::now() >= self.next_look {
            self.next_look = Instant::now() + Duration::from_millis(50);
            self.pid = self
                .pg
                .psql(
                    self.db,
                    &format!("SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{}'", self.slot),
                )
                .ok()
                .and_then(|pid| pid.trim().parse().ok());
        }
        if let Some(cpu) = self.pid.and_then(cpu_seconds) {
            self.cost.walsender_cpu_s = self.cost.walsender_cpu_s.max(cpu);
        }
    }

    fn finish(mut self) -> ServerCost {
        self.cost.tcp_segments = tcp_segments_received().unwrap_or(0).saturating_sub(self.segments_at_start);
        self.cost
    }
}

/// The host's TCP segments received so far (`/proc/net/snmp`, Tcp InSegs).
fn tcp_segments_received() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let at = names.split_whitespace().position(|n| n == "InSegs")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Runs the benchmark `args` describe and prints its table.
pub async fn run(args: BenchArgs) -> BenchResult<()> {
    if args.backfill {
        return backfill::run(args).await;
    }
    if args.cutover {
        return cutover::run(args).await;
    }
    if args.way_back {
        return way_back::run(args).await;
    }
    if args.latency {
        return tokio::task::spawn_blocking(move || latency::run(&args)).await?;
    }
    if !args.appliers.is_empty() {
        return appliers::run(&args).await;
    }
    match args.target {
        BenchTarget::Null | BenchTarget::Postgres => {
            tokio::task::spawn_blocking(move || run_blocking(&args)).await?
        }
        BenchTarget::Kafka => {
            let brokers = args.kafka_brokers.clone().ok_or("--target kafka needs --kafka-brokers")?;
            sluice_kafka::create_topics(&brokers, &[(KAFKA_TOPIC, 4)]).await?;
            tokio::task::spawn_blocking(move || run_blocking(&args)).await?
        }
        BenchTarget::Dynamodb => run_dynamodb(&args).await,
    }
}

/// The DynamoDB target against a plain BatchWriteItem client, same server, same rows.
async fn run_dynamodb(args: &BenchArgs) -> BenchResult<()> {
    let endpoint = args.dynamodb_endpoint.clone().ok_or("--target dynamodb needs --dynamodb-endpoint")?;
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(&ClusterOptions::default())).await??;
    let client =
        sluice_dynamodb::DynamoClient::connect(&sluice_dynamodb::ClientOptions::local(&endpoint)).await;
    let sluice = std::env::current_exe()?;
    println!(
        "sluice bench --target dynamodb: {} rows per run in transactions of {}, {} runs, concurrency {}, write_mode {}, {}",
        args.rows,
        args.tx_rows,
        args.runs,
        args.concurrency,
        args.write_mode,
        if args.live { "live (rows loaded while sluice streams)" } else { "backlog (rows loaded before sluice starts)" }
    );
    println!(
        "{:>4} {:>18} {:>16} {:>7} {:>14}",
        "run", "BatchWriteItem/s", "sluice items/s", "ratio", "peak RSS MiB"
    );
    let mut ratios = Vec::new();
    for run in 0..args.runs {
        let db = format!("bench_ddb_{run}");
        pg.create_database(&db)?;
        pg.psql(&db, "CREATE TABLE bench (id bigint PRIMARY KEY, name text NOT NULL, amount numeric NOT NULL); CREATE PUBLICATION bench_pub FOR TABLE bench;")?;
        pg.psql(&db, "SELECT pg_create_logical_replication_slot('sluice', 'pgoutput')")?;
        let load = || -> BenchResult<String> {
            let end = load_rows(&pg, &db, args, 0)?;
            pg.psql(&db, "INSERT INTO bench VALUES (0, 'end', 0)")?;
            Ok(end)
        };
        let backlog_end = if args.live { None } else { Some(load()?) };
        pg.psql(&db, "CHECKPOINT")?;
        let (base_table, sluice_table) = (
            format!("bench_base_{run}_{}", std::process::id()),
            format!("bench_sluice_{run}_{}", std::process::id()),
        );
        client.create_table(&base_table, "pk", None).await?;
        client.create_table(&sluice_table, "pk", None).await?;

        let baseline = batch_write_baseline(&client, &base_table, args.rows, args.concurrency).await?;

        let dir = tempfile::tempdir()?;
        let mapping = dir.path().join("mapping.toml");
        std::fs::write(&mapping, format!("[[tables]]\nsource = \"public.bench\"\ntarget = \"{sluice_table}\"\npartition_key = {{ attribute = \"pk\", template = \"ROW#{{id}}\" }}\n"))?;
        let config = dir.path().join("bench.toml");
        std::fs::write(
            &config,
            format!(
                "[monitoring]\nlisten = \"\"\n[source.connection]\nport = {}\ndbname = \"{db}\"\n[source.replication]\nslot = \"sluice\"\npublication = \"bench_pub\"\ncreate_slot = false\n\
                 [target]\nkind = \"dynamodb\"\nmapping = \"{}\"\nendpoint_url = \"{endpoint}\"\nregion = \"us-east-1\"\n\
                 access_key_id = \"test\"\nsecret_access_key = \"test\"\nconcurrency = {}\nwrite_mode = \"{}\"\n",
                pg.port,
                mapping.display(),
                args.concurrency,
                args.write_mode
            ),
        )?;
        let mut command = Command::new(&sluice);
        command.args(["run", "-c"]).arg(&config).stdin(Stdio::null());
        let (started, mut child, end) = match backlog_end {
            Some(end) => {
                let child = command.args(["--until-lsn", &end]).env("SLUICE_LOG", "warn").spawn()?;
                (Instant::now(), child, end)
            }
            None => {
                // Load only once sluice streams, so that every change is new to it.
                let mut child = command
                    .env("SLUICE_LOG", "warn,sluice_postgres::source=info")
                    .stderr(Stdio::piped())
                    .spawn()?;
                let (streaming_tx, streaming_rx) = std::sync::mpsc::channel();
                let stderr = child.stderr.take().ok_or("no stderr")?;
                std::thread::spawn(move || {
                    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok)
                    {
                        if line.contains(" streaming") {
                            let _ = streaming_tx.send(());
                        } else if !line.contains(" INFO ") {
                            eprintln!("{line}");
                        }
                    }
                });
                streaming_rx
                    .recv_timeout(Duration::from_secs(60))
                    .map_err(|_| "sluice did not start streaming within 60 s")?;
                let started = Instant::now();
                let end = load()?;
                (started, child, end)
            }
        };
        let mut peak = 0;
        let status = loop {
            peak = peak.max(peak_rss_kib(child.id()).unwrap_or(0));
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if args.live && pg.psql(&db, &format!("SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots WHERE slot_name = 'sluice'"))? == "t" {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let elapsed = started.elapsed();
        let status = match status {
            Some(status) => status,
            None => {
                Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
                child.wait()?
            }
        };
        if !status.success() {
            return Err(format!("sluice run failed: {status}").into());
        }
        let streamed = (args.rows + 1) as f64 / elapsed.as_secs_f64();
        ratios.push(streamed / baseline);
        println!(
            "{:>4} {:>18.0} {:>16.0} {:>7.3} {:>14.1}",
            run + 1,
            baseline,
            streamed,
            streamed / baseline,
            peak as f64 / 1024.0
        );
        drop_slots(&pg, &db, &["sluice"])?;
        pg.psql("postgres", &format!("DROP DATABASE \"{db}\" WITH (FORCE)"))?;
    }
    ratios.sort_by(f64::total_cmp);
    println!("median ratio {:.3}", ratios[ratios.len() / 2]);
    Ok(())
}

/// Inserts `--rows` rows `(id, 'name-' || id, id * 1.5)` with ids after `offset` into `db`'s
/// bench table, in transactions of `--tx-rows`; the WAL insert position after the last.
fn load_rows(pg: &LocalPostgres, db: &str, args: &BenchArgs, offset: u64) -> BenchResult<String> {
    pg.psql(
        db,
        &format!(
            "DO $$ BEGIN FOR t IN 0..{last} LOOP \
               INSERT INTO bench SELECT g, 'name-' || g, g * 1.5 FROM generate_series({offset} + t * {tx} + 1, {offset} + LEAST((t + 1) * {tx}, {rows})) g; \
               COMMIT; END LOOP; END $$",
            last = args.rows.div_ceil(args.tx_rows) - 1,
            tx = args.tx_rows,
            rows = args.rows
        ),
    )?;
    Ok(pg.psql(db, "SELECT pg_current_wal_insert_lsn()")?)
}

/// The baseline of the DynamoDB benchmarks: the `bench` table's `rows` items as sluice maps
/// them, written by a plain client into `table` with unconditional BatchWriteItem of 25,
/// `concurrency` requests at once. Items per second.
async fn batch_write_baseline(
    client: &sluice_dynamodb::DynamoClient,
    table: &str,
    rows: u64,
    concurrency: usize,
) -> BenchResult<f64> {
    let started = Instant::now();
    let chunks: Vec<Vec<sluice_dynamodb::Item>> = (1..=rows as i64)
        .map(|id| {
            sluice_dynamodb::Item::from([
                ("pk".to_string(), sluice_dynamodb::Attr::S(format!("ROW#{id}"))),
                ("id".to_string(), sluice_dynamodb::Attr::N(id.to_string())),
                ("name".to_string(), sluice_dynamodb::Attr::S(format!("name-{id}"))),
                ("amount".to_string(), sluice_dynamodb::Attr::N(format!("{}", id as f64 * 1.5))),
                ("_version".to_string(), sluice_dynamodb::Attr::N(id.to_string())),
            ])
        })
        .collect::<Vec<_>>()
        .chunks(25)
        .map(<[_]>::to_vec)
        .collect();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut chunks = chunks.into_iter();
    loop {
        while pending.len() < concurrency {
            let Some(chunk) = chunks.next() else { break };
            let (client, table) = (client.clone(), table.to_owned());
            pending.push(async move { client.batch_put(&table, chunk).await });
        }
        match futures_util::StreamExt::next(&mut pending).await {
            Some(result) => result?,
            None => break,
        }
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// The topic the Kafka benchmark's outbox events go to.
const KAFKA_TOPIC: &str = "outbox.event.Order";

fn run_blocking(args: &BenchArgs) -> BenchResult<()> {
    match args.streaming {
        BenchStreaming::On if args.proto_version < 2 => {
            return Err("--streaming needs --proto-version 2 or later".into())
        }
        BenchStreaming::Parallel if args.proto_version < 4 => {
            return Err("--streaming parallel needs --proto-version 4".into())
        }
        _ => {}
    }
    let poll = args.source == BenchSource::Poll;
    if poll && args.target != BenchTarget::Kafka {
        return Err("--source poll needs --target kafka (polled rows are outbox events)".into());
    }
    if args.live && (args.shape != Shape::Many || args.target != BenchTarget::Null || poll) {
        return Err("--live measures the null target with --shape many (and --target dynamodb)".into());
    }
    let pg = LocalPostgres::start(&ClusterOptions { bin: args.pg_bin.clone(), ..ClusterOptions::default() })?;
    println!("Postgres {}", pg.psql("postgres", "SHOW server_version")?);
    let sluice = std::env::current_exe()?;
    let shapes: &[Shape] = match args.shape {
        Shape::Both => &[Shape::Many, Shape::One],
        Shape::Many => &[Shape::Many],
        Shape::One => &[Shape::One],
    };
    println!(
        "sluice bench --target {}{}: {} rows per run, {} runs, proto_version {}{}{}{}",
        match args.target {
            BenchTarget::Kafka => "kafka (outbox events)",
            BenchTarget::Postgres => "postgres (a second database, same cluster)",
            _ => "null",
        },
        if poll { format!(", polling source (batch size {})", args.poll_batch_size) } else { String::new() },
        args.rows,
        args.runs,
        args.proto_version,
        if args.streaming == BenchStreaming::Off {
            String::new()
        } else {
            format!(", streaming {}", args.streaming.option())
        },
        if args.binary { ", binary" } else { "" },
        if args.unix { ", over the Unix-domain socket" } else { ", over TCP (127.0.0.1)" }
    );
    if args.live {
        println!("live: each consumer streams while its rows are inserted, timed until its walsender has sent them");
    }
    for &shape in shapes {
        let label = match shape {
            Shape::Many => {
                format!("{} transactions of {} rows", args.rows.div_ceil(args.tx_rows), args.tx_rows)
            }
            _ => format!("one transaction of {} rows", args.rows),
        };
        println!("\n== {label}");
        // Walsender CPU per 1M changes and TCP segments (thousands) over the run, per consumer.
        println!(
            "{:>6} {:>16} {:>14} {:>7} {:>13} {:>12} {:>20} {:>20}",
            "run",
            "pg_recvlogical/s",
            "sluice rows/s",
            "ratio",
            "peak RSS MiB",
            "sluice CPU s",
            "walsender s/1M r|s",
            "TCP segs k r|s"
        );
        let per_million = |cost: &ServerCost| cost.walsender_cpu_s * 1e6 / (args.rows as f64 + 1.0);
        let mut samples = Vec::new();
        for run in 0..args.runs {
            let sample = if args.live {
                run_once_live(&pg, &sluice, args, run)?
            } else {
                run_once(&pg, &sluice, args, shape, run)?
            };
            println!(
                "{:>6} {:>16.0} {:>14.0} {:>7.3} {:>13.1} {:>12.2} {:>20} {:>20}",
                run + 1,
                sample.baseline_rows_per_s,
                sample.sluice_rows_per_s,
                sample.sluice_rows_per_s / sample.baseline_rows_per_s,
                sample.peak_rss_kib as f64 / 1024.0,
                sample.sluice_cpu_s,
                format!("{:.2}|{:.2}", per_million(&sample.baseline_cost), per_million(&sample.sluice_cost)),
                format!(
                    "{:.0}|{:.0}",
                    sample.baseline_cost.tcp_segments as f64 / 1e3,
                    sample.sluice_cost.tcp_segments as f64 / 1e3
                ),
            );
            samples.push(sample);
        }
        println!(
            "{:>6} {:>16.0} {:>14.0} {:>7.3} {:>13.1} {:>12.2} {:>20} {:>20}",
            "median",
            median(&samples, |s| s.baseline_rows_per_s),
            median(&samples, |s| s.sluice_rows_per_s),
            median(&samples, |s| s.sluice_rows_per_s / s.baseline_rows_per_s),
            median(&samples, |s| s.peak_rss_kib as f64 / 1024.0),
            median(&samples, |s| s.sluice_cpu_s),
            format!(
                "{:.2}|{:.2}",
                median(&samples, |s| per_million(&s.baseline_cost)),
                median(&samples, |s| per_million(&s.sluice_cost))
            ),
            format!(
                "{:.0}|{:.0}",
                median(&samples, |s| s.baseline_cost.tcp_segments as f64 / 1e3),
                median(&samples, |s| s.sluice_cost.tcp_segments as f64 / 1e3)
            ),
        );
    }
    Ok(())
}

fn run_once(
    pg: &LocalPostgres,
    sluice: &Path,
    args: &BenchArgs,
    shape: Shape,
    run: usize,
) -> BenchResult<Sample> {
    let db = format!("bench_{}_{run}", if shape == Shape::Many { "many" } else { "one" });
    pg.create_database(&db)?;
    let kafka = args.target == BenchTarget::Kafka;
    // For Kafka the table is an outbox: each row is one event for one of 1000 aggregates.
    let (table, columns) = if kafka {
        (
            "CREATE TABLE bench (id bigint PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload jsonb)",
            "g, 'Order', 'order-' || (g % 1000), 'Step', jsonb_build_object('n', g, 'name', 'name-' || g)",
        )
    } else {
        (BENCH_TABLE, "g, 'name-' || g, g * 1.5")
    };
    pg.psql(&db, &format!("{table}; CREATE PUBLICATION bench_pub FOR TABLE bench;"))?;
    for slot in ["baseline", "sluice"] {
        pg.psql(&db, &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"))?;
    }
    let rows = args.rows;
    let load = match shape {
        Shape::Many => format!(
            "DO $$ BEGIN FOR t IN 0..{last} LOOP \
               INSERT INTO bench SELECT {columns} FROM generate_series(t * {tx} + 1, LEAST((t + 1) * {tx}, {rows})) g; \
               COMMIT; END LOOP; END $$",
            last = rows.div_ceil(args.tx_rows) - 1,
            tx = args.tx_rows
        ),
        _ => format!("INSERT INTO bench SELECT {columns} FROM generate_series(1, {rows}) g"),
    };
    pg.psql(&db, &load)?;
    // A marker transaction after `end`: both consumers stop once they have passed it.
    let end = pg.psql(&db, "SELECT pg_current_wal_insert_lsn()")?;
    pg.psql(&db, &format!("INSERT INTO bench SELECT {} FROM (VALUES (0)) v(g)", columns))?;
    // Flush WAL and dirty pages now, so that neither consumer pays for it.
    pg.psql(&db, "CHECKPOINT")?;
    let total_rows = rows as f64 + 1.0;
    // The Postgres target writes into a database of its own, made for each run.
    let target_db = format!("{db}_target");

    let baseline = || -> BenchResult<(f64, ServerCost)> {
        let mut cmd = recvlogical(pg, args, &db, "baseline");
        cmd.arg(format!("--endpos={end}"));
        let mut watch = WalsenderWatch::new(pg, &db, "baseline");
        let started = Instant::now();
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).spawn()?;
        let status = loop {
            watch.sample();
            if let Some(status) = child.try_wait()? {
                break status;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = started.elapsed().as_secs_f64();
        if !status.success() {
            return Err(format!("pg_recvlogical failed: {status}").into());
        }
        Ok((total_rows / elapsed, watch.finish()))
    };
    let measured_sluice = || -> BenchResult<(f64, u64, f64, ServerCost)> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("bench.toml");
        std::fs::write(&config, sluice_config(pg, args, &db, dir.path(), &target_db)?)?;
        let poll = args.source == BenchSource::Poll;
        let started = Instant::now();
        let mut command = Command::new(sluice);
        command.arg("run").arg("-c").arg(&config);
        if !poll {
            command.arg("--until-lsn").arg(&end);
        }
        let mut watch = WalsenderWatch::new(pg, &db, "sluice");
        let mut child = command.env("SLUICE_LOG", "warn").stdin(Stdio::null()).spawn()?;
        let mut peak = 0;
        let mut cpu = 0.0f64;
        let mut drained_at = None;
        let mut next_count = Instant::now();
        let status = loop {
            peak = peak.max(peak_rss_kib(child.id()).unwrap_or(0));
            cpu = cpu.max(cpu_seconds(child.id()).unwrap_or(0.0));
            if !poll {
                watch.sample();
            }
            if let Some(status) = child.try_wait()? {
                break status;
            }
            // A polled row is deleted only once Kafka has it: an empty table means all delivered.
            if poll && drained_at.is_none() && Instant::now() >= next_count {
                next_count = Instant::now() + Duration::from_millis(100);
                if pg.psql(&db, "SELECT count(*) FROM bench")? == "0" {
                    drained_at = Some(started.elapsed());
                    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = drained_at.unwrap_or_else(|| started.elapsed()).as_secs_f64();
        if !status.success() {
            return Err(format!("sluice run failed: {status}").into());
        }
        Ok((total_rows / elapsed, peak, cpu, watch.finish()))
    };
    let (baseline, sluice) = alternate(run, baseline, measured_sluice)?;
    drop_slots(pg, &db, &["baseline", "sluice"])?;
    pg.psql("postgres", &format!("DROP DATABASE \"{db}\" WITH (FORCE)"))?;
    if args.target == BenchTarget::Postgres {
        let applied: f64 = pg.psql(&target_db, "SELECT count(*) FROM bench")?.parse()?;
        if applied < rows as f64 {
            return Err(format!("the target holds {applied} rows, not {rows}").into());
        }
        pg.psql("postgres", &format!("DROP DATABASE \"{target_db}\" WITH (FORCE)"))?;
    }
    Ok(Sample::new(baseline, sluice))
}

/// sluice's configuration for the stream benchmarks: `db` through the replication slot `sluice`
/// (or the polling source), into the benchmark's target (`target_db` for `--target postgres`).
fn sluice_config(
    pg: &LocalPostgres,
    args: &BenchArgs,
    db: &str,
    dir: &Path,
    target_db: &str,
) -> BenchResult<String> {
    let kafka = args.target == BenchTarget::Kafka;
    Ok(format!(
        "[monitoring]\nlisten = \"\"\n[source.connection]\nhost = \"{}\"\nport = {}\ndbname = \"{db}\"\n\
         {}{}",
        if args.unix { pg.socket_dir().display().to_string() } else { "127.0.0.1".into() },
        pg.port,
        if args.source == BenchSource::Poll {
            format!("[source.poll]\ntable = \"public.bench\"\nbatch_size = {}\ninterval = \"100ms\"\n", args.poll_batch_size)
        } else {
            format!(
                "[source.replication]\nslot = \"sluice\"\npublication = \"bench_pub\"\ncreate_slot = false\n\
                 proto_version = {}\nstreaming = \"{}\"\nbinary = {}\nspill_dir = \"{}\"\n",
                args.proto_version,
                args.streaming.option(),
                args.binary,
                dir.display()
            )
        },
        match &args.kafka_brokers {
            Some(brokers) if kafka => format!(
                "[target]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ncompression = \"none\"\n[target.outbox]\ntable = \"public.bench\"\n"
            ),
            _ if args.target == BenchTarget::Postgres => postgres_target(pg, target_db, dir)?,
            _ => "[target]\nkind = \"null\"\n".to_owned(),
        }
    ))
}

/// `pg_recvlogical` streaming `slot` of `db` into /dev/null with the benchmark's options.
fn recvlogical(pg: &LocalPostgres, args: &BenchArgs, db: &str, slot: &str) -> Command {
    let mut cmd = pg.client_command("pg_recvlogical");
    let host = if args.unix { pg.socket_dir().display().to_string() } else { "127.0.0.1".into() };
    cmd.args(["-h", &host, "-U", "postgres", "-S", slot, "--start", "-f", "/dev/null", "--no-loop"])
        .arg("-p")
        .arg(pg.port.to_string())
        .arg("-d")
        .arg(db)
        .args(["-o", &format!("proto_version={}", args.proto_version), "-o", "publication_names=bench_pub"]);
    if args.streaming != BenchStreaming::Off {
        cmd.args(["-o", &format!("streaming={}", args.streaming.option())]);
    }
    if args.binary {
        cmd.args(["-o", "binary=true"]);
    }
    cmd
}

/// The live stream (`--live`, null target): each consumer in turn streams while `--rows` rows
/// are inserted in transactions of `--tx-rows`, timed from the load's start until the
/// consumer's walsender has sent all of it. Each has a slot created just before its turn, so
/// neither decodes the other's load.
fn run_once_live(pg: &LocalPostgres, sluice: &Path, args: &BenchArgs, run: usize) -> BenchResult<Sample> {
    let db = format!("bench_live_{run}");
    pg.create_database(&db)?;
    pg.psql(&db, &format!("{BENCH_TABLE}; CREATE PUBLICATION bench_pub FOR TABLE bench;"))?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bench.toml");
    // The live runs use neither the polling source nor a target database (checked above).
    std::fs::write(&config, sluice_config(pg, args, &db, dir.path(), "")?)?;
    // One consumer's turn: rows/s, its peak RSS and CPU (sluice only), the server's cost.
    let turn = |slot: &'static str, offset: u64| -> BenchResult<(f64, u64, f64, ServerCost)> {
        pg.psql(&db, &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"))?;
        let mut child = if slot == "baseline" {
            recvlogical(pg, args, &db, slot).stdin(Stdio::null()).stdout(Stdio::null()).spawn()?
        } else {
            Command::new(sluice)
                .arg("run")
                .arg("-c")
                .arg(&config)
                .env("SLUICE_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()?
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while pg.psql(&db, &format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"))?
            != "t"
        {
            if Instant::now() > deadline {
                return Err(format!("the {slot} consumer did not start streaming within 60 s").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut watch = WalsenderWatch::new(pg, &db, slot);
        let (mut peak, mut cpu) = (0, 0.0f64);
        let started = Instant::now();
        let elapsed = std::thread::scope(|scope| -> BenchResult<Duration> {
            let load = scope.spawn(|| -> Result<String, String> {
                let end = load_rows(pg, &db, args, offset).map_err(|e| e.to_string())?;
                // A transaction after the end, so that the walsender passes it at once.
                pg.psql(&db, &format!("INSERT INTO bench VALUES (-{}, 'end', 0)", offset + 1))
                    .map_err(|e| e.to_string())?;
                Ok(end)
            });
            let end = loop {
                watch.sample();
                if slot == "sluice" {
                    peak = peak.max(peak_rss_kib(child.id()).unwrap_or(0));
                    cpu = cpu.max(cpu_seconds(child.id()).unwrap_or(0.0));
                }
                if load.is_finished() {
                    break load.join().map_err(|_| "the load panicked")??;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            loop {
                watch.sample();
                let sent = pg.psql(
                    &db,
                    &format!(
                        "SELECT coalesce(bool_or(r.sent_lsn >= '{end}'), false) FROM pg_stat_replication r \
                         JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = '{slot}'"
                    ),
                )?;
                if sent == "t" {
                    return Ok(started.elapsed());
                }
                if let Some(status) = child.try_wait()? {
                    return Err(format!("the {slot} consumer exited: {status}").into());
                }
                if slot == "sluice" {
                    peak = peak.max(peak_rss_kib(child.id()).unwrap_or(0));
                    cpu = cpu.max(cpu_seconds(child.id()).unwrap_or(0.0));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })?;
        let cost = watch.finish();
        Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
        child.wait()?;
        Ok((args.rows as f64 / elapsed.as_secs_f64(), peak, cpu, cost))
    };
    let ((baseline_rows_per_s, _, _, baseline_cost), sluice) =
        alternate(run, || turn("baseline", 0), || turn("sluice", args.rows))?;
    drop_slots(pg, &db, &["baseline", "sluice"])?;
    pg.psql("postgres", &format!("DROP DATABASE \"{db}\" WITH (FORCE)"))?;
    Ok(Sample::new((baseline_rows_per_s, baseline_cost), sluice))
}

/// Runs the baseline and sluice one after the other, the baseline first in even runs, so that
/// neither always runs on the warmer (or more fragmented) server.
fn alternate<B, S>(
    run: usize,
    baseline: impl FnOnce() -> BenchResult<B>,
    sluice: impl FnOnce() -> BenchResult<S>,
) -> BenchResult<(B, S)> {
    if run.is_multiple_of(2) {
        let b = baseline()?;
        Ok((b, sluice()?))
    } else {
        let s = sluice()?;
        Ok((baseline()?, s))
    }
}

/// Drops `slots` of `db` once their consumers are gone. A walsender lingers for a moment after
/// its client exits, and its slot refuses the drop until then: waited out for up to 30 s.
fn drop_slots(pg: &LocalPostgres, db: &str, slots: &[&str]) -> BenchResult<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg.psql(
        db,
        "SELECT count(*) FROM pg_replication_slots WHERE active AND database = current_database()",
    )? != "0"
    {
        if Instant::now() > deadline {
            return Err(format!("slots of {db} still active after 30 s").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for slot in slots {
        pg.psql(db, &format!("SELECT pg_drop_replication_slot('{slot}')"))?;
    }
    Ok(())
}

/// The table the null, Postgres and backfill benchmarks stream.
const BENCH_TABLE: &str =
    "CREATE TABLE bench (id bigint PRIMARY KEY, name text NOT NULL, amount numeric NOT NULL)";

/// A Postgres target for the bench table: creates `target_db` in the cluster with an empty
/// `bench` table, writes the mapping into `dir`, and returns the config's `[target]` sections.
fn postgres_target(pg: &LocalPostgres, target_db: &str, dir: &Path) -> BenchResult<String> {
    pg.create_database(target_db)?;
    pg.psql(target_db, BENCH_TABLE)?;
    let mapping = dir.join("mapping.toml");
    std::fs::write(&mapping, "[[tables]]\nsource = \"public.bench\"\ntarget = \"public.bench\"\n")?;
    Ok(format!(
        "[target]\nkind = \"postgres\"\nmapping = \"{}\"\n[target.connection]\nport = {}\ndbname = \"{target_db}\"\nuser = \"postgres\"\n",
        mapping.display(),
        pg.port
    ))
}

/// The process's peak resident set (VmHWM) in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU seconds (user + system) a Postgres cluster has used so far: its postmaster's own and
/// that of its children, both those it has reaped (ended backends) and those still running.
pub(crate) fn cluster_cpu_seconds(pg: &LocalPostgres) -> Option<f64> {
    let pid_file = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).ok()?;
    let postmaster: u32 = pid_file.lines().next()?.trim().parse().ok()?;
    let own = stat_fields(&postmaster.to_string())?;
    let mut ticks = own[11] + own[12] + own[13] + own[14];
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        if let Some(child) = stat_fields(pid).filter(|f| f[1] as u32 == postmaster) {
            ticks += child[11] + child[12];
        }
    }
    Some(ticks / 100.0)
}

/// User plus system CPU time of a running process, in seconds (Linux clock ticks of 1/100 s).
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(&pid.to_string())?;
    Some((fields[11] + fields[12]) / 100.0)
}

/// The first 15 fields of `/proc/<pid>/stat` after the parenthesised command name: the state
/// (a letter, read as 0), ppid at 1, and utime, stime, cutime and cstime at 11 to 14.
fn stat_fields(pid: &str) -> Option<Vec<f64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<f64> = rest.split_whitespace().take(15).map(|f| f.parse().unwrap_or(0.0)).collect();
    (fields.len() == 15).then_some(fields)
}
