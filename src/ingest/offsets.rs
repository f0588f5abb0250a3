//! Input positions: per (topic, partition), the offset after the last
//! message the processing state holds. Pure bookkeeping, no Kafka types.
//!
//! The positions are checkpointed with the state (see [`crate::state`]) and
//! are what the service commits to Kafka after each checkpoint. A message
//! below its partition's position is already in the state: after a restart
//! (the group's committed offsets can trail the checkpoint by one commit) or
//! a rebalance (librdkafka resumes from the committed offset) Kafka delivers
//! it again, and it is skipped, so nothing is counted twice.

/// What [`Positions::advance`] decided about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Next in line: process it.
    Next,
    /// Already in the state: skip it.
    Redelivered,
    /// Process it, but offsets between the position and this one were never
    /// seen (compacted away, transaction markers, or the group committed
    /// past this state's checkpoint): this many.
    Gap(i64),
}

/// Positions per (topic, partition).
#[derive(Debug, Default, Clone)]
pub struct Positions {
    /// A handful of partitions per instance: a vector searched by `&str`
    /// avoids allocating a key per message.
    parts: Vec<(String, i32, i64)>,
    /// Positions changed since the last [`Positions::take_moved`].
    moved: bool,
}

impl Positions {
    /// No position known: every partition starts wherever Kafka starts it.
    pub fn new() -> Self {
        Self::default()
    }

    /// The positions of a checkpoint.
    pub fn restored(parts: Vec<(String, i32, i64)>) -> Self {
        Positions {
            parts,
            moved: false,
        }
    }

    /// Records message `offset` of `topic`/`partition`; says whether it is
    /// new to the state.
    #[inline]
    pub fn advance(&mut self, topic: &str, partition: i32, offset: i64) -> Step {
        match self
            .parts
            .iter_mut()
            .find(|(t, p, _)| *p == partition && t == topic)
        {
            Some((_, _, next)) => {
                if offset < *next {
                    return Step::Redelivered;
                }
                let gap = offset - *next;
                *next = offset + 1;
                self.moved = true;
                if gap > 0 {
                    Step::Gap(gap)
                } else {
                    Step::Next
                }
            }
            None => {
                self.parts.push((topic.to_string(), partition, offset + 1));
                self.moved = true;
                Step::Next
            }
        }
    }

    /// The position of one partition, if any message of it is in the state.
    pub fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.parts
            .iter()
            .find(|(t, p, _)| *p == partition && t == topic)
            .map(|(_, _, o)| *o)
    }

    /// Every position, for a checkpoint.
    pub fn all(&self) -> Vec<(String, i32, i64)> {
        self.parts.clone()
    }

    /// True once when positions moved since the previous call (a commit is due).
    pub fn take_moved(&mut self) -> bool {
        std::mem::take(&mut self.moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_messages_advance_and_redeliveries_are_skipped() {
        let mut p = Positions::new();
        assert_eq!(
            p.advance("t", 0, 5),
            Step::Next,
            "the first message of a partition"
        );
        assert_eq!(p.advance("t", 0, 6), Step::Next);
        assert_eq!(p.advance("t", 1, 0), Step::Next);
        assert_eq!(p.get("t", 0), Some(7));
        assert!(p.take_moved());
        assert!(!p.take_moved());
        // A rebalance restarts the partition at an older committed offset.
        assert_eq!(p.advance("t", 0, 5), Step::Redelivered);
        assert_eq!(p.advance("t", 0, 6), Step::Redelivered);
        assert!(!p.take_moved(), "skipped messages move nothing");
        assert_eq!(p.advance("t", 0, 7), Step::Next);
        assert_eq!(p.advance("t", 0, 10), Step::Gap(2));
        let mut all = p.all();
        all.sort();
        assert_eq!(all, vec![("t".into(), 0, 11), ("t".into(), 1, 1)]);
    }

    #[test]
    fn restored_positions_skip_what_the_checkpoint_holds() {
        let mut p = Positions::restored(vec![("g".into(), 3, 100)]);
        assert_eq!(p.advance("g", 3, 98), Step::Redelivered);
        assert_eq!(p.advance("g", 3, 99), Step::Redelivered);
        assert_eq!(p.advance("g", 3, 100), Step::Next);
        assert_eq!(p.get("g", 3), Some(101));
        assert_eq!(p.get("g", 4), None);
    }
}
