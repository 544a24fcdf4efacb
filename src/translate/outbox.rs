//! The outbox event router, shared by the Kafka and DynamoDB targets: pure, no I/O.
//!
//! A row inserted into the outbox table, or a `pg_logical_emit_message` message with the
//! outbox prefix whose content is a JSON object of the same fields, is one event. Its fields
//! come from configurable columns with Debezium-compatible defaults: `id`, `aggregatetype`,
//! `aggregateid`, `type`, `payload`, and header columns (`type` by default). Updates and
//! deletes of outbox rows are not events: applications may delete an outbox row right after
//! inserting it, and the WAL still holds the insert.
//!
//! Each target turns an [`OutboxEvent`] into its own shape: a Kafka record on the aggregate
//! type's topic (`translate::kafka`), or an item of a DynamoDB event-log table
//! ([`OutboxEvent::event_log_item`]).

use sluice_core::Problem;

use sluice_core::{ChangeEvent, Position, Relation, TableName, Value};

/// The router's settings (a target's `[target.outbox]`).
#[derive(Clone, Debug, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// The outbox table (`schema.table`) whose inserts are events.
    #[serde(default)]
    pub table: Option<TableName>,
    /// Also route `pg_logical_emit_message` messages with this prefix (content: a JSON object).
    #[serde(default)]
    pub message_prefix: Option<String>,
    /// Kafka: the topic template over `{aggregatetype}`.
    #[serde(default = "default_outbox_topic")]
    pub topic: String,
    /// Kafka: what an event whose topic does not exist does: `stop` the pipeline (nothing past
    /// it is confirmed), or go to the dead-letter file and let the other events flow.
    #[serde(default)]
    pub missing_topic: MissingTopic,
    /// DynamoDB: the event-log table the events are written to.
    #[serde(default)]
    pub event_table: Option<String>,
    /// DynamoDB: the event-log table's partition key attribute, `{aggregatetype}#{aggregateid}`.
    #[serde(default = "default_partition_key")]
    pub partition_key: String,
    /// DynamoDB: the event-log table's sort key attribute, the event's sequence (source
    /// position, then event id), so that one aggregate's events read back in order.
    #[serde(default = "default_sort_key")]
    pub sort_key: String,
    #[serde(default = "default_id_column")]
    pub id_column: String,
    #[serde(default = "default_aggregate_type_column")]
    pub aggregate_type_column: String,
    #[serde(default = "default_aggregate_id_column")]
    pub aggregate_id_column: String,
    #[serde(default = "default_type_column")]
    pub type_column: String,
    #[serde(default = "default_payload_column")]
    pub payload_column: String,
    /// Further columns (or message fields) copied into headers of the same name (attributes in
    /// DynamoDB); the event type column is one by default.
    #[serde(default = "default_header_columns")]
    pub header_columns: Vec<String>,
}

/// `target.outbox.missing_topic`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MissingTopic {
    /// Stop with an error naming the topic (the default).
    #[default]
    Stop,
    /// Dead-letter the event (counted), and go on.
    DeadLetter,
}

fn default_outbox_topic() -> String {
    "outbox.event.{aggregatetype}".into()
}
fn default_partition_key() -> String {
    "aggregate".into()
}
fn default_sort_key() -> String {
    "sequence".into()
}
fn default_id_column() -> String {
    "id".into()
}
fn default_aggregate_type_column() -> String {
    "aggregatetype".into()
}
fn default_aggregate_id_column() -> String {
    "aggregateid".into()
}
fn default_type_column() -> String {
    "type".into()
}
fn default_payload_column() -> String {
    "payload".into()
}
fn default_header_columns() -> Vec<String> {
    vec!["type".into()]
}

/// An outbox row or message that can never become an event (no aggregate type, a payload
/// that is not JSON): dead-letter it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{table}: {reason}")]
pub struct Poison {
    /// The outbox table, or `message:<prefix>`.
    pub table: String,
    pub reason: String,
}

/// The event's payload as the source held it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// json/jsonb, or a JSON value in a message: kept as JSON text.
    Json(String),
    Text(String),
    Bytes(Vec<u8>),
}

impl Payload {
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Payload::Json(s) | Payload::Text(s) => s.into_bytes(),
            Payload::Bytes(b) => b,
        }
    }
}

/// One routed event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEvent {
    /// The outbox table, or `message:<prefix>`, for error messages.
    pub source: String,
    pub aggregate_type: String,
    pub aggregate_id: Option<String>,
    pub id: Option<String>,
    /// `None` is a tombstone (Kafka) or an event without payload (DynamoDB).
    pub payload: Option<Payload>,
    /// The configured header columns that are not NULL, in configuration order.
    pub headers: Vec<(String, String)>,
    pub position: Position,
}

/// What the router makes of a change.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    Event(OutboxEvent),
    /// An update or delete of the outbox table: nothing to publish.
    Ignored,
    /// Not an outbox change: plain CDC, if the target does that.
    NotOutbox,
}

impl OutboxConfig {
    /// Problems of the router that do not depend on the target; `messages`: the source
    /// decodes logical messages.
    pub fn problems(&self, messages: bool, problems: &mut Vec<Problem>) {
        if self.message_prefix.is_some() && !messages {
            problems.push(Problem::new(
                "target.outbox",
                "message_prefix",
                "needs source.replication.messages = true",
            ));
        }
        if self.table.is_none() && self.message_prefix.is_none() {
            problems.push(Problem::new(
                "target.outbox",
                "table",
                "name the outbox table, or a message_prefix, or both",
            ));
        }
    }

    /// Routes one change.
    pub fn route(&self, event: &ChangeEvent) -> Result<Routed, Poison> {
        let is_outbox = |relation: &Relation| self.table.as_ref().is_some_and(|table| table.is(relation));
        match event {
            ChangeEvent::Insert { relation, new, position, .. } if is_outbox(relation) => {
                self.route_row(relation, new, *position).map(Routed::Event)
            }
            ChangeEvent::Update { relation, .. } | ChangeEvent::Delete { relation, .. }
                if is_outbox(relation) =>
            {
                Ok(Routed::Ignored)
            }
            ChangeEvent::Message { prefix, content, position, .. }
                if self.message_prefix.as_deref() == Some(prefix.as_str()) =>
            {
                self.route_message(prefix, content, *position).map(Routed::Event)
            }
            _ => Ok(Routed::NotOutbox),
        }
    }

    fn route_row(
        &self,
        relation: &Relation,
        values: &[Value],
        position: Position,
    ) -> Result<OutboxEvent, Poison> {
        let table = relation.qualified_name();
        let column = |name: &str| relation.columns.iter().position(|c| c.name == name).map(|i| &values[i]);
        let poison = |reason: String| Poison { table: table.clone(), reason };
        let field_text = |name: &str| -> Result<Option<String>, Poison> {
            match column(name) {
                Some(value) => Ok(text_of(value)),
                None => Err(poison(format!("the outbox table has no column {name:?}"))),
            }
        };
        let aggregate_type = field_text(&self.aggregate_type_column)?
            .ok_or_else(|| poison(format!("column {:?} is NULL", self.aggregate_type_column)))?;
        let payload = match column(&self.payload_column) {
            None => return Err(poison(format!("the outbox table has no column {:?}", self.payload_column))),
            Some(Value::Null) => None,
            Some(Value::Bytea(bytes)) => Some(Payload::Bytes(bytes.clone())),
            Some(Value::Json(json)) => Some(Payload::Json(json.clone())),
            Some(value) => text_of(value).map(Payload::Text),
        };
        let mut headers = Vec::new();
        for name in &self.header_columns {
            if let Some(value) = field_text(name)? {
                headers.push((name.clone(), value));
            }
        }
        Ok(OutboxEvent {
            aggregate_id: field_text(&self.aggregate_id_column)?,
            id: field_text(&self.id_column)?,
            source: table,
            aggregate_type,
            payload,
            headers,
            position,
        })
    }

    fn route_message(&self, prefix: &str, content: &[u8], position: Position) -> Result<OutboxEvent, Poison> {
        let table = format!("message:{prefix}");
        let poison = |reason: String| Poison { table: table.clone(), reason };
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(content)
            .map_err(|e| poison(format!("message content is not a JSON object: {e}")))?;
        let text = |name: &str| match object.get(name) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        };
        let aggregate_type = text(&self.aggregate_type_column)
            .ok_or_else(|| poison(format!("message field {:?} is missing", self.aggregate_type_column)))?;
        let payload = match object.get(&self.payload_column) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(Payload::Text(s.clone())),
            Some(other) => Some(Payload::Json(other.to_string())),
        };
        Ok(OutboxEvent {
            headers: self
                .header_columns
                .iter()
                .filter_map(|name| text(name).map(|v| (name.clone(), v)))
                .collect(),
            aggregate_id: text(&self.aggregate_id_column),
            id: text(&self.id_column),
            source: table,
            aggregate_type,
            payload,
            position,
        })
    }
}

/// The text of a value for keys and headers.
pub fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::Text(s) | Value::Enum(s) | Value::Json(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

impl OutboxEvent {
    /// The event's sort key in an event log: the source position as fixed-width hex (so that
    /// text order is position order), then the event id. Positions of polled events name the
    /// inserting transaction only, so the id orders the events of one transaction.
    pub fn sequence(&self) -> String {
        let mut sequence = format!("{:016X}.{:08X}", self.position.commit_lsn.0, self.position.tx_ordinal);
        if let Some(id) = &self.id {
            sequence.push('.');
            sequence.push_str(id);
        }
        sequence
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use sluice_core::TypeKind;
    use sluice_core::{Column, Lsn, OldRow, ReplicaIdentity};

    use super::*;

    /// A test relation `public.<name>` with these (name, is key, kind) columns.
    pub(crate) fn relation(name: &str, columns: &[(&str, bool, TypeKind)]) -> Arc<Relation> {
        Arc::new(Relation {
            oid: 1,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .iter()
                .map(|(name, is_key, kind)| Column {
                    name: (*name).into(),
                    type_oid: 0,
                    type_modifier: -1,
                    is_key: *is_key,
                    kind: kind.clone(),
                })
                .collect(),
        })
    }

    /// The outbox table of the Debezium convention.
    pub(crate) fn outbox_relation() -> Arc<Relation> {
        relation(
            "outbox",
            &[
                ("id", true, TypeKind::Uuid),
                ("aggregatetype", false, TypeKind::Text),
                ("aggregateid", false, TypeKind::Text),
                ("type", false, TypeKind::Text),
                ("payload", false, TypeKind::Jsonb),
            ],
        )
    }

    pub(crate) fn config() -> OutboxConfig {
        toml::from_str("table = \"public.outbox\"\nmessage_prefix = \"outbox\"\nevent_table = \"events\"")
            .unwrap()
    }

    pub(crate) fn position(ordinal: u32) -> Position {
        Position { commit_lsn: Lsn(0x16B3748), tx_ordinal: ordinal }
    }

    pub(crate) fn insert(aggregate_id: Value, payload: Value) -> ChangeEvent {
        ChangeEvent::Insert {
            position: position(3),
            relation: outbox_relation(),
            new: vec![
                Value::Uuid([1; 16]),
                Value::Text("Order".into()),
                aggregate_id,
                Value::Text("OrderCreated".into()),
                payload,
            ],
            snapshot: false,
        }
    }

    pub(crate) fn event(routed: Routed) -> OutboxEvent {
        match routed {
            Routed::Event(event) => event,
            other => panic!("not an event: {other:?}"),
        }
    }

    #[test]
    fn an_outbox_row_routes_with_its_fields_and_updates_and_deletes_are_ignored() {
        let config = config();
        let routed = event(
            config
                .route(&insert(Value::Text("o-17".into()), Value::Json("{\"total\": 9.50}".into())))
                .unwrap(),
        );
        assert_eq!(routed.aggregate_type, "Order");
        assert_eq!(routed.aggregate_id.as_deref(), Some("o-17"));
        assert_eq!(routed.id.as_deref(), Some("01010101-0101-0101-0101-010101010101"));
        assert_eq!(routed.payload, Some(Payload::Json("{\"total\": 9.50}".into())));
        assert_eq!(routed.headers, vec![("type".to_string(), "OrderCreated".to_string())]);
        let delete = ChangeEvent::Delete {
            position: position(1),
            relation: outbox_relation(),
            old: OldRow::Key(vec![Value::Uuid([3; 16]), Value::Null, Value::Null, Value::Null, Value::Null]),
        };
        assert_eq!(config.route(&delete).unwrap(), Routed::Ignored);
        let other = ChangeEvent::Message {
            position: position(0),
            transactional: true,
            prefix: "audit".into(),
            content: bytes::Bytes::from_static(b"x"),
        };
        assert_eq!(config.route(&other).unwrap(), Routed::NotOutbox);
    }

    #[test]
    fn a_message_routes_like_a_row_and_a_bad_one_is_poison() {
        let config = config();
        let message = ChangeEvent::Message {
            position: position(0),
            transactional: true,
            prefix: "outbox".into(),
            content: bytes::Bytes::from_static(br#"{"id":"e1","aggregatetype":"Customer","aggregateid":"c-1","type":"Renamed","payload":{"name":"Ada"}}"#),
        };
        let routed = event(config.route(&message).unwrap());
        assert_eq!(
            (routed.aggregate_type.as_str(), routed.aggregate_id.as_deref(), routed.id.as_deref()),
            ("Customer", Some("c-1"), Some("e1"))
        );
        assert_eq!(routed.payload, Some(Payload::Json(r#"{"name":"Ada"}"#.into())));
        let bad = ChangeEvent::Message {
            position: position(0),
            transactional: true,
            prefix: "outbox".into(),
            content: bytes::Bytes::from_static(b"[1]"),
        };
        let error = config.route(&bad).unwrap_err();
        assert_eq!(error.table, "message:outbox");
    }
}
