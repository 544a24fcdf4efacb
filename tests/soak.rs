//! The fault soak: pgbench drives the source while sluice streams into a Postgres target, and
//! faults strike on a seeded schedule: kill -9 of sluice, the server's fast and immediate
//! restarts, the target unreachable (a proxy that cuts every connection), and kill -9 in the
//! middle of such an outage. After each fault the soak waits until the slot is confirmed past
//! everything written before it ended (the time to recover); at the end every source row is
//! compared with its target row.
//!
//! The suite runs the short form (5 faults of each kind, 5 s outages). Longer:
//! `SLUICE_SOAK_SECONDS=3600 SLUICE_SOAK_OUTAGE_SECONDS=60 SLUICE_SOAK_SEED=7 cargo test -p sluice
//! --test main --features sluice/test-hooks -- soak:: --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::localpg::LocalPostgres;
use sluice_core::Lsn;

use crate::harness::{kill_9, patience, sluice, Outage, TestDb};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*: the schedule is the same for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill9,
    RestartFast,
    RestartImmediate,
    TargetOutage,
    Kill9DuringOutage,
}

const FAULTS: [Fault; 5] = [
    Fault::Kill9,
    Fault::RestartFast,
    Fault::RestartImmediate,
    Fault::TargetOutage,
    Fault::Kill9DuringOutage,
];

const PGBENCH_SCRIPT: &str = "\\set id random(1, 1000)
\\set delta random(-100, 100)
BEGIN;
UPDATE accounts SET balance = balance + :delta, updates = updates + 1, at = now() WHERE id = :id;
INSERT INTO events (account, delta) VALUES (:id, :delta);
END;
";

const SCHEMA: &str = "CREATE TABLE accounts (id int8 PRIMARY KEY, balance int8 NOT NULL, updates int8 NOT NULL, at timestamptz);
  CREATE TABLE events (id bigserial PRIMARY KEY, account int8 NOT NULL, delta int8 NOT NULL)";

fn start_sluice(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    sluice().args(["run", "-c"]).arg(config).stdout(Stdio::null()).stderr(log).spawn().expect("start sluice")
}

/// Starts sluice again when it has exited, as Kubernetes restarts a pod: it exits by design
/// when the connection holding its pipeline lock is lost (a server restart), since another
/// replica may take over.
fn supervise(child: &mut Child, config: &Path, log: &Path, exits: &mut u32) {
    if let Ok(Some(_)) = child.try_wait() {
        *exits += 1;
        *child = start_sluice(config, log);
    }
}

/// A query that may meet the server restarting: None then.
fn query(pg: &LocalPostgres, db: &str, sql: &str) -> Option<String> {
    pg.psql(db, sql).ok()
}

/// pgbench at a fixed rate until `stop`, started again whenever a restart aborted its clients.
fn drive(pg: Arc<LocalPostgres>, db: String, script: std::path::PathBuf, stop: Arc<AtomicBool>) -> u32 {
    let mut runs = 0;
    while !stop.load(Ordering::SeqCst) {
        runs += 1;
        let _ = pg
            .client_command("pgbench")
            .args(["-n", "-h", "127.0.0.1", "-U", "postgres", "-c", "2", "-j", "1", "-R", "150", "-T", "10"])
            .arg("-p")
            .arg(pg.port.to_string())
            .arg("-f")
            .arg(&script)
            .arg(&db)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(200));
    }
    runs
}

/// Rows of `sql` (first column the key) as key → the rest.
fn rows(pg: &LocalPostgres, db: &str, sql: &str) -> BTreeMap<i64, String> {
    pg.psql(db, sql)
        .expect("read rows")
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (key, rest) = l.split_once('|').unwrap_or((l, ""));
            (key.parse().expect("a key"), rest.to_owned())
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_under_a_seeded_fault_schedule_loses_nothing() {
    let seed = env_or("SLUICE_SOAK_SEED", 17);
    let per_kind = env_or("SLUICE_SOAK_FAULTS_PER_KIND", 5);
    let min_seconds = env_or("SLUICE_SOAK_SECONDS", 0);
    let outage = Duration::from_secs(env_or("SLUICE_SOAK_OUTAGE_SECONDS", 5));
    let mut rng = Rng(seed.max(1));

    // A cluster of its own: the soak restarts it.
    let pg = Arc::new(LocalPostgres::start(&Default::default()).unwrap());
    let source = TestDb::in_cluster(Arc::clone(&pg));
    let target = TestDb::in_cluster(Arc::clone(&pg));
    source.sql(&format!("{SCHEMA}; CREATE PUBLICATION p FOR TABLE accounts, events"));
    target.sql(SCHEMA);
    let proxy = Outage::start(pg.port).await;

    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(
        &mapping,
        "[[tables]]\nsource = \"public.accounts\"\ntarget = \"public.accounts\"\n\n\
         [[tables]]\nsource = \"public.events\"\ntarget = \"public.events\"\n",
    )
    .unwrap();
    let slot = source.slot_name("soak");
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nretry_for = \"10m\"\n\n[monitoring]\nlisten = \"127.0.0.1:0\"\n\n\
             [source.connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"\n\n\
             [source.replication]\nslot = \"{slot}\"\npublication = \"p\"\nstatus_interval = \"1s\"\n\n\
             [target]\nkind = \"postgres\"\nmapping = \"{}\"\ndead_letter = \"{}\"\nretry_for = \"10m\"\n\n\
             [target.connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"\nuser = \"postgres\"\n",
            pg.port,
            source.name,
            mapping.display(),
            dir.path().join("dead.jsonl").display(),
            proxy.port,
            target.name,
        ),
    )
    .unwrap();
    let log = dir.path().join("sluice.log");
    let _logs = crate::harness::LogsOnPanic(vec![log.clone()]);
    let mut child = start_sluice(&config, &log);
    source.wait_slot_active(&slot).await;
    // Written once the slot exists, so that the stream carries every row (no backfill here).
    source.sql("INSERT INTO accounts SELECT g, 0, 0, now() FROM generate_series(1, 1000) g");

    let script = dir.path().join("soak.sql");
    std::fs::write(&script, PGBENCH_SCRIPT).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let (pg, db, stop) = (Arc::clone(&pg), source.name.clone(), Arc::clone(&stop));
        std::thread::spawn(move || drive(pg, db, script, stop))
    };

    let started = Instant::now();
    let mut recoveries: BTreeMap<Fault, Vec<Duration>> = BTreeMap::new();
    let mut exits = 0;
    let mut round = 0u64;
    while recoveries.values().map(Vec::len).min().unwrap_or(0) < per_kind as usize
        || recoveries.len() < FAULTS.len()
        || started.elapsed() < Duration::from_secs(min_seconds)
    {
        // Each kind once per round, in a seeded order.
        let mut order = FAULTS.to_vec();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for fault in order {
            tokio::time::sleep(Duration::from_millis(1_000 + rng.below(3_000))).await;
            supervise(&mut child, &config, &log, &mut exits);
            match fault {
                Fault::Kill9 => {
                    kill_9(&mut child);
                    child = start_sluice(&config, &log);
                }
                Fault::RestartFast | Fault::RestartImmediate => {
                    pg.stop(if fault == Fault::RestartFast { "fast" } else { "immediate" }).unwrap();
                    tokio::time::sleep(Duration::from_millis(500 + rng.below(1_500))).await;
                    pg.restart().unwrap();
                }
                Fault::TargetOutage => {
                    proxy.begin();
                    tokio::time::sleep(outage).await;
                    proxy.end();
                }
                Fault::Kill9DuringOutage => {
                    proxy.begin();
                    tokio::time::sleep(outage / 2).await;
                    kill_9(&mut child);
                    child = start_sluice(&config, &log);
                    tokio::time::sleep(outage / 2).await;
                    proxy.end();
                }
            }
            // Recovered: the slot is confirmed past everything written before the fault ended.
            let ended = Instant::now();
            let mut mark = None;
            let deadline = ended + patience(Duration::from_secs(120));
            loop {
                let now = query(&pg, &source.name, "SELECT pg_current_wal_insert_lsn()")
                    .and_then(|t| t.parse::<Lsn>().ok());
                if mark.is_none() {
                    mark = now;
                }
                let confirmed = query(
                    &pg,
                    &source.name,
                    &format!(
                        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
                    ),
                )
                .and_then(|t| t.parse::<Lsn>().ok());
                supervise(&mut child, &config, &log, &mut exits);
                if let (Some(mark), Some(confirmed)) = (mark, confirmed) {
                    if confirmed >= mark {
                        break;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: no recovery from {fault:?} within {:?} (mark {mark:?}, confirmed {confirmed:?})",
                    deadline - ended
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            recoveries.entry(fault).or_default().push(ended.elapsed());
        }
        round += 1;
    }

    stop.store(true, Ordering::SeqCst);
    let pgbench_runs = tokio::task::spawn_blocking(move || driver.join().unwrap()).await.unwrap();
    let end = source.insert_lsn();
    crate::harness::wait_for("the slot to pass the last transaction", Duration::from_secs(120), || async {
        source.slot_confirmed("soak").is_some_and(|c| c >= end)
    })
    .await;
    crate::harness::stop(child);

    let accounts_sql = "SELECT id, balance || ',' || updates FROM accounts ORDER BY id";
    let (want, got) = (rows(&pg, &source.name, accounts_sql), rows(&pg, &target.name, accounts_sql));
    let missing = want.keys().filter(|k| !got.contains_key(k)).count();
    let update_count = |v: &str| v.rsplit(',').next().unwrap_or("0").parse::<i64>().unwrap_or(0);
    let older =
        want.iter().filter(|(k, v)| got.get(k).is_some_and(|g| update_count(g) < update_count(v))).count();
    let different = want.iter().filter(|(k, v)| got.get(k).is_some_and(|g| g != *v)).count();
    let events_sql = "SELECT id FROM events ORDER BY id";
    let source_events: BTreeSet<i64> = rows(&pg, &source.name, events_sql).into_keys().collect();
    let target_events: BTreeSet<i64> = rows(&pg, &target.name, events_sql).into_keys().collect();
    let lost_events = source_events.difference(&target_events).count();
    let extra_events = target_events.difference(&source_events).count();

    let faults: usize = recoveries.values().map(Vec::len).sum();
    eprintln!(
        "soak: seed {seed}, {:.0} s, {} transactions (pgbench started {pgbench_runs} times), {faults} faults, \
         sluice exited {exits} times by itself (restarted, as Kubernetes would)",
        started.elapsed().as_secs_f64(),
        source_events.len()
    );
    for (fault, times) in &mut recoveries {
        times.sort();
        eprintln!(
            "soak: {fault:?}: {} times, recovery p50 {:.1} s, max {:.1} s",
            times.len(),
            percentile(times, 0.5).as_secs_f64(),
            times.last().unwrap().as_secs_f64()
        );
    }
    eprintln!(
        "soak: accounts missing {missing}, older than the source {older}, different {different}; \
         events lost {lost_events}, not in the source {extra_events}"
    );
    assert!(source_events.len() > 100, "pgbench committed only {} transactions", source_events.len());
    assert_eq!((missing, older, different), (0, 0, 0), "accounts: missing, older, different");
    assert_eq!((lost_events, extra_events), (0, 0), "events: lost, not in the source");
}
