//! The fault soak: pgbench drives the source while three pipelines stream it into a Postgres
//! target (two replicas sharing the HA lock), a DynamoDB-API server (moto) and a Kafka-protocol
//! broker (tansu), each target behind a proxy. Faults strike on a seeded schedule: kill -9 of
//! sluice; the HA standby taking over from a killed replica; the source server's fast and
//! immediate restarts; every target unreachable (connections cut and refused) or black-holed
//! (connections open, nothing passing); kill -9 of every process in the middle of an outage;
//! and the Postgres pipeline's slot invalidated by `max_slot_wal_keep_size`, which
//! `on_slot_lost = "stop"` must refuse by name until the operator drops the slot and backfills.
//! After each fault the soak waits until every slot is confirmed past everything written before
//! the fault ended (the time to recover); at the end every source row is compared with each
//! target, and every Kafka duplicate must lie at or past the slot's confirmed position at a
//! fault between its two copies.
//!
//! The suite runs the short form (5 faults of each kind, 5 s outages). Longer:
//! `SLUICE_SOAK_SECONDS=3600 SLUICE_SOAK_OUTAGE_SECONDS=60 SLUICE_SOAK_SEED=7 cargo test -p sluice
//! --test main --features sluice/test-hooks -- soak:: --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::localpg::{free_port, ClusterOptions, LocalPostgres};
use sluice_core::Lsn;
use sluice_dynamodb::{Attr, DynamoClient};

use crate::harness::{dynamo_client, http_get, kill_9, moto, patience, sluice, Kafka, Outage, TestDb};

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
    /// kill -9 of the DynamoDB or the Kafka pipeline's process.
    Kill9,
    /// kill -9 of the Postgres pipeline's streaming replica: the standby takes the lock.
    HaTakeover,
    RestartFast,
    RestartImmediate,
    /// Every target's proxy cuts its connections and refuses new ones.
    TargetOutage,
    /// Every target's proxy keeps its connections open and passes nothing.
    TargetBlackHole,
    /// kill -9 of every process in the middle of an outage.
    Kill9DuringOutage,
    /// The Postgres pipeline's slot falls behind `max_slot_wal_keep_size` and is invalidated.
    SlotLost,
}

const FAULTS: [Fault; 8] = [
    Fault::Kill9,
    Fault::HaTakeover,
    Fault::RestartFast,
    Fault::RestartImmediate,
    Fault::TargetOutage,
    Fault::TargetBlackHole,
    Fault::Kill9DuringOutage,
    Fault::SlotLost,
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

/// What the slot may hold back before the server invalidates it: small, so that the slot-loss
/// fault needs little WAL, and far above what a 60 s outage makes pgbench write.
const SLOT_WAL_KEEP_MB: u64 = 64;

/// One sluice process of a pipeline.
struct Replica {
    child: Child,
    /// Its monitoring port.
    port: u16,
}

/// A pipeline: its config, its log and its processes (two for the Postgres target, which
/// share the HA lock).
struct Pipeline {
    name: &'static str,
    slot: String,
    config: PathBuf,
    log: PathBuf,
    replicas: Vec<Replica>,
    /// Processes that exited by themselves and were started again.
    exits: u32,
}

impl Pipeline {
    fn new(name: &'static str, slot: String, config: PathBuf, log: PathBuf, count: usize) -> Self {
        let mut pipeline = Pipeline { name, slot, config, log, replicas: Vec::new(), exits: 0 };
        for _ in 0..count {
            let port = free_port().unwrap();
            let child = pipeline.spawn(port, &pipeline.log);
            pipeline.replicas.push(Replica { child, port });
        }
        pipeline
    }

    fn spawn(&self, port: u16, log: &Path) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        sluice()
            .args(["run", "-c"])
            .arg(&self.config)
            .env("SLUICE__MONITORING__LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sluice")
    }

    fn kill_9(&mut self, index: usize) {
        kill_9(&mut self.replicas[index].child);
        self.respawn(index);
    }

    fn respawn(&mut self, index: usize) {
        self.replicas[index].child = self.spawn(self.replicas[index].port, &self.log);
    }

    /// Starts again what exited, as Kubernetes restarts a pod: sluice exits by design when the
    /// connection holding its pipeline lock is lost (a server restart), since another replica
    /// may take over.
    fn supervise(&mut self) {
        for i in 0..self.replicas.len() {
            if let Ok(Some(_)) = self.replicas[i].child.try_wait() {
                self.exits += 1;
                self.replicas[i].child = self.spawn(self.replicas[i].port, &self.log);
            }
        }
    }

    /// The replica that streams (holds the HA lock), if one does.
    fn streaming(&self) -> Option<usize> {
        self.replicas.iter().position(|r| {
            http_get(r.port, "/status")
                .filter(|(code, _)| *code == 200)
                .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                .is_some_and(|status| status["streaming"] == true)
        })
    }

    fn stop(self) {
        for replica in self.replicas {
            crate::harness::stop(replica.child);
        }
    }
}

/// A query that may meet the server restarting: None then.
fn query(pg: &LocalPostgres, db: &str, sql: &str) -> Option<String> {
    pg.psql(db, sql).ok()
}

fn slot_confirmed(pg: &LocalPostgres, db: &str, slot: &str) -> Option<Lsn> {
    query(pg, db, &format!("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"))
        .and_then(|t| t.parse().ok())
}

/// pgbench at a fixed rate until `stop`, started again whenever a restart aborted its clients.
fn drive(pg: Arc<LocalPostgres>, db: String, script: PathBuf, rate: u64, stop: Arc<AtomicBool>) -> u32 {
    let mut runs = 0;
    while !stop.load(Ordering::SeqCst) {
        runs += 1;
        let _ = pg
            .client_command("pgbench")
            .args(["-n", "-h", "127.0.0.1", "-U", "postgres", "-c", "2", "-j", "1", "-T", "10"])
            .arg("-R")
            .arg(rate.to_string())
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

/// The nearest-rank percentile of sorted times.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// What one target holds, for the comparison with the source: accounts as `balance,updates`,
/// and the event ids.
struct Holdings {
    accounts: BTreeMap<i64, String>,
    events: BTreeSet<i64>,
}

/// Missing, older than the source (fewer updates) and different accounts; lost events and
/// events not in the source.
fn compare(want: &BTreeMap<i64, String>, events: &BTreeSet<i64>, got: &Holdings) -> [usize; 5] {
    let updates = |v: &str| v.rsplit(',').next().unwrap_or("0").parse::<i64>().unwrap_or(0);
    let accounts = &got.accounts;
    [
        want.keys().filter(|k| !accounts.contains_key(k)).count(),
        want.iter().filter(|(k, v)| accounts.get(k).is_some_and(|g| updates(g) < updates(v))).count(),
        want.iter().filter(|(k, v)| accounts.get(k).is_some_and(|g| g != *v)).count(),
        events.difference(&got.events).count(),
        got.events.difference(events).count(),
    ]
}

async fn dynamodb_holdings(client: &DynamoClient, table: &str) -> Holdings {
    let number = |attr: Option<&Attr>| match attr {
        Some(Attr::N(n)) => n.clone(),
        other => panic!("a number attribute, not {other:?}"),
    };
    let mut holdings = Holdings { accounts: BTreeMap::new(), events: BTreeSet::new() };
    for item in client.scan_all(table).await.expect("scan the DynamoDB table") {
        let Some(Attr::S(pk)) = item.get("pk") else { panic!("an item without its key") };
        if let Some(id) = pk.strip_prefix("ACCOUNT#") {
            let value = format!("{},{}", number(item.get("balance")), number(item.get("updates")));
            holdings.accounts.insert(id.parse().unwrap(), value);
        } else if let Some(id) = pk.strip_prefix("EVENT#") {
            holdings.events.insert(id.parse().unwrap());
        }
    }
    holdings
}

/// One Kafka record, as the soak reads it.
struct Record {
    partition: i32,
    offset: i64,
    key: String,
    /// `commit_lsn/ordinal`, from the `sluice.position` header.
    position: (Lsn, u64),
    /// The row after the change.
    new: serde_json::Value,
}

/// Every record of `topic`, once none has come for 5 s.
fn consume(kafka: &Kafka, topic: &str) -> Vec<Record> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("soak-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30)).expect("metadata");
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..metadata.topics()[0].partitions().len() as i32 {
        assignment.add_partition_offset(topic, partition, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).expect("assign");
    let mut records = Vec::new();
    let mut last = Instant::now();
    let deadline = Instant::now() + patience(Duration::from_secs(900));
    while last.elapsed() < Duration::from_secs(5) {
        assert!(Instant::now() < deadline, "consuming {topic} took too long: {} records", records.len());
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = message.expect("consume");
        last = Instant::now();
        let position = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "sluice.position").and_then(|h| h.value))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("a sluice.position header");
        // `commit_lsn/ordinal`, and an LSN has a slash of its own.
        let (lsn, ordinal) = position.rsplit_once('/').expect("commit_lsn/ordinal");
        let value: serde_json::Value =
            serde_json::from_slice(message.payload().expect("a value")).expect("a JSON value");
        records.push(Record {
            partition: message.partition(),
            offset: message.offset(),
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            position: (lsn.parse().expect("an LSN"), ordinal.parse().expect("an ordinal")),
            new: value["new"].clone(),
        });
    }
    records
}

/// The high watermark of each partition of `topic`.
fn watermarks(kafka: &Kafka, topic: &str) -> Vec<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &kafka.brokers).create().expect("consumer");
    (0..3)
        .map(|partition| {
            consumer.fetch_watermarks(topic, partition, Duration::from_secs(30)).expect("watermarks").1
        })
        .collect()
}

/// What a fault's start looked like to Kafka: each topic's watermarks and the Kafka slot's
/// confirmed position (None where a server restart can move the slot back to its last
/// checkpointed position).
struct Mark {
    fault: Fault,
    watermarks: BTreeMap<&'static str, Vec<i64>>,
    confirmed: Option<Lsn>,
}

/// Records of the topic written again, and those of them that no fault explains. A run sends a
/// record again only when it replays from the slot's confirmed position (a restart) or resends
/// a batch the target failed (an outage): either way at or past the position the slot had
/// confirmed when the last fault before the second copy began (each fault waits for the one
/// before it to be recovered from). A server restart can move the slot back to its last
/// checkpointed position, so after one any position is explained.
fn duplicates(records: &[Record], topic: &'static str, marks: &[Mark]) -> (usize, Vec<String>) {
    let mut first: BTreeMap<(&str, (Lsn, u64)), i64> = BTreeMap::new();
    let (mut again, mut unexplained) = (0, Vec::new());
    for record in records {
        let Some(&offset) = first.get(&(record.key.as_str(), record.position)) else {
            first.insert((record.key.as_str(), record.position), record.offset);
            continue;
        };
        again += 1;
        let partition = record.partition as usize;
        let last_fault = marks.iter().rev().find(|mark| mark.watermarks[topic][partition] <= record.offset);
        let explained = last_fault
            .is_some_and(|mark| mark.confirmed.is_none_or(|confirmed| record.position.0 >= confirmed));
        if !explained {
            unexplained.push(format!(
                "{topic}[{partition}] {}/{} at offsets {offset} and {}, last fault before: {:?}",
                record.position.0,
                record.position.1,
                record.offset,
                last_fault.map(|m| (m.fault, m.confirmed))
            ));
        }
    }
    (again, unexplained)
}

/// Ids as ranges, for a message.
fn ranges(ids: impl IntoIterator<Item = i64>) -> String {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for id in ids {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == id => *end = id,
            _ => out.push((id, id)),
        }
    }
    out.iter()
        .map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A JSON number or string, as text.
fn plain(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The accounts' last record per key (the newest state) and the event ids, from Kafka.
fn kafka_holdings(accounts: &[Record], events: &[Record]) -> Holdings {
    let mut last: BTreeMap<i64, (i32, i64, String)> = BTreeMap::new();
    for record in accounts {
        let id = record.new["id"].as_i64().expect("an account id");
        let value = format!("{},{}", plain(&record.new["balance"]), plain(&record.new["updates"]));
        let entry = last.entry(id).or_insert((record.partition, record.offset, value.clone()));
        if record.offset >= entry.1 {
            *entry = (record.partition, record.offset, value);
        }
    }
    Holdings {
        accounts: last.into_iter().map(|(id, (_, _, value))| (id, value)).collect(),
        events: events.iter().map(|r| r.new["id"].as_i64().expect("an event id")).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_under_a_seeded_fault_schedule_loses_nothing() {
    let seed = env_or("SLUICE_SOAK_SEED", 17);
    let per_kind = env_or("SLUICE_SOAK_FAULTS_PER_KIND", 5);
    let min_seconds = env_or("SLUICE_SOAK_SECONDS", 0);
    let outage = Duration::from_secs(env_or("SLUICE_SOAK_OUTAGE_SECONDS", 5));
    let rate = env_or("SLUICE_SOAK_RATE", 100);
    let mut rng = Rng(seed.max(1));

    // A cluster of its own: the soak restarts it and fills its WAL.
    let pg = Arc::new(
        LocalPostgres::start(&ClusterOptions {
            settings: vec![("max_slot_wal_keep_size".into(), format!("{SLOT_WAL_KEEP_MB}MB"))],
            ..Default::default()
        })
        .unwrap(),
    );
    let source = TestDb::in_cluster(Arc::clone(&pg));
    let target = TestDb::in_cluster(Arc::clone(&pg));
    source.sql(&format!("{SCHEMA}; CREATE PUBLICATION p FOR TABLE accounts, events"));
    target.sql(SCHEMA);
    let pg_proxy = Outage::start(pg.port).await;

    let moto = moto();
    let moto_proxy = Outage::start(moto.port).await;
    let client = dynamo_client(&moto.url).await;
    let table = format!("soak_{}", source.name);
    client.create_table(&table, "pk", None).await.unwrap();

    let kafka_port = free_port().unwrap();
    let kafka = Kafka::start(Some(kafka_port));
    let kafka_proxy = Outage::start_on(kafka_port, kafka.port).await;
    const TOPICS: [&str; 2] = ["soak.accounts", "soak.events"];
    for topic in TOPICS {
        kafka.create_topic(topic, 3).await;
    }
    let proxies = [&pg_proxy, &moto_proxy, &kafka_proxy];

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let pg_mapping = write(
        "pg_mapping.toml",
        "[[tables]]\nsource = \"public.accounts\"\ntarget = \"public.accounts\"\n\n\
         [[tables]]\nsource = \"public.events\"\ntarget = \"public.events\"\n"
            .into(),
    );
    let dynamodb_mapping = write(
        "dynamodb_mapping.toml",
        format!(
            "[[tables]]\nsource = \"public.accounts\"\ntarget = \"{table}\"\n\
             partition_key = {{ attribute = \"pk\", template = \"ACCOUNT#{{id}}\" }}\n\n\
             [[tables]]\nsource = \"public.events\"\ntarget = \"{table}\"\n\
             partition_key = {{ attribute = \"pk\", template = \"EVENT#{{id}}\" }}\n"
        ),
    );
    let config = |name: &'static str, slot: &str, target: String| -> PathBuf {
        write(
            &format!("{name}.toml"),
            format!(
                "[pipeline]\nname = \"{name}\"\nretry_for = \"10m\"\n\n\
                 [source.connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"\n\n\
                 [source.replication]\nslot = \"{slot}\"\npublication = \"p\"\nstatus_interval = \"1s\"\n\
                 on_slot_lost = \"stop\"\n\n{target}\n",
                pg.port, source.name
            ),
        )
    };
    let slot = |name: &str| source.slot_name(&format!("soak_{name}"));
    let configs = [
        (
            "postgres",
            2,
            config(
                "postgres",
                &slot("postgres"),
                format!(
                    "[target]\nkind = \"postgres\"\nmapping = \"{}\"\ndead_letter = \"{}\"\n\n\
                     [target.connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"\nuser = \"postgres\"",
                    pg_mapping.display(),
                    dir.path().join("postgres_dead.jsonl").display(),
                    pg_proxy.port,
                    target.name,
                ),
            ),
        ),
        (
            "dynamodb",
            1,
            config(
                "dynamodb",
                &slot("dynamodb"),
                format!(
                    "[target]\nkind = \"dynamodb\"\nmapping = \"{}\"\nendpoint_url = \"{}\"\nregion = \"us-east-1\"\n\
                     access_key_id = \"test\"\nsecret_access_key = \"test\"\nconcurrency = 8\ndead_letter = \"{}\"",
                    dynamodb_mapping.display(),
                    moto_proxy.url(),
                    dir.path().join("dynamodb_dead.jsonl").display(),
                ),
            ),
        ),
        (
            "kafka",
            1,
            config(
                "kafka",
                &slot("kafka"),
                format!(
                    "[target]\nkind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"soak.{{table}}\"",
                    kafka.brokers
                ),
            ),
        ),
    ];
    let logs: Vec<PathBuf> =
        configs.iter().map(|(name, ..)| dir.path().join(format!("{name}.log"))).collect();
    let _logs = crate::harness::LogsOnPanic(logs.clone());
    let mut pipelines: Vec<Pipeline> = configs
        .iter()
        .zip(&logs)
        .map(|((name, count, config), log)| {
            Pipeline::new(name, slot(name), config.clone(), log.clone(), *count)
        })
        .collect();
    for pipeline in &pipelines {
        source.wait_slot_active(&pipeline.slot).await;
    }
    // Written once the slots exist, so that the stream carries every row (no backfill here).
    source.sql("INSERT INTO accounts SELECT g, 0, 0, now() FROM generate_series(1, 1000) g");

    let script = dir.path().join("soak.sql");
    std::fs::write(&script, PGBENCH_SCRIPT).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let (pg, db, stop) = (Arc::clone(&pg), source.name.clone(), Arc::clone(&stop));
        std::thread::spawn(move || drive(pg, db, script, rate, stop))
    };

    let started = Instant::now();
    let mut recoveries: BTreeMap<Fault, Vec<Duration>> = BTreeMap::new();
    let mut marks: Vec<Mark> = Vec::new();
    let mut kills = 0;
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
            pipelines.iter_mut().for_each(Pipeline::supervise);
            let restart = matches!(fault, Fault::RestartFast | Fault::RestartImmediate);
            marks.push(Mark {
                fault,
                watermarks: TOPICS.iter().map(|t| (*t, watermarks(&kafka, t))).collect(),
                confirmed: if restart { None } else { slot_confirmed(&pg, &source.name, &pipelines[2].slot) },
            });
            match fault {
                Fault::Kill9 => {
                    pipelines[1 + rng.below(2) as usize].kill_9(0);
                    kills += 1;
                }
                Fault::HaTakeover => {
                    let pipeline = &mut pipelines[0];
                    let deadline = Instant::now() + patience(Duration::from_secs(60));
                    let leader = loop {
                        if let Some(leader) = pipeline.streaming() {
                            break leader;
                        }
                        assert!(Instant::now() < deadline, "round {round}: no Postgres replica streams");
                        pipeline.supervise();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    };
                    // Started again once the other took over, so that the lock passes to the
                    // standby rather than back to the restarted process.
                    kill_9(&mut pipeline.replicas[leader].child);
                    kills += 1;
                    let other = 1 - leader;
                    let deadline = Instant::now() + patience(Duration::from_secs(60));
                    while pipeline.streaming() != Some(other) {
                        assert!(
                            Instant::now() < deadline,
                            "round {round}: the standby did not take over from the killed replica"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    pipeline.respawn(leader);
                }
                Fault::RestartFast | Fault::RestartImmediate => {
                    pg.stop(if fault == Fault::RestartFast { "fast" } else { "immediate" }).unwrap();
                    tokio::time::sleep(Duration::from_millis(500 + rng.below(1_500))).await;
                    pg.restart().unwrap();
                }
                Fault::TargetOutage => {
                    proxies.iter().for_each(|p| p.begin());
                    tokio::time::sleep(outage).await;
                    proxies.iter().for_each(|p| p.end());
                }
                Fault::TargetBlackHole => {
                    proxies.iter().for_each(|p| p.black_hole());
                    tokio::time::sleep(outage).await;
                    proxies.iter().for_each(|p| p.heal());
                }
                Fault::Kill9DuringOutage => {
                    proxies.iter().for_each(|p| p.begin());
                    tokio::time::sleep(outage / 2).await;
                    for pipeline in &mut pipelines {
                        for i in 0..pipeline.replicas.len() {
                            pipeline.kill_9(i);
                            kills += 1;
                        }
                    }
                    tokio::time::sleep(outage / 2).await;
                    proxies.iter().for_each(|p| p.end());
                }
                Fault::SlotLost => {}
            }
            // Recovered: every slot is confirmed past everything written before the fault ended.
            // The slot's loss ends when sluice refused the lost slot; the recovery includes the
            // operator's steps and the backfill.
            let ended = match fault {
                Fault::SlotLost => lose_the_slot(&pg, &source, &mut pipelines, round).await,
                _ => Instant::now(),
            };
            let mut mark = None;
            let deadline = ended + patience(Duration::from_secs(180));
            loop {
                let now = query(&pg, &source.name, "SELECT pg_current_wal_insert_lsn()")
                    .and_then(|t| t.parse::<Lsn>().ok());
                if mark.is_none() {
                    mark = now;
                }
                let confirmed: Vec<Option<Lsn>> =
                    pipelines.iter().map(|p| slot_confirmed(&pg, &source.name, &p.slot)).collect();
                pipelines.iter_mut().for_each(Pipeline::supervise);
                if let Some(mark) = mark {
                    if confirmed.iter().all(|c| c.is_some_and(|c| c >= mark)) {
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
            eprintln!(
                "soak: {:>6.1} s round {round} {fault:?} recovered in {:.1} s",
                started.elapsed().as_secs_f64(),
                ended.elapsed().as_secs_f64()
            );
        }
        round += 1;
    }

    stop.store(true, Ordering::SeqCst);
    let pgbench_runs = tokio::task::spawn_blocking(move || driver.join().unwrap()).await.unwrap();
    let end = source.insert_lsn();
    for pipeline in &pipelines {
        crate::harness::wait_for(
            "every slot to pass the last transaction",
            Duration::from_secs(180),
            || async { slot_confirmed(&pg, &source.name, &pipeline.slot).is_some_and(|c| c >= end) },
        )
        .await;
    }
    let exits: Vec<String> = pipelines.iter().map(|p| format!("{} {}", p.name, p.exits)).collect();
    pipelines.into_iter().for_each(Pipeline::stop);

    let accounts_sql = "SELECT id, balance || ',' || updates FROM accounts ORDER BY id";
    let events_sql = "SELECT id FROM events ORDER BY id";
    let want = rows(&pg, &source.name, accounts_sql);
    let source_events: BTreeSet<i64> = rows(&pg, &source.name, events_sql).into_keys().collect();
    let postgres = Holdings {
        accounts: rows(&pg, &target.name, accounts_sql),
        events: rows(&pg, &target.name, events_sql).into_keys().collect(),
    };
    let dynamodb = dynamodb_holdings(&client, &table).await;
    let (kafka_accounts, kafka_events) = {
        let kafka = &kafka;
        (consume(kafka, TOPICS[0]), consume(kafka, TOPICS[1]))
    };
    let kafka_duplicates =
        [duplicates(&kafka_accounts, TOPICS[0], &marks), duplicates(&kafka_events, TOPICS[1], &marks)];
    let kafka_state = kafka_holdings(&kafka_accounts, &kafka_events);

    let faults: usize = recoveries.values().map(Vec::len).sum();
    eprintln!(
        "soak: seed {seed}, {:.0} s, {} transactions at {rate}/s (pgbench started {pgbench_runs} times), \
         {faults} faults, {kills} kill -9; exited by themselves and restarted (as Kubernetes would): {}",
        started.elapsed().as_secs_f64(),
        source_events.len(),
        exits.join(", ")
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
    let mut anomalies = Vec::new();
    for (name, holdings) in [("postgres", &postgres), ("dynamodb", &dynamodb), ("kafka", &kafka_state)] {
        let [missing, older, different, lost, extra] = compare(&want, &source_events, holdings);
        eprintln!(
            "soak: {name}: accounts missing {missing}, older than the source {older}, different {different}; \
             events lost {lost}, not in the source {extra}"
        );
        if missing + older + different + lost + extra > 0 {
            eprintln!(
                "soak: {name}: events lost: {}",
                ranges(source_events.difference(&holdings.events).copied())
            );
            anomalies.push(name);
        }
    }
    for (topic, (again, unexplained)) in TOPICS.iter().zip(kafka_duplicates) {
        eprintln!(
            "soak: kafka {topic}: {again} records written again, {} of them not explained by a fault",
            unexplained.len()
        );
        for line in unexplained.iter().take(10) {
            eprintln!("soak:   {line}");
        }
        if !unexplained.is_empty() {
            anomalies.push(topic);
        }
    }
    assert!(source_events.len() > 100, "pgbench committed only {} transactions", source_events.len());
    assert!(anomalies.is_empty(), "anomalies in {anomalies:?}");
}

/// The slot-loss fault: the Postgres pipeline's processes are killed; pgbench and WAL segment
/// switches carry the server past `max_slot_wal_keep_size` while the other slots keep up; a
/// checkpoint invalidates the slot. A restarted sluice must refuse it by name, exit and confirm
/// nothing; then the operator's recovery from the README: drop the slot, start sluice (it
/// creates the slot anew) and backfill every table (`sluice snapshot`).
async fn lose_the_slot(
    pg: &LocalPostgres,
    source: &TestDb,
    pipelines: &mut [Pipeline],
    round: u64,
) -> Instant {
    let db = &source.name;
    let (lost, others) = pipelines.split_first_mut().unwrap();
    for replica in &mut lost.replicas {
        kill_9(&mut replica.child);
    }
    let status = |what: &str| {
        query(pg, db, &format!("SELECT {what} FROM pg_replication_slots WHERE slot_name = '{}'", lost.slot))
    };
    crate::harness::wait_for(
        "the killed pipeline's slot to be released",
        Duration::from_secs(60),
        || async { status("active").as_deref() == Some("f") },
    )
    .await;
    let deadline = Instant::now() + patience(Duration::from_secs(180));
    while status("wal_status").as_deref() != Some("lost") {
        assert!(Instant::now() < deadline, "round {round}: the slot was not invalidated");
        // A segment's worth of WAL positions at a time, the other pipelines kept up with.
        let switched = query(pg, db, "SELECT pg_switch_wal()").and_then(|t| t.parse::<Lsn>().ok());
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(switched) = switched {
            let caught_up = Instant::now() + patience(Duration::from_secs(120));
            for other in others.iter_mut() {
                while slot_confirmed(pg, db, &other.slot).is_none_or(|c| c < switched) {
                    assert!(Instant::now() < caught_up, "round {round}: {} fell behind the WAL", other.name);
                    other.supervise();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let _ = query(pg, db, "CHECKPOINT");
    }

    // Refused by name, nothing confirmed, and the process exits.
    let refusal = lost.log.with_extension("refusal.log");
    let mut child = lost.spawn(lost.replicas[0].port, &refusal);
    let exited = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + patience(Duration::from_secs(60));
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                kill_9(&mut child);
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    let log = std::fs::read_to_string(&refusal).unwrap();
    assert!(exited.is_some_and(|s| !s.success()), "round {round}: sluice ran on a lost slot: {log}");
    assert!(
        log.contains(&format!("replication slot \"{}\" was invalidated", lost.slot)),
        "round {round}: the refusal names the slot: {log}"
    );
    std::fs::remove_file(&refusal).unwrap();
    let refused = Instant::now();

    // The operator's recovery.
    source.sql(&format!("SELECT pg_drop_replication_slot('{}')", lost.slot));
    for i in 0..lost.replicas.len() {
        lost.replicas[i].child = lost.spawn(lost.replicas[i].port, &lost.log);
    }
    source.wait_slot_active(&lost.slot).await;
    let config = lost.config.clone();
    let (code, output) = tokio::task::spawn_blocking(move || {
        crate::harness::sluice_output(
            &["snapshot", "-c", config.to_str().unwrap()],
            patience(Duration::from_secs(600)),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "round {round}: the backfill after the slot's loss: {output}");
    refused
}
