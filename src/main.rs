//! The `sluice` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::config::{Config, ConfigError};
use sluice_core::Lsn;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Change-data capture from Postgres logical replication")]
struct Cli {
    /// Log format on standard error: `text`, or `json` (one object per line). The level comes
    /// from SLUICE_LOG (e.g. `info`, `sluice=debug`).
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Stream changes from the source to the target until stopped (SIGTERM/SIGINT drain and exit 0).
    Run {
        #[arg(short, long)]
        config: PathBuf,
        /// Stop (gracefully) once this source position is durable in the target.
        #[arg(long, value_name = "LSN")]
        until_lsn: Option<Lsn>,
        /// Stream despite the start checks' warnings (as `pipeline.allow_warnings = true`);
        /// problems always stop `run`.
        #[arg(long)]
        allow_warnings: bool,
        /// Run the way back of the configured pipeline: read the new store (a Postgres
        /// target's database through its own slot and publication, a DynamoDB target's
        /// tables' streams) and apply to the old tables through the inverted mapping, for the
        /// tables a `cutover` reversed.
        #[arg(long)]
        reverse: bool,
    },
    /// Check a configuration file, its mapping against the source database, and the target
    /// (tables, topics, rights); prints every problem with its dotted key, and what it skipped.
    ///
    /// Given several configurations (`-c a.toml -c b.toml`: one deployment's pipelines), each
    /// is checked, and then together: a DynamoDB table written by two pipelines where one
    /// writes it with `write_mode = "batch"` is refused.
    Validate {
        #[arg(short, long, required = true)]
        config: Vec<PathBuf>,
        /// Only check the files, without connecting to the database.
        #[arg(long)]
        offline: bool,
    },
    /// Show a pipeline's slot, positions, lag and counters: from the running daemon's
    /// `/status` endpoint (`monitoring.listen`) when it answers, else straight from Postgres.
    Status {
        #[arg(short, long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Backfill tables while the daemon streams: requests a chunked, resumable backfill from the
    /// running `sluice run` and follows its progress (see the README).
    Snapshot {
        #[arg(short, long)]
        config: PathBuf,
        /// A table (`schema.table`) to backfill; repeat for several. Default: every published table.
        #[arg(long = "table", value_name = "TABLE")]
        tables: Vec<String>,
        /// Request and return at once instead of following the progress.
        #[arg(long)]
        no_wait: bool,
        /// Cancel these pending or running requests (snapshot or reconcile) instead; the
        /// daemon stops a running one after its current chunk. Repeat for several.
        #[arg(long, value_name = "ID", conflicts_with_all = ["tables", "no_wait"])]
        cancel: Vec<i64>,
    },
    /// Each published table's migration phase (forward, fenced, reversed, rolling_back,
    /// finished) and whether it is fenced; with `--history`, every move, who made it and when.
    Migration {
        #[arg(short, long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also list every move of the pipeline's tables, oldest first.
        #[arg(long)]
        history: bool,
    },
    /// Fence tables of the source database: a trigger refuses every write to them (SQLSTATE
    /// SL001) but those of sluice's reverse session. `cutover` does this itself.
    Fence {
        #[arg(short, long)]
        config: PathBuf,
        /// A table (`schema.table`) of the pipeline's publication; repeat for several.
        #[arg(long = "table", value_name = "TABLE", required = true)]
        tables: Vec<String>,
    },
    /// Take the fence down from tables of the source database.
    Unfence {
        #[arg(short, long)]
        config: PathBuf,
        /// A table (`schema.table`) of the pipeline's publication; repeat for several.
        #[arg(long = "table", value_name = "TABLE", required = true)]
        tables: Vec<String>,
    },
    /// Move tables to the new store: check (phase forward, lag, the way back set up, verify
    /// clean), fence the old tables, drain the forward stream to the fence, verify, record
    /// `reversed`. Safe to re-run after a crash at any step.
    Cutover(sluice::migration::MoveArgs),
    /// Move reversed tables back to the old store: fence the new tables, drain the way back,
    /// verify, record `forward` and unfence the old tables. Safe to re-run.
    Rollback(sluice::migration::MoveArgs),
    /// The point of no return: the way back stops applying the tables for good.
    Finish(sluice::migration::MoveArgs),
    /// Compare the target (DynamoDB or Postgres) with the source through the mapping: matched, missing,
    /// different and extra keys per table. Exit 0 when equal, 3 when anything differs.
    Verify(sluice::verify::VerifyArgs),
    /// Verify, re-drive only the differing keys through the running daemon's guarded apply
    /// path, then verify again. Exit 0 when equal afterwards, 3 otherwise.
    Reconcile(sluice::verify::VerifyArgs),
    /// Quick-start: a local Postgres, a demo table, sluice streaming its changes to stdout.
    Demo {
        /// Stream into a local DynamoDB-API server instead, started from this `moto_server`
        /// (`pip install 'moto[server]'`), and read the items back.
        #[arg(long, value_name = "MOTO_SERVER", num_args = 0..=1, default_missing_value = "moto_server")]
        dynamodb: Option<PathBuf>,
        /// Stream into a second database of the same cluster through a Postgres mapping
        /// (renamed columns, a constant) and read the rows back.
        #[arg(long, conflicts_with = "dynamodb")]
        postgres: bool,
    },
    /// The dead-letter file (`target.dead_letter`): list its entries, or replay them once the
    /// mapping is fixed (keyed backfill requests served by the running daemon; see the README).
    #[command(subcommand)]
    DeadLetter(DeadLetterCommand),
    /// Benchmark the stream against pg_recvlogical on the same data (see the README).
    Bench(sluice::bench::BenchArgs),
    /// Print the configuration file's JSON Schema (draft-07), generated from the types that
    /// read it: for editors (taplo's `#:schema`, VS Code) and other tooling.
    ConfigSchema,
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Every entry: line, position, table, whether replayed, and the reason (no values).
    List {
        #[arg(short, long)]
        config: PathBuf,
        /// The entries as written (values included), one JSON object a line, with `replayed`.
        #[arg(long)]
        json: bool,
    },
    /// Re-drives the entries not yet replayed: their rows are read again from the source and
    /// written through the current mapping and the position guard. Exits 0 when every entry
    /// that leads back to a source row was replayed.
    Replay {
        #[arg(short, long)]
        config: PathBuf,
        /// Request and return, without waiting (nothing is marked replayed).
        #[arg(long)]
        no_wait: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(refused) = refuses_kafka_source(&cli.command) {
        return refused;
    }
    match cli.command {
        Command::Validate { config: paths, offline } => {
            let mut outcome = ExitCode::SUCCESS;
            let mut loaded = Vec::new();
            for path in paths {
                let config = Config::load(&path);
                let checked = validate_one(&runtime, &path, &config, offline);
                if checked != ExitCode::SUCCESS {
                    outcome = checked;
                }
                if let Ok(config) = config {
                    loaded.push((path, config));
                }
            }
            let shared = sluice::validate::shared_unguarded_tables(&loaded);
            if !shared.is_empty() {
                return refused("error: these pipelines cannot run together", &shared, &[]);
            }
            outcome
        }
        Command::Run { config, until_lsn, allow_warnings, reverse } => {
            // Listening first: a SIGTERM during the config load or the start checks then
            // stops the run gracefully instead of killing the process.
            let mut signals = Signals::install(&runtime);
            let mut config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            if reverse && matches!(config.target, sluice::targets::TargetConfig::Dynamodb(_)) {
                return report(runtime.block_on(run_way_back_from_dynamodb(config, signals)));
            }
            if reverse {
                config = match sluice::migration::reverse::reversed(&config) {
                    Ok(c) => c,
                    Err(problems) => return config_failure(&ConfigError::Invalid { problems }),
                };
                if let Err(e) = runtime.block_on(sluice::migration::reverse::prepare(&config)) {
                    return report(Err(e.into()));
                }
            }
            config.pipeline.allow_warnings |= allow_warnings;
            if !config.source.is_database() {
                return report(runtime.block_on(run(config, None, signals)));
            }
            let checked = runtime.block_on(async {
                tokio::select! {
                    checked = start_checks(&config) => Some(checked),
                    () = signals.received() => None,
                }
            });
            let Some(checked) = checked else {
                tracing::info!(
                    "signal received during the start checks; stopping before the pipeline starts"
                );
                return ExitCode::SUCCESS;
            };
            match checked {
                Ok(Some((problems, warnings))) => {
                    let count = problems.len() + warnings.len();
                    let header = format!(
                        "error: the pipeline cannot start: the start checks found {count} problem{}",
                        if count == 1 { "" } else { "s" }
                    );
                    return refused(&header, &problems, &warnings);
                }
                Ok(None) => {}
                Err(e) => return report(Err(e)),
            }
            report(runtime.block_on(run(config, until_lsn, signals)))
        }
        Command::Status { config, json } => match Config::load(&config) {
            Ok(config) => {
                report(runtime.block_on(sluice::status::print(&config, json)).map_err(anyhow::Error::from))
            }
            Err(e) => config_failure(&e),
        },
        Command::Snapshot { config, cancel, .. } if !cancel.is_empty() => match Config::load(&config) {
            Ok(config) => report(
                runtime.block_on(sluice::backfill::cancel(&config, &cancel)).map_err(anyhow::Error::from),
            ),
            Err(e) => config_failure(&e),
        },
        Command::Snapshot { config, tables, no_wait, .. } => match Config::load(&config) {
            Ok(config) => report(
                runtime
                    .block_on(sluice::backfill::snapshot(&config, &tables, !no_wait))
                    .map_err(anyhow::Error::from),
            ),
            Err(e) => config_failure(&e),
        },
        Command::Migration { config, json, history } => match Config::load(&config) {
            Ok(config) => report(
                runtime
                    .block_on(sluice::migration::show(&config, json, history))
                    .map_err(anyhow::Error::from),
            ),
            Err(e) => config_failure(&e),
        },
        Command::Fence { config, tables } => fence(&runtime, &config, &tables, true),
        Command::Unfence { config, tables } => fence(&runtime, &config, &tables, false),
        Command::Cutover(args) => move_tables(&runtime, &args, "cutover"),
        Command::Rollback(args) => move_tables(&runtime, &args, "rollback"),
        Command::Finish(args) => move_tables(&runtime, &args, "finish"),
        Command::Verify(args) | Command::Reconcile(args) if Config::load(&args.config).is_err() => {
            config_failure(&Config::load(&args.config).expect_err("checked"))
        }
        Command::Verify(args) => verify_exit(runtime.block_on(async {
            let config = Config::load(&args.config)?;
            let report = sluice::verify::verify(&config, &args).await?;
            sluice::verify::print(&report, &args)?;
            anyhow::Ok(report.differences())
        })),
        Command::Reconcile(args) => verify_exit(runtime.block_on(async {
            let config = Config::load(&args.config)?;
            let report = sluice::verify::reconcile(&config, &args).await?;
            sluice::verify::print(&report, &args)?;
            anyhow::Ok(report.differences())
        })),
        Command::Demo { dynamodb, postgres } => {
            let options = sluice::demo::DemoOptions { dynamodb_server: dynamodb, postgres_target: postgres };
            report(runtime.block_on(sluice::demo::run(options)).map_err(anyhow::Error::from_boxed))
        }
        Command::DeadLetter(DeadLetterCommand::List { config, json }) => match Config::load(&config) {
            Ok(config) => report(sluice::dead_letters::list(&config, json).map_err(anyhow::Error::from)),
            Err(e) => config_failure(&e),
        },
        Command::DeadLetter(DeadLetterCommand::Replay { config, no_wait }) => match Config::load(&config) {
            Ok(config) => report(
                runtime
                    .block_on(sluice::dead_letters::replay(&config, !no_wait))
                    .map(|_| ())
                    .map_err(anyhow::Error::from),
            ),
            Err(e) => config_failure(&e),
        },
        Command::Bench(args) => {
            report(runtime.block_on(sluice::bench::run(args)).map_err(anyhow::Error::from_boxed))
        }
        Command::ConfigSchema => {
            let schema = sluice::config::schema::config_schema();
            report(sluice::error::print(&format!("{schema:#}\n")).map_err(anyhow::Error::from))
        }
    }
}

/// True when `path` loads as an applier's configuration (`[source.kafka]`).
fn is_applier(path: &std::path::Path) -> bool {
    Config::load(path).is_ok_and(|config| !config.source.is_database())
}

/// `sluice validate` of one configuration file (`config`, as loaded from `path`): its
/// problems printed, and the exit code.
fn validate_one(
    runtime: &tokio::runtime::Runtime,
    path: &std::path::Path,
    config: &Result<Config, ConfigError>,
    offline: bool,
) -> ExitCode {
    match config {
        Ok(config) if offline => {
            for way_back in sluice::validate::offline_way_back(config) {
                println!("way back: {way_back}");
            }
            println!(
                "{}: ok (offline: neither the source database nor the target was consulted)",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Ok(config) if !config.source.is_database() => {
            // An applier reads no database; its topics and group are checked as it joins.
            println!(
                "{}: ok (an applier of [source.kafka]: the topics are checked when it joins the group)",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Ok(config) => match runtime.block_on(sluice::validate::live(config)) {
            Ok(findings) => {
                for skipped in &findings.skipped {
                    println!("skipped: {skipped}");
                }
                for way_back in &findings.irreversible {
                    println!("way back: {way_back}");
                }
                if findings.is_clean() {
                    println!("{}: ok (checked {})", path.display(), findings.checked.join(", "));
                    ExitCode::SUCCESS
                } else {
                    let problems: Vec<_> =
                        findings.problems.into_iter().chain(findings.unreachable).collect();
                    refused("error: invalid configuration", &problems, &findings.warnings)
                }
            }
            Err(e) => report(Err(anyhow::Error::from(e).context(format!(
                "cannot check the source database {} (source.connection)",
                config.source.connection.addr()
            )))),
        },
        Err(e) => config_failure(e),
    }
}

/// The commands that read or write the source database refuse an applier's configuration
/// (`[source.kafka]`), naming why.
fn refuses_kafka_source(command: &Command) -> Option<ExitCode> {
    let (name, path) = match command {
        Command::Snapshot { config, .. } => ("snapshot", config),
        Command::Migration { config, .. } => ("migration", config),
        Command::Fence { config, .. } => ("fence", config),
        Command::Unfence { config, .. } => ("unfence", config),
        Command::Cutover(args) => ("cutover", &args.config),
        Command::Rollback(args) => ("rollback", &args.config),
        Command::Finish(args) => ("finish", &args.config),
        Command::Verify(args) => ("verify", &args.config),
        Command::Reconcile(args) => ("reconcile", &args.config),
        Command::DeadLetter(DeadLetterCommand::Replay { config, .. }) => ("dead-letter replay", config),
        Command::Run { config, reverse: true, .. } => ("run --reverse", config),
        _ => return None,
    };
    if !is_applier(path) {
        return None;
    }
    fatal(
        &format!(
            "error: sluice {name} works on a Postgres source, and {} configures an applier ([source.kafka]); \
             run it with the configuration of the pipeline that writes the topics",
            path.display()
        ),
        &[],
    );
    Some(ExitCode::from(2))
}

/// `sluice fence` (`up`) and `sluice unfence`.
fn fence(runtime: &tokio::runtime::Runtime, path: &std::path::Path, tables: &[String], up: bool) -> ExitCode {
    match Config::load(path) {
        Ok(config) => report(
            runtime
                .block_on(sluice::migration::fence_tables(&config, tables, up))
                .map_err(anyhow::Error::from),
        ),
        Err(e) => config_failure(&e),
    }
}

/// `sluice cutover`, `rollback` and `finish`.
fn move_tables(
    runtime: &tokio::runtime::Runtime,
    args: &sluice::migration::MoveArgs,
    command: &str,
) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    let moved = runtime.block_on(async {
        match command {
            "cutover" => sluice::migration::cutover(&config, args).await,
            "rollback" => sluice::migration::rollback(&config, args).await,
            _ => sluice::migration::finish(&config, args).await,
        }
    });
    report(moved.map_err(anyhow::Error::from))
}

/// `run --reverse` with a DynamoDB target: the tables' streams into the old tables, until a
/// signal; one process per pipeline (its name lock, `<name>-reverse`, in the old database).
async fn run_way_back_from_dynamodb(config: Config, mut signals: Signals) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = sluice_core::Shutdown::new();
    tokio::spawn(async move {
        signals.received().await;
        tracing::info!("signal received; stopping the way back");
        shutdown_tx.trigger();
    });
    let name = sluice::migration::reverse_dynamodb::pipeline_name(&config);
    let state = std::sync::Arc::new(sluice::monitor::PipelineState::with(
        &name,
        config.monitoring.ready_max_lag,
        false,
    ));
    let metrics = sluice::metrics::install(&name);
    if let Some(listen) = config.monitoring.listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (monitoring.listen)"))?;
        tracing::info!(addr = %listener.local_addr()?, "serving /metrics and /healthz");
        tokio::spawn(sluice::http::serve(
            listener,
            std::sync::Arc::clone(&state),
            metrics,
            shutdown_rx.clone(),
        ));
    }
    // With HA, replicas stand by on the way back's own lock, as the forward ones do on theirs.
    let lock_name = format!("{}-reverse", config.source.lock_name());
    let Some(_lock) = ha_lock(&config, &lock_name, &state, &shutdown_rx).await? else { return Ok(()) };
    let claimed = sluice::ha::claim_name(&config.source.connection, &name).await?;
    state.active.store(true, std::sync::atomic::Ordering::Relaxed);
    let source = std::sync::Arc::new(sluice_postgres::SourceStats::default());
    state.set_source(std::sync::Arc::clone(&source));
    let way_back = sluice::migration::reverse_dynamodb::run(
        &config,
        std::sync::Arc::clone(&state.target),
        source,
        shutdown_rx,
    );
    tokio::select! {
        result = way_back => result?,
        reason = claimed.lost() => anyhow::bail!("{}: stopping, since another process may claim pipeline {name:?} now", reason.replace("HA lock", "pipeline name's lock")),
    }
    Ok(())
}

/// With `ha.enabled`, stands by until this replica holds the HA lock `lock_name`: `Some(lock)`,
/// or `None` when shutdown came first. Without HA, `Some(None)` at once.
async fn ha_lock(
    config: &Config,
    lock_name: &str,
    state: &sluice::monitor::PipelineState,
    shutdown: &sluice_core::Shutdown,
) -> anyhow::Result<Option<Option<sluice::ha::HaLock>>> {
    // Appliers ([source.kafka]) share partitions through their consumer group instead.
    if !config.ha.enabled || !config.source.is_database() {
        return Ok(Some(None));
    }
    let mut shutdown = shutdown.clone();
    let lock = sluice::ha::acquire(
        &config.source.connection,
        &config.ha.state_table,
        lock_name,
        config.ha.retry_interval,
        config.pipeline.retry_for,
        &state.standby_healthy,
        &mut shutdown,
    )
    .await?;
    Ok(lock.map(Some))
}

async fn run(config: Config, until_lsn: Option<Lsn>, mut signals: Signals) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = sluice_core::Shutdown::new();
    let trigger = shutdown_tx.clone();
    tokio::spawn(async move {
        signals.received().await;
        tracing::info!("signal received; draining");
        trigger.trigger();
    });
    let state = sluice::monitor::PipelineState::new(&config);
    let metrics = sluice::metrics::install(&config.pipeline.name);
    if let Some(listen) = config.monitoring.listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (monitoring.listen)"))?;
        tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz and /status");
        tokio::spawn(sluice::http::serve(
            listener,
            std::sync::Arc::clone(&state),
            metrics,
            shutdown_rx.clone(),
        ));
    }
    tokio::spawn(sluice::monitor::run(std::sync::Arc::clone(&state), config.clone(), shutdown_rx.clone()));

    let lock_name = config.source.lock_name();
    let Some(lock) = ha_lock(&config, &lock_name, &state, &shutdown_rx).await? else { return Ok(()) };
    // Requests are addressed by pipeline name: one running pipeline per name and database.
    // A polled outbox serves none (and its replicas may run without the HA lock).
    let name = match config.source.replication() {
        Some(_) => Some(sluice::ha::claim_name(&config.source.connection, &config.pipeline.name).await?),
        None => None,
    };
    if let Some(lock) = &lock {
        if !fencing_delay(&config, lock, &shutdown_rx).await {
            return Ok(());
        }
    }
    state.active.store(true, std::sync::atomic::Ordering::Relaxed);
    let pipeline = sluice::pipeline::run(&config, &state, shutdown_rx, |pipeline| {
        if let Some(until) = until_lsn {
            let mut durable = pipeline.durable;
            tokio::spawn(async move {
                if durable.wait_for(|&lsn| lsn >= until).await.is_ok() {
                    tracing::info!(lsn = %until, "reached --until-lsn");
                    shutdown_tx.trigger();
                }
            });
        }
    });
    let lock_lost = async {
        match &lock {
            Some(lock) => lock.lost().await,
            None => std::future::pending().await,
        }
    };
    let name_lost = async {
        match &name {
            Some(name) => name.lost().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = pipeline => result?,
        reason = lock_lost => anyhow::bail!("{reason}: stopping, since another replica may hold the HA lock now"),
        reason = name_lost => anyhow::bail!("{}: stopping, since another process may claim pipeline {:?} now", reason.replace("HA lock", "pipeline name's lock"), config.pipeline.name),
    }
    // Drained: every write is durable, so the next holder need not wait for one of ours.
    if let Some(lock) = lock {
        lock.release().await;
    }
    Ok(())
}

/// Before the first write of a target written without per-write guards: when the HA lock's
/// previous holder did not release it cleanly, waits out the longest time one of its writes
/// can still land (its lock-loss detection plus the target's request timeout). `false` when
/// shutdown came first.
async fn fencing_delay(config: &Config, lock: &sluice::ha::HaLock, shutdown: &sluice_core::Shutdown) -> bool {
    let Some(request_timeout) = config.target.unconditional_writes() else { return true };
    if matches!(lock.predecessor, sluice::ha::Predecessor::None | sluice::ha::Predecessor::Released) {
        return true;
    }
    let delay = sluice::ha::LOSS_DETECTION + request_timeout;
    tracing::info!(
        delay_s = delay.as_secs(),
        "fencing: the HA lock's previous holder did not release it cleanly and may still have a write in flight; \
         waiting before the first unconditional write (write_mode = \"batch\": the lock's loss detection plus \
         target.request_timeout)"
    );
    let mut shutdown = shutdown.clone();
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.requested() => false,
    }
}

/// SIGTERM and SIGINT, listened for from the moment `run` starts: one arriving before the
/// pipeline is up is kept and stops it gracefully once it is (the default action would kill
/// the process).
struct Signals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl Signals {
    fn install(runtime: &tokio::runtime::Runtime) -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let _entered = runtime.enter();
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => Self(Some((term, int))),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, "cannot listen for SIGTERM and SIGINT; they stop sluice without draining");
                Self(None)
            }
        }
    }

    /// Returns when either signal has arrived (since `install`); never without them.
    async fn received(&mut self) {
        match &mut self.0 {
            Some((term, int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            None => std::future::pending().await,
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => {
            JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
            builder.json().flatten_event(true).with_current_span(false).init()
        }
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
}

/// 0 when the target equals the source, 3 when it differs, 1 on failure.
fn verify_exit(result: anyhow::Result<u64>) -> ExitCode {
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(3),
        Err(error) => report(Err(error)),
    }
}

/// `validate`'s live checks, made by `run` before it streams: the problems that refuse the
/// start (with the warnings, unless allowed), or `None`. A source that does not answer yet
/// is retried within `pipeline.retry_for`; an unreachable target is logged, and left to the
/// target's own retries.
#[allow(clippy::type_complexity)]
async fn start_checks(
    config: &Config,
) -> anyhow::Result<Option<(Vec<sluice_core::Problem>, Vec<sluice_core::Problem>)>> {
    let policy = sluice_core::RetryPolicy::new(config.pipeline.retry_for);
    let findings = sluice_core::retry::retry(
        policy,
        &sluice_core::Shutdown::never(),
        "the start checks against the source database",
        || sluice::validate::live(config),
        |_| {},
    )
    .await
    .map_err(|gave_up| match gave_up {
        sluice_core::GaveUp::Failed { error, .. } => anyhow::Error::from(error).context(format!(
            "cannot check the source database {} (source.connection)",
            config.source.connection.addr()
        )),
        sluice_core::GaveUp::Shutdown => anyhow::anyhow!("stopped"),
    })?;
    for unreachable in &findings.unreachable {
        tracing::warn!(key = %unreachable.key, "start check skipped: {}; streaming starts, and writes retry within the target's retry_for", unreachable.message);
    }
    if config.pipeline.allow_warnings {
        for warning in &findings.warnings {
            tracing::warn!(key = %warning.key, "{} (allowed by pipeline.allow_warnings)", warning.message);
        }
        if findings.problems.is_empty() {
            return Ok(None);
        }
        return Ok(Some((findings.problems, Vec::new())));
    }
    if findings.problems.is_empty() && findings.warnings.is_empty() {
        return Ok(None);
    }
    Ok(Some((findings.problems, findings.warnings)))
}

/// The live checks failed (`validate`, or `run` refusing to stream): every problem and
/// warning, how to go on, and exit 2.
fn refused(header: &str, problems: &[sluice_core::Problem], warnings: &[sluice_core::Problem]) -> ExitCode {
    let mut lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.extend(warnings.iter().map(|w| format!("warning: {w}")));
    if !warnings.is_empty() {
        lines.push(
            "(`sluice validate` makes the same checks; a warning that describes the setup as intended is allowed \
             with pipeline.allow_warnings = true or `run --allow-warnings`)"
                .into(),
        );
    }
    fatal(header, &lines);
    ExitCode::from(2)
}

fn config_failure(error: &ConfigError) -> ExitCode {
    let lines: Vec<String> = error.to_string().lines().map(str::to_owned).collect();
    fatal("error: invalid configuration", &lines);
    ExitCode::from(2)
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            fatal(&format!("error: {}", sluice_postgres::error::Chain(error.as_ref())), &[]);
            ExitCode::FAILURE
        }
    }
}

/// Set by `--log-format json`: the last words are a JSON line too.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Why sluice stops, as its last words on standard error: a line and its details indented
/// below it, or, with `--log-format json`, one JSON log line (the details in `problems`).
fn fatal(message: &str, details: &[String]) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        let message = message.strip_prefix("error: ").unwrap_or(message);
        if details.is_empty() {
            tracing::error!("{message}");
        } else {
            tracing::error!(problems = %details.join("; "), "{message}");
        }
    } else {
        eprintln!("{message}");
        for line in details {
            eprintln!("  {line}");
        }
    }
}
