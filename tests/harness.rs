//! Test harness: a shared throwaway Postgres cluster (started on first use, stopped when the last
//! test using it finishes), a fresh database per test, an in-process source whose events the
//! test reads and acknowledges, the `sluice` binary, and `wait_for` helpers with deadlines.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sluice::localpg::{ClusterOptions, LocalPostgres};
use sluice_core::{ChangeEvent, EventBatch, Lsn};
use sluice_postgres::{ConnectionConfig, ReplicationConfig, ReplicationSource, SourceOptions, SourceStats};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

static SHARED: Mutex<Weak<LocalPostgres>> = Mutex::new(Weak::new());
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The cluster shared by the tests running now.
pub fn shared_cluster() -> Arc<LocalPostgres> {
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pg) = shared.upgrade() {
        return pg;
    }
    let pg =
        Arc::new(LocalPostgres::start(&ClusterOptions::default()).expect("start the test Postgres cluster"));
    *shared = Arc::downgrade(&pg);
    pg
}

/// A fresh database in a cluster.
pub struct TestDb {
    pub pg: Arc<LocalPostgres>,
    pub name: String,
}

impl TestDb {
    pub fn new() -> Self {
        Self::in_cluster(shared_cluster())
    }

    pub fn in_cluster(pg: Arc<LocalPostgres>) -> Self {
        let name = format!("t{}_{}", std::process::id(), DB_COUNTER.fetch_add(1, Ordering::Relaxed));
        pg.create_database(&name).expect("create test database");
        TestDb { pg, name }
    }

    /// Runs SQL through psql; panics with the server's message on failure.
    pub fn sql(&self, sql: &str) -> String {
        self.pg.psql(&self.name, sql).unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
    }

    pub fn lsn(&self, sql: &str) -> Lsn {
        self.sql(sql).parse().expect("an LSN")
    }

    pub fn insert_lsn(&self) -> Lsn {
        self.lsn("SELECT pg_current_wal_insert_lsn()")
    }

    /// Runs `sql` (one transaction) and returns the end LSN of its commit record; see
    /// [`CommitPeek`].
    pub fn commit_lsn_of(&self, sql: &str) -> Lsn {
        self.peek_commits().commit_lsn_of(sql)
    }

    /// A temporary test_decoding slot to read commit positions through. Creating a slot waits
    /// for every transaction running in the cluster, so create it before opening one.
    pub fn peek_commits(&self) -> CommitPeek<'_> {
        let slot = self.slot_name("peek");
        self.sql(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'test_decoding')"));
        CommitPeek { db: self, slot }
    }

    /// Waits until a replication connection streams from `slot`. A slot being created is
    /// active too, but has no confirmed position until it reached its consistent point; changes
    /// before that point are not in the stream.
    pub async fn wait_slot_active(&self, slot: &str) {
        let sql = format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active AND confirmed_flush_lsn IS NOT NULL");
        // Creating a logical slot waits for the transactions running anywhere in the cluster,
        // which other tests keep busy: allow for a loaded machine.
        wait_for(&format!("slot {slot} to be active"), Duration::from_secs(90), || async {
            self.sql(&sql) == "1"
        })
        .await;
    }

    /// Starts an in-process source on `slot` and waits until it streams.
    pub async fn stream(&self, repl: ReplicationConfig) -> Stream {
        let slot = repl.slot.clone();
        let stream = Stream::start(self.connection(), repl);
        self.wait_slot_active(&slot).await;
        let stats = Arc::clone(&stream.stats);
        wait_for("the source to stream", Duration::from_secs(90), || {
            let streaming = stats.streaming.load(std::sync::atomic::Ordering::Relaxed);
            async move { streaming }
        })
        .await;
        stream
    }

    /// The confirmed flush LSN of this test's slot `slot`.
    pub fn slot_confirmed(&self, slot: &str) -> Option<Lsn> {
        let slot = self.slot_name(slot);
        let text = self
            .sql(&format!("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"));
        text.parse().ok()
    }

    /// The server's major version: 15 for 15.4.
    pub fn server_major(&self) -> u32 {
        self.sql("SHOW server_version_num").parse::<u32>().expect("server_version_num") / 10000
    }

    /// `server_version`, as the server words it.
    pub fn server_version(&self) -> String {
        self.sql("SHOW server_version")
    }

    pub fn connection(&self) -> ConnectionConfig {
        self.pg.connection(&self.name)
    }

    /// Slots are cluster-wide: each test's slot names carry its database name.
    pub fn slot_name(&self, slot: &str) -> String {
        format!("{}_{slot}", self.name)
    }

    pub fn replication(&self, slot: &str, publication: &str) -> ReplicationConfig {
        ReplicationConfig {
            status_interval: Duration::from_secs(1),
            ..ReplicationConfig::new(self.slot_name(slot), publication)
        }
    }

    /// A config file for the `sluice` binary: source settings for this database plus `rest`.
    pub fn config_file(&self, dir: &std::path::Path, slot: &str, publication: &str, rest: &str) -> PathBuf {
        let path = dir.join("sluice.toml");
        let slot = self.slot_name(slot);
        let text = format!(
            "[pipeline]\nretry_for = \"2s\"\n\n[monitoring]\nlisten = \"127.0.0.1:0\"\n\n[source.connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"\n\n\
             [source.replication]\nslot = \"{slot}\"\npublication = \"{publication}\"\nstatus_interval = \"1s\"\n\n{rest}\n",
            self.pg.port, self.name
        );
        std::fs::write(&path, text).expect("write config");
        path
    }
}

/// A finished test leaves nothing behind in the shared cluster: its connections (replication
/// ones too) are ended, its slots dropped and its database removed. Slots are a cluster-wide,
/// limited resource; left over, they make later tests fail with "all replication slots are in
/// use". Best effort: a stopped server or a slot that stays busy only leaves litter.
impl Drop for TestDb {
    fn drop(&mut self) {
        let name = &self.name;
        let steps = [
            format!("SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"),
            format!("SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots WHERE database = '{name}' AND NOT active"),
            format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            // Replication origins are cluster-wide, and each takes one of the
            // max_replication_slots progress entries: the test's (named after its slots).
            format!("SELECT count(pg_replication_origin_drop(roname)) FROM pg_replication_origin WHERE roname LIKE '%{name}%'"),
        ];
        for _ in 0..3 {
            if steps.iter().all(|sql| self.pg.psql("postgres", sql).is_ok()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// An in-process source whose batches the test receives; every batch is acknowledged
/// (made "durable") as soon as the test has read it.
/// Reads the end LSN of a transaction's commit record. Confirming that LSN acknowledges the
/// transaction: a slot stays below it until the transaction is durable in the target, and
/// reaches it only then. (The cluster's insert position is no such bound: other tests write WAL
/// beside this one, and an idle slot may confirm past it before this transaction commits.)
pub struct CommitPeek<'a> {
    db: &'a TestDb,
    slot: String,
}

impl CommitPeek<'_> {
    /// Runs `sql` (statements without BEGIN or COMMIT: psql runs them as one transaction) and
    /// returns the end LSN of its commit record.
    pub fn commit_lsn_of(&self, sql: &str) -> Lsn {
        let output = self.db.sql(&format!("{sql}; SELECT pg_current_xact_id()"));
        let xid = output.lines().last().expect("a transaction id");
        // The slot decodes up to the flushed WAL; with synchronous_commit = off the commit is
        // flushed by the WAL writer a moment later.
        let peek = format!(
            "SELECT lsn FROM pg_logical_slot_get_changes('{}', NULL, NULL) WHERE data = 'COMMIT {xid}'",
            self.slot
        );
        let mut commit = String::new();
        wait_for_blocking("the commit to be decodable", Duration::from_secs(30), || {
            commit = self.db.sql(&peek);
            !commit.is_empty()
        });
        commit.parse().expect("an LSN")
    }
}

impl Drop for CommitPeek<'_> {
    fn drop(&mut self) {
        let _ = self.db.pg.psql(&self.db.name, &format!("SELECT pg_drop_replication_slot('{}')", self.slot));
    }
}

pub struct Stream {
    batches: mpsc::Receiver<EventBatch>,
    durable: watch::Sender<Lsn>,
    shutdown: sluice_core::ShutdownTrigger,
    pub task: JoinHandle<sluice_postgres::Result<()>>,
    pub acknowledge: bool,
    pub stats: Arc<SourceStats>,
    /// The `redelivery_horizon` of the last batch received.
    pub redelivery_horizon: Lsn,
}

impl Stream {
    pub fn start(conn: ConnectionConfig, repl: ReplicationConfig) -> Self {
        Self::start_with(
            conn,
            repl,
            SourceOptions { retry_for: Duration::from_secs(5), ..SourceOptions::default() },
        )
    }

    /// [`Stream::start`] with these options (a longer `retry_for` to outlast a failover).
    pub fn start_with(conn: ConnectionConfig, repl: ReplicationConfig, options: SourceOptions) -> Self {
        let source = ReplicationSource::new(conn, repl, options);
        let stats = source.stats();
        let (tx, batches) = mpsc::channel(4);
        let (durable, durable_rx) = watch::channel(Lsn::ZERO);
        let (shutdown, shutdown_rx) = sluice_core::Shutdown::new();
        let task = tokio::spawn(source.run(tx, durable_rx, shutdown_rx));
        Stream { batches, durable, shutdown, task, acknowledge: true, stats, redelivery_horizon: Lsn::ZERO }
    }

    /// Collects events until `done` says the collection is complete, or panics at the deadline.
    pub async fn collect_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&[ChangeEvent]) -> bool,
    ) -> Vec<ChangeEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut events = Vec::new();
        while !done(&events) {
            let batch = tokio::time::timeout_at(deadline, self.batches.recv()).await.unwrap_or_else(|_| {
                panic!("timed out after {limit:?} with {} events: {:#?}", events.len(), events.last())
            });
            let Some(batch) = batch else {
                let result = (&mut self.task).await;
                panic!("the source stopped: {result:?}");
            };
            self.redelivery_horizon =
                batch.redelivery_horizon.expect("a streaming session knows its redelivery horizon");
            if self.acknowledge {
                if let Some(ack) = batch.ack_lsn {
                    self.durable.send_replace(ack);
                }
            }
            events.extend(batch.events);
        }
        events
    }

    /// True when no change is waiting (nothing was delivered that the test has not read).
    /// Batches without events (heartbeats, which only carry a position) do not count.
    pub fn nothing_delivered(&mut self) -> bool {
        while let Ok(batch) = self.batches.try_recv() {
            if !batch.events.is_empty() {
                return false;
            }
        }
        true
    }

    /// Ends the source abruptly, as a crash would: nothing more is confirmed.
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Collects the changes (inserts, updates, deletes, truncates, messages) of `count` commits.
    pub async fn commits(&mut self, count: usize) -> Vec<ChangeEvent> {
        self.collect_until(Duration::from_secs(60), |events| {
            events.iter().filter(|e| matches!(e, ChangeEvent::Commit { .. })).count() >= count
        })
        .await
    }

    pub async fn stop(self) -> sluice_postgres::Result<()> {
        self.shutdown.trigger();
        let Stream { mut batches, task, durable, acknowledge, .. } = self;
        // Keep draining so that the source can hand over its last batch. Batches without
        // events (heartbeats) are acknowledged, so the drain does not wait for them; batches
        // with events the test did not read stay unacknowledged.
        let drain = tokio::spawn(async move {
            while let Some(batch) = batches.recv().await {
                if let (true, true, Some(ack)) = (acknowledge, batch.events.is_empty(), batch.ack_lsn) {
                    durable.send_replace(ack);
                }
            }
        });
        let result = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("source stops")
            .expect("source task");
        drain.abort();
        result
    }
}

/// The `int8` first column of every insert among `events`; panics on any other row change.
pub fn inserted_ids(events: &[ChangeEvent]) -> Vec<i64> {
    row_changes(events)
        .iter()
        .map(|e| match e {
            ChangeEvent::Insert { new, .. } => match new[0] {
                sluice_core::Value::Int8(id) => id,
                ref other => panic!("id {other:?}"),
            },
            other => panic!("expected inserts only, got {other:?}"),
        })
        .collect()
}

/// Only the row changes of a list of events.
pub fn row_changes(events: &[ChangeEvent]) -> Vec<&ChangeEvent> {
    events
        .iter()
        .filter(|e| {
            matches!(
                e,
                ChangeEvent::Insert { .. }
                    | ChangeEvent::Update { .. }
                    | ChangeEvent::Delete { .. }
                    | ChangeEvent::Truncate { .. }
            )
        })
        .collect()
}

/// The `sluice` binary with logs at info level: the one this build made, or
/// `SLUICE_TEST_BIN` (a copy, so that an hour-long soak keeps running one binary while the
/// tree is rebuilt).
pub fn sluice() -> Command {
    let binary = std::env::var_os("SLUICE_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_sluice").into());
    let mut cmd = Command::new(binary);
    cmd.env("SLUICE_LOG", "info").stdin(Stdio::null());
    cmd
}

/// Prints these files (sluice's logs) if the test panics while the guard lives.
pub struct LogsOnPanic(pub Vec<PathBuf>);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for path in &self.0 {
                eprintln!(
                    "----- {} -----\n{}",
                    path.display(),
                    std::fs::read_to_string(path).unwrap_or_else(|e| e.to_string())
                );
            }
        }
    }
}

/// Runs `sluice` to completion with a time limit; returns (exit code, stderr).
/// Runs `sluice run -c config` until the stream passed everything `db` holds so far, expecting
/// success; returns its log (standard error).
pub fn run_to_now(db: &TestDb, config: &std::path::Path) -> String {
    let until = db.insert_lsn().to_string();
    let (code, stderr) = sluice_output(
        &["run", "-c", config.to_str().unwrap(), "--until-lsn", &until],
        Duration::from_secs(90),
    );
    assert_eq!(code, Some(0), "{stderr}");
    stderr
}

pub fn sluice_output(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let mut child =
        sluice().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn sluice");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            return (status.code(), String::from_utf8_lossy(&out.stderr).into_owned());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "sluice {args:?} did not exit within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `sluice verify --json -c config` through the binary: the report, with the exit code
/// checked against it (0 when equal, 3 when anything differs).
pub async fn verify_report(config: &std::path::Path) -> serde_json::Value {
    let mut command = sluice();
    command.args(["verify", "--json", "-c", config.to_str().unwrap()]);
    let out =
        tokio::task::spawn_blocking(move || command.output().expect("run sluice verify")).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("a JSON report ({e}): {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        out.status.code(),
        Some(if differences(&report) == 0 { 0 } else { 3 }),
        "exit code follows the differences: {report:#}"
    );
    report
}

/// Missing, different and extra keys over every table of a verify report.
pub fn differences(report: &serde_json::Value) -> u64 {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["missing"].as_u64().unwrap() + t["different"].as_u64().unwrap() + t["extra"].as_u64().unwrap()
        })
        .sum()
}

/// Kills a child process with SIGKILL (no chance to flush or confirm anything).
pub fn kill_9(child: &mut Child) {
    let _ = Command::new("kill").arg("-9").arg(child.id().to_string()).status();
    let _ = child.wait();
}

/// Waits up to `limit` for the child to exit.
pub async fn wait_for_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "sluice still runs after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops a running sluice with SIGTERM and expects it to exit 0.
pub fn stop(mut child: Child) {
    // A SIGTERM sent before the process has installed its handler (a run stopped right after
    // its start) would kill it by the default action: wait until it catches SIGTERM.
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    while !catches_sigterm(child.id()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success(), "sluice exits 0 on SIGTERM");
}

/// Whether process `pid` has a handler for SIGTERM (bit 15 of `SigCgt` in its /proc status).
fn catches_sigterm(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let caught = status.lines().find_map(|line| line.strip_prefix("SigCgt:")).map(str::trim);
    caught.and_then(|mask| u64::from_str_radix(mask, 16).ok()).is_some_and(|mask| mask & (1 << 14) != 0)
}

/// How many times its written limit a wait may take before it fails
/// (`SLUICE_TEST_PATIENCE`, default 3): a loaded CI machine runs the suite up to four times
/// slower than a quiet one, and a deadline only bounds how long a failure takes to show.
pub fn patience(limit: Duration) -> Duration {
    static FACTOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let factor = *FACTOR.get_or_init(|| {
        std::env::var("SLUICE_TEST_PATIENCE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|f| *f > 0)
            .unwrap_or(3)
    });
    limit * factor
}

/// Polls `check` until it is true; panics naming `what` at the deadline (`limit`, times the
/// patience).
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let limit = patience(limit);
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The same, for blocking checks.
pub fn wait_for_blocking(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let limit = patience(limit);
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A DynamoDB-API server (moto) on 127.0.0.1, shared by the tests running now.
pub struct Moto {
    child: Mutex<Child>,
    pub url: String,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

static MOTO: Mutex<Weak<Moto>> = Mutex::new(Weak::new());

/// `SLUICE_TEST_MOTO`, the CI cache's venv, or `moto_server` on PATH.
fn moto_binary() -> PathBuf {
    if let Ok(path) = std::env::var("SLUICE_TEST_MOTO") {
        return PathBuf::from(path);
    }
    let cached = PathBuf::from(std::env::var("HOME").unwrap_or_default())
        .join(".cache/sluice-ci/moto/bin/moto_server");
    if cached.exists() {
        return cached;
    }
    PathBuf::from("moto_server")
}

pub fn moto() -> Arc<Moto> {
    let mut shared = MOTO.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(moto) = shared.upgrade() {
        return moto;
    }
    let port = sluice::localpg::free_port().unwrap();
    let child = Command::new(moto_binary())
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start moto_server ({e}); run `bash .ci/run` once, or pip install 'moto[server]'")
        });
    let moto = Arc::new(Moto { child: Mutex::new(child), url: format!("http://127.0.0.1:{port}"), port });
    wait_for_blocking("moto to answer", Duration::from_secs(30), || http_ok(port, "/moto-api/"));
    *shared = Arc::downgrade(&moto);
    moto
}

/// True when `GET path` on 127.0.0.1:port answers 200.
pub fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

/// `GET path` on 127.0.0.1:`port`: the status code and body, or `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// The value of one series in a Prometheus exposition: `name` alone matches the first series
/// of that metric whatever its labels; `name{a="x",b="y"}` matches exactly those labels, in
/// any order.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    fn split(series: &str) -> (&str, BTreeSet<&str>) {
        match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}').split(',').collect()),
            None => (series, BTreeSet::new()),
        }
    }
    let (want_name, want_labels) = split(series);
    exposition.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        let (name, labels) = split(name);
        let matches = name == want_name && (!series.contains('{') || labels == want_labels);
        matches.then(|| value.parse().ok()).flatten()
    })
}

/// A DynamoDB client for a test server.
pub async fn dynamo_client(url: &str) -> sluice_dynamodb::DynamoClient {
    sluice_dynamodb::DynamoClient::connect(&sluice_dynamodb::ClientOptions::local(url)).await
}

/// A TCP proxy on 127.0.0.1 that can cut every connection and refuse new ones for a while:
/// a network outage between sluice and a server.
pub struct Outage {
    pub port: u16,
    down: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
    /// Milliseconds each piece of a request waits before it is passed on (a slow link).
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    /// A black hole: connections stay open and new ones are accepted, but nothing passes in
    /// either direction until it ends (a firewall dropping packets, not refusing them).
    hole: Arc<AtomicBool>,
}

/// Waits while the black hole lasts.
async fn through_the_hole(hole: &AtomicBool) {
    while hole.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Outage {
    pub async fn start(target_port: u16) -> Self {
        Self::start_on(0, target_port).await
    }

    /// A proxy listening on `port` (0: any free port).
    pub async fn start_on(port: u16, target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut = Arc::new(tokio::sync::Notify::new());
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let hole = Arc::new(AtomicBool::new(false));
        let (down2, cut2, delay2, hole2) =
            (Arc::clone(&down), Arc::clone(&cut), Arc::clone(&delay_ms), Arc::clone(&hole));
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { return };
                if down2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cut = Arc::clone(&cut2);
                let delay = Arc::clone(&delay2);
                let (hole_up, hole_down) = (Arc::clone(&hole2), Arc::clone(&hole2));
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    through_the_hole(&hole_up).await;
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_client.read(&mut buf).await?;
                            if n == 0 {
                                return to_server.shutdown().await;
                            }
                            let wait = delay.load(Ordering::SeqCst);
                            if wait > 0 {
                                tokio::time::sleep(Duration::from_millis(wait)).await;
                            }
                            through_the_hole(&hole_up).await;
                            to_server.write_all(&buf[..n]).await?;
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_server.read(&mut buf).await?;
                            if n == 0 {
                                return to_client.shutdown().await;
                            }
                            through_the_hole(&hole_down).await;
                            to_client.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = async { tokio::join!(up, down) } => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        });
        Outage { port, down, cut, delay_ms, hole }
    }

    /// Passes nothing, either way, on open connections and new ones, until `heal`: requests
    /// meet silence rather than a refusal, as behind a firewall that drops packets.
    pub fn black_hole(&self) {
        self.hole.store(true, Ordering::SeqCst);
    }

    /// Ends a black hole: what waited passes on, late.
    pub fn heal(&self) {
        self.hole.store(false, Ordering::SeqCst);
    }

    /// Holds each piece of a request for `delay` before passing it on (zero: no delay).
    pub fn slow(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts open connections and refuses new ones until `end`.
    pub fn begin(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    pub fn end(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// A Kafka-protocol broker (tansu, in-memory storage) on 127.0.0.1, one per test. With
/// `advertise`, clients are told to connect to that port instead (an `Outage` proxy in front).
pub struct Kafka {
    child: Child,
    pub port: u16,
    /// What clients bootstrap from: the advertised address.
    pub brokers: String,
    /// Further properties of the test's own clients (TLS behind a proxy).
    pub client_properties: Vec<(String, String)>,
}

impl Drop for Kafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `SLUICE_TEST_TANSU`, the CI cache, or `tansu` on PATH.
fn tansu_binary() -> PathBuf {
    if let Ok(path) = std::env::var("SLUICE_TEST_TANSU") {
        return PathBuf::from(path);
    }
    let cached =
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/sluice-ci/tansu/bin/tansu");
    if cached.exists() {
        return cached;
    }
    PathBuf::from("tansu")
}

impl Kafka {
    pub fn start(advertise: Option<u16>) -> Self {
        let port = sluice::localpg::free_port().unwrap();
        let advertised = advertise.unwrap_or(port);
        let child = Command::new(tansu_binary())
            .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{advertised}")])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start tansu ({e}); run `bash .ci/run` once, or set SLUICE_TEST_TANSU")
            });
        wait_for_blocking("tansu to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Kafka { child, port, brokers: format!("127.0.0.1:{advertised}"), client_properties: Vec::new() }
    }

    /// A client configuration for the test's own clients.
    fn client_config(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.client_properties {
            config.set(key, value);
        }
        config
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            self.client_config().create().expect("admin client");
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin
            .create_topics(&[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))], &options)
            .await
            .expect("create topic")
        {
            result.unwrap_or_else(|(topic, code)| panic!("create topic {topic}: {code}"));
        }
    }

    /// Every record of `topic` from the beginning, once no further record has come for
    /// `quiet`: the whole topic, when its producers have stopped.
    pub fn consume_all(&self, topic: &str, quiet: Duration) -> Vec<Consumed> {
        let last = std::cell::Cell::new((0usize, Instant::now()));
        self.consume(topic, Duration::from_secs(120), |records| {
            let (count, since) = last.get();
            if records.len() != count {
                last.set((records.len(), Instant::now()));
                return false;
            }
            since.elapsed() >= quiet
        })
    }

    /// Every record of `topic` from the beginning, in partition order, once `done` holds for
    /// them (or panics at the deadline).
    pub fn consume(&self, topic: &str, limit: Duration, done: impl Fn(&[Consumed]) -> bool) -> Vec<Consumed> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", format!("test-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
        let partitions = metadata.topics()[0].partitions().len() as i32;
        let mut assignment = rdkafka::TopicPartitionList::new();
        for partition in 0..partitions {
            assignment.add_partition_offset(topic, partition, rdkafka::Offset::Beginning).unwrap();
        }
        consumer.assign(&assignment).expect("assign");
        let deadline = Instant::now() + limit;
        let mut records = Vec::new();
        while !done(&records) {
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} consuming {topic}: {} records",
                records.len()
            );
            let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
            let message = message.expect("consume");
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push(Consumed {
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: message.payload().map(|p| String::from_utf8_lossy(p).into_owned()),
                headers,
            });
        }
        records
    }
}

/// One consumed record, as text.
#[derive(Clone, Debug)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Consumed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// In `dir`: a CA (`ca.crt`), a server certificate for 127.0.0.1 signed by it (`server.crt`,
/// `server.key`), and an unrelated CA (`other_ca.crt`).
pub fn certificates(dir: &std::path::Path) {
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    for ca in ["ca", "other_ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=sluice test {ca}"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

/// A TLS-terminating proxy on 127.0.0.1:`listen` with the server certificate made by
/// `certificates(dir)`, forwarding each connection in plaintext to 127.0.0.1:`upstream`.
/// Runs until the runtime ends.
pub async fn tls_proxy(listen: u16, upstream: u16, dir: &std::path::Path) {
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::fs::read(dir.join("server.crt")).unwrap().as_slice())
        .map(Result::unwrap)
        .collect();
    let key = rustls_pemfile::private_key(&mut std::fs::read(dir.join("server.key")).unwrap().as_slice())
        .unwrap()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut client) = acceptor.accept(client).await else { return };
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
}
