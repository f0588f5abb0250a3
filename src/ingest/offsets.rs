//! Which offsets are safe to commit: a message may be committed once what it
//! produced is durable. Pure bookkeeping, no Kafka types.
//!
//! Each consumed message gets a *due time*: the event time at which its
//! effect is in the rows written so far (the end of its largest window).
//! After rows up to watermark `W` are durable, a partition can commit up to
//! (not including) its first message whose due time is after `W`.
//!
//! Per partition we keep a deque of `(offset, due)` with strictly
//! increasing `due`: a message whose due time is not above an earlier one's
//! can never be the first blocker, so it needs no entry. With in-order input
//! the deque holds about one entry per open window.

use std::collections::{BTreeMap, VecDeque};

/// Safe commit positions per (topic, partition).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: BTreeMap<(String, i32), PartitionOffsets>,
}

#[derive(Debug, Default)]
struct PartitionOffsets {
    /// Offset after the last message seen (the commit position when nothing blocks).
    next: i64,
    blockers: VecDeque<(i64, i64)>,
    committed: Option<i64>,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records message `offset` of `topic`/`partition` whose output is durable
    /// once rows up to event time `due_ms` are written (`None`: nothing to wait for).
    pub fn record(&mut self, topic: &str, partition: i32, offset: i64, due_ms: Option<i64>) {
        let p = match self.parts.get_mut(&(topic.to_string(), partition)) {
            Some(p) => p,
            None => self
                .parts
                .entry((topic.to_string(), partition))
                .or_default(),
        };
        p.next = p.next.max(offset + 1);
        if let Some(due) = due_ms {
            if p.blockers.back().is_none_or(|&(_, d)| due > d) {
                p.blockers.push_back((offset, due));
            }
        }
    }

    /// Rows up to watermark `durable_ms` are written: returns the partitions
    /// whose commit position moved, with the new position.
    pub fn advance(&mut self, durable_ms: i64) -> Vec<(String, i32, i64)> {
        let mut moved = Vec::new();
        for ((topic, partition), p) in self.parts.iter_mut() {
            while p.blockers.front().is_some_and(|&(_, due)| due <= durable_ms) {
                p.blockers.pop_front();
            }
            let position = p.blockers.front().map_or(p.next, |&(o, _)| o);
            if p.committed != Some(position) && position > 0 {
                p.committed = Some(position);
                moved.push((topic.clone(), *partition, position));
            }
        }
        moved
    }

    /// Forgets a partition (revoked).
    pub fn remove(&mut self, topic: &str, partition: i32) {
        self.parts.remove(&(topic.to_string(), partition));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_up_to_the_first_message_not_yet_durable() {
        let mut t = OffsetTracker::new();
        t.record("p", 0, 0, Some(100));
        t.record("p", 0, 1, Some(100));
        t.record("p", 0, 2, Some(200));
        t.record("p", 0, 3, Some(150)); // out of order: covered by offset 2
        t.record("p", 1, 7, None);
        let mut moved = t.advance(99);
        moved.sort();
        assert_eq!(moved, vec![("p".into(), 1, 8)]);
        assert_eq!(t.advance(100), vec![("p".into(), 0, 2)]);
        assert!(t.advance(120).is_empty(), "no change, nothing to commit");
        assert_eq!(t.advance(200), vec![("p".into(), 0, 4)]);
    }

    #[test]
    fn an_early_message_blocks_later_durable_ones() {
        let mut t = OffsetTracker::new();
        t.record("g", 0, 10, Some(500));
        t.record("g", 0, 11, Some(600));
        assert_eq!(t.advance(400), vec![("g".into(), 0, 10)]);
        assert_eq!(t.advance(550), vec![("g".into(), 0, 11)]);
        t.remove("g", 0);
        assert!(t.advance(1000).is_empty());
    }
}
