//! `sluice bench --cutover`: a table's cut-over with the application writing, on a throwaway
//! cluster with an old and a new database.
//!
//! Each run: both directions start (`sluice run`, `sluice run --reverse`); `--rows` rows are
//! loaded into the old table in transactions of `--tx-rows` and timed until the forward slot
//! confirmed them (the forward stream's rows/s); an application task then updates random rows
//! at `--writes-per-second`, against the old table until the fence refuses it, and against
//! the new one once `sluice cutover` has returned; the cut-over is timed from its start to
//! its exit (`reversed`), and the write unavailability is the time from the first refused
//! write to the first one the new table took. Last, `--rows` more rows go into the new table
//! and are timed until the reverse slot confirmed them (the way back's rows/s), the same
//! measure as the forward one, so their ratio compares the two directions on the same data.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{median, BenchArgs, BenchResult, BENCH_TABLE};
use crate::localpg::{ClusterOptions, LocalPostgres};

struct Sample {
    forward_rows_per_s: f64,
    reverse_rows_per_s: f64,
    cutover_s: f64,
    unavailable_s: f64,
    refused: u64,
    written: u64,
}

pub async fn run(args: BenchArgs) -> BenchResult<()> {
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(&ClusterOptions::default())).await??;
    let sluice = std::env::current_exe()?;
    println!(
        "sluice bench --cutover: {} rows (id bigint, name text, amount numeric) in transactions of {}, \
         {} application writes/s, {} runs",
        args.rows, args.tx_rows, args.writes_per_second, args.runs
    );
    println!(
        "{:>4} {:>16} {:>16} {:>7} {:>11} {:>15} {:>8} {:>8}",
        "run", "forward rows/s", "reverse rows/s", "ratio", "cutover s", "unavailable s", "refused", "writes"
    );
    let mut samples = Vec::new();
    for run in 0..args.runs {
        let sample = run_once(&pg, &sluice, &args, run).await?;
        println!(
            "{:>4} {:>16.0} {:>16.0} {:>7.3} {:>11.2} {:>15.2} {:>8} {:>8}",
            run + 1,
            sample.forward_rows_per_s,
            sample.reverse_rows_per_s,
            sample.reverse_rows_per_s / sample.forward_rows_per_s,
            sample.cutover_s,
            sample.unavailable_s,
            sample.refused,
            sample.written
        );
        samples.push(sample);
    }
    println!(
        "median {:>14.0} {:>16.0} {:>7.3} {:>11.2} {:>15.2}",
        median(&samples, |s| s.forward_rows_per_s),
        median(&samples, |s| s.reverse_rows_per_s),
        median(&samples, |s| s.reverse_rows_per_s / s.forward_rows_per_s),
        median(&samples, |s| s.cutover_s),
        median(&samples, |s| s.unavailable_s)
    );
    Ok(())
}

/// Kills the daemons when the run ends, however it ends.
struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }
}

async fn run_once(pg: &LocalPostgres, sluice: &Path, args: &BenchArgs, run: usize) -> BenchResult<Sample> {
    let (old, new) = (format!("cutover_{run}"), format!("cutover_{run}_new"));
    for db in [&old, &new] {
        pg.create_database(db)?;
        pg.psql(db, BENCH_TABLE)?;
    }
    pg.psql(&old, "CREATE PUBLICATION bench_pub FOR TABLE bench")?;
    let dir = tempfile::tempdir()?;
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(&mapping, "[[tables]]\nsource = \"public.bench\"\ntarget = \"public.bench\"\n")?;
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[monitoring]\nlisten = \"\"\n[source.connection]\nport = {port}\ndbname = \"{old}\"\n\
             [source.replication]\nslot = \"fwd_{run}\"\npublication = \"bench_pub\"\nstatus_interval = \"1s\"\n\
             [target]\nkind = \"postgres\"\nmapping = \"{}\"\n[target.connection]\nport = {port}\ndbname = \"{new}\"\nuser = \"postgres\"\n",
            mapping.display(),
            port = pg.port,
        ),
    )?;
    let start = |reverse: bool| -> BenchResult<Child> {
        let mut command = Command::new(sluice);
        command.arg("run").arg("-c").arg(&config);
        if reverse {
            command.arg("--reverse");
        }
        Ok(command.env("SLUICE_LOG", "warn").stdin(Stdio::null()).spawn()?)
    };
    let _daemons = Daemons(vec![start(false)?, start(true)?]);
    let (forward_slot, reverse_slot) = (format!("fwd_{run}"), format!("fwd_{run}_reverse"));
    wait_active(pg, &old, &forward_slot).await?;
    wait_active(pg, &new, &reverse_slot).await?;

    // The forward stream: the rows loaded, until durable in the new table.
    let forward_rows_per_s = load(pg, &old, &forward_slot, args, 0).await?;

    // The application, writing where the migration says.
    let moved = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(AppStats::default());
    let app = tokio::spawn(application(
        pg.connection(&old),
        pg.connection(&new),
        args.rows,
        args.writes_per_second,
        Arc::clone(&moved),
        Arc::clone(&stop),
        Arc::clone(&stats),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let cutover = tokio::task::spawn_blocking({
        let (sluice, config) = (sluice.to_owned(), config.clone());
        move || {
            Command::new(sluice)
                .args(["cutover", "--table", "public.bench", "--drain-timeout", "30m", "-c"])
                .arg(config)
                .env("SLUICE_LOG", "warn")
                .stdin(Stdio::null())
                .output()
        }
    })
    .await??;
    let cutover_s = started.elapsed().as_secs_f64();
    if !cutover.status.success() {
        stop.store(true, Ordering::Relaxed);
        return Err(format!("sluice cutover failed: {}", String::from_utf8_lossy(&cutover.stderr)).into());
    }
    moved.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats.first_new_ok_us.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            return Err("the application wrote nothing to the new table within 60 s of the cut-over".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let unavailable_s = match stats.first_refused_us.load(Ordering::Relaxed) {
        0 => 0.0,
        refused => (stats.first_new_ok_us.load(Ordering::Relaxed).saturating_sub(refused)) as f64 / 1e6,
    };

    // The way back: as many rows into the new table, until durable in the old one.
    let reverse_rows_per_s = load(pg, &new, &reverse_slot, args, args.rows).await?;
    stop.store(true, Ordering::Relaxed);
    app.await??;
    drop(_daemons);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg.psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_replication_slots WHERE active AND database IN ('{old}', '{new}')"),
    )? != "0"
    {
        if Instant::now() > deadline {
            return Err("the slots are still active 30 s after the daemons stopped".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (db, slot) in [(&old, &forward_slot), (&new, &reverse_slot)] {
        pg.psql(db, &format!("SELECT pg_drop_replication_slot('{slot}')"))?;
    }
    let copied: u64 = pg.psql(&old, "SELECT count(*) FROM bench")?.parse()?;
    if copied != 2 * args.rows {
        return Err(
            format!("the old table holds {copied} rows after the way back, not {}", 2 * args.rows).into()
        );
    }
    for db in [&old, &new] {
        pg.psql("postgres", &format!("DROP DATABASE \"{db}\" WITH (FORCE)"))?;
    }
    Ok(Sample {
        forward_rows_per_s,
        reverse_rows_per_s,
        cutover_s,
        unavailable_s,
        refused: stats.refused.load(Ordering::Relaxed),
        written: stats.written.load(Ordering::Relaxed),
    })
}

async fn wait_active(pg: &LocalPostgres, db: &str, slot: &str) -> BenchResult<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while pg.psql(
        db,
        &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active"),
    )? != "1"
    {
        if Instant::now() > deadline {
            return Err(format!("slot {slot} not streamed within 120 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Loads `--rows` rows with ids after `offset` into `db`'s bench table; rows/s from the start
/// of the load until `slot` confirmed its last commit.
async fn load(pg: &LocalPostgres, db: &str, slot: &str, args: &BenchArgs, offset: u64) -> BenchResult<f64> {
    let started = Instant::now();
    let end = super::load_rows(pg, db, args, offset)?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    while pg.psql(
        db,
        &format!(
            "SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    )? != "t"
    {
        if Instant::now() > deadline {
            return Err(format!("slot {slot} did not confirm {end} within an hour").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(args.rows as f64 / started.elapsed().as_secs_f64())
}

#[derive(Default)]
struct AppStats {
    /// Microseconds since the application started, 0 for not yet.
    first_refused_us: AtomicU64,
    first_new_ok_us: AtomicU64,
    refused: AtomicU64,
    written: AtomicU64,
}

/// Updates a random row at `rate` a second: in the old table until the fence refuses it, then
/// (once `moved`) in the new one.
async fn application(
    old: sluice_postgres::ConnectionConfig,
    new: sluice_postgres::ConnectionConfig,
    rows: u64,
    rate: u64,
    moved: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stats: Arc<AppStats>,
) -> BenchResult<()> {
    let old = sluice_postgres::connect_sql(&old).await?;
    let new = sluice_postgres::connect_sql(&new).await?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        // A spread of rows: a multiplicative hash of the write's number.
        let id = (n.wrapping_mul(2_654_435_761) % rows.max(1) + 1) as i64;
        let on_new = moved.load(Ordering::Relaxed);
        let client = if on_new { &new } else { &old };
        match client.execute("UPDATE bench SET amount = amount + 1 WHERE id = $1", &[&id]).await {
            Ok(_) => {
                stats.written.fetch_add(1, Ordering::Relaxed);
                if on_new {
                    let _ = stats.first_new_ok_us.compare_exchange(
                        0,
                        started.elapsed().as_micros().max(1) as u64,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
            }
            Err(e)
                if e.as_db_error()
                    .is_some_and(|d| d.code().code() == crate::migration::fence::REFUSED_SQLSTATE) =>
            {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                let _ = stats.first_refused_us.compare_exchange(
                    0,
                    started.elapsed().as_micros().max(1) as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
