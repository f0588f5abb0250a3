//! Event-time windows and the watermark. Pure: the wall clock is an argument.
//!
//! The watermark is `max event time seen − allowed lateness`. When no input
//! has arrived for `idle_timeout` (wall clock), it follows the wall clock
//! instead (`wall − allowed lateness`, never moving backwards), so a finished
//! replay or a quiet stream still closes its windows and expires its state.

/// Start of the tumbling window of `size_ms` that contains `ts`.
#[inline]
pub fn window_start(ts: i64, size_ms: i64) -> i64 {
    ts.div_euclid(size_ms) * size_ms
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

    /// Records input with event time `event_ms` that arrived at `wall_ms`.
    #[inline]
    pub fn observe(&mut self, event_ms: i64, wall_ms: i64) {
        self.max_event_ms = Some(self.max_event_ms.map_or(event_ms, |m| m.max(event_ms)));
        self.last_input_wall_ms = Some(wall_ms);
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
        let wm = match (self.emitted, candidate) {
            (Some(e), Some(c)) => Some(e.max(c)),
            (e, c) => e.or(c),
        };
        self.emitted = wm;
        wm
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
}
