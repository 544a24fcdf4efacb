//! Appliers in a Kafka consumer group: Postgres → sluice → Kafka (tansu, 3 partitions) →
//! two `sluice run` processes with `[source.kafka]` in one group → DynamoDB (moto) or a
//! Postgres target. Kill -9 of an applier mid-stream, a target outage (nothing committed),
//! and the bad inputs (an unknown topic, a foreign record, more appliers than partitions).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use sluice_dynamodb::{Attr, DynamoClient};

use crate::harness::{dynamo_client, http_get, kill_9, metric, moto, wait_for, Kafka, LogsOnPanic, TestDb};
use crate::operations::start;

/// The source table, the same in the Postgres target; `writes` counts each row write made by
/// the apply (or, in the source, by the application).
const ACCOUNTS: &str = "CREATE TABLE accounts (id int8 PRIMARY KEY, n int8 NOT NULL, name text);
  CREATE TABLE writes (n int8 NOT NULL); INSERT INTO writes VALUES (0);
  CREATE FUNCTION count_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE writes SET n = n + 1; RETURN NULL; END $$;
  CREATE TRIGGER counted AFTER INSERT OR UPDATE OR DELETE ON accounts FOR EACH ROW EXECUTE FUNCTION count_write();";

/// A forward pipeline (Postgres → Kafka topic `cdc.accounts`, 3 partitions) and the pieces
/// the appliers need.
struct Chain {
    kafka: Kafka,
    db: TestDb,
    dir: tempfile::TempDir,
    forward: Child,
    logs: Vec<PathBuf>,
}

impl Chain {
    async fn start(partitions: i32) -> Self {
        let kafka = Kafka::start(None);
        kafka.create_topic("cdc.accounts", partitions).await;
        let db = TestDb::new();
        db.sql(ACCOUNTS);
        db.sql("CREATE PUBLICATION p FOR TABLE accounts");
        let dir = tempfile::tempdir().unwrap();
        let config = db.config_file(
            dir.path(),
            "fwd",
            "p",
            &format!("[target]\nkind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"cdc.{{table}}\"\nretry_for = \"2m\"\n", kafka.brokers),
        );
        let log = dir.path().join("forward.log");
        let forward = start(&config, &log);
        db.wait_slot_active(&db.slot_name("fwd")).await;
        Chain { kafka, db, dir, forward, logs: vec![log] }
    }

    /// An applier's configuration: group `group`, topic `cdc.accounts` (or `topics`), the
    /// given `[target]` table, metrics on `port`.
    fn applier_config(&self, name: &str, group: &str, topics: &str, target: &str, port: u16) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[pipeline]\nname = \"appliers\"\nretry_for = \"2m\"\nshutdown_timeout = \"10s\"\n\n\
                 [monitoring]\nlisten = \"127.0.0.1:{port}\"\n\n\
                 [source.kafka]\nbrokers = \"{}\"\ntopics = [{topics}]\ngroup_id = \"{group}\"\n\
                 properties = {{ \"session.timeout.ms\" = 6000, \"heartbeat.interval.ms\" = 500 }}\n\n{target}\n",
                self.kafka.brokers
            ),
        )
        .unwrap();
        path
    }

    fn start_applier(&mut self, config: &Path, log: &str) -> Child {
        let log = self.dir.path().join(log);
        self.logs.push(log.clone());
        start(config, &log)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        kill_9(&mut self.forward);
        // Every process's log when the test failed (appliers started late included).
        drop(LogsOnPanic(std::mem::take(&mut self.logs)));
    }
}

/// Starts applier `a`, waits until it owns every partition, then starts `b` and waits until
/// the two share them. `a` is so the group's leader: tansu 0.6 leaves the partitions of a
/// dead leader unassigned (a broker defect; Kafka elects a new leader), so the tests kill `b`.
async fn start_pair(chain: &mut Chain, configs: [&Path; 2], ports: [u16; 2], partitions: f64) -> [Child; 2] {
    let a = chain.start_applier(configs[0], "a.log");
    wait_for("applier a to own every partition", Duration::from_secs(90), || async {
        scrape(ports[0], "sluice_kafka_partitions_assigned") == Some(partitions)
    })
    .await;
    let b = chain.start_applier(configs[1], "b.log");
    wait_for("the two appliers to share the partitions", Duration::from_secs(90), || async {
        let (x, y) = (
            scrape(ports[0], "sluice_kafka_partitions_assigned").unwrap_or(0.0),
            scrape(ports[1], "sluice_kafka_partitions_assigned").unwrap_or(0.0),
        );
        x >= 1.0 && y >= 1.0 && x + y == partitions
    })
    .await;
    [a, b]
}

/// Kills applier `b` with SIGKILL and waits until the group has dropped it: tansu 0.6 evicts a
/// member that missed its heartbeats with a rebalance of the survivors that keeps their
/// partitions, and only a member joining afterwards gets the dead one's partitions (Kafka
/// would hand them to the survivors). `a`'s log shows that rebalance.
async fn kill_9_and_wait_for_eviction(chain: &Chain, b: &mut Child) {
    let assigned = || chain.log("a.log").matches("partitions assigned").count();
    let before = assigned();
    kill_9(b);
    wait_for("the group to evict the killed applier", Duration::from_secs(60), || async {
        assigned() > before
    })
    .await;
}

fn port() -> u16 {
    sluice::localpg::free_port().unwrap()
}

/// A metric of the applier on `port`, when it answers.
fn scrape(port: u16, series: &str) -> Option<f64> {
    http_get(port, "/metrics").and_then(|(_, body)| metric(&body, series))
}

/// A deterministic mix of inserts, updates, deletes (and, with `key_changes`, updates of the
/// key) over ids `from..to`, a few milliseconds apart.
async fn workload(connection: sluice_postgres::ConnectionConfig, from: i64, to: i64, key_changes: bool) {
    let sql = sluice_postgres::connect_sql(&connection).await.unwrap();
    for step in from..to {
        let statement = match step % 5 {
            0 | 1 => format!("INSERT INTO accounts VALUES ({step}, 0, 'acct {step}')"),
            2 => format!("UPDATE accounts SET n = n + 1, name = name || '+' WHERE id % 7 = {}", step % 7),
            3 => format!("DELETE FROM accounts WHERE id = {}", step - 3),
            _ if key_changes => format!("UPDATE accounts SET id = id + 100000 WHERE id = {}", step - 4),
            _ => format!("UPDATE accounts SET n = n + 10 WHERE id = {}", step - 4),
        };
        sql.batch_execute(&statement).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// The source rows, as `ACCOUNT#id` → (n, name).
fn source_rows(db: &TestDb) -> BTreeMap<String, (String, String)> {
    db.sql("SELECT id, n, coalesce(name, '') FROM accounts ORDER BY id")
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('|').collect();
            (format!("ACCOUNT#{}", fields[0]), (fields[1].to_owned(), fields[2].to_owned()))
        })
        .collect()
}

/// The live items (tombstones left out) in the same shape.
async fn live_items(client: &DynamoClient, table: &str) -> BTreeMap<String, (String, String)> {
    client
        .scan_all(table)
        .await
        .unwrap()
        .into_iter()
        .filter(|item| item.get("_deleted") != Some(&Attr::Bool(true)))
        .map(|item| {
            let text = |name: &str| match item.get(name) {
                Some(Attr::S(s)) => s.clone(),
                Some(Attr::N(n)) => n.clone(),
                _ => String::new(),
            };
            (text("pk"), (text("n"), text("name")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_appliers_in_a_group_apply_every_change_to_dynamodb_across_a_kill_9() {
    let mut chain = Chain::start(3).await;
    let (moto, client, table, mapping) = dynamodb_table(&chain, "appliers").await;
    let target = crate::dynamodb::target_toml(&mapping, &moto.url, "concurrency = 8\n");
    let (port_a, port_b) = (port(), port());
    let config_a = chain.applier_config("a", "g", "\"cdc.accounts\"", &target, port_a);
    let config_b = chain.applier_config("b", "g", "\"cdc.accounts\"", &target, port_b);
    let [mut a, mut b] = start_pair(&mut chain, [&config_a, &config_b], [port_a, port_b], 3.0).await;

    // A member that stops (SIGTERM: it drains, commits and leaves the group): the other takes
    // every partition and goes on.
    let writer = tokio::spawn(workload(chain.db.connection(), 0, 200, true));
    wait_for("some items to arrive", Duration::from_secs(60), || {
        let (client, table) = (client.clone(), table.clone());
        async move { client.scan_all(&table).await.unwrap().len() >= 30 }
    })
    .await;
    std::process::Command::new("kill").arg("-TERM").arg(b.id().to_string()).status().unwrap();
    wait_for("applier a to own all 3 partitions", Duration::from_secs(90), || async {
        scrape(port_a, "sluice_kafka_partitions_assigned") == Some(3.0)
    })
    .await;
    writer.await.unwrap();
    assert!(tokio::task::spawn_blocking(move || b.wait()).await.unwrap().unwrap().success());
    chain.db.sql("INSERT INTO accounts VALUES (-1, 0, 'alone')");
    wait_for("a alone to apply a change made after b left", Duration::from_secs(90), || {
        let (client, table) = (client.clone(), table.clone());
        async move { live_items(&client, &table).await.contains_key("ACCOUNT#-1") }
    })
    .await;

    // kill -9 of a member mid-stream. (Kafka hands the dead member's partitions to the other
    // after session.timeout.ms; tansu 0.6 keeps them assigned to it until it rejoins, so here
    // its partitions wait for the restart while the other member goes on with its own.)
    let mut b = chain.start_applier(&config_b, "b2.log");
    wait_for("the restarted applier to own a partition again", Duration::from_secs(90), || async {
        scrape(port_b, "sluice_kafka_partitions_assigned").unwrap_or(0.0) >= 1.0
    })
    .await;
    let writer = tokio::spawn(workload(chain.db.connection(), 200, 350, true));
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill_9_and_wait_for_eviction(&chain, &mut b).await;
    writer.await.unwrap();
    let mut b = chain.start_applier(&config_b, "b3.log");
    workload(chain.db.connection(), 350, 450, true).await;
    let expected = source_rows(&chain.db);
    assert!(expected.len() > 50, "the workload leaves rows behind: {}", expected.len());
    wait_for("the items to equal the source rows", Duration::from_secs(180), || {
        let (client, table, expected) = (client.clone(), table.clone(), expected.clone());
        async move { live_items(&client, &table).await == expected }
    })
    .await;
    // Nothing stays behind: every partition's records are durable and committed.
    wait_for("the group's commits to reach the end of every partition", Duration::from_secs(60), || async {
        committed(&chain.kafka, "g", "cdc.accounts", 3) == ends(&chain.kafka, "cdc.accounts", 3)
    })
    .await;
    for child in [&mut a, &mut b] {
        std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    }
    for child in [a, b] {
        let status = tokio::task::spawn_blocking(move || {
            let mut c = child;
            c.wait()
        })
        .await
        .unwrap()
        .unwrap();
        assert!(status.success(), "an applier drains and exits 0 on SIGTERM");
    }
    assert_eq!(live_items(&client, &table).await, expected, "final state equals the source item by item");
    let rebalanced = chain.log("a.log");
    assert!(rebalanced.matches("partitions assigned").count() >= 3, "a saw the rebalances:\n{rebalanced}");
}

/// `write_mode = "batch"` behind a consumer group: a newly assigned partition is held for the
/// fencing delay (`revoke_timeout` 1 s + `request_timeout` 5 s + 5 s here) before any of its
/// records is applied, so that a previous owner's last unguarded write lands first; then
/// every change applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_applier_holds_newly_assigned_partitions_for_the_fencing_delay() {
    let mut chain = Chain::start(3).await;
    let (moto, client, table, mapping) = dynamodb_table(&chain, "fenced").await;
    // The records wait in the topic before the applier joins.
    workload(chain.db.connection(), 0, 150, true).await;
    let target = crate::dynamodb::target_toml(
        &mapping,
        &moto.url,
        "write_mode = \"batch\"\nrequest_timeout = \"5s\"\n",
    );
    let port_a = port();
    let config = chain.applier_config("a", "fenced", "\"cdc.accounts\"", &target, port_a);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("group_id = \"fenced\"\n", "group_id = \"fenced\"\nrevoke_timeout = \"1s\"\n");
    std::fs::write(&config, text).unwrap();
    let mut a = chain.start_applier(&config, "a.log");
    wait_for("applier a to own every partition", Duration::from_secs(90), || async {
        scrape(port_a, "sluice_kafka_partitions_assigned") == Some(3.0)
    })
    .await;
    let seen = std::time::Instant::now();
    while seen.elapsed() < Duration::from_secs(6) {
        let items = client.scan_all(&table).await.unwrap().len();
        assert_eq!(
            items,
            0,
            "{items} items written {:?} after the assignment, inside the 11 s fencing delay",
            seen.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let log = chain.log("a.log");
    assert!(log.contains("fencing: holding the assigned partitions") && log.contains("delay_s=11"), "{log}");
    let expected = source_rows(&chain.db);
    assert!(expected.len() >= 20, "the workload leaves rows behind: {}", expected.len());
    wait_for("the items to equal the source rows", Duration::from_secs(120), || {
        let (client, table, expected) = (client.clone(), table.clone(), expected.clone());
        async move { live_items(&client, &table).await == expected }
    })
    .await;
    std::process::Command::new("kill").arg("-TERM").arg(a.id().to_string()).status().unwrap();
    assert!(tokio::task::spawn_blocking(move || a.wait()).await.unwrap().unwrap().success());
}

/// A fresh DynamoDB table `<prefix>_<db>` on moto, keyed by `pk`, and a mapping of the
/// source's `accounts` into it (`ACCOUNT#id`).
async fn dynamodb_table(
    chain: &Chain,
    prefix: &str,
) -> (Arc<crate::harness::Moto>, DynamoClient, String, PathBuf) {
    let moto = moto();
    let client = dynamo_client(&moto.url).await;
    let table = format!("{prefix}_{}", chain.db.name);
    client.create_table(&table, "pk", None).await.unwrap();
    let mapping = chain.dir.path().join("mapping.toml");
    std::fs::write(
        &mapping,
        format!("[[tables]]\nsource = \"public.accounts\"\ntarget = \"{table}\"\npartition_key = {{ attribute = \"pk\", template = \"ACCOUNT#{{id}}\" }}\n"),
    )
    .unwrap();
    (moto, client, table, mapping)
}

/// The Postgres target of the appliers: the same table in another database, with the same
/// write-counting trigger.
fn postgres_target(chain: &Chain, proxy_port: Option<u16>) -> (TestDb, String) {
    let target = TestDb::in_cluster(Arc::clone(&chain.db.pg));
    target.sql(ACCOUNTS);
    let mapping = chain.dir.path().join("pg_mapping.toml");
    std::fs::write(&mapping, "[[tables]]\nsource = \"public.accounts\"\ntarget = \"public.accounts\"\n")
        .unwrap();
    let toml = format!(
        "[target]\nkind = \"postgres\"\nmapping = \"{}\"\nretry_for = \"2m\"\n\
         [target.connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"\nuser = \"postgres\"\nconnect_timeout = \"2s\"\n",
        mapping.display(),
        proxy_port.unwrap_or(target.pg.port),
        target.name
    );
    (target, toml)
}

fn rows(db: &TestDb) -> String {
    db.sql("SELECT id, n, coalesce(name, '') FROM accounts ORDER BY id")
}

fn writes(db: &TestDb) -> u64 {
    db.sql("SELECT n FROM writes").trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_appliers_into_postgres_apply_each_change_once_across_a_kill_9() {
    let mut chain = Chain::start(3).await;
    let (target, toml) = postgres_target(&chain, None);
    let (port_a, port_b) = (port(), port());
    let config_a = chain.applier_config("a", "pg", "\"cdc.accounts\"", &toml, port_a);
    let config_b = chain.applier_config("b", "pg", "\"cdc.accounts\"", &toml, port_b);
    let [mut a, mut b] = start_pair(&mut chain, [&config_a, &config_b], [port_a, port_b], 3.0).await;
    let writer = tokio::spawn(workload(chain.db.connection(), 0, 300, false));
    wait_for("some rows to arrive", Duration::from_secs(60), || async { writes(&target) >= 40 }).await;
    kill_9_and_wait_for_eviction(&chain, &mut b).await;
    writer.await.unwrap();
    let mut b = chain.start_applier(&config_b, "b2.log");
    workload(chain.db.connection(), 300, 400, false).await;
    let expected = rows(&chain.db);
    wait_for("the target rows to equal the source rows", Duration::from_secs(180), || async {
        rows(&target) == expected
    })
    .await;
    // Each change applied once: the target's trigger counted as many writes as the source's.
    let (made, applied) = (writes(&chain.db), writes(&target));
    let abandoned = chain
        .logs
        .iter()
        .any(|log| std::fs::read_to_string(log).unwrap_or_default().contains("abandoning them uncommitted"));
    if abandoned {
        // Documented: a revocation that times out may let a batch apply on both members.
        assert!(applied >= made && applied <= 2 * made, "{applied} writes for {made} changes");
    } else {
        assert_eq!(applied, made, "each change applied exactly once across the kill -9 and the rebalances");
    }
    let checkpoints =
        target.sql("SELECT count(*) FROM sluice_checkpoint WHERE pipeline LIKE 'appliers:cdc.accounts/%'");
    assert_eq!(checkpoints.trim(), "3", "one checkpoint per partition");
    for child in [&mut a, &mut b] {
        kill_9(child);
    }
}

/// The end offsets of `topic`'s partitions (after the last record, once none came for a
/// second), from the records themselves: tansu 0.6 answers ListOffsets with offsets short of
/// its records'.
fn ends(kafka: &Kafka, topic: &str, partitions: i32) -> Vec<i64> {
    let mut ends = vec![0; partitions as usize];
    for record in kafka.consume_all(topic, Duration::from_secs(1)) {
        let end = &mut ends[record.partition as usize];
        *end = (*end).max(record.offset + 1);
    }
    ends
}

/// The group's committed offsets for `topic`'s partitions, read as a client would.
fn committed(kafka: &Kafka, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let offsets = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
    offsets
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => -1,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_target_is_down_nothing_is_committed_and_a_restart_resumes_from_the_commits() {
    let mut chain = Chain::start(3).await;
    let target_port = chain.db.pg.port;
    let outage = crate::harness::Outage::start(target_port).await;
    let (target, toml) = postgres_target(&chain, Some(outage.port));
    let applier_port = port();
    let config = chain.applier_config("a", "outage", "\"cdc.accounts\"", &toml, applier_port);
    let mut applier = chain.start_applier(&config, "a.log");
    workload(chain.db.connection(), 0, 100, false).await;
    let expected = rows(&chain.db);
    wait_for("the first rows to be applied", Duration::from_secs(90), || async { rows(&target) == expected })
        .await;
    wait_for("their offsets to be committed to the end", Duration::from_secs(30), || async {
        committed(&chain.kafka, "outage", "cdc.accounts", 3) == ends(&chain.kafka, "cdc.accounts", 3)
    })
    .await;
    let before = committed(&chain.kafka, "outage", "cdc.accounts", 3);

    outage.begin();
    workload(chain.db.connection(), 100, 200, false).await;
    // The records are in the topic and read; none is durable, so no offset moves.
    wait_for("the applier to read the new records", Duration::from_secs(30), || async {
        scrape(applier_port, "sluice_kafka_records_total{outcome=\"change\",pipeline=\"appliers\"}")
            .unwrap_or(0.0)
            > 100.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        committed(&chain.kafka, "outage", "cdc.accounts", 3),
        before,
        "nothing committed while the target is down"
    );
    let writes_before = writes(&target);
    kill_9(&mut applier);
    outage.end();

    // The restart reads from the commits: what was applied before the outage is not applied
    // again, and everything else arrives.
    let mut applier = chain.start_applier(&config, "a2.log");
    let expected = rows(&chain.db);
    wait_for("everything to converge after the restart", Duration::from_secs(120), || async {
        rows(&target) == expected
    })
    .await;
    assert_eq!(writes(&target), writes(&chain.db), "each change applied once");
    assert!(writes_before <= writes(&target));
    kill_9(&mut applier);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_named_and_loses_nothing() {
    let mut chain = Chain::start(1).await;
    let (target, toml) = postgres_target(&chain, None);
    let dead = chain.dir.path().join("dead.jsonl");
    let toml = toml.replace("[target]\n", &format!("[target]\ndead_letter = \"{}\"\n", dead.display()));

    // An unknown topic: refused at start, naming the key.
    let config = chain.applier_config("unknown", "bad", "\"cdc.nope\"", &toml, port());
    let (code, output) =
        crate::harness::sluice_output(&["run", "-c", config.to_str().unwrap()], Duration::from_secs(60));
    assert_ne!(code, Some(0), "{output}");
    assert!(output.contains("cdc.nope") && output.contains("source.kafka.topics"), "{output}");

    // Two appliers for one partition: one stands by and says why; the other applies all.
    let (port_a, port_b) = (port(), port());
    let config_a = chain.applier_config("a", "bad", "\"cdc.accounts\"", &toml, port_a);
    let config_b = chain.applier_config("b", "bad", "\"cdc.accounts\"", &toml, port_b);
    let mut a = chain.start_applier(&config_a, "a.log");
    let mut b = chain.start_applier(&config_b, "b.log");
    wait_for("one applier to say it stands by, without a partition", Duration::from_secs(90), || async {
        ["a.log", "b.log"]
            .iter()
            .any(|log| chain.log(log).contains("more members than its topics have partitions"))
    })
    .await;
    wait_for("one applier to own the partition and the other none", Duration::from_secs(30), || async {
        let owned = [port_a, port_b].map(|p| scrape(p, "sluice_kafka_partitions_assigned"));
        owned.contains(&Some(1.0)) && owned.contains(&Some(0.0))
    })
    .await;

    // A record in another format, between sluice's own: dead-lettered, counted, and the
    // records after it still apply.
    workload(chain.db.connection(), 0, 20, false).await;
    {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &chain.kafka.brokers).create().unwrap();
        producer
            .send(BaseRecord::to("cdc.accounts").key("{\"id\":1}").payload("{\"id\":1,\"n\":999}"))
            .unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
    }
    workload(chain.db.connection(), 20, 40, false).await;
    let expected = rows(&chain.db);
    wait_for(
        "every change of sluice's to apply around the foreign record",
        Duration::from_secs(90),
        || async { rows(&target) == expected },
    )
    .await;
    let entries = std::fs::read_to_string(&dead).unwrap_or_default();
    assert_eq!(entries.lines().count(), 1, "{entries}");
    let entry: serde_json::Value = serde_json::from_str(entries.lines().next().unwrap()).unwrap();
    assert_eq!(entry["topic"], "cdc.accounts");
    assert!(entry["reason"].as_str().unwrap().contains("sluice.relation"), "{entry}");
    assert!(!entry["reason"].as_str().unwrap().contains("999"), "no value in the reason: {entry}");
    let counted: f64 = [port_a, port_b]
        .iter()
        .filter_map(|p| {
            scrape(*p, "sluice_kafka_records_total{outcome=\"dead_lettered\",pipeline=\"appliers\"}")
        })
        .sum();
    assert_eq!(counted, 1.0);
    for child in [&mut a, &mut b] {
        kill_9(child);
    }
}
