//! REPLICA IDENTITY DEFAULT, FULL, USING INDEX and NOTHING each stream what the README says.

use sluice_core::{ChangeEvent, OldRow, Value};

use crate::harness::{row_changes, TestDb};

fn int(v: i64) -> Value {
    Value::Int8(v)
}
fn text(s: &str) -> Value {
    Value::Text(s.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_identity_sends_the_old_key_only_when_the_key_changes() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8 PRIMARY KEY, name text); CREATE PUBLICATION p FOR TABLE t");
    let mut stream = db.stream(db.replication("s", "p")).await;
    db.sql("INSERT INTO t VALUES (1, 'a')");
    db.sql("UPDATE t SET name = 'b' WHERE id = 1");
    db.sql("UPDATE t SET id = 2 WHERE id = 1");
    db.sql("DELETE FROM t WHERE id = 2");
    let events = stream.commits(4).await;
    let changes = row_changes(&events);
    let ChangeEvent::Update { old, relation, .. } = changes[1] else { panic!("update") };
    assert_eq!(old, &None, "key unchanged: no old row");
    assert!(relation.columns[0].is_key && !relation.columns[1].is_key);
    let ChangeEvent::Update { old, .. } = changes[2] else { panic!("update") };
    assert_eq!(old, &Some(OldRow::Key(vec![int(1), Value::Null])), "key changed: the old key");
    let ChangeEvent::Delete { old, .. } = changes[3] else { panic!("delete") };
    assert_eq!(old, &OldRow::Key(vec![int(2), Value::Null]));
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_identity_sends_the_whole_old_row() {
    let db = TestDb::new();
    db.sql("CREATE TABLE t (id int8, name text); ALTER TABLE t REPLICA IDENTITY FULL; CREATE PUBLICATION p FOR TABLE t");
    let mut stream = db.stream(db.replication("s", "p")).await;
    db.sql("INSERT INTO t VALUES (1, 'a')");
    db.sql("UPDATE t SET name = 'b' WHERE id = 1");
    db.sql("DELETE FROM t WHERE id = 1");
    let events = stream.commits(3).await;
    let changes = row_changes(&events);
    let ChangeEvent::Update { old, .. } = changes[1] else { panic!("update") };
    assert_eq!(old, &Some(OldRow::Full(vec![int(1), text("a")])));
    let ChangeEvent::Delete { old, relation, .. } = changes[2] else { panic!("delete") };
    assert_eq!(old, &OldRow::Full(vec![int(1), text("b")]));
    assert!(relation.has_identity());
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_identity_uses_the_index_columns_as_key() {
    let db = TestDb::new();
    db.sql(
        "CREATE TABLE t (id int8, email text NOT NULL, name text); CREATE UNIQUE INDEX t_email ON t (email);
         ALTER TABLE t REPLICA IDENTITY USING INDEX t_email; CREATE PUBLICATION p FOR TABLE t",
    );
    let mut stream = db.stream(db.replication("s", "p")).await;
    db.sql("INSERT INTO t VALUES (1, 'a@x', 'a')");
    db.sql("UPDATE t SET email = 'b@x' WHERE id = 1");
    db.sql("DELETE FROM t WHERE id = 1");
    let events = stream.commits(3).await;
    let changes = row_changes(&events);
    let ChangeEvent::Update { old, relation, .. } = changes[1] else { panic!("update") };
    let keys: Vec<_> = relation.columns.iter().filter(|c| c.is_key).map(|c| c.name.as_str()).collect();
    assert_eq!(keys, ["email"]);
    assert_eq!(old, &Some(OldRow::Key(vec![Value::Null, text("a@x"), Value::Null])));
    let ChangeEvent::Delete { old, .. } = changes[2] else { panic!("delete") };
    assert_eq!(old, &OldRow::Key(vec![Value::Null, text("b@x"), Value::Null]));
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_without_identity_are_reported_at_start_and_postgres_refuses_their_updates() {
    let db = TestDb::new();
    db.sql(
        "CREATE TABLE no_pk (id int8, name text); CREATE TABLE nothing (id int8 PRIMARY KEY);
         ALTER TABLE nothing REPLICA IDENTITY NOTHING; CREATE TABLE fine (id int8 PRIMARY KEY);
         CREATE PUBLICATION p FOR TABLE no_pk, nothing, fine; CREATE PUBLICATION inserts_only FOR TABLE no_pk WITH (publish = 'insert')",
    );
    let client = sluice_postgres::connect_sql(&db.connection()).await.unwrap();
    let warnings = sluice_postgres::setup::identity_warnings(&client, "p").await.unwrap();
    let tables: Vec<_> = warnings.iter().map(|w| w.table.as_str()).collect();
    assert_eq!(tables, ["public.no_pk", "public.nothing"]);
    assert!(warnings[0].reason.contains("no primary key"));
    assert!(warnings[1].reason.contains("NOTHING"));
    assert!(
        sluice_postgres::setup::identity_warnings(&client, "inserts_only").await.unwrap().is_empty(),
        "an insert-only publication needs no identity"
    );

    // Inserts stream; Postgres itself rejects the update, so no change can be lost silently.
    let mut stream = db.stream(db.replication("s", "p")).await;
    db.sql("INSERT INTO no_pk VALUES (1, 'a')");
    let err = db.pg.psql(&db.name, "UPDATE no_pk SET name = 'b'").unwrap_err().to_string();
    assert!(err.contains("does not have a replica identity"), "{err}");
    let events = stream.commits(1).await;
    assert!(matches!(row_changes(&events)[..], [ChangeEvent::Insert { .. }]));
    stream.stop().await.unwrap();
}
