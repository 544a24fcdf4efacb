//! Reading one table over several connections: a fresh request of a whole table is split into
//! key ranges, [`RANGES_PER_READER`] for each of `backfill.table_concurrency` readers, and the
//! readers take the ranges one after another from a shared queue (keyset pages between
//! watermarks in each, like a whole table). The split points are quantiles of primary keys
//! sampled from the table, so the ranges hold about as many rows each: the key of the first
//! row of each of [`SAMPLE_PAGES_PER_READER`] pages spread evenly over the table, fetched by
//! ctid (no scan); a table whose pages give too few (a partitioned one) is sampled with
//! `TABLESAMPLE SYSTEM` instead. Because a reader that is done takes the next range, neither
//! a sample's error nor a slower connection leaves one reader working alone at the end for
//! long. The ranges are stored with the request (`ranges`, a JSON array of `{after, upto, done}`), and each reader
//! records its range's resumable position there, so that a restart resumes every range where
//! it stopped, with the same ranges whatever `table_concurrency` says by then.

use serde::{Deserialize, Serialize};
use sluice_postgres::catalog::Table;

use super::{BackfillConfig, BackfillError, Request};

/// Pages sampled per reader, one key each. Keys from distinct pages spread over the table:
/// `TABLESAMPLE SYSTEM` at 1,000 keys per reader read about 15 whole pages of a 1M-row table,
/// each a run of adjacent keys, and split points between so few runs left ranges of 1 to 15
/// chunks (measured, chunk 20,000). With a key from each of 250 pages per reader, a range of
/// four per reader rests on about 60 pages.
const SAMPLE_PAGES_PER_READER: u64 = 250;

/// The fallback's sampled keys per reader (`TABLESAMPLE SYSTEM`, whole pages).
const SAMPLE_KEYS_PER_READER: f64 = 1000.0;

/// Ranges per reader. With one range each, a sample's error of a few percent, or one
/// connection served more slowly, left a reader alone for the last tenth of a 1M-row table
/// (measured: ranges of 600k and 420k rows); with four, the tail alone is at most a range.
pub(super) const RANGES_PER_READER: usize = 4;

/// One key range of a table and how far its reader got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Range {
    /// The last key made durable, or the key before the range (exclusive); `None` from the
    /// table's start.
    pub after: Option<Vec<String>>,
    /// The range's last key (inclusive); `None` to the table's end.
    pub upto: Option<Vec<String>>,
    /// Every row of the range is durable.
    #[serde(default)]
    pub done: bool,
}

/// The request's ranges: those stored with it, or, for a fresh request of a whole table large
/// enough for more than one reader, new ones (stored before any is read). `None`: one reader.
pub(super) async fn plan(
    sql: &tokio_postgres::Client,
    progress: &str,
    pipeline: &str,
    request: &Request,
    table: &Table,
    config: &BackfillConfig,
) -> Result<Option<Vec<Range>>, BackfillError> {
    let stored: Option<String> = sql
        .query_one(
            &format!("SELECT ranges::text FROM {progress} WHERE pipeline = $1 AND id = $2"),
            &[&pipeline, &request.id],
        )
        .await?
        .get(0);
    if let Some(stored) = stored {
        let ranges: Vec<Range> = serde_json::from_str(&stored).map_err(|e| {
            BackfillError::Request(format!(
                "request {}: its stored key ranges cannot be read: {e}",
                request.id
            ))
        })?;
        return Ok(Some(ranges));
    }
    let fresh = request.keys.is_none() && request.last_key.is_none() && request.rows_done == 0;
    if !fresh || config.readers_per_table() <= 1 {
        return Ok(None);
    }
    let (rows, blocks) = super::progress::table_size(sql, &request.table).await?.unwrap_or((0, 0));
    // Each range at least a chunk.
    let chunks = (rows / config.chunk_size.max(1) as i64).max(1) as usize;
    let readers = config.readers_per_table().min(chunks);
    if readers <= 1 {
        return Ok(None);
    }
    let count = (readers * RANGES_PER_READER).min(chunks);
    let pages = spread(blocks.max(0) as u64, SAMPLE_PAGES_PER_READER * readers as u64);
    let mut sample: Vec<Vec<String>> =
        sql.query(&table.key_at_pages_query(&pages), &[]).await?.iter().map(|row| row.get(0)).collect();
    if sample.len() < count * 8 {
        let percent = (100.0 * SAMPLE_KEYS_PER_READER * readers as f64 / rows as f64).clamp(0.001, 100.0);
        sample =
            sql.query(&table.key_sample_query(percent), &[]).await?.iter().map(|row| row.get(0)).collect();
    }
    let ranges = split(&sample, count);
    if ranges.len() <= 1 {
        return Ok(None);
    }
    let text = serde_json::to_string(&ranges).expect("ranges serialize");
    sql.execute(
        &format!("UPDATE {progress} SET ranges = $3::text::jsonb WHERE pipeline = $1 AND id = $2"),
        &[&pipeline, &request.id, &text],
    )
    .await?;
    tracing::info!(request = request.id, table = %request.table, ranges = ranges.len(), sampled_keys = sample.len(), "backfill split into key ranges");
    Ok(Some(ranges))
}

/// Whether a reader made any of `ranges` durable already: one is done, or its `after` has
/// moved past the key before it (the range before's `upto`).
pub(super) fn progressed(ranges: &[Range]) -> bool {
    let mut before: Option<&Vec<String>> = None;
    for range in ranges {
        if range.done || range.after.as_ref() != before {
            return true;
        }
        before = range.upto.as_ref();
    }
    false
}

/// At most `count` page numbers spread evenly over `blocks` pages, from the first.
fn spread(blocks: u64, count: u64) -> Vec<u64> {
    let count = count.min(blocks);
    (0..count).map(|i| i * blocks / count).collect()
}

/// `count` ranges covering every key, split at quantiles of `sample` (sorted keys); fewer
/// where the sample repeats a split point or is too small.
fn split(sample: &[Vec<String>], count: usize) -> Vec<Range> {
    let mut points: Vec<&Vec<String>> = if sample.len() < count {
        Vec::new()
    } else {
        (1..count).map(|i| &sample[i * sample.len() / count]).collect()
    };
    points.dedup();
    let mut ranges = Vec::with_capacity(points.len() + 1);
    let mut after: Option<Vec<String>> = None;
    for point in points {
        ranges.push(Range { after: after.take(), upto: Some(point.clone()), done: false });
        after = Some(point.clone());
    }
    ranges.push(Range { after, upto: None, done: false });
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(values: &[i64]) -> Vec<Vec<String>> {
        values.iter().map(|v| vec![v.to_string()]).collect()
    }

    fn bounds(ranges: &[Range]) -> Vec<(Option<String>, Option<String>)> {
        ranges
            .iter()
            .map(|r| (r.after.as_ref().map(|k| k[0].clone()), r.upto.as_ref().map(|k| k[0].clone())))
            .collect()
    }

    #[test]
    fn fresh_ranges_have_not_progressed_and_a_moved_or_done_one_has() {
        let mut ranges = split(&keys(&(1..=100).collect::<Vec<_>>()), 4);
        assert!(!progressed(&ranges));
        ranges[2].after = Some(vec!["60".into()]);
        assert!(progressed(&ranges));
        let mut ranges = split(&keys(&(1..=100).collect::<Vec<_>>()), 4);
        ranges[3].done = true;
        assert!(progressed(&ranges));
        assert!(!progressed(&[]));
    }

    #[test]
    fn sampled_pages_spread_evenly_and_never_past_the_table() {
        assert_eq!(spread(7350, 4), vec![0, 1837, 3675, 5512]);
        assert_eq!(spread(3, 10), vec![0, 1, 2]);
        assert_eq!(spread(0, 10), Vec::<u64>::new());
        assert!(spread(7350, 500).iter().all(|&page| page < 7350));
    }

    #[test]
    fn ranges_meet_end_to_end_and_cover_every_key() {
        let sample = keys(&(1..=100).collect::<Vec<_>>());
        let ranges = split(&sample, 4);
        assert_eq!(
            bounds(&ranges),
            vec![
                (None, Some("26".into())),
                (Some("26".into()), Some("51".into())),
                (Some("51".into()), Some("76".into())),
                (Some("76".into()), None),
            ]
        );
        assert!(ranges.iter().all(|r| !r.done));
    }

    #[test]
    fn a_repeated_split_point_makes_fewer_ranges_and_a_tiny_sample_one() {
        assert_eq!(
            bounds(&split(&keys(&[5, 5, 5, 5, 9]), 4)),
            vec![(None, Some("5".into())), (Some("5".into()), None)]
        );
        assert_eq!(bounds(&split(&keys(&[1]), 4)), vec![(None, None)]);
        assert_eq!(bounds(&split(&[], 4)), vec![(None, None)]);
    }

    #[test]
    fn stored_ranges_read_back_with_their_progress() {
        let ranges = vec![
            Range { after: None, upto: Some(vec!["a b".into(), "7".into()]), done: true },
            Range { after: Some(vec!["a b".into(), "9".into()]), upto: None, done: false },
        ];
        let text = serde_json::to_string(&ranges).unwrap();
        assert_eq!(serde_json::from_str::<Vec<Range>>(&text).unwrap(), ranges);
        // As Postgres's jsonb_set leaves it: `after` replaced, keys reordered.
        let edited = r#"[{"done": true, "upto": ["a b", "7"], "after": null}, {"done": false, "upto": null, "after": ["a b", "12"]}]"#;
        assert_eq!(
            serde_json::from_str::<Vec<Range>>(edited).unwrap()[1].after,
            Some(vec!["a b".to_owned(), "12".to_owned()])
        );
    }
}
