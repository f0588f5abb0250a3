//! Event-time windows and the watermark. Pure: the wall clock is an argument.
//!
//! The watermark follows every partition of the predictions topic (a
//! [`Source`]) on its own:
//! it is `min over active sources of (max event time seen in the source) −
//! allowed lateness`, the rule of Flink and Kafka Streams. A replay of a
//! backlog in which the broker serves one partition an hour of event time
//! ahead of the others therefore makes nothing late: an event is late only
//! if it is older than the lateness relative to events of its *own*
//! partition. (A single maximum over all inputs, the rule before, made
//! three of four partitions late in such a replay.)
//!
//! Only partitions of the predictions topic hold the watermark back: label
//! timestamps may be anything from the time of the prediction to days
//! after it, and a window's drift, integrity and volume depend on
//! predictions alone. Labels count as input (for idleness), never as
//! event time: the watermark follows predictions only.
//!
//! A source is active until it has had no input for `idle_timeout` (wall
//! clock); when the caller says it has a backlog (unread messages, known
//! from the broker's high watermark, and assumed for a partition just
//! assigned), for ten times that and at least five minutes: a partition
//! the broker is slow to serve holds the watermark back instead of being
//! left behind. A source
//! the caller announced ([`Watermark::assign`]) but that has delivered
//! nothing yet holds the watermark back until it is idle. When every source
//! is idle, the watermark follows the wall clock instead (`wall − allowed
//! lateness`, never moving backwards), so a finished replay or a quiet
//! stream still closes its windows and expires its state.
//!
//! The idle timers start with the first input a process sees: before it
//! (a consumer still joining its group, a broker not yet answering) nothing
//! is idle, so a restart in the middle of a replay of old events does not
//! close every window and expire every prediction by the wall clock.
//! Checkpoints keep the event-time state ([`WatermarkState`]) but not the
//! wall-clock times of the last inputs ([`Watermark::restored`]).

use serde::{Deserialize, Serialize};

/// Start of the tumbling window of `size_ms` that contains `ts`.
#[inline]
pub fn window_start(ts: i64, size_ms: i64) -> i64 {
    ts.div_euclid(size_ms) * size_ms
}

/// One input partition: of the predictions topic or of the labels topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Source {
    /// The labels (ground-truth) topic, not the predictions topic.
    pub labels: bool,
    /// The partition number.
    pub partition: i32,
}

impl Source {
    /// Partition `partition` of the predictions topic.
    pub fn predictions(partition: i32) -> Self {
        Source {
            labels: false,
            partition,
        }
    }

    /// Partition `partition` of the labels topic.
    pub fn labels(partition: i32) -> Self {
        Source {
            labels: true,
            partition,
        }
    }
}

/// The event-time state of a [`Watermark`], as stored in a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatermarkState {
    /// The newest event time seen, over every source.
    pub max_event_ms: Option<i64>,
    /// The highest watermark handed out.
    pub emitted: Option<i64>,
    /// The sources read, with the newest event time seen in each (`None`:
    /// assigned, nothing seen yet). Absent from checkpoints written before
    /// per-source watermarks: they restore with none.
    #[serde(default)]
    pub sources: Vec<(Source, Option<i64>)>,
}

/// A source with unread messages counts as idle only after this many idle
/// timeouts without input, and not before [`BACKLOG_IDLE_MIN_MS`]: long
/// enough for a broker that serves one partition after another, bounded
/// because a backlog that never drains (a transaction marker after the
/// last message, records a `read_committed` consumer never gets) must not
/// hold windows open forever.
pub const BACKLOG_IDLE_FACTOR: i64 = 10;

/// See [`BACKLOG_IDLE_FACTOR`]: five minutes.
pub const BACKLOG_IDLE_MIN_MS: i64 = 300_000;

/// What the watermark knows of one source.
#[derive(Debug, Clone, Copy)]
struct Clock {
    source: Source,
    max_event_ms: Option<i64>,
    last_input_wall_ms: Option<i64>,
    /// The caller knows of unread messages: never idle.
    backlog: bool,
}

/// Tracks the watermark over the input partitions of both topics.
#[derive(Debug, Clone)]
pub struct Watermark {
    lateness_ms: i64,
    idle_timeout_ms: i64,
    max_event_ms: Option<i64>,
    /// The first input of this process: the idle timer of a source that
    /// has delivered nothing since starts there.
    first_input_wall_ms: Option<i64>,
    /// The last input of any kind (with or without an event time).
    last_input_wall_ms: Option<i64>,
    /// A handful per instance: searched linearly, the last one used first.
    clocks: Vec<Clock>,
    last_clock: usize,
    /// The highest watermark handed out: it never goes backwards.
    emitted: Option<i64>,
    /// The caller declared the input finished ([`Watermark::end_input`]).
    ended: bool,
}

impl Watermark {
    /// A watermark with no input seen yet.
    pub fn new(lateness_ms: i64, idle_timeout_ms: i64) -> Self {
        Watermark {
            lateness_ms,
            idle_timeout_ms,
            max_event_ms: None,
            first_input_wall_ms: None,
            last_input_wall_ms: None,
            clocks: Vec::new(),
            last_clock: 0,
            emitted: None,
            ended: false,
        }
    }

    /// A watermark with the event-time state of a checkpoint. The idle
    /// timers start again with the first input after the restart (see the
    /// module docs). A state with nothing seen gives [`Watermark::new`].
    pub fn restored(lateness_ms: i64, idle_timeout_ms: i64, state: WatermarkState) -> Self {
        let mut w = Watermark::new(lateness_ms, idle_timeout_ms);
        w.max_event_ms = state.max_event_ms;
        w.emitted = state.emitted;
        // Nothing is known of the backlogs after a restart (there usually
        // is one): each source holds the watermark back until it delivers,
        // the caller says it has no backlog, or the backlog timeout.
        w.clocks = state
            .sources
            .into_iter()
            .map(|(source, max)| Clock {
                source,
                max_event_ms: max,
                last_input_wall_ms: None,
                backlog: true,
            })
            .collect();
        w
    }

    /// The event-time state, for a checkpoint (see [`Watermark::restored`]).
    pub fn state(&self) -> WatermarkState {
        let mut sources: Vec<(Source, Option<i64>)> = self
            .clocks
            .iter()
            .map(|c| (c.source, c.max_event_ms))
            .collect();
        sources.sort_unstable();
        WatermarkState {
            max_event_ms: self.max_event_ms,
            emitted: self.emitted,
            sources,
        }
    }

    fn clock(&mut self, source: Source) -> &mut Clock {
        let i = match self.clocks.get(self.last_clock) {
            Some(c) if c.source == source => self.last_clock,
            _ => match self.clocks.iter().position(|c| c.source == source) {
                Some(i) => i,
                None => {
                    self.clocks.push(Clock {
                        source,
                        max_event_ms: None,
                        last_input_wall_ms: None,
                        backlog: false,
                    });
                    self.clocks.len() - 1
                }
            },
        };
        self.last_clock = i;
        &mut self.clocks[i]
    }

    /// Records input from `source` with event time `event_ms` that arrived
    /// at `wall_ms`.
    #[inline]
    pub fn observe(&mut self, source: Source, event_ms: i64, wall_ms: i64) {
        self.touch(wall_ms);
        if source.labels {
            // Labels count as input, never as event time: a label may be
            // dated days after its prediction, and moving the watermark to
            // it while the predictions pause would make them late.
            return;
        }
        self.max_event_ms = Some(self.max_event_ms.map_or(event_ms, |m| m.max(event_ms)));
        let c = self.clock(source);
        c.max_event_ms = Some(c.max_event_ms.map_or(event_ms, |m| m.max(event_ms)));
        c.last_input_wall_ms = Some(wall_ms);
    }

    /// Records that input arrived (e.g. an undecodable message) without an
    /// event time. It keeps the input as a whole from being idle, not any
    /// source: a partition of nothing but garbage holds no window open.
    pub fn touch(&mut self, wall_ms: i64) {
        self.last_input_wall_ms = Some(wall_ms);
        self.first_input_wall_ms.get_or_insert(wall_ms);
    }

    /// The caller now reads exactly these sources (a Kafka assignment):
    /// others stop holding the watermark back. Until the caller says
    /// otherwise ([`Watermark::set_backlog`]) each is taken to have a
    /// backlog (nothing is known of it yet), so one that has delivered
    /// nothing holds the watermark back until it delivers, or for the
    /// bounded backlog timeout.
    pub fn assign(&mut self, sources: impl IntoIterator<Item = Source>) {
        let sources: Vec<Source> = sources.into_iter().filter(|s| !s.labels).collect();
        self.clocks.retain(|c| sources.contains(&c.source));
        self.last_clock = 0;
        for s in sources {
            self.clock(s).backlog = true;
        }
    }

    /// The caller no longer reads these sources (a partition revoked): they
    /// stop holding the watermark back.
    pub fn revoke(&mut self, sources: &[Source]) {
        self.clocks.retain(|c| !sources.contains(&c.source));
        self.last_clock = 0;
    }

    /// Whether `source` (read now: seen or assigned) has unread messages
    /// (from the broker's high watermark): a source with a backlog is idle
    /// only after [`BACKLOG_IDLE_FACTOR`] times the idle timeout without
    /// input.
    pub fn set_backlog(&mut self, source: Source, backlog: bool) {
        if let Some(c) = self.clocks.iter_mut().find(|c| c.source == source) {
            c.backlog = backlog;
        }
    }

    /// The process was busy for `ms` without reading input (writing output,
    /// checkpointing): that time does not count towards the idle timeout.
    pub fn pause(&mut self, ms: i64) {
        let ms = ms.max(0);
        let later = |t: &mut Option<i64>| {
            if let Some(t) = t {
                *t = t.saturating_add(ms);
            }
        };
        later(&mut self.last_input_wall_ms);
        later(&mut self.first_input_wall_ms);
        for c in &mut self.clocks {
            later(&mut c.last_input_wall_ms);
        }
    }

    /// The caller knows at `wall_ms` that there is nothing to read (the
    /// broker reports no unread message on any input partition): if no
    /// input came since the process started (a restart after the input
    /// ended), the idle timers start now, as if input had just arrived.
    /// Without it a restored watermark would wait for the next message to
    /// start them, and the windows the state holds would stay open until
    /// new input comes.
    pub fn start_idle_clock(&mut self, wall_ms: i64) {
        if self.first_input_wall_ms.is_none() {
            self.touch(wall_ms);
        }
    }

    /// The caller has decided the input is finished (a replay run until
    /// idle, about to exit): from now on every source is idle and the
    /// watermark follows the wall clock, whatever backlog the caller
    /// reported. Without it the last advance before an exit would depend
    /// on which of two timers fired first.
    pub fn end_input(&mut self) {
        self.ended = true;
    }

    /// The newest event time seen.
    pub fn max_event_ms(&self) -> Option<i64> {
        self.max_event_ms
    }

    /// The watermark at wall-clock time `wall_ms`, or `None` before any input.
    pub fn current(&mut self, wall_ms: i64) -> Option<i64> {
        let wm = self.peek(wall_ms);
        self.emitted = wm;
        wm
    }

    fn source_idle(&self, c: &Clock, wall_ms: i64) -> bool {
        if self.ended {
            return true;
        }
        let timeout = if c.backlog {
            (BACKLOG_IDLE_FACTOR * self.idle_timeout_ms).max(BACKLOG_IDLE_MIN_MS)
        } else {
            self.idle_timeout_ms
        };
        c.last_input_wall_ms
            .or(self.first_input_wall_ms)
            .is_some_and(|last| wall_ms - last >= timeout)
    }

    /// The sources holding the watermark back at `wall_ms` (active ones
    /// with the oldest event time, or active ones with none yet).
    pub fn holding(&self, wall_ms: i64) -> Vec<Source> {
        let active: Vec<&Clock> = self
            .clocks
            .iter()
            .filter(|c| !self.source_idle(c, wall_ms))
            .collect();
        let oldest = active.iter().map(|c| c.max_event_ms).min().flatten();
        active
            .iter()
            .filter(|c| c.max_event_ms.is_none() || c.max_event_ms == oldest)
            .map(|c| c.source)
            .collect()
    }

    /// What [`Watermark::current`] would return at `wall_ms`, without moving it.
    pub fn peek(&self, wall_ms: i64) -> Option<i64> {
        // The oldest event time over the active sources; `Some(None)` when
        // an active source has delivered nothing yet.
        let mut active: Option<Option<i64>> = None;
        for c in &self.clocks {
            if !self.source_idle(c, wall_ms) {
                let m = c.max_event_ms;
                active = Some(match active {
                    None => m,
                    Some(a) => a.zip(m).map(|(a, m)| a.min(m)),
                });
            }
        }
        let candidate = match active {
            Some(oldest) => oldest.map(|m| m - self.lateness_ms),
            None => {
                let by_events = self.max_event_ms.map(|m| m - self.lateness_ms);
                if self.is_idle(wall_ms) {
                    let by_wall = wall_ms - self.lateness_ms;
                    Some(by_events.map_or(by_wall, |e| e.max(by_wall)))
                } else {
                    by_events
                }
            }
        };
        match (self.emitted, candidate) {
            (Some(e), Some(c)) => Some(e.max(c)),
            (e, c) => e.or(c),
        }
    }

    /// True when the input as a whole has been idle for the idle timeout.
    pub fn is_idle(&self, wall_ms: i64) -> bool {
        self.ended
            || self
                .last_input_wall_ms
                .is_some_and(|last| wall_ms - last >= self.idle_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P0: Source = Source {
        labels: false,
        partition: 0,
    };

    /// Issue #11: a restart after the input ended, with nothing to read,
    /// closes what is due after the idle timeout, as an uninterrupted run
    /// would; without the broker's word it waits for input.
    #[test]
    fn a_restart_with_nothing_to_read_goes_idle_from_the_confirmation() {
        let state = WatermarkState {
            max_event_ms: Some(1_000_000),
            emitted: Some(970_000),
            sources: vec![(P0, Some(1_000_000))],
        };
        let wall = 50_000_000;
        let mut waiting = Watermark::restored(30_000, 60_000, state.clone());
        assert_eq!(waiting.current(wall + 3_600_000), Some(970_000));
        let mut w = Watermark::restored(30_000, 60_000, state);
        w.set_backlog(P0, false);
        w.start_idle_clock(wall);
        assert_eq!(w.current(wall + 59_999), Some(970_000));
        assert_eq!(w.current(wall + 60_000), Some(wall + 60_000 - 30_000));
        // Input that came first keeps its own clock.
        let mut fed = Watermark::new(30_000, 60_000);
        fed.observe(P0, 2_000_000, wall);
        fed.start_idle_clock(wall + 50_000);
        assert!(fed.is_idle(wall + 60_000));
    }

    #[test]
    fn window_start_floors_including_negative_times() {
        assert_eq!(window_start(0, 300_000), 0);
        assert_eq!(window_start(299_999, 300_000), 0);
        assert_eq!(window_start(300_000, 300_000), 300_000);
        assert_eq!(window_start(-1, 1000), -1000);
    }

    #[test]
    fn watermark_trails_the_max_event_time_by_the_lateness() {
        let mut w = Watermark::new(30_000, 60_000);
        assert_eq!(w.current(0), None);
        w.observe(P0, 1_000_000, 5);
        w.observe(P0, 900_000, 6); // out of order: does not move it back
        assert_eq!(w.current(10), Some(970_000));
        w.observe(P0, 1_100_000, 20);
        assert_eq!(w.current(30), Some(1_070_000));
    }

    #[test]
    fn idle_input_follows_the_wall_clock_and_never_goes_back() {
        let mut w = Watermark::new(30_000, 60_000);
        // A replay of old data: event times far behind the wall clock.
        let wall = 10_000_000_000;
        w.observe(P0, 1_000_000, wall);
        assert_eq!(w.current(wall + 59_999), Some(970_000));
        assert!(!w.is_idle(wall + 59_999));
        assert_eq!(w.current(wall + 60_000), Some(wall + 60_000 - 30_000));
        assert!(w.is_idle(wall + 60_000));
        // New (old) input makes it non-idle, but the watermark stays put.
        w.observe(P0, 1_000_001, wall + 70_000);
        assert_eq!(w.current(wall + 70_001), Some(wall + 30_000));
    }

    #[test]
    fn restored_keeps_event_time_and_restarts_the_idle_timer() {
        let (lateness, idle) = (30_000, 60_000);
        let mut w = Watermark::new(lateness, idle);
        let wall = 10_000_000_000;
        w.observe(P0, 1_000_000, wall);
        w.observe(P0, 1_200_000, wall + 1);
        assert_eq!(w.current(wall + 2), Some(1_170_000));
        let state = w.state();
        assert_eq!(
            state,
            WatermarkState {
                max_event_ms: Some(1_200_000),
                emitted: Some(1_170_000),
                sources: vec![(P0, Some(1_200_000))],
            }
        );
        let bytes = rmp_serde::to_vec(&state).unwrap();
        let state: WatermarkState = rmp_serde::from_slice(&bytes).unwrap();
        // Restarted an hour later: not idle, however long the consumer
        // takes to get its first message.
        let restart = wall + 3_600_000;
        let mut r = Watermark::restored(lateness, idle, state.clone());
        assert_eq!(r.max_event_ms(), Some(1_200_000));
        assert!(!r.is_idle(restart + 10 * idle));
        assert_eq!(r.current(restart + 10 * idle), Some(1_170_000));
        // The first input starts the idle timer (and the caller learns
        // that the partition has no backlog left).
        let first = restart + 10 * idle;
        r.observe(P0, 1_300_000, first);
        assert_eq!(r.current(first + 1), Some(1_270_000));
        assert_eq!(
            r.current(first + idle),
            Some(1_270_000),
            "a backlog is assumed"
        );
        r.set_backlog(P0, false);
        assert!(!r.is_idle(first + idle - 1));
        assert!(r.is_idle(first + idle));
        assert_eq!(r.current(first + idle), Some(first + idle - lateness));
        assert_eq!(r.state().max_event_ms, Some(1_300_000));
    }

    #[test]
    fn restored_never_goes_behind_the_emitted_watermark() {
        // The stored watermark followed the wall clock past the event times.
        let state = WatermarkState {
            max_event_ms: Some(1_000),
            emitted: Some(50_000),
            sources: vec![],
        };
        let mut r = Watermark::restored(0, 60_000, state);
        assert_eq!(r.current(100_001), Some(50_000));
        r.observe(P0, 2_000, 100_002);
        assert_eq!(r.current(100_003), Some(50_000));
    }

    #[test]
    fn busy_time_is_not_idle_time() {
        let mut w = Watermark::new(0, 1_000);
        w.observe(P0, 5_000, 100);
        w.pause(10_000);
        assert!(
            !w.is_idle(10_100 + 999),
            "the 10 s spent writing do not count"
        );
        assert_eq!(w.current(10_100 + 999), Some(5_000));
        assert!(w.is_idle(10_100 + 1_000));
    }

    #[test]
    fn restoring_an_empty_state_is_a_new_watermark() {
        let mut r = Watermark::restored(0, 10, WatermarkState::default());
        assert_eq!(r.current(1_000), None);
        assert!(!r.is_idle(1_000));
        assert_eq!(r.state(), WatermarkState::default());
    }

    const P1: Source = Source {
        labels: false,
        partition: 1,
    };

    #[test]
    fn a_partition_served_ahead_of_the_others_makes_nothing_late() {
        // A backlog replay: the broker serves partition 0 an hour of event
        // time ahead of partition 1.
        let mut w = Watermark::new(60_000, 30_000);
        let hour = 3_600_000;
        w.observe(P0, 10 * hour, 1);
        w.observe(P1, 9 * hour, 2);
        w.observe(P0, 11 * hour, 3);
        assert_eq!(
            w.current(4),
            Some(9 * hour - 60_000),
            "the slower partition rules"
        );
        assert_eq!(w.holding(4), vec![P1]);
        w.observe(P1, 9 * hour + 30 * 60_000, 5);
        assert_eq!(w.current(6), Some(9 * hour + 29 * 60_000));
        // Partition 0 is done (idle, no backlog): partition 1 alone rules.
        w.observe(P1, 10 * hour, 30_003);
        assert_eq!(w.current(30_004), Some(10 * hour - 60_000));
        // Both idle: the newest event time (or the wall clock), as before.
        assert_eq!(w.current(60_003), Some(11 * hour - 60_000));
        assert_eq!(w.max_event_ms(), Some(11 * hour));
    }

    #[test]
    fn a_partition_with_a_backlog_is_never_idle() {
        let mut w = Watermark::new(0, 1_000);
        w.observe(P0, 50_000, 0);
        w.observe(P1, 10_000, 0);
        w.set_backlog(P1, true);
        // The broker does not serve partition 1 for a while: it still
        // holds the watermark back, so its backlog will not be late.
        assert_eq!(w.current(BACKLOG_IDLE_MIN_MS - 1), Some(10_000));
        assert_eq!(w.holding(BACKLOG_IDLE_MIN_MS - 1), vec![P1]);
        // Not forever: a backlog that never drains is given up on.
        assert_eq!(
            w.current(BACKLOG_IDLE_MIN_MS),
            Some(BACKLOG_IDLE_MIN_MS),
            "all idle"
        );
        w.set_backlog(P1, false);
        assert_eq!(
            w.current(BACKLOG_IDLE_MIN_MS + 1),
            Some(BACKLOG_IDLE_MIN_MS + 1)
        );
        // Only sources read now take a backlog.
        w.set_backlog(Source::predictions(7), true);
        assert_eq!(w.state().sources.len(), 2);
    }

    #[test]
    fn an_ended_input_follows_the_wall_clock_whatever_the_backlog() {
        let mut w = Watermark::new(1_000, 5_000);
        w.observe(P0, 50_000, 0);
        w.observe(P1, 10_000, 0);
        w.set_backlog(P1, true);
        // One second after the last input: partition 1 holds the watermark.
        assert_eq!(w.current(1_000), Some(9_000));
        assert!(!w.is_idle(1_000));
        w.end_input();
        // Declared over: every source is idle at once, the wall clock rules
        // (and the event time, where it is ahead of the wall clock).
        assert!(w.is_idle(1_000));
        assert!(w.holding(1_000).is_empty());
        assert_eq!(w.current(1_000), Some(49_000));
        assert_eq!(w.current(80_000), Some(79_000));
    }

    #[test]
    fn an_assigned_partition_holds_the_watermark_until_it_delivers_or_is_idle() {
        let mut w = Watermark::new(0, 1_000);
        w.assign([P0, P1, Source::labels(0)]);
        // The caller learnt that neither has a backlog.
        w.set_backlog(P0, false);
        w.set_backlog(P1, false);
        w.observe(P0, 50_000, 100);
        assert_eq!(
            w.current(200),
            None,
            "partition 1 has delivered nothing yet"
        );
        assert_eq!(w.holding(200), vec![P1]);
        // Idle timers of silent partitions start with the first input.
        w.observe(P0, 60_000, 1_000);
        assert_eq!(w.current(1_100), Some(60_000), "partition 1 is idle now");
        // With a backlog (or before anything is known) it holds on.
        let mut b = Watermark::new(0, 1_000);
        b.assign([P0, P1]);
        b.set_backlog(P0, false);
        b.observe(P0, 50_000, 100);
        assert_eq!(b.current(5_000), None);
        assert_eq!(b.holding(5_000), vec![P1]);
        b.observe(P1, 40_000, 5_001);
        assert_eq!(b.current(5_002), Some(40_000));
        // A revoked partition no longer holds it back.
        b.revoke(&[P1]);
        assert_eq!(b.current(5_003), Some(50_000));
        // An assignment is complete: a partition left out of it is revoked.
        b.observe(P1, 1_000, 5_004);
        b.assign([P0]);
        assert_eq!(b.holding(5_005), vec![P0]);
    }

    #[test]
    fn labels_do_not_hold_the_watermark_back() {
        let mut w = Watermark::new(0, 1_000);
        w.observe(P0, 50_000, 0);
        // Label timestamps set to the prediction's time, days back.
        w.observe(Source::labels(0), 1_000, 0);
        assert_eq!(w.current(1), Some(50_000));
        w.observe(Source::labels(0), 90_000, 2);
        assert_eq!(w.current(3), Some(50_000));
        assert_eq!(w.max_event_ms(), Some(50_000));
        assert_eq!(w.state().sources, vec![(P0, Some(50_000))]);
        // The predictions pause (P0 idle) while labels dated later go on:
        // the watermark does not move to the labels' time.
        w.observe(Source::labels(0), 95_000, 1_100);
        assert_eq!(w.current(1_500), Some(50_000));
        // Once the whole input is idle, the wall clock moves it.
        assert_eq!(w.current(60_000), Some(60_000));
    }

    #[test]
    fn per_partition_event_times_survive_a_checkpoint() {
        let mut w = Watermark::new(0, 1_000);
        let p2 = Source::predictions(2);
        w.assign([P0, P1, p2]);
        w.observe(P1, 20_000, 0);
        w.observe(P0, 70_000, 0);
        let state = w.state();
        assert_eq!(
            state.sources,
            vec![(P0, Some(70_000)), (P1, Some(20_000)), (p2, None)]
        );
        let bytes = rmp_serde::to_vec(&state).unwrap();
        let mut r = Watermark::restored(0, 1_000, rmp_serde::from_slice(&bytes).unwrap());
        // Partition 2 delivered nothing before the checkpoint: after the
        // restart it still holds the watermark back, before any input and
        // after (its backlog is unknown), until the caller knows better.
        assert_eq!(r.current(10), None);
        r.observe(P1, 30_000, 20);
        r.observe(P0, 80_000, 20);
        assert_eq!(r.current(5_000), None);
        r.set_backlog(p2, false);
        assert_eq!(r.current(5_000), Some(30_000));
        // The assignment after the restart no longer has partition 1.
        r.assign([P0, p2]);
        r.set_backlog(p2, false);
        assert_eq!(r.current(5_001), Some(80_000));
        // A checkpoint from before per-partition event times.
        #[derive(Serialize)]
        struct Old {
            max_event_ms: Option<i64>,
            emitted: Option<i64>,
        }
        let old = rmp_serde::to_vec(&Old {
            max_event_ms: Some(5),
            emitted: Some(4),
        })
        .unwrap();
        let state: WatermarkState = rmp_serde::from_slice(&old).unwrap();
        assert_eq!(
            state,
            WatermarkState {
                max_event_ms: Some(5),
                emitted: Some(4),
                sources: vec![]
            }
        );
    }
}
