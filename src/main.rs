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
    },
    /// Check a configuration file, and its mapping against the source database; prints every
    /// problem with its dotted key.
    Validate {
        #[arg(short, long)]
        config: PathBuf,
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
    },
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
    /// Benchmark the stream against pg_recvlogical on the same data (see the README).
    Bench(sluice::bench::BenchArgs),
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
    match cli.command {
        Command::Validate { config: path, offline } => match Config::load(&path) {
            Ok(_) if offline => {
                println!("{}: ok (offline: the database was not consulted)", path.display());
                ExitCode::SUCCESS
            }
            Ok(config) => match runtime.block_on(sluice::validate::against_database(&config)) {
                Ok(problems) if problems.is_empty() => {
                    println!("{}: ok", path.display());
                    ExitCode::SUCCESS
                }
                Ok(problems) => config_failure(&ConfigError::Invalid { problems }),
                Err(e) => report(Err(anyhow::Error::from(e))),
            },
            Err(e) => config_failure(&e),
        },
        Command::Run { config, until_lsn } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            report(runtime.block_on(run(config, until_lsn)))
        }
        Command::Status { config, json } => match Config::load(&config) {
            Ok(config) => {
                report(runtime.block_on(sluice::status::print(&config, json)).map_err(anyhow::Error::from))
            }
            Err(e) => config_failure(&e),
        },
        Command::Snapshot { config, tables, no_wait } => match Config::load(&config) {
            Ok(config) => report(
                runtime
                    .block_on(sluice::backfill::snapshot(&config, &tables, !no_wait))
                    .map_err(anyhow::Error::from),
            ),
            Err(e) => config_failure(&e),
        },
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
        Command::Bench(args) => {
            report(runtime.block_on(sluice::bench::run(args)).map_err(anyhow::Error::from_boxed))
        }
    }
}

async fn run(config: Config, until_lsn: Option<Lsn>) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = sluice_core::Shutdown::new();
    let signals = shutdown_tx.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; draining");
        signals.trigger();
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

    let lock = if config.ha.enabled {
        let mut shutdown = shutdown_rx.clone();
        let lock_name = config.source.lock_name();
        match sluice::ha::acquire(
            &config.source.connection,
            &lock_name,
            config.ha.retry_interval,
            config.pipeline.retry_for,
            &state.standby_healthy,
            &mut shutdown,
        )
        .await?
        {
            Some(lock) => Some(lock),
            None => return Ok(()),
        }
    } else {
        None
    };
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
    match lock {
        Some(lock) => tokio::select! {
            result = pipeline => result?,
            reason = lock.lost() => anyhow::bail!("{reason}: stopping, since another replica may hold the HA lock now"),
        },
        None => pipeline.await?,
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
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

fn config_failure(error: &ConfigError) -> ExitCode {
    eprintln!("error: invalid configuration");
    for line in error.to_string().lines() {
        eprintln!("  {line}");
    }
    ExitCode::from(2)
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", sluice_postgres::error::Chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}
