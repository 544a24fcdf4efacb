//! The way back from DynamoDB, against a real Postgres and moto's DynamoDB Streams: the shop
//! mapping (two tables in one DynamoDB table) goes forward, cuts over, takes the
//! application's PutItem / UpdateItem / DeleteItem (made with aws-sdk-dynamodb, as a client
//! would) back into the old tables exactly once and typed as the columns declare, survives a
//! kill -9 of the way back, rolls back with the operator's fence, and streams forward again.
//! A trigger on the old tables counts every row write: sluice's own writes never come back.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use sluice_dynamodb::{Attr, DynamoClient};

use crate::dynamodb::{items, shop_mapping, target_toml, SCHEMA};
use crate::harness::{
    differences, dynamo_client, http_get, kill_9, moto, sluice, sluice_output, verify_report, wait_for,
    LogsOnPanic, Moto, TestDb,
};

const COUNT_WRITES: &str = "CREATE TABLE writes (n int8 NOT NULL); INSERT INTO writes VALUES (0);
    CREATE FUNCTION count_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE writes SET n = n + 1; RETURN NULL; END $$;
    CREATE TRIGGER counted AFTER INSERT OR UPDATE OR DELETE ON customers FOR EACH ROW EXECUTE FUNCTION count_write();
    CREATE TRIGGER counted AFTER INSERT OR UPDATE OR DELETE ON orders FOR EACH ROW EXECUTE FUNCTION count_write();";

fn writes(db: &TestDb) -> i64 {
    db.sql("SELECT n FROM writes").trim().parse().unwrap()
}

/// The application's client: aws-sdk-dynamodb against moto.
fn app_client(url: &str) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "test"))
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.into())
}
fn n(v: &str) -> AttributeValue {
    AttributeValue::N(v.into())
}

fn daemon(config: &Path, reverse: bool, log: &Path) -> Child {
    let mut command = sluice();
    command.arg("run").arg("-c").arg(config);
    if reverse {
        command.arg("--reverse");
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    command.stdout(Stdio::null()).stderr(log).spawn().expect("start sluice")
}

struct Shop {
    _moto: Arc<Moto>,
    db: TestDb,
    dir: tempfile::TempDir,
    config: PathBuf,
    table: String,
    client: DynamoClient,
    app: aws_sdk_dynamodb::Client,
    forward: Child,
    back: std::sync::Mutex<Option<Child>>,
}

impl Shop {
    /// Old tables with a write counter, a DynamoDB table with a NEW_AND_OLD_IMAGES stream,
    /// the forward daemon, and the first rows streamed forward and verified.
    async fn start(slot: &str) -> Shop {
        let moto = moto();
        let db = TestDb::new();
        db.sql(SCHEMA);
        db.sql(COUNT_WRITES);
        let dir = tempfile::tempdir().unwrap();
        let table = format!("back_{}", db.name);
        let client = dynamo_client(&moto.url).await;
        client.create_table(&table, "pk", Some("sk")).await.unwrap();
        client.enable_stream(&table, "NEW_AND_OLD_IMAGES").await.unwrap();
        let mapping = shop_mapping(dir.path(), &table);
        let config = db.config_file(dir.path(), slot, "p", &target_toml(&mapping, &moto.url, ""));
        // Small transactions on the way back, so that a kill lands between them.
        let text = std::fs::read_to_string(&config).unwrap().replacen(
            "[pipeline]\n",
            "[pipeline]\nbatch_max_events = 20\n",
            1,
        );
        std::fs::write(&config, text).unwrap();
        let forward = daemon(&config, false, &dir.path().join("forward.log"));
        let app = app_client(&moto.url);
        let shop =
            Shop { _moto: moto, db, dir, config, table, client, app, forward, back: Default::default() };
        shop.db.wait_slot_active(&shop.db.slot_name(slot)).await;
        shop.db.sql(
            "INSERT INTO customers (id, email, password_hash, balance, created_at, tags, prefs)
               SELECT i, 'c' || i || '@x', 'hash' || i, i * 1.5, '2024-05-01 12:00:00+00'::timestamptz + i * interval '1 hour',
                      ARRAY['t' || i], jsonb_build_object('n', i) FROM generate_series(1, 5) i;
             INSERT INTO orders SELECT 1 + i % 5, 10 + i, i FROM generate_series(1, 10) i;",
        );
        wait_for("the first rows to stream forward", Duration::from_secs(120), || async {
            items(&shop.client, &shop.table).await.len() == 15
        })
        .await;
        shop
    }

    fn logs(&self) -> LogsOnPanic {
        LogsOnPanic(vec![self.dir.path().join("forward.log"), self.dir.path().join("reverse.log")])
    }

    fn start_back(&self) {
        let started = daemon(&self.config, true, &self.dir.path().join("reverse.log"));
        *self.back.lock().unwrap() = Some(started);
    }

    fn kill_back(&self) {
        if let Some(mut back) = self.back.lock().unwrap().take() {
            kill_9(&mut back);
        }
    }

    /// Waits until the way back has read every shard to its end after now.
    async fn back_caught_up(&self) {
        let now: f64 = self.db.sql("SELECT extract(epoch FROM now())").trim().parse().unwrap();
        wait_for("the way back to read the stream to its end", Duration::from_secs(120), || async {
            if self.db.sql("SELECT to_regclass('sluice_stream_checkpoint') IS NULL") == "t" {
                return false;
            }
            let read_to = self.db.sql(
                "SELECT coalesce(min(extract(epoch FROM read_to)), 0) FROM sluice_stream_checkpoint WHERE NOT finished",
            );
            read_to.trim().parse::<f64>().unwrap_or(0.0) > now + 1.0
        })
        .await;
    }

    async fn verify_clean(&self) {
        let report = verify_report(&self.config).await;
        assert_eq!(differences(&report), 0, "{report:#}");
    }

    fn command(&self, args: &[&str]) -> (Option<i32>, String) {
        let mut all = args.to_vec();
        all.extend(["-c", self.config.to_str().unwrap(), "--drain-timeout", "120s"]);
        sluice_output(&all, Duration::from_secs(300))
    }

    fn phase(&self, table: &str) -> String {
        let out =
            sluice().args(["migration", "--json", "-c", self.config.to_str().unwrap()]).output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["tables"].as_array().unwrap().iter().find(|t| t["table"] == table).unwrap()["phase"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn key(&self, pk: &str, sk: &str) -> std::collections::HashMap<String, AttributeValue> {
        [("pk".to_owned(), s(pk)), ("sk".to_owned(), s(sk))].into()
    }

    async fn put(&self, attributes: &[(&str, AttributeValue)]) {
        let mut request = self.app.put_item().table_name(&self.table);
        for (name, value) in attributes {
            request = request.item(*name, value.clone());
        }
        request.send().await.expect("PutItem");
    }

    async fn update(&self, pk: &str, sk: &str, attribute: &str, value: AttributeValue) {
        self.app
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key(pk, sk)))
            .update_expression("SET #a = :v")
            .expression_attribute_names("#a", attribute)
            .expression_attribute_values(":v", value)
            .send()
            .await
            .expect("UpdateItem");
    }

    async fn delete(&self, pk: &str, sk: &str) {
        self.app
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(self.key(pk, sk)))
            .send()
            .await
            .expect("DeleteItem");
    }
}

/// The daemons end with the test, however it ends (a panic too).
impl Drop for Shop {
    fn drop(&mut self) {
        kill_9(&mut self.forward);
        self.kill_back();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_s_dynamodb_writes_reach_the_old_tables_once_and_roll_back() {
    let shop = Shop::start("back").await;
    let _logs = shop.logs();
    let db = &shop.db;
    shop.verify_clean().await;
    db.sql("UPDATE writes SET n = 0");

    // Cut over both tables of the single-table design.
    let (code, out) = shop.command(&["cutover", "--table", "public.customers", "--table", "public.orders"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("5/5 reversed"), "{out}");
    assert_eq!(shop.phase("public.customers"), "reversed");
    assert_eq!(shop.phase("public.orders"), "reversed");

    // The way back starts only now: it reads every forward write since the stream began, all
    // in a reversed phase, and must recognise each one as sluice's own.
    shop.start_back();
    shop.back_caught_up().await;
    assert_eq!(writes(db), 0, "sluice's own forward writes came back");

    // The application writes DynamoDB, as a client would.
    let millis = "1714564800250"; // 2024-05-01 12:00:00.25 UTC
    shop.put(&[
        ("pk", s("CUSTOMER#100")),
        ("sk", s("PROFILE")),
        ("id", n("100")),
        ("emailAddress", s("new@x")),
        ("status", s("active")),
        ("balance", n("7.25")),
        ("created_at", n(millis)),
        ("tags", AttributeValue::Ss(vec!["b".into(), "a".into()])),
        ("prefs", AttributeValue::M([("dark".to_owned(), AttributeValue::Bool(true))].into())),
        ("entity", s("Customer")),
    ])
    .await;
    shop.update("CUSTOMER#1", "PROFILE", "emailAddress", s("changed@x")).await;
    shop.update("CUSTOMER#2", "ORDER#11", "total", n("99")).await;
    shop.delete("CUSTOMER#3", "ORDER#12").await;
    shop.put(&[
        ("pk", s("CUSTOMER#100")),
        ("sk", s("ORDER#500")),
        ("customer_id", n("100")),
        ("id", n("500")),
        ("total", n("5")),
        ("entity", s("Order")),
    ])
    .await;
    // An attribute no column maps to: nothing to write.
    shop.update("CUSTOMER#2", "PROFILE", "views", n("3")).await;
    // Another writer's item in the shared table: not ours.
    shop.put(&[("pk", s("SESSION#1")), ("sk", s("X"))]).await;

    wait_for("the application's five writes in the old tables", Duration::from_secs(120), || async {
        writes(db) >= 5
    })
    .await;
    shop.back_caught_up().await;
    assert_eq!(writes(db), 5, "each write applied once, nothing else");
    assert_eq!(
        db.sql(
            "SELECT id, email, status, balance, created_at = '2024-05-01 12:00:00.25+00', \
                    tags @> ARRAY['a', 'b'] AND cardinality(tags) = 2, prefs = '{\"dark\": true}', password_hash IS NULL \
             FROM customers WHERE id = 100"
        ),
        "100|new@x|active|7.25|t|t|t|t"
    );
    assert_eq!(
        db.sql("SELECT email, password_hash FROM customers WHERE id = 1"),
        "changed@x|hash1",
        "a dropped column keeps its value"
    );
    assert_eq!(db.sql("SELECT total FROM orders WHERE customer_id = 2 AND id = 11"), "99");
    assert_eq!(db.sql("SELECT count(*) FROM orders WHERE customer_id = 3 AND id = 12"), "0");
    assert_eq!(db.sql("SELECT total FROM orders WHERE customer_id = 100 AND id = 500"), "5");
    // No echo: the forward stream dropped the way back's transactions, so the application's
    // items are as it wrote them (no version added by sluice).
    let all = items(&shop.client, &shop.table).await;
    let customer = &all[&("CUSTOMER#100".to_owned(), "PROFILE".to_owned())];
    assert!(!customer.contains_key("_version"), "{:?}", customer.keys());
    assert_eq!(customer["emailAddress"], Attr::S("new@x".into()));
    shop.verify_clean().await;

    // The way back's endpoints: ready while it streams, its records counted by outcome.
    let log = std::fs::read_to_string(shop.dir.path().join("reverse.log")).unwrap();
    let port: u16 = log
        .lines()
        .find_map(|l| l.split("addr=127.0.0.1:").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .expect("the way back's address in its log");
    let (code, body) = http_get(port, "/readyz").expect("/readyz answers");
    assert_eq!(code, 200, "{body}");
    let (_, metrics) = http_get(port, "/metrics").expect("/metrics answers");
    let outcome = |o: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("sluice_reverse_records_total{") && l.contains(&format!("outcome=\"{o}\""))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(outcome("own"), 15.0, "the forward stream's 15 items: {metrics}");
    assert_eq!(outcome("applied"), 5.0, "{metrics}");
    assert_eq!((outcome("foreign"), outcome("unchanged")), (1.0, 1.0), "{metrics}");

    // kill -9 mid-stream: nothing lost, nothing applied twice.
    let before = writes(db);
    for i in 0..150 {
        let id = (1000 + i).to_string();
        shop.put(&[
            ("pk", s("CUSTOMER#100")),
            ("sk", s(&format!("ORDER#{id}"))),
            ("customer_id", n("100")),
            ("id", n(&id)),
            ("total", n(&i.to_string())),
            ("entity", s("Order")),
        ])
        .await;
    }
    wait_for("the way back to be part way", Duration::from_secs(120), || async { writes(db) > before }).await;
    shop.kill_back();
    let at_kill = writes(db);
    shop.start_back();
    wait_for("the burst in the old tables", Duration::from_secs(180), || async {
        writes(db) >= before + 150
    })
    .await;
    shop.back_caught_up().await;
    assert_eq!(
        writes(db),
        before + 150,
        "killed at {} of 150: every write applied exactly once",
        at_kill - before
    );
    assert_eq!(db.sql("SELECT count(*) FROM orders WHERE customer_id = 100"), "151");
    shop.verify_clean().await;

    // Rollback needs the operator's word that the application no longer writes DynamoDB.
    let (code, out) = shop.command(&["rollback", "--table", "public.customers", "--table", "public.orders"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--new-side-fenced") && out.contains(&shop.table), "{out}");
    assert_eq!(shop.phase("public.customers"), "reversed", "nothing moved");
    let (code, out) = shop.command(&[
        "rollback",
        "--table",
        "public.customers",
        "--table",
        "public.orders",
        "--new-side-fenced",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("3/5 drained") && out.contains("5/5 forward"), "{out}");
    assert_eq!(shop.phase("public.orders"), "forward");
    // Forward again, the one attribute the application added that no column maps to is drift
    // again, named by verify, until the forward stream next writes the row.
    let report = verify_report(&shop.config).await;
    assert_eq!(differences(&report), 1, "{report:#}");
    let customers =
        report["tables"].as_array().unwrap().iter().find(|t| t["table"] == "public.customers").unwrap();
    assert_eq!(customers["different_keys"][0]["attributes"], serde_json::json!(["views"]), "{report:#}");
    db.sql("UPDATE customers SET status = 'gold' WHERE id = 2");

    // Forward again: the old tables take writes, and the stream reaches the items the
    // application wrote (they carry version 0 now, below any position).
    db.sql("UPDATE customers SET email = 'after@x' WHERE id = 100; UPDATE orders SET total = 1 WHERE customer_id = 100 AND id = 500");
    wait_for("the forward stream to update the application's items", Duration::from_secs(120), || async {
        let all = items(&shop.client, &shop.table).await;
        all[&("CUSTOMER#100".to_owned(), "PROFILE".to_owned())]["emailAddress"] == Attr::S("after@x".into())
            && all[&("CUSTOMER#100".to_owned(), "ORDER#500".to_owned())]["total"] == Attr::N("1".into())
    })
    .await;
    shop.verify_clean().await;

    // Cut over again, then finish: the point of no return. The way back applies the
    // application's writes until then, and none after.
    let (code, out) = shop.command(&["cutover", "--table", "public.customers", "--table", "public.orders"]);
    assert_eq!(code, Some(0), "{out}");
    let before = writes(db);
    shop.update("CUSTOMER#4", "PROFILE", "emailAddress", s("before-finish@x")).await;
    wait_for("the write before finish", Duration::from_secs(120), || async { writes(db) == before + 1 })
        .await;
    let (code, out) = shop.command(&["finish", "--table", "public.customers", "--table", "public.orders"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1/2 drained") && out.contains("2/2 finished"), "{out}");
    assert_eq!(shop.phase("public.customers"), "finished");
    shop.update("CUSTOMER#4", "PROFILE", "emailAddress", s("after-finish@x")).await;
    shop.back_caught_up().await;
    assert_eq!(writes(db), before + 1, "nothing applied after finish");
    assert_eq!(db.sql("SELECT email FROM customers WHERE id = 4"), "before-finish@x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_names_what_the_way_back_from_dynamodb_cannot_do() {
    let moto = moto();
    let db = TestDb::new();
    db.sql(SCHEMA);
    db.sql("ALTER TABLE customers ALTER COLUMN password_hash SET NOT NULL");
    let dir = tempfile::tempdir().unwrap();
    let table = format!("novalid_{}", db.name);
    dynamo_client(&moto.url).await.create_table(&table, "pk", Some("sk")).await.unwrap();
    // Orders keyed like profiles, with no constant to tell them apart.
    let mapping = shop_mapping(dir.path(), &table);
    let text = std::fs::read_to_string(&mapping).unwrap().replace(
        "template = \"ORDER#{id}\" }\nconstants = { entity = \"Order\" }",
        "template = \"PROFILE\" }",
    );
    assert!(!text.contains("\"Order\""));
    std::fs::write(&mapping, text).unwrap();
    let config = db.config_file(dir.path(), "novalid", "p", &target_toml(&mapping, &moto.url, ""));
    let stdout = |args: &[&str]| {
        let out = sluice().args(args).arg("-c").arg(&config).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, offline) = stdout(&["validate", "--offline"]);
    assert_eq!(code, Some(0), "the forward direction is fine: {offline}");
    assert!(
        offline.contains("way back: mapping.tables[1].partition_key")
            && offline.contains("public.customers and public.orders"),
        "{offline}"
    );
    let (_, live) = stdout(&["validate"]);
    assert!(live.contains("public.customers and public.orders"), "{live}");
    assert!(
        live.contains("column password_hash is dropped by the mapping, NOT NULL and without a default"),
        "{live}"
    );
    assert!(
        live.contains(&format!("DynamoDB table {table} has no stream enabled"))
            && live.contains("NEW_AND_OLD_IMAGES"),
        "{live}"
    );
}
