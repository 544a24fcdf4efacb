//! `sluice bench --way-back --dynamodb-endpoint URL`: the way back from DynamoDB, on a
//! throwaway cluster and the DynamoDB-API server given (moto serves DynamoDB Streams).
//!
//! Each run: a fresh old table `bench` (in phase `reversed`) and a DynamoDB table with a
//! NEW_AND_OLD_IMAGES stream; `--rows` items are written there with BatchWriteItem, as an
//! application would. The baseline is a plain client reading the same stream to its end with
//! GetShardIterator / GetRecords and doing nothing with the records; `sluice run --reverse`
//! is timed from its start until every row is in the old table (rows/s, their ratio). The two
//! take turns going first. Last, the application writes one item at a time at `--writes-per-second` for
//! `--lag-seconds`, each carrying its send time, and the old table's default stamps each row's
//! arrival: the lag from an application's write to its row is reported as p50 and p99.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_dynamodb::streams::sdk::StreamsClient;
use sluice_dynamodb::streams::{describe_all, ShardStart, StreamsApi};
use sluice_dynamodb::{Attr, ClientOptions, DynamoClient, Item};

use super::{median, BenchArgs, BenchResult};
use crate::localpg::{ClusterOptions, LocalPostgres};
use crate::migration::{ensure_state_tables, transition, MigrationConfig, Step};

struct Sample {
    baseline_rows_per_s: f64,
    sluice_rows_per_s: f64,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    lag_rows: u64,
}

const TABLE: &str =
    "CREATE TABLE bench (id bigint PRIMARY KEY, name text NOT NULL, amount numeric NOT NULL, \
     sent_ms bigint, arrived timestamptz NOT NULL DEFAULT clock_timestamp()); \
     CREATE PUBLICATION bench_pub FOR TABLE bench;";

pub async fn run(args: BenchArgs) -> BenchResult<()> {
    let endpoint = args.dynamodb_endpoint.clone().ok_or("--way-back needs --dynamodb-endpoint")?;
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(&ClusterOptions::default())).await??;
    let options = ClientOptions::local(&endpoint);
    let client = DynamoClient::connect(&options).await;
    println!(
        "sluice bench --way-back: {} items (id, name, amount) from DynamoDB Streams into Postgres, {} runs; \
         lag at {} writes/s for {} s",
        args.rows, args.runs, args.writes_per_second, args.lag_seconds
    );
    println!(
        "{:>4} {:>22} {:>16} {:>7} {:>12} {:>12} {:>9}",
        "run", "plain reader records/s", "sluice rows/s", "ratio", "lag p50 ms", "lag p99 ms", "lag rows"
    );
    let mut samples = Vec::new();
    for run in 0..args.runs {
        let sample = run_once(&pg, &client, &options, &endpoint, &args, run).await?;
        println!(
            "{:>4} {:>22.0} {:>16.0} {:>7.3} {:>12.0} {:>12.0} {:>9}",
            run + 1,
            sample.baseline_rows_per_s,
            sample.sluice_rows_per_s,
            sample.sluice_rows_per_s / sample.baseline_rows_per_s,
            sample.lag_p50_ms,
            sample.lag_p99_ms,
            sample.lag_rows
        );
        samples.push(sample);
    }
    println!(
        "median {:>20.0} {:>16.0} {:>7.3} {:>12.0} {:>12.0}",
        median(&samples, |s| s.baseline_rows_per_s),
        median(&samples, |s| s.sluice_rows_per_s),
        median(&samples, |s| s.sluice_rows_per_s / s.baseline_rows_per_s),
        median(&samples, |s| s.lag_p50_ms),
        median(&samples, |s| s.lag_p99_ms)
    );
    Ok(())
}

/// Stops the daemon when the run ends, however it ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn item(id: u64, sent_ms: Option<u128>) -> Item {
    let mut item = Item::from([
        ("pk".to_string(), Attr::S(format!("ROW#{id}"))),
        ("id".to_string(), Attr::N(id.to_string())),
        ("name".to_string(), Attr::S(format!("name-{id}"))),
        ("amount".to_string(), Attr::N(format!("{}", id as f64 * 1.5))),
    ]);
    if let Some(sent) = sent_ms {
        item.insert("sent_ms".into(), Attr::N(sent.to_string()));
    }
    item
}

/// A plain client: every shard from its oldest record to its current end, one after the
/// other, doing nothing with the records; how many it read.
async fn read_to_end(api: &StreamsClient, arn: &str, want: u64) -> BenchResult<u64> {
    let (_, shards) = describe_all(api, arn).await?;
    let mut read = 0;
    for shard in shards {
        let mut iterator = Some(api.iterator(arn, &shard.id, &ShardStart::TrimHorizon).await?);
        while let Some(current) = iterator {
            let page = api.records(&current).await?;
            read += page.records.len() as u64;
            if page.records.is_empty() && read >= want {
                break;
            }
            iterator = page.next_iterator;
        }
    }
    Ok(read)
}

async fn count(sql: &tokio_postgres::Client) -> Result<u64, tokio_postgres::Error> {
    Ok(sql.query_one("SELECT count(*) FROM bench", &[]).await?.get::<_, i64>(0) as u64)
}

async fn run_once(
    pg: &LocalPostgres,
    client: &DynamoClient,
    options: &ClientOptions,
    endpoint: &str,
    args: &BenchArgs,
    run: usize,
) -> BenchResult<Sample> {
    let db = format!("way_back_{run}");
    pg.create_database(&db)?;
    pg.psql(&db, TABLE)?;
    let pipeline = format!("back_{run}");
    let sql = sluice_postgres::connect_sql(&pg.connection(&db)).await?;
    let migration = MigrationConfig::default();
    ensure_state_tables(&sql, &migration).await?;
    for step in [Step::Fence, Step::Reverse] {
        transition(&sql, &migration, &pipeline, "public.bench", step, "bench").await?;
    }
    let table = format!("way_back_{run}_{}", std::process::id());
    client.create_table(&table, "pk", None).await?;
    client.enable_stream(&table, "NEW_AND_OLD_IMAGES").await?;
    let arn = client.stream_of(&table).await?.ok_or("no stream")?.arn;

    // The backlog, written as an application would.
    let items: Vec<Item> = (1..=args.rows).map(|id| item(id, None)).collect();
    for chunk in items.chunks(25) {
        client.batch_put(&table, chunk.to_vec()).await?;
    }

    // The baseline: a plain client reads the stream to its end; before sluice on even runs,
    // after it on odd ones (the server may answer a stream read before faster or slower).
    let api = StreamsClient::connect(options, &table).await;
    let baseline = async || -> BenchResult<f64> {
        let started = Instant::now();
        let read = read_to_end(&api, &arn, args.rows).await?;
        if read < args.rows {
            return Err(format!("the plain reader found {read} of {} records", args.rows).into());
        }
        Ok(read as f64 / started.elapsed().as_secs_f64())
    };
    let mut baseline_rows_per_s = if run.is_multiple_of(2) { baseline().await? } else { 0.0 };

    let dir = tempfile::tempdir()?;
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(
        &mapping,
        format!(
            "[[tables]]\nsource = \"public.bench\"\ntarget = \"{table}\"\npartition_key = {{ attribute = \"pk\", template = \"ROW#{{id}}\" }}\ndrop = [\"arrived\"]\n"
        ),
    )?;
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nname = \"{pipeline}\"\n[monitoring]\nlisten = \"\"\n[source.connection]\nport = {}\ndbname = \"{db}\"\n\
             [source.replication]\nslot = \"back_{run}\"\npublication = \"bench_pub\"\n\
             [target]\nkind = \"dynamodb\"\nmapping = \"{}\"\nendpoint_url = \"{endpoint}\"\nregion = \"us-east-1\"\n\
             access_key_id = \"test\"\nsecret_access_key = \"test\"\n",
            pg.port,
            mapping.display(),
        ),
    )?;
    let started = Instant::now();
    let _daemon = Daemon(
        Command::new(std::env::current_exe()?)
            .args(["run", "--reverse", "-c"])
            .arg(&config)
            .env("SLUICE_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(1800);
    while count(&sql).await? < args.rows {
        if Instant::now() > deadline {
            return Err("the way back did not apply the backlog within 30 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sluice_rows_per_s = args.rows as f64 / started.elapsed().as_secs_f64();
    if !run.is_multiple_of(2) {
        baseline_rows_per_s = baseline().await?;
    }

    // The lag at a steady rate: one PutItem at a time, each with its send time.
    let interval = Duration::from_secs_f64(1.0 / args.writes_per_second.max(1) as f64);
    let writes = args.writes_per_second * args.lag_seconds;
    let mut next = Instant::now();
    for n in 0..writes {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
        client.batch_put(&table, vec![item(args.rows + 1 + n, Some(now_ms))]).await?;
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while count(&sql).await? < args.rows + writes {
        if Instant::now() > deadline {
            return Err("the way back did not apply the paced writes within 5 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = sql
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag), percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), count(*) \
             FROM (SELECT (extract(epoch FROM arrived) * 1000 - sent_ms)::float8 AS lag FROM bench WHERE sent_ms IS NOT NULL) l",
            &[],
        )
        .await?;
    Ok(Sample {
        baseline_rows_per_s,
        sluice_rows_per_s,
        lag_p50_ms: row.get::<_, f64>(0),
        lag_p99_ms: row.get::<_, f64>(1),
        lag_rows: row.get::<_, i64>(2) as u64,
    })
}
