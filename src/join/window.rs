//! Event-time windows and the watermark. Pure: the wall clock is an argument.
//!
//! The watermark is `max event time seen − allowed lateness`. When no input
//! has arrived for `idle_timeout` (wall clock), it follows the wall clock
//! instead (`wall − allowed lateness`, never moving backwards), so a finished
//! replay or a quiet stream still closes its windows and expires its state.
//!
//! The idle timer starts with the first input a process sees: before it
//! (a consumer still joining its group, a broker not yet answering) nothing
//! is idle, so a restart in the middle of a replay of old events does not
//! close every window and expire every prediction by the wall clock.
//! Checkpoints keep the event-time state ([`WatermarkState`]) but not the
//! wall-clock time of the last input ([`Watermark::restored`]).

use serde::{Deserialize, Serialize};

/// Start of the tumbling window of `size_ms` that contains `ts`.
#[inline]
pub fn window_start(ts: i64, size_ms: i64) -> i64 {
    ts.div_euclid(size_ms) * size_ms
}

/// The event-time state of a [`Watermark`], as stored in a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatermarkState {
    /// The newest event time seen.
    pub max_event_ms: Option<i64>,
    /// The highest watermark handed out.
    pub emitted: Option<i64>,
}

/// Tracks the watermark over both input streams.
#[derive(Debug, Clone)]
pub struct Watermark {
    lateness_ms: i64,
    idle_timeout_ms: i64,
    max_event_ms: Option<i64>,
    last_input_wall_ms: Option<i64>,
    /// The highest watermark handed out: it never goes backwards.
    emitted: Option<i64>,
}

impl Watermark {
    /// A watermark with no input seen yet.
    pub fn new(lateness_ms: i64, idle_timeout_ms: i64) -> Self {
        Watermark {
            lateness_ms,
            idle_timeout_ms,
            max_event_ms: None,
            last_input_wall_ms: None,
            emitted: None,
        }
    }

    /// A watermark with the event-time state of a checkpoint. The idle
    /// timer starts again with the first input after the restart (see the
    /// module docs). A state with nothing seen gives [`Watermark::new`].
    pub fn restored(lateness_ms: i64, idle_timeout_ms: i64, state: WatermarkState) -> Self {
        Watermark {
            lateness_ms,
            idle_timeout_ms,
            max_event_ms: state.max_event_ms,
            last_input_wall_ms: None,
            emitted: state.emitted,
        }
    }

    /// The event-time state, for a checkpoint (see [`Watermark::restored`]).
    pub fn state(&self) -> WatermarkState {
        WatermarkState {
            max_event_ms: self.max_event_ms,
            emitted: self.emitted,
        }
    }

    /// Records input with event time `event_ms` that arrived at `wall_ms`.
    #[inline]
    pub fn observe(&mut self, event_ms: i64, wall_ms: i64) {
        self.max_event_ms = Some(self.max_event_ms.map_or(event_ms, |m| m.max(event_ms)));
        self.last_input_wall_ms = Some(wall_ms);
    }

    /// The process was busy for `ms` without reading input (writing output,
    /// checkpointing): that time does not count towards the idle timeout.
    pub fn pause(&mut self, ms: i64) {
        if let Some(last) = &mut self.last_input_wall_ms {
            *last = last.saturating_add(ms.max(0));
        }
    }

    /// Records that input arrived (e.g. an undecodable message) without an event time.
    pub fn touch(&mut self, wall_ms: i64) {
        self.last_input_wall_ms = Some(wall_ms);
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

    /// What [`Watermark::current`] would return at `wall_ms`, without moving it.
    pub fn peek(&self, wall_ms: i64) -> Option<i64> {
        let by_events = self.max_event_ms.map(|m| m - self.lateness_ms);
        let idle = match self.last_input_wall_ms {
            Some(last) => wall_ms - last >= self.idle_timeout_ms,
            None => false,
        };
        let candidate = if idle {
            let by_wall = wall_ms - self.lateness_ms;
            Some(by_events.map_or(by_wall, |e| e.max(by_wall)))
        } else {
            by_events
        };
        match (self.emitted, candidate) {
            (Some(e), Some(c)) => Some(e.max(c)),
            (e, c) => e.or(c),
        }
    }

    /// True when the input has been idle for the idle timeout.
    pub fn is_idle(&self, wall_ms: i64) -> bool {
        self.last_input_wall_ms
            .is_some_and(|last| wall_ms - last >= self.idle_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        w.observe(1_000_000, 5);
        w.observe(900_000, 6); // out of order: does not move it back
        assert_eq!(w.current(10), Some(970_000));
        w.observe(1_100_000, 20);
        assert_eq!(w.current(30), Some(1_070_000));
    }

    #[test]
    fn idle_input_follows_the_wall_clock_and_never_goes_back() {
        let mut w = Watermark::new(30_000, 60_000);
        // A replay of old data: event times far behind the wall clock.
        let wall = 10_000_000_000;
        w.observe(1_000_000, wall);
        assert_eq!(w.current(wall + 59_999), Some(970_000));
        assert!(!w.is_idle(wall + 59_999));
        assert_eq!(w.current(wall + 60_000), Some(wall + 60_000 - 30_000));
        assert!(w.is_idle(wall + 60_000));
        // New (old) input makes it non-idle, but the watermark stays put.
        w.observe(1_000_001, wall + 70_000);
        assert_eq!(w.current(wall + 70_001), Some(wall + 30_000));
    }

    #[test]
    fn restored_keeps_event_time_and_restarts_the_idle_timer() {
        let (lateness, idle) = (30_000, 60_000);
        let mut w = Watermark::new(lateness, idle);
        let wall = 10_000_000_000;
        w.observe(1_000_000, wall);
        w.observe(1_200_000, wall + 1);
        assert_eq!(w.current(wall + 2), Some(1_170_000));
        let state = w.state();
        assert_eq!(
            state,
            WatermarkState {
                max_event_ms: Some(1_200_000),
                emitted: Some(1_170_000)
            }
        );
        let bytes = rmp_serde::to_vec(&state).unwrap();
        let state: WatermarkState = rmp_serde::from_slice(&bytes).unwrap();
        // Restarted an hour later: not idle, however long the consumer
        // takes to get its first message.
        let restart = wall + 3_600_000;
        let mut r = Watermark::restored(lateness, idle, state);
        assert_eq!(r.max_event_ms(), Some(1_200_000));
        assert!(!r.is_idle(restart + 10 * idle));
        assert_eq!(r.current(restart + 10 * idle), Some(1_170_000));
        // The first input starts the idle timer.
        let first = restart + 10 * idle;
        r.observe(1_300_000, first);
        assert_eq!(r.current(first + 1), Some(1_270_000));
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
        };
        let mut r = Watermark::restored(0, 60_000, state);
        assert_eq!(r.current(100_001), Some(50_000));
        r.observe(2_000, 100_002);
        assert_eq!(r.current(100_003), Some(50_000));
    }

    #[test]
    fn busy_time_is_not_idle_time() {
        let mut w = Watermark::new(0, 1_000);
        w.observe(5_000, 100);
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
}
