//! The live checks of `validate`, made by `run` before it streams: both sides, against a real
//! Postgres, a DynamoDB-API server (moto) and a Postgres target.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{dynamo_client, moto, sluice, sluice_output, LogsOnPanic, TestDb};

const LIMIT: Duration = Duration::from_secs(90);

const SCHEMA: &str = "CREATE TABLE users (id int8 PRIMARY KEY, email text, team int8);
  CREATE TABLE audit (id int8 PRIMARY KEY, note text);
  CREATE TABLE hidden (id int8 PRIMARY KEY);
  CREATE PUBLICATION p FOR TABLE users, audit;";

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_owned()
}

/// A mapping of `users` (and, when `all`, of `audit`) into `table`, keyed `pk`/`sk`.
fn mapping(dir: &Path, table: &str, users_key: &str, all: bool) -> PathBuf {
    let mut text = format!(
        "[[tables]]\nsource = \"public.users\"\ntarget = \"{table}\"\n\
         partition_key = {{ attribute = \"pk\", template = \"USER#{users_key}\" }}\n\
         sort_key = {{ attribute = \"sk\", template = \"PROFILE\" }}\n"
    );
    if all {
        text.push_str(&format!(
            "\n[[tables]]\nsource = \"public.audit\"\ntarget = \"{table}\"\n\
             partition_key = {{ attribute = \"pk\", template = \"AUDIT#{{id}}\" }}\n\
             sort_key = {{ attribute = \"sk\", template = \"NOTE\" }}\n"
        ));
    }
    write(&dir.join("mapping.toml"), &text)
}

/// `sluice validate`: exit code, and standard output followed by standard error.
fn validate(config: &Path) -> (Option<i32>, String) {
    let out = sluice().args(["validate", "-c", config.to_str().unwrap()]).output().unwrap();
    (
        out.status.code(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

fn run(config: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["run", "-c", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    sluice_output(&args, LIMIT)
}

/// Before the change `run` started streaming on these configs (its stream only failed, or
/// silently skipped, later); now it refuses at start with exit 2, naming every problem, and
/// creates no slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_to_stream_a_pipeline_that_cannot_work_and_names_every_problem() {
    let moto = moto();
    let db = TestDb::new();
    db.sql(SCHEMA);
    let table = format!("app_{}", db.name);
    let dir = tempfile::tempdir().unwrap();
    // users mapped with a key column that does not exist, audit published but unmapped,
    // hidden mapped but not published; the DynamoDB table does not exist yet.
    let map = mapping(dir.path(), &table, "{user_id}", false);
    let mut text = std::fs::read_to_string(&map).unwrap();
    text.push_str(&format!(
        "\n[[tables]]\nsource = \"public.hidden\"\ntarget = \"{table}\"\npartition_key = {{ attribute = \"pk\", template = \"H#{{id}}\" }}\nsort_key = {{ attribute = \"sk\", template = \"H\" }}\n"
    ));
    write(&map, &text);
    let config =
        db.config_file(dir.path(), "refuse", "p", &crate::dynamodb::target_toml(&map, &moto.url, ""));

    let (code, out) = run(&config, &[]);
    assert_eq!(code, Some(2), "{out}");
    for expected in [
        "error: the pipeline cannot start",
        "target.mapping.tables[0].partition_key.template: column user_id does not exist in public.users",
        "target.mapping.tables[1].source: table public.hidden is not in publication \"p\"",
        &format!("target.mapping.tables[0].target: DynamoDB table {table} does not exist"),
        "warning: source.replication.publication: table public.audit is in publication \"p\" but no table of the mapping names it",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    assert_eq!(db.slot_confirmed("refuse"), None, "no slot was created: nothing streamed");
    // The opt-out covers warnings only.
    let (code, out) = run(&config, &["--allow-warnings"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("column user_id does not exist") && !out.contains("warning: source.replication"),
        "{out}"
    );

    // Fixed but for the unmapped table: refused for the warning alone, unless allowed.
    let client = dynamo_client(&moto.url).await;
    client.create_table(&table, "pk", Some("sk")).await.unwrap();
    mapping(dir.path(), &table, "{id}", false);
    let (code, out) = run(&config, &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("warning: source.replication.publication: table public.audit")
            && out.contains("--allow-warnings"),
        "{out}"
    );
    assert!(!out.contains("target.mapping.tables"), "{out}");
    let log = dir.path().join("allowed.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let mut child = sluice()
        .args(["run", "--allow-warnings", "-c", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    db.wait_slot_active(&db.slot_name("refuse")).await;
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(out.contains("public.audit") && out.contains("allowed by pipeline.allow_warnings"), "{out}");
}

/// `validate` asks the target too: a DynamoDB table that is missing or keyed otherwise, an
/// endpoint that does not answer, a role that may not stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_checks_the_dynamodb_side_and_the_role() {
    let moto = moto();
    let db = TestDb::new();
    db.sql(SCHEMA);
    let dir = tempfile::tempdir().unwrap();
    let table = format!("app_{}", db.name);
    let map = mapping(dir.path(), &table, "{id}", true);
    let config = db.config_file(dir.path(), "val", "p", &crate::dynamodb::target_toml(&map, &moto.url, ""));
    let validate = |config: &Path| validate(config);

    let (code, out) = validate(&config);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains(&format!(
            "target.mapping.tables[0].target: DynamoDB table {table} does not exist at {}; create it with partition key pk (S) and sort key sk (S): \
             aws dynamodb create-table --table-name {table} --attribute-definitions AttributeName=pk,AttributeType=S AttributeName=sk,AttributeType=S \
             --key-schema AttributeName=pk,KeyType=HASH AttributeName=sk,KeyType=RANGE",
            moto.url
        )),
        "{out}"
    );
    assert!(!out.contains("tables[1].target"), "one table is described once: {out}");

    // Keyed otherwise: a partition key only.
    let client = dynamo_client(&moto.url).await;
    client.create_table(&table, "pk", None).await.unwrap();
    let (code, out) = validate(&config);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains(&format!("DynamoDB table {table} has partition key pk (S), but sluice writes partition key pk (S) and sort key sk (S)")),
        "{out}"
    );

    // The right table: ok, saying what was checked.
    let good = format!("{table}_2");
    client.create_table(&good, "pk", Some("sk")).await.unwrap();
    mapping(dir.path(), &good, "{id}", true);
    let (code, out) = validate(&config);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(": ok (checked source database") && out.contains("DynamoDB tables at"), "{out}");

    // An endpoint nobody listens on: one line, no SDK dump.
    let port = sluice::localpg::free_port().unwrap();
    let unreachable = write(
        &dir.path().join("unreachable.toml"),
        &std::fs::read_to_string(&config).unwrap().replace(&moto.url, &format!("http://127.0.0.1:{port}")),
    );
    let (code, out) = validate(&unreachable);
    assert_eq!(code, Some(2), "{out}");
    let line = out.lines().find(|l| l.contains("target.endpoint_url")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains(&format!("cannot reach DynamoDB at http://127.0.0.1:{port}")), "{out}");
    assert!(!out.contains("DispatchFailure") && !out.contains("{ "), "no debug dump: {out}");

    // A role without REPLICATION.
    let role = format!("norepl_{}", db.name);
    db.sql(&format!("CREATE ROLE {role} LOGIN"));
    let text = std::fs::read_to_string(&config).unwrap();
    let as_role = write(
        &dir.path().join("role.toml"),
        &text.replacen("[source.connection]\n", &format!("[source.connection]\nuser = \"{role}\"\n"), 1),
    );
    let (code, out) = validate(&as_role);
    db.sql(&format!("DROP ROLE {role}"));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains(&format!("source.connection.user: role \"{role}\""))
            && out.contains(&format!("ALTER ROLE {role} REPLICATION")),
        "{out}"
    );
}

/// A Postgres target: its tables exist, and the target role may write them and its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_names_the_rights_a_postgres_target_role_lacks() {
    let db = TestDb::new();
    db.sql(
        "CREATE TABLE users (id int8 PRIMARY KEY, email text);
         CREATE PUBLICATION p FOR TABLE users;",
    );
    let target = TestDb::in_cluster(crate::harness::shared_cluster());
    let role = format!("writer_{}", target.name);
    target.sql(&format!(
        "CREATE TABLE accounts (id int8 PRIMARY KEY, email text);
         CREATE ROLE {role} LOGIN;
         GRANT SELECT, INSERT ON accounts TO {role};
         REVOKE CREATE ON SCHEMA public FROM PUBLIC;"
    ));
    let dir = tempfile::tempdir().unwrap();
    let map = write(
        &dir.path().join("pg.toml"),
        "[[tables]]\nsource = \"public.users\"\ntarget = \"public.accounts\"\n",
    );
    let config = db.config_file(
        dir.path(),
        "pgval",
        "p",
        &format!(
            "[target]\nkind = \"postgres\"\nmapping = \"{}\"\n[target.connection]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{}\"\nuser = \"{role}\"\n",
            map.display(),
            target.connection().port,
            target.name
        ),
    );
    let (code, out) = sluice_output(&["validate", "-c", config.to_str().unwrap()], LIMIT);
    target
        .sql(&format!("GRANT UPDATE, DELETE ON accounts TO {role}; GRANT CREATE ON SCHEMA public TO {role}"));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains(&format!("role \"{role}\" lacks UPDATE, DELETE on target table public.accounts; grant it with GRANT UPDATE, DELETE ON"))
            && out.contains("the checkpoint table public.sluice_checkpoint does not exist")
            && out.contains(&format!("GRANT CREATE ON SCHEMA \"public\" TO {role}")),
        "{out}"
    );
    let (code, out) = validate(&config);
    target.sql(&format!("DROP OWNED BY {role}; DROP ROLE {role}"));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("target database {}", target.name)), "{out}");
}
