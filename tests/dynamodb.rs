//! The DynamoDB target against a real DynamoDB-API server (moto) through aws-sdk-dynamodb.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sluice::config::{Config, PipelineConfig, SourceConfig, SourceMode};
use sluice::targets::dynamodb::config::DynamoConfig;
use sluice::targets::TargetConfig;
use sluice_core::Lsn;
use sluice_dynamodb::{Attr, DynamoClient, GuardedWrite, Item, Outcome, WriteAction};
use tokio::sync::watch;

use crate::harness::{dynamo_client, moto, sluice_output, wait_for, Outage, TestDb};

pub(crate) const SCHEMA: &str = "CREATE TABLE customers (id int8 PRIMARY KEY, email text, password_hash text, status text NOT NULL DEFAULT 'active',
    balance numeric(12,2), created_at timestamptz, tags text[], prefs jsonb, bio text);
  CREATE TABLE orders (customer_id int8, id int8, total numeric, PRIMARY KEY (customer_id, id));
  CREATE PUBLICATION p FOR TABLE customers, orders;";

/// The worked example mapping, pointed at `table`.
pub(crate) fn shop_mapping(dir: &Path, table: &str) -> PathBuf {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/examples/shop.toml")).unwrap();
    let path = dir.join("mapping.toml");
    std::fs::write(&path, example.replace("target = \"shop\"", &format!("target = \"{table}\""))).unwrap();
    path
}

/// The `[target]` section of a config file for the DynamoDB target at `url` with test
/// credentials, plus `extra` keys.
pub fn target_toml(mapping: &Path, url: &str, extra: &str) -> String {
    format!(
        "[target]\nkind = \"dynamodb\"\nmapping = \"{}\"\nendpoint_url = \"{url}\"\nregion = \"us-east-1\"\n\
         access_key_id = \"test\"\nsecret_access_key = \"test\"\n{extra}",
        mapping.display()
    )
}

fn dynamo_config(url: &str, mapping: PathBuf, dead_letter: Option<PathBuf>) -> DynamoConfig {
    DynamoConfig {
        mapping: Some(mapping),
        outbox: None,
        endpoint_url: Some(url.into()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some(sluice_core::Secret::new("test")),
        concurrency: 8,
        retry_for: Duration::from_secs(120),
        request_timeout: Duration::from_secs(2),
        dead_letter,
        write_mode: sluice::targets::dynamodb::config::WriteMode::Single,
        transaction_size: 25,
        batch_size: 100,
    }
}

struct Running {
    shutdown: sluice_core::ShutdownTrigger,
    task: tokio::task::JoinHandle<Result<(), sluice::error::PipelineError>>,
    source_stats: Arc<sluice_postgres::SourceStats>,
}

async fn start_pipeline(db: &TestDb, slot: &str, target: DynamoConfig) -> Running {
    let config = Config {
        pipeline: PipelineConfig::default(),
        source: SourceConfig {
            connection: db.connection(),
            heartbeat_connection: None,
            mode: SourceMode::Replication(db.replication(slot, "p")),
        },
        target: TargetConfig::Dynamodb(target),
        monitoring: Default::default(),
        ha: Default::default(),
        backfill: Default::default(),
        migration: Default::default(),
        verify: Default::default(),
        reverse_of: None,
    };
    let (shutdown, shutdown_rx) = sluice_core::Shutdown::new();
    let (stats_tx, mut stats_rx) = watch::channel(None);
    let state = sluice::monitor::PipelineState::new(&config);
    let task = tokio::spawn(async move {
        sluice::pipeline::run(&config, &state, shutdown_rx, |p| {
            stats_tx.send_replace(Some(p.source_stats));
        })
        .await
    });
    let source_stats = stats_rx.wait_for(Option::is_some).await.unwrap().clone().unwrap();
    db.wait_slot_active(&db.slot_name(slot)).await;
    Running { shutdown, task, source_stats }
}

impl Running {
    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("pipeline stops")
            .unwrap()
            .expect("pipeline ends cleanly");
    }
}

fn s(v: &str) -> Attr {
    Attr::S(v.into())
}

/// Items by (pk, sk).
pub(crate) async fn items(client: &DynamoClient, table: &str) -> BTreeMap<(String, String), Item> {
    client
        .scan_all(table)
        .await
        .unwrap()
        .into_iter()
        .map(|item| {
            let key = |name: &str| match &item[name] {
                Attr::S(v) => v.clone(),
                other => panic!("{other:?}"),
            };
            ((key("pk"), key("sk")), item)
        })
        .collect()
}

/// A number attribute without trailing fractional zeros (DynamoDB normalises them; moto does not).
fn number(attr: &Attr) -> String {
    let Attr::N(n) = attr else { panic!("not a number: {attr:?}") };
    if n.contains('.') {
        n.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        n.clone()
    }
}

fn is_tombstone(item: &Item) -> bool {
    item.get("_deleted") == Some(&Attr::Bool(true))
}

fn unique_table(db: &TestDb) -> String {
    format!("shop_{}", db.name)
}

/// A fresh database with `SCHEMA`, a fresh DynamoDB table (pk, sk) and a temp dir.
struct Shop {
    moto: Arc<crate::harness::Moto>,
    db: TestDb,
    table: String,
    client: DynamoClient,
    dir: tempfile::TempDir,
}

impl Shop {
    async fn new() -> Self {
        let moto = moto();
        let db = TestDb::new();
        db.sql(SCHEMA);
        let table = unique_table(&db);
        let client = dynamo_client(&moto.url).await;
        client.create_table(&table, "pk", Some("sk")).await.unwrap();
        Shop { moto, db, table, client, dir: tempfile::tempdir().unwrap() }
    }

    /// The example mapping pointed at this table, against `url` (moto, or a proxy in front of it).
    fn target(&self, url: &str, dead_letter: Option<PathBuf>) -> DynamoConfig {
        dynamo_config(url, shop_mapping(self.dir.path(), &self.table), dead_letter)
    }

    async fn item_count(&self) -> usize {
        items(&self.client, &self.table).await.len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_stream_into_one_table_through_the_mapping_and_converge() {
    converges(sluice::targets::dynamodb::config::WriteMode::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_stream_into_one_table_in_transactions_and_converge() {
    converges(sluice::targets::dynamodb::config::WriteMode::Transaction).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_stream_into_one_table_in_read_then_write_batches_and_converge() {
    converges(sluice::targets::dynamodb::config::WriteMode::Batch).await;
}

async fn converges(write_mode: sluice::targets::dynamodb::config::WriteMode) {
    let shop = Shop::new().await;
    let (db, table, client) = (&shop.db, &shop.table, &shop.client);
    let target = DynamoConfig { write_mode, ..shop.target(&shop.moto.url, None) };
    let running = start_pipeline(db, "ddb", target).await;

    db.sql(
        "INSERT INTO customers VALUES
           (1, 'ada@x', 'h1', 'active', 100.50, '2024-05-01 12:00:00+00', '{b,a}', '{\"theme\": \"dark\", \"n\": 2}', 'long bio'),
           (2, 'grace@x', 'h2', 'active', 7, NULL, '{}', NULL, NULL);
         INSERT INTO orders VALUES (1, 10, 9.99), (1, 11, 5), (2, 20, 1)",
    );
    db.sql("UPDATE customers SET balance = 90.50 WHERE id = 1");
    db.sql("UPDATE customers SET id = 3 WHERE id = 2");
    db.sql("DELETE FROM orders WHERE customer_id = 1 AND id = 11");
    db.sql("UPDATE customers SET status = 'banned' WHERE id = 1");
    let last = db.commit_lsn_of("INSERT INTO orders VALUES (3, 30, 2)");
    // Items are written in parallel (one key stays in order), so look once everything is
    // durable: the slot confirms the last transaction only then.
    wait_for("the slot to confirm the last change", Duration::from_secs(60), || async {
        db.slot_confirmed("ddb").unwrap() >= last
    })
    .await;
    let items = items(client, table).await;
    let live: Vec<_> =
        items.iter().filter(|(_, i)| !is_tombstone(i)).map(|(k, _)| (k.0.as_str(), k.1.as_str())).collect();
    assert_eq!(
        live,
        [
            ("CUSTOMER#1", "ORDER#10"),
            ("CUSTOMER#2", "ORDER#20"),
            ("CUSTOMER#3", "ORDER#30"),
            ("CUSTOMER#3", "PROFILE")
        ],
        "{items:#?}"
    );
    let tombstones: Vec<_> =
        items.iter().filter(|(_, i)| is_tombstone(i)).map(|(k, _)| (k.0.as_str(), k.1.as_str())).collect();
    assert_eq!(
        tombstones,
        [("CUSTOMER#1", "ORDER#11"), ("CUSTOMER#1", "PROFILE"), ("CUSTOMER#2", "PROFILE")],
        "deleted, banned (left the filter) and re-keyed"
    );

    let grace = &items[&("CUSTOMER#3".to_string(), "PROFILE".to_string())];
    assert_eq!(grace["emailAddress"], s("grace@x"));
    assert_eq!(number(&grace["balance"]), "7");
    assert_eq!(grace["entity"], s("Customer"));
    assert_eq!(grace["id"], Attr::N("3".into()));
    for absent in ["password_hash", "tags", "prefs", "created_at", "bio", "email"] {
        assert!(!grace.contains_key(absent), "{absent} must not be written: {grace:?}");
    }
    let ada_order = &items[&("CUSTOMER#1".to_string(), "ORDER#10".to_string())];
    assert_eq!(number(&ada_order["total"]), "9.99");
    assert_eq!(ada_order["entity"], s("Order"));
    let ada = &items[&("CUSTOMER#1".to_string(), "PROFILE".to_string())];
    assert!(
        ada.contains_key("expires_at") && !ada.contains_key("emailAddress"),
        "a tombstone holds only key, version, marker and TTL"
    );

    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_map_to_the_configured_attribute_types() {
    let shop = Shop::new().await;
    let (db, table, client) = (&shop.db, &shop.table, &shop.client);
    let running = start_pipeline(db, "types", shop.target(&shop.moto.url, None)).await;
    db.sql(
        "INSERT INTO customers VALUES (1, 'ada@x', 'h1', 'active', 100.50, '2024-05-01 12:00:00.123+00', '{b,a,b}',
           '{\"theme\": \"dark\", \"n\": 12345678901234567890.5, \"list\": [1, null, true]}', repeat('x', 20000))",
    );
    wait_for("the item", Duration::from_secs(60), || async { shop.item_count().await == 1 }).await;
    let item = items(client, table).await.into_values().next().unwrap();
    assert_eq!(number(&item["balance"]), "100.5", "numeric → N");
    assert_eq!(item["created_at"], Attr::N("1714564800123".into()), "timestamptz → epoch millis");
    assert_eq!(item["tags"], Attr::Ss(vec!["a".into(), "b".into()]), "text[] → SS");
    assert_eq!(
        item["prefs"],
        Attr::M(BTreeMap::from([
            ("theme".to_string(), s("dark")),
            ("n".to_string(), Attr::N("12345678901234567890.5".into())),
            ("list".to_string(), Attr::L(vec![Attr::N("1".into()), Attr::Null, Attr::Bool(true)])),
        ])),
        "jsonb → M with exact numbers"
    );
    assert_eq!(item["bio"], s(&"x".repeat(20000)));
    assert!(matches!(&item["_version"], Attr::N(_)));
    running.stop().await;
}

/// A moto table with only a partition key `pk`, named `{prefix}_{pid}`.
async fn fresh_table(prefix: &str) -> (Arc<crate::harness::Moto>, DynamoClient, String) {
    let moto = moto();
    let client = dynamo_client(&moto.url).await;
    let table = format!("{prefix}_{}", std::process::id());
    client.create_table(&table, "pk", None).await.unwrap();
    (moto, client, table)
}

/// A guarded write of `action` to item `pk = key` at `version`.
fn guarded(table: &str, key: &str, version: u64, action: WriteAction) -> GuardedWrite {
    GuardedWrite {
        table: table.to_owned(),
        key: Item::from([("pk".to_string(), s(key))]),
        partition_key: "pk".into(),
        version_attribute: "_version".into(),
        version: version.to_string(),
        action,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_replay_never_resurrects_a_deleted_item() {
    let (_moto, client, table) = fresh_table("replay").await;
    let write = |version: u64, action: WriteAction| guarded(&table, "USER#1", version, action);
    let row = WriteAction::Put(Item::from([("name".to_string(), s("ada"))]));
    let tombstone = WriteAction::Put(Item::from([("_deleted".to_string(), Attr::Bool(true))]));
    assert_eq!(client.apply(&write(5, row.clone())).await.unwrap(), Outcome::Applied);
    assert_eq!(client.apply(&write(6, tombstone)).await.unwrap(), Outcome::Applied);
    assert_eq!(
        client.apply(&write(5, row.clone())).await.unwrap(),
        Outcome::AlreadyApplied,
        "the replayed insert is absorbed"
    );
    assert_eq!(
        client.apply(&write(6, row.clone())).await.unwrap(),
        Outcome::AlreadyApplied,
        "the same position twice is absorbed"
    );
    let stored = client.scan_all(&table).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert!(is_tombstone(&stored[0]), "still deleted: {stored:?}");
    assert_eq!(client.apply(&write(7, row)).await.unwrap(), Outcome::Applied, "a newer insert revives it");
    assert!(!is_tombstone(&client.scan_all(&table).await.unwrap()[0]));
    let partial = WriteAction::Update {
        set: Item::from([("name".to_string(), s("ada lovelace"))]),
        remove: vec!["_deleted".into()],
    };
    assert_eq!(client.apply(&write(6, partial.clone())).await.unwrap(), Outcome::AlreadyApplied);
    assert_eq!(client.apply(&write(8, partial)).await.unwrap(), Outcome::Applied);
    assert_eq!(client.scan_all(&table).await.unwrap()[0]["name"], s("ada lovelace"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_dynamodb_loses_nothing_and_acknowledges_nothing_early() {
    let shop = Shop::new().await;
    let db = &shop.db;
    let outage = Outage::start(shop.moto.port).await;
    let running = start_pipeline(db, "outage", shop.target(&outage.url(), None)).await;
    db.sql("INSERT INTO orders VALUES (1, 1, 1)");
    wait_for("the first order", Duration::from_secs(60), || async { shop.item_count().await == 1 }).await;
    wait_until_confirmed(db, "outage").await;

    outage.begin();
    let commit = db.commit_lsn_of("INSERT INTO orders SELECT 1, g, g FROM generate_series(2, 200) g");
    let stats = Arc::clone(&running.source_stats);
    wait_for("sluice to receive the change", Duration::from_secs(30), || {
        let received = Lsn(stats.received_lsn.load(Ordering::Relaxed));
        async move { received >= commit }
    })
    .await;
    // Several status intervals pass while DynamoDB is unreachable.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let confirmed = db.slot_confirmed("outage").unwrap();
        assert!(
            confirmed < commit,
            "slot confirmed {confirmed}, acknowledging the transaction ending at {commit} during the outage"
        );
    }
    assert_eq!(shop.item_count().await, 1);

    outage.end();
    wait_for("every order after the outage", Duration::from_secs(120), || async {
        shop.item_count().await == 200
    })
    .await;
    wait_for("the slot to move past the outage", Duration::from_secs(30), || async {
        db.slot_confirmed("outage").unwrap() >= commit
    })
    .await;
    running.stop().await;
}

/// The position the walsender of `slot` has sent up to.
fn sent_lsn(db: &TestDb, slot: &str) -> Lsn {
    let slot = db.slot_name(slot);
    db.sql(&format!(
        "SELECT r.sent_lsn FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = '{slot}'"
    ))
    .parse()
    .unwrap_or_default()
}

async fn wait_until_confirmed(db: &TestDb, slot: &str) -> Lsn {
    let target = db.insert_lsn();
    wait_for("the slot to confirm", Duration::from_secs(30), || async {
        db.slot_confirmed(slot).unwrap() >= Lsn(target.0.saturating_sub(64))
    })
    .await;
    db.slot_confirmed(slot).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_go_to_the_dead_letter_file_and_the_stream_continues() {
    let shop = Shop::new().await;
    let db = &shop.db;
    let dead_letter = shop.dir.path().join("dead.jsonl");
    let running = start_pipeline(db, "poison", shop.target(&shop.moto.url, Some(dead_letter.clone()))).await;
    db.sql("INSERT INTO orders VALUES (1, 1, 1234567890123456789012345678901234567890.5)");
    db.sql("INSERT INTO customers (id, bio) SELECT 2, string_agg(md5(g::text), '') FROM generate_series(1, 15000) g");
    db.sql("INSERT INTO orders VALUES (1, 2, 3)");
    wait_for("the good row", Duration::from_secs(60), || async { shop.item_count().await == 1 }).await;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&dead_letter)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["table"], "public.orders");
    assert!(
        lines[0]["reason"]
            .as_str()
            .unwrap()
            .contains("column total: 41 significant digits exceed DynamoDB's 38"),
        "{}",
        lines[0]
    );
    assert!(lines[0]["commit_lsn"].as_str().unwrap().contains('/'));
    assert_eq!(lines[1]["table"], "public.customers");
    assert!(lines[1]["reason"].as_str().unwrap().contains("400 KB"), "{}", lines[1]);
    assert_eq!(lines[1]["key"]["pk"]["S"], "CUSTOMER#2");
    let end = db.insert_lsn();
    wait_for("the slot to move past the poison rows", Duration::from_secs(30), || async {
        db.slot_confirmed("poison").unwrap() >= Lsn(end.0 - 64)
    })
    .await;
    running.stop().await;
}

#[test]
fn bad_mapping_is_named_by_validate() {
    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("m.toml");
    std::fs::write(&mapping, "[[tables]]\nsource = \"public.users\"\ntarget = \"app\"\npartition_key = { attribute = \"pk\", template = \"USER#{id\" }\n").unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[source.connection]\ndbname = \"app\"\n[source.replication]\nslot = \"s\"\npublication = \"p\"\n\
             [target]\nkind = \"dynamodb\"\nmapping = \"{}\"\n",
            mapping.display()
        ),
    )
    .unwrap();
    let (code, stderr) =
        sluice_output(&["validate", "-c", config.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("target.mapping.tables[0].partition_key.template") && stderr.contains("unclosed"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_streaming_then_restart_leaves_the_target_equal_to_the_source() {
    kill_9_then_restart("single").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_streaming_in_batch_mode_then_restart_leaves_the_target_equal_to_the_source() {
    kill_9_then_restart("batch").await;
}

/// A fresh database with a table `accounts` of `columns` in publication `p`, a fresh DynamoDB
/// table keyed by `pk` alone, and a mapping of the one into the other with the partition key
/// `prefix` followed by the row's id.
struct Accounts {
    moto: Arc<crate::harness::Moto>,
    db: TestDb,
    table: String,
    client: DynamoClient,
    dir: tempfile::TempDir,
    mapping: PathBuf,
}

impl Accounts {
    async fn new(columns: &str, prefix: &str) -> Self {
        let moto = moto();
        let db = TestDb::new();
        db.sql(&format!("CREATE TABLE accounts ({columns}); CREATE PUBLICATION p FOR TABLE accounts"));
        let table = unique_table(&db);
        let client = dynamo_client(&moto.url).await;
        client.create_table(&table, "pk", None).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mapping = dir.path().join("mapping.toml");
        std::fs::write(
            &mapping,
            format!("[[tables]]\nsource = \"public.accounts\"\ntarget = \"{table}\"\npartition_key = {{ attribute = \"pk\", template = \"{prefix}{{id}}\" }}\n"),
        )
        .unwrap();
        Accounts { moto, db, table, client, dir, mapping }
    }
}

async fn kill_9_then_restart(write_mode: &str) {
    let Accounts { moto, db, table, client, dir, mapping } =
        Accounts::new("id int8 PRIMARY KEY, n int8 NOT NULL, name text", "ACCOUNT#").await;
    let config = db.config_file(
        dir.path(),
        "kill",
        "p",
        &target_toml(&mapping, &moto.url, &format!("concurrency = 8\nwrite_mode = \"{write_mode}\"\n")),
    );
    let start = |log: &str| {
        crate::harness::sluice()
            .args(["run", "-c", config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let mut first = start("first.log");
    db.wait_slot_active(&db.slot_name("kill")).await;

    // A deterministic mix of inserts, updates, deletes and key changes.
    let connection = db.connection();
    let writer = tokio::spawn(async move {
        let sql = sluice_postgres::connect_sql(&connection).await.unwrap();
        for step in 0..400i64 {
            let statement = match step % 5 {
                0 | 1 => format!("INSERT INTO accounts VALUES ({step}, 0, 'acct {step}')"),
                2 => format!("UPDATE accounts SET n = n + 1, name = name || '+' WHERE id % 7 = {}", step % 7),
                3 => format!("DELETE FROM accounts WHERE id = {}", step - 3),
                _ => format!("UPDATE accounts SET id = id + 100000 WHERE id = {}", step - 4),
            };
            sql.batch_execute(&statement).await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    wait_for("some items to arrive", Duration::from_secs(60), || {
        let (client, table) = (client.clone(), table.clone());
        async move { client.scan_all(&table).await.unwrap().len() >= 40 }
    })
    .await;
    crate::harness::kill_9(&mut first);
    writer.await.unwrap();
    let marker = db.commit_lsn_of("INSERT INTO accounts VALUES (-1, 0, 'marker')");
    let mut second = start("second.log");
    wait_for("the restarted sluice to confirm everything", Duration::from_secs(120), || async {
        db.slot_confirmed("kill").unwrap() >= marker
    })
    .await;
    std::process::Command::new("kill").arg("-TERM").arg(second.id().to_string()).status().unwrap();
    assert!(tokio::task::spawn_blocking(move || second.wait()).await.unwrap().unwrap().success());

    assert_items_equal_rows(&db, &client, &table).await;
}

/// `batch` mode's fencing delay. A replica that takes the HA lock from one that released it
/// cleanly (SIGTERM, drained) writes at once; one that takes it from one killed -9 mid-stream
/// first waits out the delay (the lock's loss detection, 7 s, plus `request_timeout`, 3 s
/// here). The items end equal to the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_waits_out_a_fencing_delay_after_an_unclean_takeover_only() {
    let Accounts { moto, db, table, client, dir, mapping } =
        Accounts::new("id int8 PRIMARY KEY, n int8 NOT NULL, name text", "ACCOUNT#").await;
    let port = sluice::localpg::free_port().unwrap();
    let config = crate::operations::with_monitoring(
        db.config_file(
            dir.path(),
            "fence",
            "p",
            &target_toml(&mapping, &moto.url, "write_mode = \"batch\"\nrequest_timeout = \"3s\"\n"),
        ),
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let logs: Vec<PathBuf> = (1..=3).map(|n| dir.path().join(format!("replica{n}.log"))).collect();
    let _logs = crate::harness::LogsOnPanic(logs.clone());
    let log = |n: usize| std::fs::read_to_string(&logs[n]).unwrap_or_default();
    let streams = || async { crate::operations::streaming(port) == Some(true) };
    let insert = |from: i64, to: i64| {
        db.sql(&format!(
            "INSERT INTO accounts SELECT g, 0, 'acct ' || g FROM generate_series({from}, {}) g",
            to - 1
        ))
    };

    // The first holder ever: no predecessor, no delay.
    let mut first = crate::operations::start(&config, &logs[0]);
    wait_for("replica 1 to stream", Duration::from_secs(60), streams).await;
    insert(0, 50);
    wait_for("the first 50 items", Duration::from_secs(60), || {
        let (client, table) = (client.clone(), table.clone());
        async move { client.scan_all(&table).await.unwrap().len() >= 50 }
    })
    .await;
    std::process::Command::new("kill").arg("-TERM").arg(first.id().to_string()).status().unwrap();
    assert!(tokio::task::spawn_blocking(move || first.wait()).await.unwrap().unwrap().success());
    assert!(!log(0).contains("fencing:"), "{}", log(0));

    // A clean handover: the successor writes without waiting.
    let mut second = crate::operations::start(&config, &logs[1]);
    wait_for("replica 2 to stream", Duration::from_secs(60), streams).await;
    assert!(log(1).contains("predecessor=Released") && !log(1).contains("fencing:"), "{}", log(1));

    // kill -9 in the middle of a stream of updates, deletes and key changes.
    let connection = db.connection();
    let writer = tokio::spawn(async move {
        let sql = sluice_postgres::connect_sql(&connection).await.unwrap();
        for step in 0..300i64 {
            let statement = match step % 4 {
                0 => format!("INSERT INTO accounts VALUES ({}, 0, 'late')", 1000 + step),
                1 => format!("UPDATE accounts SET n = n + 1, name = name || '+' WHERE id % 7 = {}", step % 7),
                2 => format!("DELETE FROM accounts WHERE id = {}", step / 4),
                _ => format!("UPDATE accounts SET id = id + 100000 WHERE id = {}", 1000 + step - 3),
            };
            sql.batch_execute(&statement).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    crate::harness::kill_9(&mut second);
    writer.await.unwrap();

    // An unclean takeover: the lock is held at once, the first write waits the delay out.
    let mut third = crate::operations::start(&config, &logs[2]);
    wait_for("replica 3 to hold the lock", Duration::from_secs(60), || async {
        log(2).contains("holding the HA lock")
    })
    .await;
    let held = std::time::Instant::now();
    wait_for("replica 3 to stream", Duration::from_secs(60), streams).await;
    let waited = held.elapsed();
    assert!(log(2).contains("predecessor=Unclean") && log(2).contains("fencing:"), "{}", log(2));
    assert!(
        waited >= Duration::from_secs(9),
        "streamed {waited:?} after taking the lock, inside the 10 s delay"
    );
    let marker = db.commit_lsn_of("INSERT INTO accounts VALUES (-1, 0, 'marker')");
    wait_for("replica 3 to confirm everything", Duration::from_secs(120), || async {
        db.slot_confirmed("fence").unwrap() >= marker
    })
    .await;
    std::process::Command::new("kill").arg("-TERM").arg(third.id().to_string()).status().unwrap();
    assert!(tokio::task::spawn_blocking(move || third.wait()).await.unwrap().unwrap().success());
    assert_items_equal_rows(&db, &client, &table).await;
}

/// `sluice validate` over one deployment's configurations refuses a DynamoDB table written by
/// two pipelines where one writes it in `batch` mode, and lets the replicas of one pipeline,
/// or two guarded writers, share it.
#[test]
fn validate_refuses_a_batch_writer_sharing_its_table_with_another_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("m.toml");
    std::fs::write(
        &mapping,
        "[[tables]]\nsource = \"public.accounts\"\ntarget = \"shared\"\npartition_key = { attribute = \"pk\", template = \"A#{id}\" }\n",
    )
    .unwrap();
    let config = |name: &str, slot: &str, mode: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[source.connection]\ndbname = \"app\"\n[source.replication]\nslot = \"{slot}\"\npublication = \"p\"\n{}",
                target_toml(&mapping, "http://127.0.0.1:1", &format!("write_mode = \"{mode}\"\n"))
            ),
        )
        .unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (batch, replica, single, other_single) = (
        config("batch", "s1", "batch"),
        config("replica", "s1", "batch"),
        config("single", "s2", "single"),
        config("single2", "s3", "single"),
    );
    let validate = |files: &[&str]| {
        let mut args = vec!["validate", "--offline"];
        for file in files {
            args.extend(["-c", file]);
        }
        sluice_output(&args, Duration::from_secs(30))
    };
    let (code, stderr) = validate(&[&batch, &single]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("target.write_mode")
            && stderr.contains("\"shared\"")
            && stderr.contains(&batch)
            && stderr.contains(&single),
        "{stderr}"
    );
    let (code, stderr) = validate(&[&batch, &replica]);
    assert_eq!(code, Some(0), "two replicas of one pipeline: {stderr}");
    let (code, stderr) = validate(&[&single, &other_single]);
    assert_eq!(code, Some(0), "two guarded writers: {stderr}");
}

/// Every row of `accounts` has exactly its item in `table` (`ACCOUNT#id`: n and name), and
/// every live item has its row.
async fn assert_items_equal_rows(db: &TestDb, client: &DynamoClient, table: &str) {
    // Every source row has exactly its item, and every live item has its row.
    let rows: BTreeMap<String, (String, String)> = db
        .sql("SELECT id, n, coalesce(name, '') FROM accounts ORDER BY id")
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('|').collect();
            (format!("ACCOUNT#{}", fields[0]), (fields[1].to_owned(), fields[2].to_owned()))
        })
        .collect();
    let live: BTreeMap<String, (String, String)> = client
        .scan_all(table)
        .await
        .unwrap()
        .into_iter()
        .filter(|item| !is_tombstone(item))
        .map(|item| {
            let Attr::S(pk) = &item["pk"] else { panic!() };
            let Attr::S(name) = &item["name"] else { panic!() };
            (pk.clone(), (number(&item["n"]), name.clone()))
        })
        .collect();
    assert!(rows.len() > 50, "the workload leaves rows behind: {}", rows.len());
    assert_eq!(live, rows, "the target equals the source");
}

#[test]
fn validate_checks_the_mapping_against_the_live_catalog() {
    let db = TestDb::new();
    db.sql(
        "CREATE TABLE customers (id int8 PRIMARY KEY, email text, region text, prefs jsonb);
         CREATE TABLE orders (customer_id int8, id int8 PRIMARY KEY);
         CREATE TABLE unpublished (id int8 PRIMARY KEY);
         CREATE PUBLICATION p FOR TABLE customers, orders",
    );
    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("m.toml");
    std::fs::write(
        &mapping,
        r#"
        [[tables]]
        source = "public.customers"
        target = "app"
        partition_key = { attribute = "pk", template = "CUSTOMER#{id}" }
        rename = { mail = "emailAddress" }
        columns = { email = { as = "number" }, prefs = { as = "map" } }

        [[tables]]
        source = "public.orders"
        target = "app"
        partition_key = { attribute = "pk", template = "CUSTOMER#{customer_id}" }
        sort_key = { attribute = "sk", template = "ORDER#{id}" }

        [[tables]]
        source = "public.unpublished"
        target = "app"
        partition_key = { attribute = "pk", template = "U#{id}" }

        [[tables]]
        source = "public.missing"
        target = "app"
        partition_key = { attribute = "pk", template = "M#{id}" }
        "#,
    )
    .unwrap();
    let config = db.config_file(
        dir.path(),
        "v",
        "p",
        &format!("[target]\nkind = \"dynamodb\"\nmapping = \"{}\"\n", mapping.display()),
    );
    let (code, stderr) =
        sluice_output(&["validate", "-c", config.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(2), "{stderr}");
    for expected in [
        "target.mapping.tables[0].rename.mail: column mail does not exist in public.customers",
        "target.mapping.tables[0].columns.email.as: Number does not fit column email of type text",
        "target.mapping.tables[1].partition_key.template: column customer_id is not part of the replica identity of public.orders",
        "target.mapping.tables[2].source: table public.unpublished is not in publication \"p\"",
        "target.mapping.tables[3].source: table public.missing does not exist",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("tables[0].columns.prefs"), "a fitting rule is fine: {stderr}");
    let (code, stdout_or_err) =
        sluice_output(&["validate", "--offline", "-c", config.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(0), "offline validation only reads the files: {stdout_or_err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_with_an_already_applied_write_applies_the_rest() {
    let (_moto, client, table) = fresh_table("txn").await;
    let write = |key: &str, version: u64, name: &str| {
        guarded(&table, key, version, WriteAction::Put(Item::from([("name".to_string(), s(name))])))
    };
    let first = [write("A", 5, "a5"), write("B", 5, "b5")];
    assert_eq!(client.apply_transaction(&first).await.unwrap(), vec![Outcome::Applied, Outcome::Applied]);
    let mixed = [write("A", 4, "a4-replayed"), write("B", 6, "b6"), write("C", 6, "c6")];
    assert_eq!(
        client.apply_transaction(&mixed).await.unwrap(),
        vec![Outcome::AlreadyApplied, Outcome::Applied, Outcome::Applied]
    );
    let mut names: Vec<_> =
        client.scan_all(&table).await.unwrap().into_iter().map(|i| i["name"].clone()).collect();
    names.sort_by_key(|a| format!("{a:?}"));
    assert_eq!(names, vec![s("a5"), s("b6"), s("c6")], "the stale write changed nothing, the others applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_then_write_batch_writes_exactly_what_the_guard_would_let_through() {
    let (_moto, client, table) = fresh_table("batch").await;
    let put = |key: &str, version: u64, name: &str| {
        guarded(&table, key, version, WriteAction::Put(Item::from([("name".to_string(), s(name))])))
    };
    let delete = |key: &str, version: u64| guarded(&table, key, version, WriteAction::Delete);
    // 60 new items: more than one BatchWriteItem request.
    let first: Vec<_> = (0..60).map(|i| put(&format!("K{i}"), 10, "v10")).collect();
    assert!(client.apply_batch(&first, &[false; 60]).await.unwrap().iter().all(|o| *o == Outcome::Applied));
    assert_eq!(client.scan_all(&table).await.unwrap().len(), 60);
    client
        .batch_put(
            &table,
            vec![Item::from([("pk".to_string(), s("UNVERSIONED")), ("name".to_string(), s("kept"))])],
        )
        .await
        .unwrap();

    let mixed = [
        put("K0", 9, "stale"),    // older than stored: skipped
        put("K1", 10, "same"),    // the same position again: skipped
        put("K2", 11, "newer"),   // newer: written
        delete("K3", 8),          // a stale delete: skipped
        delete("K4", 12),         // a newer delete: deleted
        delete("ABSENT", 12),     // nothing to delete
        put("NEW", 1, "created"), // absent: written
        put("UNVERSIONED", 99, "overwritten?"),
    ];
    let outcomes = client.apply_batch(&mixed, &[false; 8]).await.unwrap();
    use Outcome::{AlreadyApplied as Skip, Applied as Done};
    assert_eq!(outcomes, vec![Skip, Skip, Done, Skip, Done, Done, Done, Skip]);
    let stored: BTreeMap<String, Item> = client
        .scan_all(&table)
        .await
        .unwrap()
        .into_iter()
        .map(|item| match &item["pk"] {
            Attr::S(pk) => (pk.clone(), item),
            other => panic!("{other:?}"),
        })
        .collect();
    let name = |key: &str| stored.get(key).map(|i| i["name"].clone());
    assert_eq!(name("K0"), Some(s("v10")));
    assert_eq!(name("K1"), Some(s("v10")));
    assert_eq!(name("K2"), Some(s("newer")));
    assert_eq!(stored["K2"]["_version"], Attr::N("11".into()));
    assert_eq!(name("K3"), Some(s("v10")));
    assert_eq!(name("K4"), None, "deleted");
    assert_eq!(name("NEW"), Some(s("created")));
    assert_eq!(
        name("UNVERSIONED"),
        Some(s("kept")),
        "the guard refuses items without a version; so does batch mode"
    );
    assert_eq!(stored.len(), 61);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_shutdown_timeout_while_dynamodb_is_unreachable() {
    let shop = Shop::new().await;
    let db = &shop.db;
    let outage = Outage::start(shop.moto.port).await;
    let mapping = shop_mapping(shop.dir.path(), &shop.table);
    let config = db.config_file(
        shop.dir.path(),
        "term",
        "p",
        &target_toml(&mapping, &outage.url(), "request_timeout = \"1s\"\n"),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[pipeline]\n", "[pipeline]\nshutdown_timeout = \"2s\"\n");
    std::fs::write(&config, text).unwrap();
    let mut child = crate::harness::sluice()
        .args(["run", "-c", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    db.wait_slot_active(&db.slot_name("term")).await;
    outage.begin();
    let commit = db.commit_lsn_of("INSERT INTO orders VALUES (1, 1, 1)");
    crate::harness::wait_for_blocking("the change to reach sluice", Duration::from_secs(30), || {
        sent_lsn(db, "term") >= commit
    });
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status}");
    assert!(started.elapsed() < Duration::from_secs(20), "exited after {:?}", started.elapsed());
    let confirmed = db.slot_confirmed("term").unwrap();
    assert!(
        confirmed < commit,
        "slot confirmed {confirmed}, acknowledging the unwritten change ending at {commit}"
    );
    assert_eq!(shop.item_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_events_land_in_an_event_log_table_in_order_per_aggregate() {
    let moto = moto();
    let db = TestDb::new();
    db.sql(
        "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text, aggregateid text, type text, payload jsonb, seq int);
         CREATE PUBLICATION p FOR TABLE outbox;",
    );
    let table = format!("events_{}", db.name);
    let client = dynamo_client(&moto.url).await;
    client.create_table(&table, "aggregate", Some("sequence")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dead_letter = dir.path().join("dead.jsonl");
    let outbox = toml::from_str(&format!(
        "table = \"public.outbox\"\nmessage_prefix = \"outbox\"\nevent_table = \"{table}\""
    ))
    .unwrap();
    let target = DynamoConfig {
        mapping: None,
        outbox: Some(outbox),
        ..dynamo_config(&moto.url, PathBuf::new(), Some(dead_letter.clone()))
    };
    let config = Config {
        pipeline: PipelineConfig::default(),
        source: SourceConfig {
            connection: db.connection(),
            heartbeat_connection: None,
            mode: SourceMode::Replication(sluice_postgres::ReplicationConfig {
                messages: true,
                ..db.replication("log", "p")
            }),
        },
        target: TargetConfig::Dynamodb(target),
        monitoring: Default::default(),
        ha: Default::default(),
        backfill: Default::default(),
        migration: Default::default(),
        verify: Default::default(),
        reverse_of: None,
    };
    assert!(config.validate().is_empty(), "{:?}", config.validate());
    let (shutdown, shutdown_rx) = sluice_core::Shutdown::new();
    let state = sluice::monitor::PipelineState::new(&config);
    let task = tokio::spawn(async move { sluice::pipeline::run(&config, &state, shutdown_rx, |_| {}).await });
    db.wait_slot_active(&db.slot_name("log")).await;

    // Order o-1: five events, one transaction each, the outbox row deleted at once in two of
    // them; order o-2: three events in one transaction; a logical message; a NULL payload;
    // and a row without aggregate id, which an event log cannot key.
    for seq in 1..=5 {
        let delete = if seq % 2 == 0 { "DELETE FROM outbox WHERE aggregateid = 'o-1';" } else { "" };
        db.sql(&format!(
            "BEGIN; INSERT INTO outbox (aggregatetype, aggregateid, type, payload, seq) VALUES ('Order', 'o-1', 'Step', jsonb_build_object('seq', {seq}, 'tags', jsonb_build_array('a')), {seq}); {delete} COMMIT;"
        ));
    }
    db.sql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload, seq) SELECT 'Order', 'o-2', 'Line', jsonb_build_object('seq', g), g FROM generate_series(1, 3) g");
    db.sql("SELECT pg_logical_emit_message(true, 'outbox', '{\"id\":\"m-1\",\"aggregatetype\":\"Customer\",\"aggregateid\":\"c-9\",\"type\":\"Renamed\",\"payload\":{\"name\":\"Ada\"}}')");
    db.sql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'o-3', 'Forgotten', NULL)");
    db.sql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', NULL, 'Orphan', '{}')");
    let end = db.insert_lsn();
    wait_for("the slot to confirm every event", Duration::from_secs(60), || async {
        db.slot_confirmed("log").unwrap() >= Lsn(end.0 - 64)
    })
    .await;

    let mut by_aggregate: BTreeMap<String, Vec<Item>> = BTreeMap::new();
    for item in client.scan_all(&table).await.unwrap() {
        let Attr::S(aggregate) = &item["aggregate"] else { panic!("{item:?}") };
        by_aggregate.entry(aggregate.clone()).or_default().push(item);
    }
    for items in by_aggregate.values_mut() {
        items.sort_by_key(|item| match &item["sequence"] {
            Attr::S(s) => s.clone(),
            other => panic!("{other:?}"),
        });
    }
    let seqs = |aggregate: &str| -> Vec<String> {
        by_aggregate[aggregate]
            .iter()
            .map(|item| match &item["payload"] {
                Attr::M(payload) => number(&payload["seq"]),
                other => panic!("payload is a map: {other:?}"),
            })
            .collect()
    };
    assert_eq!(seqs("Order#o-1"), ["1", "2", "3", "4", "5"], "in sequence order, deleted rows included");
    assert_eq!(seqs("Order#o-2"), ["1", "2", "3"], "one transaction's events keep their order");
    let first = &by_aggregate["Order#o-1"][0];
    assert_eq!(first["type"], s("Step"));
    assert_eq!(first["aggregatetype"], s("Order"));
    assert!(matches!(&first["id"], Attr::S(id) if id.len() == 36), "{first:?}");
    assert!(matches!(&first["position"], Attr::S(p) if p.matches('/').count() == 2), "{first:?}");
    let customer = &by_aggregate["Customer#c-9"];
    assert_eq!((customer.len(), &customer[0]["id"]), (1, &s("m-1")));
    let forgotten = &by_aggregate["Order#o-3"];
    assert!(!forgotten[0].contains_key("payload"), "a NULL payload leaves the attribute out");
    assert_eq!(by_aggregate.len(), 4, "{by_aggregate:#?}");
    let dead: Vec<serde_json::Value> = std::fs::read_to_string(&dead_letter)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["table"], "public.outbox");
    assert!(dead[0]["reason"].as_str().unwrap().contains("aggregateid"), "{}", dead[0]);
    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(60), task).await.unwrap().unwrap().unwrap();
}

/// The reads `verify` and `reconcile` make (scans, BatchGetItem) and the plain writes of
/// commands retry a transient failure under the one retry policy instead of failing at the
/// first timeout (on a loaded CI machine one Scan attempt timed out and verify died). Through
/// a proxy that refuses every connection for a few seconds, the scan waits and then succeeds;
/// with no retry budget the same scan fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_reads_retry_through_an_outage_of_dynamodb() {
    let moto = moto();
    let direct = dynamo_client(&moto.url).await;
    let table = format!("retry_{}", std::process::id());
    direct.create_table(&table, "pk", None).await.unwrap();
    let items: Vec<Item> =
        (0..30).map(|i| Item::from([("pk".to_string(), Attr::S(format!("k{i}")))])).collect();
    direct.batch_put(&table, items).await.unwrap();

    let outage = Outage::start(moto.port).await;
    let options = |retry_for: Duration| sluice_dynamodb::ClientOptions {
        request_timeout: Some(Duration::from_secs(2)),
        retry_for,
        ..sluice_dynamodb::ClientOptions::local(&outage.url())
    };
    let without_retry = DynamoClient::connect(&options(Duration::ZERO)).await;
    let with_retry = DynamoClient::connect(&options(Duration::from_secs(120))).await;

    outage.begin();
    let error = without_retry.scan_all(&table).await.expect_err("no retry budget: the outage fails the scan");
    assert!(error.is_transient(), "an outage is transient: {error}");

    let started = std::time::Instant::now();
    let scan = tokio::spawn(async move { with_retry.scan_all(&table).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!scan.is_finished(), "the scan waits out the outage");
    outage.end();
    let found = tokio::time::timeout(Duration::from_secs(90), scan)
        .await
        .expect("the scan ends once DynamoDB is back")
        .unwrap()
        .expect("the retried scan succeeds");
    assert_eq!(found.len(), 30);
    assert!(started.elapsed() >= Duration::from_secs(3));
}

/// Worker tasks are owned: a DynamoDB worker that panics fails its batch and the pipeline
/// (sluice exits 1 naming the worker) instead of leaving the batch's receipt unresolved
/// forever, and nothing past the unapplied change is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_stops_the_pipeline_and_confirms_nothing_past_it() {
    let shop = Shop::new().await;
    let db = &shop.db;
    let mapping = shop_mapping(shop.dir.path(), &shop.table);
    let config = db.config_file(shop.dir.path(), "panic", "p", &target_toml(&mapping, &shop.moto.url, ""));
    let child = crate::harness::sluice()
        .args(["run", "-c", config.to_str().unwrap()])
        .env("SLUICE_TEST_PANIC_IN", "dynamodb-worker")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    db.wait_slot_active(&db.slot_name("panic")).await;
    let commit = db.commit_lsn_of("INSERT INTO orders VALUES (1, 1, 1)");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("sluice stops instead of waiting on the lost write forever")
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    // The batch's own receipt fails (not merely a later submit finding the worker gone).
    assert!(
        stderr.contains("a DynamoDB worker stopped before applying a write of this batch"),
        "the error names the worker: {stderr}"
    );
    let confirmed = db.slot_confirmed("panic").unwrap();
    assert!(confirmed < commit, "slot confirmed {confirmed}, past the unapplied change ending at {commit}");
    assert_eq!(shop.item_count().await, 0);
}

/// 12,000 rows, not the 200,000 of the Kafka test: moto takes a few hundred conditional writes
/// a second here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_finishes_across_repeated_kill_9_without_writing_it_again() {
    let moto = moto();
    let table = format!("bigtx_{}", std::process::id());
    crate::crash::a_large_transaction_into(crate::crash::LargeTarget::DynamoDb { moto, table }, 12_000).await;
}
