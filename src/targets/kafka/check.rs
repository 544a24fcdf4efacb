//! Live checks of a Kafka target, for `sluice validate` and `run`'s start: every topic the
//! published tables' changes go to exists on the brokers. Outbox topics named after the
//! aggregate type are checked for the aggregate types in the outbox table now; the others
//! cannot be known before their first event, and the findings say so.

use sluice_core::Problem;
use sluice_kafka::{KafkaProducer, ProducerOptions};
use sluice_postgres::setup::quote_ident;

use super::config::KafkaConfig;
use crate::validate::Findings;

/// At most this many aggregate types are read from the outbox table to check their topics.
const AGGREGATE_TYPES: i64 = 50;

/// Checks that each topic exists; a broker that does not answer is one `unreachable` line.
pub async fn target(
    config: &KafkaConfig,
    sql: &tokio_postgres::Client,
    replication: Option<&sluice_postgres::ReplicationConfig>,
    own_tables: &[String],
    findings: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    // (topic, what writes to it, the key that names it, whether a miss is only a warning)
    let mut topics: Vec<(String, String, String, bool)> = Vec::new();
    let outbox_table = config.outbox.as_ref().and_then(|o| o.table.as_ref()).map(|t| t.to_string());
    if let Some(replication) = replication {
        let published = sql
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
                &[&replication.publication],
            )
            .await?;
        for row in published {
            let (schema, name): (String, String) = (row.get(0), row.get(1));
            let table = format!("{schema}.{name}");
            if outbox_table.as_ref() == Some(&table) || own_tables.contains(&table) {
                continue;
            }
            let (topic, key) = match config.topics.get(&table) {
                Some(topic) => (topic.clone(), format!("target.topics.\"{table}\"")),
                None => (
                    config.topic.replace("{schema}", &schema).replace("{table}", &name),
                    "target.topic".into(),
                ),
            };
            topics.push((topic, format!("table {table}"), key, false));
        }
    }
    if let Some(outbox) = &config.outbox {
        if !outbox.topic.contains("{aggregatetype}") {
            topics.push((outbox.topic.clone(), "outbox events".into(), "target.outbox.topic".into(), false));
        } else if let Some(table) = &outbox.table {
            let types = sql
                .query(
                    &format!(
                        "SELECT DISTINCT {}::text FROM {} LIMIT {AGGREGATE_TYPES}",
                        quote_ident(&outbox.aggregate_type_column),
                        table.quoted()
                    ),
                    &[],
                )
                .await;
            // A missing table or column is the source side's problem, already named.
            // The rows there may be history already streamed: a missing topic of theirs is a
            // warning, and with missing_topic = "dead_letter" not even that.
            let dead_letter = outbox.missing_topic == crate::translate::outbox::MissingTopic::DeadLetter;
            for row in types.unwrap_or_default().into_iter().filter(|_| !dead_letter) {
                let Some(aggregate): Option<String> = row.get(0) else { continue };
                topics.push((
                    outbox.topic.replace("{aggregatetype}", &aggregate),
                    format!("aggregate type {aggregate:?} in {table}"),
                    "target.outbox.topic".into(),
                    true,
                ));
            }
            findings.skipped.push(format!(
                "Kafka topics of aggregate types not yet in {table} (target.outbox.topic = {:?}): known only at their first event",
                outbox.topic
            ));
        }
    }
    if topics.is_empty() {
        return Ok(());
    }
    let options = ProducerOptions {
        brokers: config.brokers.clone(),
        compression: config.compression,
        message_timeout: std::time::Duration::from_secs(10),
        client_id: "sluice-validate".into(),
        extra: config.properties.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    let producer = match KafkaProducer::new(&options) {
        Ok(producer) => producer,
        Err(error) => {
            findings.problems.push(Problem::new(
                "target",
                "properties",
                format!("cannot create a Kafka client: {}", sluice_postgres::error::Chain(&error)),
            ));
            return Ok(());
        }
    };
    topics.sort_by(|a, b| a.0.cmp(&b.0));
    topics.dedup_by(|a, b| a.0 == b.0);
    for (topic, writer, key, warning) in topics {
        match producer.topic_exists(&topic).await {
            Ok(true) => {}
            Ok(false) => {
                let problem = Problem::new(
                    "",
                    &key,
                    format!(
                        "Kafka topic {topic:?} (for {writer}) does not exist on {}; create it \
                         (kafka-topics.sh --create --topic {topic}), or change {key}{}",
                        config.brokers,
                        if warning { ", or set target.outbox.missing_topic = \"dead_letter\"" } else { "" }
                    ),
                );
                if warning {
                    findings.warnings.push(problem);
                } else {
                    findings.problems.push(problem);
                }
            }
            Err(error) => {
                findings.unreachable.push(Problem::new(
                    "target",
                    "brokers",
                    format!(
                        "cannot reach the Kafka brokers {}: {}",
                        config.brokers,
                        match &error {
                            sluice_kafka::Error::Produce { source, .. } => source.to_string(),
                            other => sluice_postgres::error::Chain(other).to_string(),
                        }
                    ),
                ));
                return Ok(());
            }
        }
    }
    findings.checked.push(format!("Kafka topics on {}", config.brokers));
    Ok(())
}
