use std::collections::HashMap;

use proptest::prelude::*;
use sluice_core::value::{Numeric, Timestamp};
use sluice_core::{ChangeEvent, Lsn, Position, TypeKind, Value};
use sluice_dynamodb::streams::{RecordEvent, StreamRecord};
use sluice_dynamodb::{Attr, Item, WriteAction};
use sluice_postgres::catalog::Table;

use super::*;
use crate::targets::dynamodb::translate::MappingTranslator;
use crate::translate::mapping::MappingFile;
use crate::translate::outbox::tests::relation;

fn shop() -> Mapping {
    Mapping::parse(include_str!("../../../../schemas/examples/shop.toml")).unwrap()
}

fn array_of(element: TypeKind) -> TypeKind {
    TypeKind::Array { element: Box::new(element), element_oid: 0, delimiter: b',' }
}

fn table(name: &str, columns: &[(&str, bool, TypeKind)]) -> Table {
    let relation = (*relation(name, columns)).clone();
    let primary_key = columns.iter().enumerate().filter(|(_, c)| c.1).map(|(i, _)| i).collect();
    Table { sql_types: vec![String::new(); columns.len()], relation, primary_key }
}

fn customers() -> Table {
    table(
        "customers",
        &[
            ("id", true, TypeKind::Int8),
            ("email", false, TypeKind::Text),
            ("password_hash", false, TypeKind::Text),
            ("status", false, TypeKind::Text),
            ("balance", false, TypeKind::Numeric),
            ("created_at", false, TypeKind::TimestampTz),
            ("tags", false, array_of(TypeKind::Text)),
            ("prefs", false, TypeKind::Jsonb),
        ],
    )
}

fn orders() -> Table {
    table(
        "orders",
        &[
            ("customer_id", true, TypeKind::Int8),
            ("id", true, TypeKind::Int8),
            ("total", false, TypeKind::Numeric),
        ],
    )
}

fn inverse() -> InverseMapping {
    let tables =
        HashMap::from([("public.customers".to_owned(), customers()), ("public.orders".to_owned(), orders())]);
    InverseMapping::new(&shop(), &tables).unwrap()
}

fn s(v: &str) -> Attr {
    Attr::S(v.into())
}
fn n(v: &str) -> Attr {
    Attr::N(v.into())
}

fn item(pairs: &[(&str, Attr)]) -> Item {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn customer_item(id: &str, email: &str) -> Item {
    item(&[
        ("pk", s(&format!("CUSTOMER#{id}"))),
        ("sk", s("PROFILE")),
        ("id", n(id)),
        ("emailAddress", s(email)),
        ("status", s("active")),
        ("balance", n("12.5")),
        ("created_at", n("1714564800500")),
        ("tags", Attr::Ss(vec!["a".into(), "b \"q\"".into()])),
        ("prefs", Attr::M([("dark".to_owned(), Attr::Bool(true))].into())),
        ("entity", s("Customer")),
    ])
}

fn record(event: RecordEvent, old: Option<Item>, new: Option<Item>) -> StreamRecord {
    let image = new.as_ref().or(old.as_ref()).unwrap();
    StreamRecord {
        event,
        sequence_number: "100".into(),
        keys: image
            .iter()
            .filter(|(k, _)| *k == "pk" || *k == "sk")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        new_image: new,
        old_image: old,
        created_at: None,
        by_ttl: false,
        unsupported: None,
    }
}

fn texts(columns: &[(String, Text)]) -> Vec<(&str, Option<&str>)> {
    columns.iter().map(|(c, t)| (c.as_str(), t.as_deref())).collect()
}

#[test]
fn an_application_insert_becomes_an_upsert_typed_as_the_columns_declare() {
    let got = inverse()
        .invert("shop", &record(RecordEvent::Insert, None, Some(customer_item("7", "a@x"))))
        .unwrap();
    let Inverse::Apply(table, ops) = got else { panic!("{got:?}") };
    assert_eq!(&*table, "public.customers");
    let [RowOp::Upsert { columns, .. }] = ops.as_slice() else { panic!("{ops:?}") };
    assert_eq!(
        texts(columns),
        vec![
            ("id", Some("7")),
            ("email", Some("a@x")),
            // password_hash is dropped: not written, so an update keeps it.
            ("status", Some("active")),
            ("balance", Some("12.5")),
            ("created_at", Some("2024-05-01T12:00:00.5Z")),
            ("tags", Some(r#"{"a","b \"q\""}"#)),
            ("prefs", Some(r#"{"dark":true}"#)),
        ]
    );
}

#[test]
fn sluice_s_own_writes_are_skipped_by_their_version() {
    let mut forward = customer_item("7", "a@x");
    forward.insert("_version".into(), n("4294967296"));
    let inverse = inverse();
    assert_eq!(
        inverse.invert("shop", &record(RecordEvent::Insert, None, Some(forward.clone()))),
        Ok(Inverse::Own)
    );
    let mut later = forward.clone();
    later.insert("_version".into(), n("8589934592"));
    assert_eq!(
        inverse.invert("shop", &record(RecordEvent::Modify, Some(forward.clone()), Some(later))),
        Ok(Inverse::Own)
    );
    // The application's update keeps the version as it was: it is the application's.
    let mut app = forward.clone();
    app.insert("emailAddress".into(), s("b@x"));
    let got = inverse.invert("shop", &record(RecordEvent::Modify, Some(forward.clone()), Some(app))).unwrap();
    assert!(
        matches!(got, Inverse::Apply(_, ref ops) if matches!(ops.as_slice(), [RowOp::Upsert { .. }])),
        "{got:?}"
    );
    // A forward tombstone carries a newer version too.
    let tombstone = item(&[
        ("pk", s("CUSTOMER#7")),
        ("sk", s("PROFILE")),
        ("_deleted", Attr::Bool(true)),
        ("_version", n("9999999999")),
    ]);
    assert_eq!(
        inverse.invert("shop", &record(RecordEvent::Modify, Some(forward), Some(tombstone))),
        Ok(Inverse::Own)
    );
}

#[test]
fn a_remove_deletes_by_the_key_parsed_from_the_templates() {
    let order =
        item(&[("pk", s("CUSTOMER#7")), ("sk", s("ORDER#31")), ("total", n("3")), ("entity", s("Order"))]);
    let got = inverse().invert("shop", &record(RecordEvent::Remove, Some(order), None)).unwrap();
    let Inverse::Apply(table, ops) = got else { panic!("{got:?}") };
    assert_eq!(&*table, "public.orders");
    let [RowOp::Delete { key, .. }] = ops.as_slice() else { panic!("{ops:?}") };
    assert_eq!(texts(key), vec![("customer_id", Some("7")), ("id", Some("31"))]);
}

#[test]
fn tombstone_expiry_unmapped_changes_and_foreign_items_write_nothing() {
    let inverse = inverse();
    let tombstone = item(&[
        ("pk", s("CUSTOMER#7")),
        ("sk", s("PROFILE")),
        ("_deleted", Attr::Bool(true)),
        ("_version", n("5")),
    ]);
    let mut expired = record(RecordEvent::Remove, Some(tombstone), None);
    expired.by_ttl = true;
    assert_eq!(inverse.invert("shop", &expired), Ok(Inverse::Unchanged));
    let before = customer_item("7", "a@x");
    let mut after = before.clone();
    after.insert("views".into(), n("3"));
    assert_eq!(
        inverse.invert("shop", &record(RecordEvent::Modify, Some(before), Some(after))),
        Ok(Inverse::Unchanged)
    );
    let other = item(&[("pk", s("SESSION#1")), ("sk", s("X"))]);
    assert_eq!(inverse.invert("shop", &record(RecordEvent::Insert, None, Some(other))), Ok(Inverse::Foreign));
    assert_eq!(
        inverse.invert("elsewhere", &record(RecordEvent::Insert, None, Some(customer_item("1", "a")))),
        Ok(Inverse::Foreign)
    );
}

#[test]
fn records_that_cannot_map_back_are_named_without_values() {
    let inverse = inverse();
    let mut banned = customer_item("7", "secret@x");
    banned.insert("status".into(), s("banned"));
    let error = inverse.invert("shop", &record(RecordEvent::Insert, None, Some(banned))).unwrap_err();
    assert_eq!(error.table.as_deref(), Some("public.customers"));
    assert!(error.reason.contains("filter"), "{error}");
    let mut wrong = customer_item("7", "secret@x");
    wrong.insert("balance".into(), Attr::Bool(true));
    let error = inverse.invert("shop", &record(RecordEvent::Insert, None, Some(wrong))).unwrap_err();
    assert_eq!(
        error.to_string(),
        "table public.customers: column balance (attribute balance): a BOOL attribute does not convert back to the column's type (as = Number)"
    );
    assert!(!error.to_string().contains("secret"));
    let mut binary = customer_item("8", "x");
    let mut unsupported = record(RecordEvent::Insert, None, Some(binary.clone()));
    unsupported.unsupported = Some("blobs".into());
    assert!(inverse.invert("shop", &unsupported).unwrap_err().reason.contains("attribute blobs"));
    binary.insert("entity".into(), s("Order"));
    // Its key says customer, its constant says order: no table fits, so not ours.
    assert_eq!(
        inverse.invert("shop", &record(RecordEvent::Insert, None, Some(binary))),
        Ok(Inverse::Foreign)
    );
}

#[test]
fn validate_names_mappings_the_way_back_cannot_read() {
    assert!(offline_problems(&shop()).is_empty());
    let text = r#"
        [[tables]]
        source = "public.a"
        target = "app"
        partition_key = { attribute = "pk", template = "A#{id}" }

        [[tables]]
        source = "public.b"
        target = "app"
        partition_key = { attribute = "pk", template = "A#{code}" }

        [[tables]]
        source = "public.c"
        target = "app"
        partition_key = { attribute = "pk", template = "C#{x}{y}" }
    "#;
    let problems = offline_problems(&Mapping::parse(text).unwrap());
    let keys: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 2, "{keys:?}");
    assert!(keys[0].contains("mapping.tables[1]") && keys[0].contains("public.a and public.b"), "{keys:?}");
    assert!(keys[1].contains("mapping.tables[2].partition_key.template"), "{keys:?}");
    // A constant that differs tells them apart.
    let told = text
        .replace("template = \"A#{code}\" }", "template = \"A#{code}\" }\nconstants = { entity = \"B\" }")
        .replace("template = \"A#{id}\" }", "template = \"A#{id}\" }\nconstants = { entity = \"A\" }");
    assert_eq!(offline_problems(&Mapping::parse(&told).unwrap()).len(), 1);
}

fn forward_item(id: i64, email: &str, balance: &str, millis: i64, tags: &[String]) -> Item {
    let relation = std::sync::Arc::new(customers().relation);
    let event = ChangeEvent::Insert {
        position: Position { commit_lsn: Lsn(1), tx_ordinal: 0 },
        relation,
        snapshot: false,
        new: vec![
            Value::Int8(id),
            Value::Text(email.into()),
            Value::Text("hash".into()),
            Value::Text("active".into()),
            Value::Numeric(Numeric::Finite(balance.into())),
            Value::TimestampTz(Timestamp(millis * 1000 - 10_957 * 86_400_000_000)),
            Value::Array(tags.iter().map(|t| Value::Text(t.clone())).collect()),
            Value::Json(r#"{"a":[1,2.5,"x"]}"#.into()),
        ],
    };
    let mut writes = Vec::new();
    MappingTranslator::new(&shop()).translate(&event, 0, &mut writes).unwrap();
    let write = writes.pop().unwrap();
    let WriteAction::Put(mut item) = write.action else { panic!() };
    item.extend(write.key);
    item
}

proptest! {
    /// What the forward translator writes, the way back reads as the same row (the dropped
    /// column aside): text, numbers, epoch millis and sets survive the round trip.
    #[test]
    fn the_forward_item_of_a_row_maps_back_to_the_row(
        id in 1i64..1_000_000_000,
        email in "[a-z@. \"\\\\{},]{0,12}",
        balance in "-?[1-9][0-9]{0,8}\\.[0-9]{0,3}[1-9]",
        millis in 0i64..4_000_000_000_000,
        tags in proptest::collection::btree_set("[a-z ]{1,5}", 1..4),
    ) {
        let tags: Vec<String> = tags.into_iter().collect();
        let item = forward_item(id, &email, &balance, millis, &tags);
        let got = inverse().invert("shop", &record(RecordEvent::Insert, None, Some(item))).unwrap();
        let Inverse::Apply(_, ops) = got else { panic!("{got:?}") };
        let [RowOp::Upsert { columns, .. }] = ops.as_slice() else { panic!("{ops:?}") };
        let column = |name: &str| columns.iter().find(|(c, _)| c == name).and_then(|(_, t)| t.clone());
        prop_assert_eq!(column("id"), Some(id.to_string()));
        prop_assert_eq!(column("email"), Some(email.clone()));
        prop_assert_eq!(column("balance"), Some(balance.clone()));
        let expected_ts = Timestamp::parse(&column("created_at").unwrap().replace('T', " ").replace('Z', "+00"), true).unwrap();
        prop_assert_eq!(expected_ts.unix_micros(), Some(millis * 1000));
        let array = column("tags").unwrap();
        let mut back: Vec<String> = array.trim_matches(|c| c == '{' || c == '}')
            .split("\",\"")
            .map(|t| t.trim_matches('"').replace("\\\"", "\""))
            .collect();
        back.sort();
        prop_assert_eq!(back, tags);
        prop_assert_eq!(column("prefs"), Some(r#"{"a":[1,2.5,"x"]}"#.to_owned()));
        prop_assert!(columns.iter().all(|(c, _)| c != "password_hash"));
    }
}
