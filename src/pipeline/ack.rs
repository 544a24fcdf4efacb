//! Which source position may be confirmed, given batches that become durable in any order.
//!
//! Batches are numbered as they are submitted. A batch may carry an acknowledgement LSN (the
//! end of the last transaction it completes). The durable position advances over the longest
//! unbroken run of completed batches from the oldest pending one, to the highest LSN in that run,
//! and never moves backwards: a later batch finishing first confirms nothing until every batch
//! before it is durable too.

use std::collections::BTreeMap;

use sluice_core::{Lsn, Position};

/// A submitted batch not yet released.
#[derive(Debug)]
struct Pending {
    ack: Option<Lsn>,
    commit_time: Option<i64>,
    /// The position of the batch's last change.
    last: Option<Position>,
    done: bool,
}

#[derive(Debug, Default)]
pub struct AckTracker {
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
    durable: Lsn,
    /// The position of the last change of the durable prefix (inside a transaction when the
    /// prefix ends with a slice of one).
    durable_position: Option<Position>,
    /// Commit time of the last durable transaction (Postgres epoch microseconds).
    durable_commit_time: Option<i64>,
    /// Commit times of the batches released since `take_released`.
    released: Vec<i64>,
}

impl AckTracker {
    /// Starts after a position already known to be durable (e.g. the slot's confirmed LSN).
    #[cfg(test)]
    pub fn starting_at(durable: Lsn) -> Self {
        AckTracker { durable, ..AckTracker::default() }
    }

    /// Records a submitted batch; returns its sequence number.
    #[cfg(test)]
    pub fn register(&mut self, ack: Option<Lsn>) -> u64 {
        self.register_with_time(ack, None)
    }

    /// Records a submitted batch and the commit time of the last transaction it completes.
    #[cfg(test)]
    pub fn register_with_time(&mut self, ack: Option<Lsn>, commit_time: Option<i64>) -> u64 {
        self.register_batch(ack, commit_time, None)
    }

    /// Records a submitted batch: its ack, the commit time of the last transaction it
    /// completes, and the position of its last change.
    pub fn register_batch(
        &mut self,
        ack: Option<Lsn>,
        commit_time: Option<i64>,
        last: Option<Position>,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(seq, Pending { ack, commit_time, last, done: false });
        seq
    }

    /// Marks a batch durable; returns the new durable position when it advanced.
    pub fn complete(&mut self, seq: u64) -> Option<Lsn> {
        if let Some(entry) = self.pending.get_mut(&seq) {
            entry.done = true;
        }
        let before = self.durable;
        while let Some(entry) = self.pending.first_entry() {
            if !entry.get().done {
                break;
            }
            let Pending { ack, commit_time, last, .. } = entry.remove();
            self.durable_position = self.durable_position.max(last);
            if let Some(ack) = ack {
                self.durable = self.durable.max(ack);
            }
            if let Some(time) = commit_time {
                self.durable_commit_time = self.durable_commit_time.max(commit_time);
                self.released.push(time);
            }
        }
        (self.durable > before).then_some(self.durable)
    }

    /// The position through which every batch is durable.
    #[cfg(test)]
    pub fn durable(&self) -> Lsn {
        self.durable
    }

    /// The commit times of the batches released (made durable, in order) since the last call:
    /// one per batch that completes a transaction or carries a heartbeat.
    pub fn take_released(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.released)
    }

    /// The position through which every change is durable, when that lies inside a
    /// transaction whose end is not durable yet (a slice of a large transaction is): what a
    /// restart, which replays that transaction from its first change, may skip.
    pub fn inside_transaction(&self) -> Option<Position> {
        self.durable_position.filter(|p| p.commit_lsn > self.durable)
    }

    /// Commit time of the last transaction (or heartbeat) made durable.
    pub fn durable_commit_time(&self) -> Option<i64> {
        self.durable_commit_time
    }

    /// Batches submitted and not yet released.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn later_batch_completing_first_confirms_nothing() {
        let mut tracker = AckTracker::default();
        let a = tracker.register(Some(Lsn(10)));
        let b = tracker.register(Some(Lsn(20)));
        assert_eq!(tracker.complete(b), None);
        assert_eq!(tracker.durable(), Lsn(0));
        assert_eq!(tracker.complete(a), Some(Lsn(20)));
    }

    #[test]
    fn batch_without_ack_passes_the_position_on() {
        let mut tracker = AckTracker::starting_at(Lsn(5));
        let a = tracker.register(None);
        let b = tracker.register(Some(Lsn(30)));
        assert_eq!(tracker.complete(a), None);
        assert_eq!(tracker.durable(), Lsn(5));
        assert_eq!(tracker.complete(b), Some(Lsn(30)));
        assert_eq!(tracker.in_flight(), 0);
    }

    #[test]
    fn commit_time_follows_the_durable_prefix() {
        let mut tracker = AckTracker::default();
        let a = tracker.register_with_time(Some(Lsn(10)), Some(100));
        let slice = tracker.register_with_time(None, None);
        let b = tracker.register_with_time(Some(Lsn(20)), Some(200));
        tracker.complete(b);
        assert_eq!(tracker.durable_commit_time(), None, "b is not durable while a is pending");
        assert!(tracker.take_released().is_empty(), "nothing released while a is pending");
        tracker.complete(a);
        assert_eq!(tracker.durable_commit_time(), Some(100));
        assert_eq!(tracker.take_released(), [100]);
        tracker.complete(slice);
        assert_eq!(tracker.durable_commit_time(), Some(200));
        assert_eq!(tracker.take_released(), [200], "a slice without a commit time adds none");
        assert!(tracker.take_released().is_empty(), "each commit time once");
    }

    fn at(commit: u64, ordinal: u32) -> Option<Position> {
        Some(Position { commit_lsn: Lsn(commit), tx_ordinal: ordinal })
    }

    #[test]
    fn the_durable_slices_of_a_transaction_are_a_position_inside_it() {
        let mut tracker = AckTracker::default();
        // A whole transaction (commit at 90, ending at 100), then three slices of one
        // committing at 200 (ending at 210).
        let whole = tracker.register_batch(Some(Lsn(100)), Some(1), at(90, 3));
        let first = tracker.register_batch(None, None, at(200, 4096));
        let second = tracker.register_batch(None, None, at(200, 8192));
        let last = tracker.register_batch(Some(Lsn(210)), Some(2), at(200, 9000));
        tracker.complete(second);
        assert_eq!(tracker.inside_transaction(), None, "nothing durable yet");
        tracker.complete(whole);
        assert_eq!(tracker.inside_transaction(), None, "a whole transaction is confirmed, not skipped");
        tracker.complete(first);
        assert_eq!(tracker.inside_transaction(), at(200, 8192), "both slices, in order");
        tracker.complete(last);
        assert_eq!(
            tracker.inside_transaction(),
            None,
            "the transaction's end is durable: the slot moves past it"
        );
    }

    proptest! {
        /// Model test: whatever the completion order (a permutation of a prefix, i.e. with gaps),
        /// the durable position equals the highest ack among the longest fully completed prefix,
        /// and it never decreases.
        #[test]
        fn durable_is_the_highest_ack_of_the_completed_prefix(
            acks in proptest::collection::vec(proptest::option::of(1u64..1000), 1..40),
            order in any::<u64>(),
            completed_fraction in 0.0f64..=1.0,
        ) {
            // Acks of a source only increase; sort them to model that.
            let mut sorted: Vec<Option<u64>> = acks.clone();
            let mut increasing = sorted.iter().flatten().copied().collect::<Vec<_>>();
            increasing.sort_unstable();
            let mut it = increasing.into_iter();
            for slot in sorted.iter_mut() {
                if slot.is_some() { *slot = it.next(); }
            }
            let mut tracker = AckTracker::default();
            let seqs: Vec<u64> = sorted.iter().map(|a| tracker.register(a.map(Lsn))).collect();
            let mut completion: Vec<usize> = (0..seqs.len()).collect();
            // Deterministic shuffle from `order`.
            let mut state = order | 1;
            for i in (1..completion.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                completion.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let take = ((completion.len() as f64) * completed_fraction) as usize;
            let mut done = vec![false; seqs.len()];
            let mut last = Lsn(0);
            for &i in &completion[..take] {
                tracker.complete(seqs[i]);
                done[i] = true;
                prop_assert!(tracker.durable() >= last, "durable moved backwards");
                last = tracker.durable();
            }
            let prefix = done.iter().take_while(|&&d| d).count();
            let expected = sorted[..prefix].iter().flatten().max().copied().unwrap_or(0);
            prop_assert_eq!(tracker.durable(), Lsn(expected));
            prop_assert_eq!(tracker.in_flight(), seqs.len() - prefix);
        }
    }
}
