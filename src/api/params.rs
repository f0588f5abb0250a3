//! Query-string parameters of the API: parsed by hand so that every bad
//! value gets a 400 naming the parameter, what was given and what is
//! expected. Pure.

use std::collections::HashMap;

/// A bad request: the message goes to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// The query parameters of one request.
#[derive(Debug, Clone, Default)]
pub struct Params(HashMap<String, String>);

impl Params {
    /// Wraps parsed query parameters; rejects any not in `allowed`.
    pub fn new(map: HashMap<String, String>, allowed: &[&str]) -> Result<Self, BadRequest> {
        let mut unknown: Vec<&str> = map
            .keys()
            .map(String::as_str)
            .filter(|k| !allowed.contains(k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(BadRequest(format!(
                "unknown query parameter {}: expected one of {}",
                unknown.join(", "),
                allowed.join(", ")
            )));
        }
        Ok(Params(map))
    }

    /// An optional string; empty counts as given (segment `''` is meaningful).
    pub fn str(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A required non-empty string.
    pub fn required(&self, name: &str) -> Result<&str, BadRequest> {
        match self.str(name) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(BadRequest(format!("missing query parameter {name}"))),
        }
    }

    /// An optional non-empty string (empty = absent).
    pub fn non_empty(&self, name: &str) -> Option<&str> {
        self.str(name).filter(|v| !v.is_empty())
    }

    /// An optional comma-separated list of non-empty items.
    pub fn list(&self, name: &str) -> Option<Vec<String>> {
        self.non_empty(name).map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
    }

    /// An optional time: unix seconds or an RFC 3339 timestamp.
    pub fn time(&self, name: &str) -> Result<Option<u32>, BadRequest> {
        self.non_empty(name)
            .map(|v| parse_time(v).map_err(|e| BadRequest(format!("invalid {name} {v:?}: {e}"))))
            .transpose()
    }

    /// An optional unsigned integer within `[min, max]`.
    pub fn uint(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, BadRequest> {
        let Some(v) = self.non_empty(name) else {
            return Ok(None);
        };
        match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(BadRequest(format!(
                "invalid {name} {v:?}: expected an integer from {min} to {max}"
            ))),
        }
    }

    /// An optional window size: seconds (`300`) or a duration (`5m`).
    pub fn window(&self, name: &str) -> Result<Option<u32>, BadRequest> {
        let Some(v) = self.non_empty(name) else {
            return Ok(None);
        };
        let secs = v
            .parse::<u64>()
            .ok()
            .or_else(|| humantime::parse_duration(v).ok().map(|d| d.as_secs()));
        match secs {
            Some(s) if s > 0 && s <= u64::from(u32::MAX) => Ok(Some(s as u32)),
            _ => Err(BadRequest(format!(
                "invalid {name} {v:?}: expected a window size in seconds (300) or as a duration (5m)"
            ))),
        }
    }

    /// An optional value from a fixed set.
    pub fn one_of(&self, name: &str, allowed: &[&str]) -> Result<Option<String>, BadRequest> {
        match self.non_empty(name) {
            None => Ok(None),
            Some(v) if allowed.contains(&v) => Ok(Some(v.to_owned())),
            Some(v) => Err(BadRequest(format!(
                "invalid {name} {v:?}: expected one of {}",
                allowed.join(", ")
            ))),
        }
    }
}

/// Unix seconds, or an RFC 3339 time (`2024-05-01T12:00:00Z`).
pub fn parse_time(v: &str) -> Result<u32, String> {
    if let Ok(n) = v.parse::<u64>() {
        return u32::try_from(n).map_err(|_| "beyond the year 2106".to_owned());
    }
    let t = humantime::parse_rfc3339_weak(v).map_err(|_| {
        "expected unix seconds or an RFC 3339 time such as 2024-05-01T12:00:00Z".to_owned()
    })?;
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "before 1970".to_owned())?
        .as_secs();
    u32::try_from(secs).map_err(|_| "beyond the year 2106".to_owned())
}

/// A time range `[from, to)` in unix seconds, at most `max` seconds long
/// (`api.max_range`): with both ends given a longer range is refused
/// naming the limit; with one end given the other is `max` away; with
/// none the range is the `max` seconds before `end`.
pub fn bounded_range(
    from: Option<u32>,
    to: Option<u32>,
    end: u32,
    max: u32,
) -> Result<(u32, u32), BadRequest> {
    let (from, to) = match (from, to) {
        (Some(f), Some(t)) => (f, t),
        (Some(f), None) => (f, f.saturating_add(max)),
        (None, Some(t)) => (t.saturating_sub(max), t),
        (None, None) => (end.saturating_sub(max), end),
    };
    if from >= to {
        return Err(BadRequest(format!(
            "invalid range: from ({from}) must be before to ({to})"
        )));
    }
    if to - from > max {
        let fmt = |s: u32| humantime::format_duration(std::time::Duration::from_secs(u64::from(s)));
        return Err(BadRequest(format!(
            "range too long: from {from} to {to} is {}, more than api.max_range ({}); ask for at most {} per request",
            fmt(to - from),
            fmt(max),
            fmt(max)
        )));
    }
    Ok((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)], allowed: &[&str]) -> Result<Params, BadRequest> {
        Params::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            allowed,
        )
    }

    #[test]
    fn times_windows_and_errors() {
        assert_eq!(parse_time("1700000000"), Ok(1_700_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(1_700_000_000));
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
        let q = p(
            &[("from", "10"), ("to", "5"), ("window", "5m")],
            &["from", "to", "window"],
        )
        .unwrap();
        assert_eq!(q.window("window"), Ok(Some(300)));
        let e = bounded_range(q.time("from").unwrap(), q.time("to").unwrap(), 0, 100).unwrap_err();
        assert!(e.0.contains("from (10) must be before to (5)"), "{e}");
        let e = p(&[("form", "1")], &["from", "to"]).unwrap_err();
        assert_eq!(
            e.0,
            "unknown query parameter form: expected one of from, to"
        );
        let q = p(&[("limit", "0"), ("status", "open")], &["limit", "status"]).unwrap();
        assert!(q
            .uint("limit", 1, 10)
            .unwrap_err()
            .0
            .contains("from 1 to 10"));
        assert!(q
            .one_of("status", &["firing", "resolved"])
            .unwrap_err()
            .0
            .contains("expected one of firing, resolved"));
        assert_eq!(
            q.required("metric").unwrap_err().0,
            "missing query parameter metric"
        );
    }

    #[test]
    fn ranges_are_bounded() {
        let day = 86_400;
        assert_eq!(bounded_range(Some(0), Some(day), 0, day), Ok((0, day)));
        let e = bounded_range(Some(0), Some(day + 1), 0, day).unwrap_err();
        assert_eq!(
            e.0,
            "range too long: from 0 to 86401 is 1day 1s, more than api.max_range (1day); ask for at most 1day per request"
        );
        assert_eq!(bounded_range(Some(10), None, 0, day), Ok((10, 10 + day)));
        assert_eq!(bounded_range(None, Some(10), 0, day), Ok((0, 10)));
        assert_eq!(
            bounded_range(None, None, 5 * day, day),
            Ok((4 * day, 5 * day))
        );
        assert_eq!(
            bounded_range(Some(u32::MAX - 1), None, 0, day),
            Ok((u32::MAX - 1, u32::MAX))
        );
    }
}
