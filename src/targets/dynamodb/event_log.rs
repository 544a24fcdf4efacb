//! Outbox events as items of a DynamoDB event-log table (`target.outbox.event_table`).

use std::collections::BTreeMap;

use sluice_dynamodb::{Attr, GuardedWrite, Item, WriteAction};

use super::attrs::{json_attr, version};
use crate::translate::outbox::{OutboxConfig, OutboxEvent, Payload, Poison};

/// The version attribute of event-log items (the position guard, as in mapped tables).
pub const EVENT_LOG_VERSION_ATTRIBUTE: &str = "_version";

/// The event as an item of a DynamoDB event-log table: key `{aggregatetype}#{aggregateid}`
/// and the sequence; attributes `id`, `aggregatetype`, `aggregateid`, the header columns,
/// `payload` (JSON becomes a map, bytea binary, anything else a string; absent when NULL)
/// and `position`. Written with the position guard, so a redelivered event rewrites
/// nothing.
pub fn event_log_item(
    event: &OutboxEvent,
    config: &OutboxConfig,
    table: &str,
) -> Result<GuardedWrite, Poison> {
    let poison = |reason: String| Poison { table: event.source.clone(), reason };
    let aggregate_id = event.aggregate_id.as_deref().ok_or_else(|| {
        poison(format!("{:?} is NULL, and the event-log key needs it", config.aggregate_id_column))
    })?;
    let mut key = Item::new();
    key.insert(config.partition_key.clone(), Attr::S(format!("{}#{aggregate_id}", event.aggregate_type)));
    key.insert(config.sort_key.clone(), Attr::S(event.sequence()));
    let mut item = BTreeMap::new();
    if let Some(id) = &event.id {
        item.insert("id".to_string(), Attr::S(id.clone()));
    }
    item.insert("aggregatetype".to_string(), Attr::S(event.aggregate_type.clone()));
    item.insert("aggregateid".to_string(), Attr::S(aggregate_id.to_owned()));
    for (name, value) in &event.headers {
        item.insert(name.clone(), Attr::S(value.clone()));
    }
    match &event.payload {
        None => {}
        Some(Payload::Json(text)) => {
            let json: serde_json::Value =
                serde_json::from_str(text).map_err(|e| poison(format!("payload is not valid JSON: {e}")))?;
            item.insert(
                "payload".to_string(),
                json_attr(&json).map_err(|e| poison(format!("payload: {e}")))?,
            );
        }
        Some(Payload::Text(text)) => {
            item.insert("payload".to_string(), Attr::S(text.clone()));
        }
        Some(Payload::Bytes(bytes)) => {
            item.insert("payload".to_string(), Attr::B(bytes.clone()));
        }
    }
    item.insert("position".to_string(), Attr::S(event.position.to_string()));
    for name in [&config.partition_key, &config.sort_key] {
        item.remove(name);
    }
    Ok(GuardedWrite {
        table: table.to_owned(),
        partition_key: config.partition_key.clone(),
        key,
        version_attribute: EVENT_LOG_VERSION_ATTRIBUTE.to_owned(),
        version: version(event.position),
        action: WriteAction::Put(item.into_iter().collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::outbox::tests::{config, event, insert, position};
    use sluice_core::{Lsn, Position, Value};

    #[test]
    fn an_event_log_item_is_keyed_by_aggregate_and_sequence_and_keeps_json_payloads_as_maps() {
        let config = config();
        let routed = event(
            config
                .route(&insert(
                    Value::Text("o-17".into()),
                    Value::Json("{\"total\": 9.50, \"lines\": [1]}".into()),
                ))
                .unwrap(),
        );
        let write = event_log_item(&routed, &config, "events").unwrap();
        assert_eq!(write.table, "events");
        assert_eq!(write.key.get("aggregate"), Some(&Attr::S("Order#o-17".into())));
        assert_eq!(
            write.key.get("sequence"),
            Some(&Attr::S("00000000016B3748.00000003.01010101-0101-0101-0101-010101010101".into()))
        );
        let WriteAction::Put(item) = &write.action else { panic!("a put: {write:?}") };
        let payload = item.get("payload").unwrap();
        let Attr::M(map) = payload else { panic!("a map: {payload:?}") };
        assert_eq!(map.get("total"), Some(&Attr::N("9.50".into())));
        assert_eq!(item.get("type"), Some(&Attr::S("OrderCreated".into())));
        assert_eq!(item.get("position"), Some(&Attr::S("0/16B3748/3".into())));
        assert_eq!(write.version, crate::targets::dynamodb::attrs::version(position(3)));

        let later = OutboxEvent {
            position: Position { commit_lsn: Lsn(0x1_0000_0000), tx_ordinal: 0 },
            ..routed.clone()
        };
        assert!(later.sequence() > routed.sequence(), "text order is position order");

        let orphan = event(config.route(&insert(Value::Null, Value::Null)).unwrap());
        let error = event_log_item(&orphan, &config, "events").unwrap_err();
        assert!(error.reason.contains("aggregateid"), "{error}");
    }
}
