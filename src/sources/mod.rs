//! Sources that are not a Postgres database (those live in the `sluice-postgres` connector):
//! the Kafka source, which reads sluice's own CDC records back in a consumer group so that
//! the apply side scales out over a topic's partitions.

pub mod kafka;
