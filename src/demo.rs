//! `sluice demo`: the quick-start. Starts a throwaway Postgres, creates a table and a
//! publication, runs the pipeline to the jsonl target on standard output (or, with
//! `--dynamodb`, into a local DynamoDB-API server it starts; with `--postgres`, into a second
//! database of the same cluster), makes a few changes and stops once they are all delivered.
//! Narration goes to standard error.

use std::time::Duration;

use sluice_postgres::{ReplicationConfig, SourceStats};
use tokio::sync::watch;

use crate::config::{Config, PipelineConfig, SourceConfig, SourceMode};
use crate::localpg::{ClusterOptions, LocalPostgres};
use crate::targets::jsonl::config::JsonlConfig;
use crate::targets::TargetConfig;
use sluice_core::Lsn;

type DemoResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const SETUP: &str =
    "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(12,2), \
     tags text[], opened_at timestamptz DEFAULT '2024-05-01 09:30:00+00'); \
     CREATE PUBLICATION demo_pub FOR TABLE accounts;";

const CHANGES: &[&str] = &[
    "INSERT INTO accounts (id, owner, balance, tags) VALUES (1, 'ada', 100.00, '{founder}'), (2, 'grace', 250.50, '{}')",
    "BEGIN; UPDATE accounts SET balance = balance - 25 WHERE id = 1; UPDATE accounts SET balance = balance + 25 WHERE id = 2; COMMIT",
    "INSERT INTO accounts (id, owner, balance) VALUES (3, 'zoë', 0)",
    "DELETE FROM accounts WHERE id = 3",
];

/// Where the demo sends changes.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// Start this DynamoDB-API server (`moto_server`) and stream into it through a mapping.
    pub dynamodb_server: Option<std::path::PathBuf>,
    /// Stream into table `v2.accounts` of a second database through a Postgres mapping.
    pub postgres_target: bool,
}

/// The Postgres target's table and mapping for `--postgres`.
const PG_TARGET_SETUP: &str =
    "CREATE SCHEMA v2; CREATE TABLE v2.accounts (account_id bigint PRIMARY KEY, holder text NOT NULL, \
     balance numeric(12,2), tags text[], opened_at timestamptz, origin text NOT NULL)";
const PG_DEMO_MAPPING: &str = "[[tables]]\nsource = \"public.accounts\"\ntarget = \"v2.accounts\"\n\
     rename = { id = \"account_id\", owner = \"holder\" }\nconstants = { origin = \"demo\" }\n";

/// The worked example `schemas/examples/demo_accounts.toml`.
const DEMO_MAPPING: &str = include_str!("../schemas/examples/demo_accounts.toml");

/// A local DynamoDB-API server, stopped on drop.
struct LocalDynamo {
    child: std::process::Child,
    url: String,
}

impl Drop for LocalDynamo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dynamo(server: &std::path::Path) -> Result<LocalDynamo, Box<dyn std::error::Error + Send + Sync>> {
    let port = crate::localpg::free_port()?;
    let child = std::process::Command::new(server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("cannot start {} ({e}); install it with: pip install 'moto[server]'", server.display())
        })?;
    let dynamo = LocalDynamo { child, url: format!("http://127.0.0.1:{port}") };
    wait_until(Duration::from_secs(30), || Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()))?;
    Ok(dynamo)
}

/// Runs the quick-start: a throwaway cluster, a pipeline into the chosen target, changes, and what arrived.
pub async fn run(options: DemoOptions) -> DemoResult {
    eprintln!("demo: starting a throwaway Postgres cluster (wal_level=logical) …");
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(&ClusterOptions::default())).await??;
    pg.create_database("demo")?;
    pg.psql("demo", SETUP)?;
    eprintln!("demo: Postgres on 127.0.0.1:{}; table accounts published as demo_pub", pg.port);

    let config = Config {
        pipeline: PipelineConfig::default(),
        source: SourceConfig {
            connection: pg.connection("demo"),
            heartbeat_connection: None,
            mode: SourceMode::Replication(ReplicationConfig::new("demo_slot", "demo_pub")),
        },
        target: TargetConfig::Jsonl(JsonlConfig { path: "-".into(), fsync: false, transactions: true }),
        monitoring: Default::default(),
        ha: Default::default(),
        backfill: Default::default(),
        verify: Default::default(),
        migration: Default::default(),
        reverse_of: None,
    };
    let dir = tempfile::tempdir()?;
    let mut dynamo = None;
    let mut config = config;
    if let Some(server) = &options.dynamodb_server {
        let local = start_dynamo(server)?;
        eprintln!("demo: DynamoDB-API server ({}) on {}", server.display(), local.url);
        let client =
            sluice_dynamodb::DynamoClient::connect(&sluice_dynamodb::ClientOptions::local(&local.url)).await;
        client.create_table("demo_accounts", "pk", Some("sk")).await?;
        let mapping = dir.path().join("mapping.toml");
        std::fs::write(&mapping, DEMO_MAPPING)?;
        eprintln!("demo: mapping public.accounts → DynamoDB table demo_accounts:{DEMO_MAPPING}");
        config.target = TargetConfig::Dynamodb(crate::targets::dynamodb::config::DynamoConfig {
            mapping: Some(mapping),
            outbox: None,
            endpoint_url: Some(local.url.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some("demo".into()),
            secret_access_key: Some(sluice_core::Secret::new("demo")),
            concurrency: 4,
            retry_for: Duration::from_secs(60),
            request_timeout: Duration::from_secs(5),
            dead_letter: None,
            write_mode: crate::targets::dynamodb::config::WriteMode::Single,
            transaction_size: 25,
            batch_size: 100,
        });
        dynamo = Some((local, client));
    }
    if options.postgres_target {
        pg.create_database("demo_v2")?;
        pg.psql("demo_v2", PG_TARGET_SETUP)?;
        let mapping = dir.path().join("mapping.toml");
        std::fs::write(&mapping, PG_DEMO_MAPPING)?;
        eprintln!("demo: mapping public.accounts → database demo_v2, table v2.accounts:\n{PG_DEMO_MAPPING}");
        config.target = TargetConfig::Postgres(crate::targets::postgres::config::PostgresTargetConfig {
            connection: pg.connection("demo_v2"),
            mapping,
            checkpoint_table: sluice_core::TableName::new("public", "sluice_checkpoint"),
            retry_for: Duration::from_secs(60),
            dead_letter: None,
            lock_timeout: Duration::from_secs(10),
            sync_sequences: true,
            inverted: false,
        });
    }
    let (shutdown_tx, shutdown_rx) = sluice_core::Shutdown::new();
    let (handles_tx, mut handles_rx) =
        watch::channel(None::<(std::sync::Arc<SourceStats>, watch::Receiver<Lsn>)>);
    let state = crate::monitor::PipelineState::new(&config);
    let pipeline = tokio::spawn(async move {
        crate::pipeline::run(&config, &state, shutdown_rx, |p| {
            handles_tx.send_replace(Some((p.source_stats, p.durable)));
        })
        .await
    });
    let (_stats, mut durable) =
        handles_rx.wait_for(Option::is_some).await?.clone().ok_or("pipeline did not start")?;
    wait_until(Duration::from_secs(30), || {
        Ok(pg.psql("demo", "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'demo_slot' AND active AND confirmed_flush_lsn IS NOT NULL")? == "1")
    })?;
    eprintln!("demo: sluice is streaming slot demo_slot; making changes:");
    let mut before_last = Lsn::ZERO;
    for sql in CHANGES {
        eprintln!("demo:   {sql}");
        before_last = pg.psql("demo", "SELECT pg_current_wal_insert_lsn()")?.parse()?;
        pg.psql("demo", sql)?;
    }
    // The last change commits after `before_last`: once that is durable, everything is.
    tokio::time::timeout(Duration::from_secs(30), durable.wait_for(|&lsn| lsn > before_last)).await??;
    shutdown_tx.trigger();
    pipeline.await??;
    if let Some((_server, client)) = &dynamo {
        eprintln!("demo: read back with aws-sdk-dynamodb (Scan of demo_accounts):");
        for item in client.scan_all("demo_accounts").await? {
            let fields: Vec<String> = item.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{}", fields.join("  "));
        }
    }
    if options.postgres_target {
        eprintln!("demo: read back from demo_v2 (SELECT * FROM v2.accounts):");
        println!("{}", pg.psql("demo_v2", "SELECT * FROM v2.accounts ORDER BY account_id")?);
    }
    let confirmed = pg
        .psql("demo", "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'demo_slot'")?;
    eprintln!("demo: every change delivered; slot demo_slot confirmed up to {confirmed}. Stopping Postgres.");
    Ok(())
}

/// Polls `check` until it returns true or `limit` passes.
pub fn wait_until(
    limit: Duration,
    mut check: impl FnMut() -> Result<bool, Box<dyn std::error::Error + Send + Sync>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if check()? {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("condition not met within {limit:?}").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
