//! Input positions: per (topic, partition), the offset after the last
//! message the processing state holds. Pure bookkeeping, no Kafka types.
//!
//! The positions are checkpointed with the state (see [`crate::state`]) and
//! are what the service commits to Kafka after each checkpoint.
//!
//! # The resume invariant
//!
//! For every partition, the first message the state applies after a
//! restart, a rebalance or a seek is the message at the state's position:
//! nothing below it twice, nothing at or above it skipped. It is enforced
//! here, on what the broker actually delivers, not on what it was asked for:
//!
//! - A message below the position is already in the state (Kafka resumed a
//!   partition at a committed offset one commit behind the checkpoint, or a
//!   rebalance moved a partition back): [`Step::Redelivered`], skipped.
//! - The first message of a partition after an assignment or a seek must not
//!   lie *past* the position. Kafka returns the whole record batch holding
//!   the offset asked for and the client drops the records before it; a
//!   broker that instead answers with the *next* batch (tansu 0.6 does,
//!   when the offset is inside a batch, which is where a checkpoint usually
//!   falls) silently skips the rest of the batch: the labels and predictions
//!   of issue #17. Such a first message is not applied: the caller seeks
//!   the partition back ([`Step::Rewind`]) and reads again, skipping what
//!   the state holds, until the broker delivers the message at the position
//!   or, from a point before the position, steps over it by itself.
//! - Offsets the broker steps over while reading a partition in sequence
//!   (compaction, transaction markers) or that no rewind, down to the start
//!   of the log, brings back (retention deleted them) are a real gap:
//!   [`Step::Gap`], applied and counted, never silent.
//!
//! The other half of the invariant is on the commit side ([`crate::app`]):
//! offsets are committed only after the checkpoint that holds them, only for
//! partitions the checkpoint covers and this consumer reads, so a committed
//! offset is never past the checkpoint. A partition the checkpoint does not
//! cover (it had delivered nothing yet) has no commit of this state and
//! starts at the beginning of its log (`auto.offset.reset = earliest`).

/// What [`Positions::advance`] decided about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Next in line: process it.
    Next,
    /// Already in the state: skip it.
    Redelivered,
    /// The first message since the partition was assigned (or sought) lies
    /// past the position: do not process it; seek the partition to this
    /// offset and read again.
    Rewind(i64),
    /// Process it, but this many offsets between the position and this one
    /// are gone: the broker stepped over them in sequence (compaction,
    /// transaction markers) or rewinding to the start of the log did not
    /// bring them back (retention).
    Gap(i64),
}

/// How far the first rewind of a partition goes back, in offsets; each
/// further rewind goes four times as far, and the last one to the start of
/// the log. Producers batch a few hundred to a few thousand records.
pub const FIRST_REWIND: i64 = 1024;

/// Rewinds of one position before the start of the log is tried.
const MAX_REWINDS: u32 = 4;

/// One partition.
#[derive(Debug, Clone)]
struct Part {
    topic: String,
    partition: i32,
    /// The offset after the last message the state holds.
    next: i64,
    /// The offset of the last message delivered since the partition was
    /// (re)assigned or sought; `None` before the first one.
    last_seen: Option<i64>,
    /// Rewinds since the state last moved (0: none in progress).
    rewinds: u32,
    /// The last rewind went to the start of the log.
    rewound_to_start: bool,
}

/// Positions per (topic, partition).
#[derive(Debug, Default, Clone)]
pub struct Positions {
    /// A handful of partitions per instance: a vector searched by `&str`
    /// avoids allocating a key per message.
    parts: Vec<Part>,
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
            parts: parts
                .into_iter()
                .map(|(topic, partition, next)| Part {
                    topic,
                    partition,
                    next,
                    last_seen: None,
                    rewinds: 0,
                    rewound_to_start: false,
                })
                .collect(),
            moved: false,
        }
    }

    fn part(&mut self, topic: &str, partition: i32) -> Option<&mut Part> {
        self.parts
            .iter_mut()
            .find(|p| p.partition == partition && p.topic == topic)
    }

    /// Records message `offset` of `topic`/`partition`; says whether it is
    /// new to the state (see the module docs).
    #[inline]
    pub fn advance(&mut self, topic: &str, partition: i32, offset: i64) -> Step {
        let Some(p) = self.part(topic, partition) else {
            self.parts.push(Part {
                topic: topic.to_string(),
                partition,
                next: offset + 1,
                last_seen: Some(offset),
                rewinds: 0,
                rewound_to_start: false,
            });
            self.moved = true;
            return Step::Next;
        };
        let first = p.last_seen.is_none();
        p.last_seen = Some(offset);
        if offset < p.next {
            return Step::Redelivered;
        }
        let gap = offset - p.next;
        if gap > 0 && first && !p.rewound_to_start {
            // The broker started this partition past the position: read
            // again from further back.
            p.rewinds += 1;
            p.last_seen = None;
            let to = if p.rewinds > MAX_REWINDS {
                0
            } else {
                p.next - FIRST_REWIND * 4i64.pow(p.rewinds - 1)
            };
            let to = to.max(0);
            p.rewound_to_start = to == 0;
            return Step::Rewind(to);
        }
        p.next = offset + 1;
        p.rewinds = 0;
        p.rewound_to_start = false;
        self.moved = true;
        if gap > 0 {
            Step::Gap(gap)
        } else {
            Step::Next
        }
    }

    /// The partition was (re)assigned: its next message is the first of a
    /// new fetch, checked against the position.
    pub fn reassigned(&mut self, topic: &str, partition: i32) {
        if let Some(p) = self.part(topic, partition) {
            p.last_seen = None;
            p.rewinds = 0;
            p.rewound_to_start = false;
        }
    }

    /// The position of one partition, if any message of it is in the state.
    pub fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.parts
            .iter()
            .find(|p| p.partition == partition && p.topic == topic)
            .map(|p| p.next)
    }

    /// Every position, for a checkpoint.
    pub fn all(&self) -> Vec<(String, i32, i64)> {
        self.parts
            .iter()
            .map(|p| (p.topic.clone(), p.partition, p.next))
            .collect()
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
        p.reassigned("t", 0);
        assert_eq!(p.advance("t", 0, 5), Step::Redelivered);
        assert_eq!(p.advance("t", 0, 6), Step::Redelivered);
        assert!(!p.take_moved(), "skipped messages move nothing");
        assert_eq!(p.advance("t", 0, 7), Step::Next);
        // Stepped over in sequence: compaction or a transaction marker.
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

    /// Issue #17: a broker that answers a fetch inside a record batch with
    /// the next batch. The first message after the restore lies past the
    /// position: rewound, read again, nothing skipped.
    #[test]
    fn a_resume_past_the_position_rewinds_until_the_position_is_delivered() {
        let mut p = Positions::restored(vec![("g".into(), 0, 2904)]);
        assert_eq!(p.advance("g", 0, 3048), Step::Rewind(2904 - FIRST_REWIND));
        assert!(!p.take_moved(), "the message was not applied");
        assert_eq!(p.get("g", 0), Some(2904));
        // The broker again starts at a batch boundary, now before the position.
        for o in 2000..2904 {
            assert_eq!(p.advance("g", 0, o), Step::Redelivered);
        }
        assert_eq!(p.advance("g", 0, 2904), Step::Next);
        assert_eq!(p.advance("g", 0, 2905), Step::Next);
    }

    #[test]
    fn each_rewind_goes_further_back_then_to_the_start_of_the_log() {
        let mut p = Positions::restored(vec![("g".into(), 0, 100_000)]);
        let mut targets = Vec::new();
        loop {
            match p.advance("g", 0, 100_500) {
                Step::Rewind(to) => targets.push(to),
                other => {
                    // Retention deleted everything before 100 500: a real
                    // gap, applied once the start of the log was tried.
                    assert_eq!(other, Step::Gap(500));
                    break;
                }
            }
        }
        assert_eq!(
            targets,
            vec![
                100_000 - 1024,
                100_000 - 4096,
                100_000 - 16_384,
                100_000 - 65_536,
                0
            ]
        );
        assert_eq!(p.get("g", 0), Some(100_501));
        // The next resume past the position rewinds afresh.
        p.reassigned("g", 0);
        assert_eq!(p.advance("g", 0, 100_700), Step::Rewind(100_501 - 1024));
    }

    #[test]
    fn a_short_position_rewinds_to_the_start_at_once() {
        let mut p = Positions::restored(vec![("g".into(), 1, 300)]);
        assert_eq!(p.advance("g", 1, 400), Step::Rewind(0));
        assert_eq!(p.advance("g", 1, 400), Step::Gap(100));
    }

    #[test]
    fn a_gap_inside_a_sequential_read_is_real() {
        let mut p = Positions::restored(vec![("g".into(), 0, 50)]);
        assert_eq!(p.advance("g", 0, 40), Step::Redelivered);
        // The broker read on from 40 and stepped over 50..60 by itself.
        assert_eq!(p.advance("g", 0, 60), Step::Gap(10));
        assert_eq!(p.get("g", 0), Some(61));
    }
}
