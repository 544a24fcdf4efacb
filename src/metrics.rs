//! Prometheus metrics: every name in one place (prefix `sluice_`, unit suffixes, low-cardinality
//! labels), and the process-wide recorder.
//!
//! Counters and histograms are recorded where things happen (the pipeline, the targets).
//! Gauges describing positions and lag are sampled from the pipeline's shared state once a
//! second by `monitor`. Every series carries the `pipeline` label.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The Kafka source: per owned `topic` and `partition`, the partition's high watermark minus
/// the offset through which its records are durable in the target.
pub const KAFKA_CONSUMER_LAG: &str = "sluice_kafka_consumer_lag";
/// The Kafka source: partitions this member owns now.
pub const KAFKA_PARTITIONS_ASSIGNED: &str = "sluice_kafka_partitions_assigned";
/// The Kafka source: offset commits, by `outcome` (`ok`, `failed`).
pub const KAFKA_COMMITS_TOTAL: &str = "sluice_kafka_commits_total";
/// The Kafka source: rebalances that assigned or revoked this member's partitions.
pub const KAFKA_REBALANCES_TOTAL: &str = "sluice_kafka_rebalances_total";
/// The Kafka source: records read, by `outcome` (`change`, `tombstone`, `dead_lettered`).
pub const KAFKA_RECORDS_TOTAL: &str = "sluice_kafka_records_total";
/// Changes handed to the target, by `table` and `op` (insert, update, delete, truncate, message).
pub const EVENTS_TOTAL: &str = "sluice_events_total";
/// 1 for each table's migration phase (`forward`, `fenced`, `reversed`, `rolling_back`,
/// `finished`), 0 for the others.
pub const MIGRATION_PHASE: &str = "sluice_migration_phase";
/// Bytes of replication payload received from Postgres.
pub const SOURCE_BYTES_TOTAL: &str = "sluice_source_received_bytes_total";
/// Reads of the replication socket: with the bytes received, how many messages a read takes
/// (paced reads, `source.replication.read_coalesce`, take many).
pub const SOURCE_READS_TOTAL: &str = "sluice_source_socket_reads_total";
/// Replication connections re-established after a failure.
pub const SOURCE_RECONNECTS_TOTAL: &str = "sluice_source_reconnects_total";
/// 1 while the replication stream is open, else 0.
pub const SOURCE_STREAMING: &str = "sluice_source_streaming";
/// Server WAL position minus the slot's confirmed flush position: what a restart would replay
/// plus what is not yet received.
pub const SOURCE_LAG_BYTES: &str = "sluice_source_lag_bytes";
/// Received minus durable in the target: what is in flight inside sluice.
pub const APPLY_LAG_BYTES: &str = "sluice_apply_lag_bytes";
/// Now minus the commit time of the last transaction (or heartbeat) durable in the target.
pub const LAG_SECONDS: &str = "sluice_lag_seconds";
/// Positions, as numbers (byte offsets in the WAL).
pub const RECEIVED_LSN: &str = "sluice_received_lsn";
/// The position through which changes are durable in the target.
pub const DURABLE_LSN: &str = "sluice_durable_lsn";
/// The server's current WAL position.
pub const SERVER_WAL_LSN: &str = "sluice_server_wal_lsn";
/// The slot's confirmed position.
pub const CONFIRMED_FLUSH_LSN: &str = "sluice_slot_confirmed_flush_lsn";
/// WAL the slot keeps on the server (current WAL position minus the slot's restart_lsn).
pub const SLOT_RETAINED_WAL_BYTES: &str = "sluice_slot_retained_wal_bytes";
/// WAL that can still be written before the slot is in danger of invalidation
/// (`safe_wal_size`; absent when `max_slot_wal_keep_size` is unlimited).
pub const SLOT_SAFE_WAL_SIZE_BYTES: &str = "sluice_slot_safe_wal_size_bytes";
/// For a failover slot (PG 17+): 1 while a standby keeps it in step (`synchronized_standby_slots`
/// lists standbys that stream now), 0 while a promotion could lose it or its changes.
pub const SLOT_FAILOVER_READY: &str = "sluice_slot_failover_ready";
/// Decoding on a standby: the primary's WAL position minus the standby's replay position
/// (read through `source.heartbeat_connection`).
pub const STANDBY_REPLAY_LAG_BYTES: &str = "sluice_standby_replay_lag_bytes";
/// Decoding on a standby: the primary's WAL position minus the slot's confirmed position.
pub const LAG_BEHIND_PRIMARY_BYTES: &str = "sluice_lag_behind_primary_bytes";
/// 1 for the slot's current `wal_status` (reserved, extended, unreserved, lost).
pub const SLOT_WAL_STATUS: &str = "sluice_slot_wal_status";
/// Heartbeats written into the WAL, and received back through the stream.
pub const HEARTBEATS_SENT_TOTAL: &str = "sluice_heartbeats_sent_total";
/// Heartbeats received back through the stream.
pub const HEARTBEATS_RECEIVED_TOTAL: &str = "sluice_heartbeats_received_total";
/// Bytes of streamed in-progress transactions currently spilled to disk.
pub const SPILLED_BYTES: &str = "sluice_spilled_bytes";
/// Transactions the source did not deliver because they carry sluice's own replication
/// origin from the other direction (no loops).
pub const ORIGIN_DROPPED_TOTAL: &str = "sluice_source_origin_dropped_total";
/// The way back: changes of new tables not applied because their table does not stream
/// back in its migration phase, by new `table`.
pub const REVERSE_SKIPPED_TOTAL: &str = "sluice_reverse_skipped_total";
/// The way back from DynamoDB: stream records by DynamoDB `table` and `outcome` (applied,
/// own: sluice's forward writes, foreign: items no mapping fits, unchanged, skipped: the
/// table does not stream back in its phase, dead_letter).
pub const REVERSE_RECORDS_TOTAL: &str = "sluice_reverse_records_total";
/// The way back from DynamoDB: now minus the creation time of the newest stream record
/// applied, by DynamoDB `table` (the service rounds it to the second).
pub const REVERSE_LAG_SECONDS: &str = "sluice_reverse_lag_seconds";
/// Row changes the source replayed that the target already holds (its checkpoint: the
/// Postgres target's, or the pipeline's inside a large transaction), skipped before translation.
pub const REPLAY_SKIPPED_TOTAL: &str = "sluice_replay_skipped_total";
/// Target requests' latency, by `target`, seconds.
pub const TARGET_WRITE_SECONDS: &str = "sluice_target_write_duration_seconds";
/// Writes by `target` and `outcome` (applied, already_applied: absorbed by the position guard).
pub const TARGET_WRITES_TOTAL: &str = "sluice_target_writes_total";
/// Retried target requests (throttling, 5xx, network), by `target`.
pub const TARGET_RETRIES_TOTAL: &str = "sluice_target_retries_total";
/// Changes that can never apply, sent to the dead-letter store, by `target`.
pub const DEAD_LETTER_TOTAL: &str = "sluice_dead_letter_total";
/// 1 while this process holds the pipeline's HA lock (it streams), 0 while standing by.
pub const HA_ACTIVE: &str = "sluice_ha_active";
/// Polling source: rows of the outbox table not yet published (counted every
/// `monitoring.slot_check_interval`).
pub const OUTBOX_BACKLOG_ROWS: &str = "sluice_outbox_backlog_rows";
/// Rows and chunks the backfill made durable in the target, by `table`.
pub const BACKFILL_ROWS_TOTAL: &str = "sluice_backfill_rows_total";
/// Chunks the backfill made durable, by `table`.
pub const BACKFILL_CHUNKS_TOTAL: &str = "sluice_backfill_chunks_total";
/// Backfill and reconcile requests being served.
pub const BACKFILL_ACTIVE: &str = "sluice_backfill_active_requests";
/// 1 when /readyz answers ready.
pub const READY: &str = "sluice_ready";
/// The background verify (`[verify]`): source rows checked, by `table`.
pub const VERIFY_ROWS_CHECKED_TOTAL: &str = "sluice_verify_rows_checked_total";
/// Keys still wrong after the re-check in the newest finished pass, by `table`.
pub const VERIFY_MISMATCHES: &str = "sluice_verify_mismatches";
/// The same for the newest pass over every row (which also looks for extra items), by `table`.
pub const VERIFY_LAST_FULL_MISMATCHES: &str = "sluice_verify_last_full_mismatches";
/// When that full pass finished, Unix seconds, by `table`.
pub const VERIFY_LAST_FULL_TIMESTAMP: &str = "sluice_verify_last_full_timestamp_seconds";
/// Background verify passes by `outcome` (clean, drift, failed).
pub const VERIFY_PASSES_TOTAL: &str = "sluice_verify_passes_total";

/// Commit at the source to durable in the target, per batch that completes a transaction (or
/// carries a heartbeat), seconds.
pub const APPLY_LATENCY_SECONDS: &str = "sluice_apply_latency_seconds";
/// Buckets of `APPLY_LATENCY_SECONDS`.
pub(crate) const APPLY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Latency buckets for target requests, seconds.
const WRITE_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once (later calls, e.g. several pipelines in one test
/// process, reuse it) and returns the handle that renders the exposition.
pub fn install(pipeline: &str) -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .add_global_label("pipeline", pipeline)
                .set_buckets_for_metric(Matcher::Full(TARGET_WRITE_SECONDS.into()), WRITE_BUCKETS)
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(Matcher::Full(APPLY_LATENCY_SECONDS.into()), APPLY_BUCKETS)
                .expect("the bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder is installed (a library embedding sluice):
            // then this handle renders nothing, which is harmless.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(EVENTS_TOTAL, "Changes handed to the target, by table and operation");
    describe_gauge!(
        KAFKA_CONSUMER_LAG,
        "Kafka source: a partition's high watermark minus the offset through which its records are durable"
    );
    describe_gauge!(KAFKA_PARTITIONS_ASSIGNED, "Kafka source: partitions this member owns");
    describe_counter!(KAFKA_COMMITS_TOTAL, "Kafka source: offset commits, by outcome");
    describe_counter!(
        KAFKA_REBALANCES_TOTAL,
        "Kafka source: rebalances that changed this member's partitions"
    );
    describe_counter!(KAFKA_RECORDS_TOTAL, "Kafka source: records read, by outcome");
    describe_counter!(
        REVERSE_RECORDS_TOTAL,
        "DynamoDB stream records read by the way back, by table and outcome"
    );
    describe_gauge!(
        REVERSE_LAG_SECONDS,
        Unit::Seconds,
        "Now minus the creation time of the newest DynamoDB stream record applied by the way back"
    );
    describe_gauge!(MIGRATION_PHASE, "1 for each table's current migration phase, 0 for the other phases");
    describe_counter!(SOURCE_BYTES_TOTAL, Unit::Bytes, "Replication payload received from Postgres");
    describe_counter!(SOURCE_READS_TOTAL, "Reads of the replication socket");
    describe_counter!(SOURCE_RECONNECTS_TOTAL, "Replication connections re-established after a failure");
    describe_gauge!(SOURCE_STREAMING, "1 while the replication stream is open");
    describe_gauge!(
        SOURCE_LAG_BYTES,
        Unit::Bytes,
        "Server WAL position minus the slot's confirmed flush position"
    );
    describe_gauge!(APPLY_LAG_BYTES, Unit::Bytes, "Received minus durable in the target");
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "Now minus the commit time of the last transaction or heartbeat durable in the target"
    );
    describe_gauge!(RECEIVED_LSN, "Highest WAL position received");
    describe_gauge!(DURABLE_LSN, "Highest WAL position durable in the target");
    describe_gauge!(SERVER_WAL_LSN, "The server's current WAL position");
    describe_gauge!(CONFIRMED_FLUSH_LSN, "The slot's confirmed flush position");
    describe_gauge!(SLOT_RETAINED_WAL_BYTES, Unit::Bytes, "WAL the slot keeps on the server");
    describe_gauge!(
        SLOT_SAFE_WAL_SIZE_BYTES,
        Unit::Bytes,
        "WAL that can be written before the slot risks invalidation"
    );
    describe_gauge!(SLOT_WAL_STATUS, "1 for the slot's current wal_status");
    describe_gauge!(SLOT_FAILOVER_READY, "1 while a standby keeps the failover slot in step");
    describe_gauge!(
        STANDBY_REPLAY_LAG_BYTES,
        "Decoding on a standby: the primary's WAL position minus the standby's replay position"
    );
    describe_gauge!(
        LAG_BEHIND_PRIMARY_BYTES,
        "Decoding on a standby: the primary's WAL position minus the slot's confirmed position"
    );
    describe_counter!(HEARTBEATS_SENT_TOTAL, "Heartbeats written into the WAL");
    describe_counter!(HEARTBEATS_RECEIVED_TOTAL, "Heartbeats received back through the stream");
    describe_gauge!(SPILLED_BYTES, Unit::Bytes, "Streamed in-progress transactions spilled to disk");
    describe_counter!(
        ORIGIN_DROPPED_TOTAL,
        "Transactions not delivered: sluice's own writes from the other direction (their replication origin)"
    );
    describe_counter!(
        REVERSE_SKIPPED_TOTAL,
        "The way back: changes of tables not streaming back in their migration phase"
    );
    describe_counter!(
        REPLAY_SKIPPED_TOTAL,
        "Replayed row changes the target already holds (its checkpoint), skipped without a request"
    );
    describe_histogram!(TARGET_WRITE_SECONDS, Unit::Seconds, "Latency of target requests");
    describe_histogram!(
        APPLY_LATENCY_SECONDS,
        Unit::Seconds,
        "Commit at the source to durable in the target, per batch completing a transaction"
    );
    describe_counter!(
        TARGET_WRITES_TOTAL,
        "Writes by outcome (already_applied: absorbed by the position guard)"
    );
    describe_counter!(TARGET_RETRIES_TOTAL, "Retried target requests");
    describe_counter!(DEAD_LETTER_TOTAL, "Changes sent to the dead-letter store");
    describe_gauge!(HA_ACTIVE, "1 while this process holds the HA lock and streams");
    describe_gauge!(READY, "1 when /readyz answers ready");
    describe_gauge!(OUTBOX_BACKLOG_ROWS, "Polling source: outbox rows not yet published");
    describe_counter!(BACKFILL_ROWS_TOTAL, "Rows the backfill made durable in the target, by table");
    describe_counter!(BACKFILL_CHUNKS_TOTAL, "Chunks the backfill made durable in the target, by table");
    describe_gauge!(BACKFILL_ACTIVE, "Backfill and reconcile requests being served");
    describe_counter!(VERIFY_ROWS_CHECKED_TOTAL, "Background verify: source rows checked, by table");
    describe_gauge!(VERIFY_MISMATCHES, "Background verify: keys still wrong in the newest pass, by table");
    describe_gauge!(
        VERIFY_LAST_FULL_MISMATCHES,
        "Background verify: keys still wrong in the newest pass over every row, by table"
    );
    describe_gauge!(
        VERIFY_LAST_FULL_TIMESTAMP,
        Unit::Seconds,
        "Background verify: when the newest pass over every row finished (Unix time), by table"
    );
    describe_counter!(VERIFY_PASSES_TOTAL, "Background verify passes by outcome (clean, drift, failed)");
}
