//! Notification payloads: what each kind of webhook receives for an alert.
//! Pure (no I/O): [`crate::sinks::webhook`] sends them.
//!
//! - generic: the `AlertEvent` as JSON (the Avro schema's field names), with
//!   `X-Modelwatch-Timestamp` (Unix seconds) and, when a secret is set,
//!   `X-Modelwatch-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`;
//! - Slack: an incoming-webhook message `{"text": ...}`;
//! - PagerDuty Events API v2: `trigger` / `resolve` with `dedup_key` = alert id;
//! - Jira: a `POST /rest/api/2/issue` body creating one issue per new alert.
//!
//! Identifiers (model, version, segment, feature, rule, message) come from
//! producers, so every one is escaped for the target before it is put in a
//! body: Slack mrkdwn ([`slack_escape`]: no `<!channel>`, no `<url|text>`
//! links), Jira wiki markup ([`jira_escape`]: no links, macros, images or
//! formatting), and bounded to the receiver's field lengths (PagerDuty
//! summary ≤ 1024 chars, other PagerDuty fields ≤ 255; Jira summary ≤ 250,
//! description ≤ 30,000; Slack text ≤ 3,000). Generic webhooks are JSON, which
//! serde escapes.

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::alerting::explain::fmt_time;
use crate::config::{WebhookConfig, WebhookKind};
use crate::model::{AlertEvent, AlertStatus, Severity};

/// Header carrying the signing timestamp (Unix seconds) of a generic webhook.
pub const TIMESTAMP_HEADER: &str = "x-modelwatch-timestamp";
/// Header carrying `sha256=<hex>` of a generic webhook.
pub const SIGNATURE_HEADER: &str = "x-modelwatch-signature";
/// Header carrying the alert id of a generic webhook.
pub const ALERT_ID_HEADER: &str = "x-modelwatch-alert-id";

/// One HTTP request to make: a path appended to the webhook URL, headers, JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Appended to the configured URL (Jira: `/rest/api/2/issue`).
    pub path: &'static str,
    /// Extra headers (content type included).
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body.
    pub body: Vec<u8>,
}

/// `sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>.<body>").
pub fn sign(secret: &[u8], timestamp_s: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; the error branch cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a generic webhook's signature in constant time (for receivers).
pub fn verify(secret: &[u8], timestamp_s: i64, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(bytes) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&bytes).is_ok()
}

/// True when `alert` goes to this webhook (severity, rule filter, resolutions).
pub fn wants(cfg: &WebhookConfig, alert: &AlertEvent) -> bool {
    if alert.severity < cfg.min_severity {
        return false;
    }
    if !cfg.rules.is_empty() && !cfg.rules.contains(&alert.rule) {
        return false;
    }
    match alert.status {
        AlertStatus::Firing => true,
        AlertStatus::Resolved => cfg.send_resolved && cfg.kind != WebhookKind::Jira,
    }
}

/// Longest Slack message text, in chars (Slack truncates beyond 40,000;
/// an alert needs far less).
pub const SLACK_TEXT_MAX: usize = 3000;
/// Longest PagerDuty `summary` (the Events API v2 limit).
pub const PAGERDUTY_SUMMARY_MAX: usize = 1024;
/// Longest other PagerDuty string field (`source`, `component`, `group`, `class`).
pub const PAGERDUTY_FIELD_MAX: usize = 255;
/// Longest Jira summary (Jira's limit).
pub const JIRA_SUMMARY_MAX: usize = 250;
/// Longest Jira description (Jira's limit is 32,767).
pub const JIRA_DESCRIPTION_MAX: usize = 30_000;

/// Text for Slack mrkdwn: `&`, `<` and `>` become entities (Slack's own
/// escaping rule), so producer text cannot form `<!channel>`, `<@user>` or
/// `<url|text>` links.
pub fn slack_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// Text for Jira wiki markup: every markup character is backslash-escaped
/// (links `[a|b]`, macros `{html}`, images `!x!`, mentions `[~user]`,
/// tables `|`, formatting `*_+^~-?#`), and line breaks become spaces so a
/// value cannot start a heading, list or quote.
pub fn jira_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '[' | ']' | '{' | '}' | '|' | '!' | '*' | '_' | '+' | '^' | '~' | '?' | '#'
            | '-' => {
                out.push('\\');
                out.push(c);
            }
            '\r' | '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The first `max` chars of `s`.
fn bounded(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// The alert's one-line title, each identifier passed through `esc`.
fn title(a: &AlertEvent, esc: fn(&str) -> String) -> String {
    let feature = a
        .feature
        .as_deref()
        .map(|f| format!(" feature {}", esc(f)))
        .unwrap_or_default();
    let segment = if a.segment.is_empty() {
        String::new()
    } else {
        format!(" [{}]", esc(&a.segment))
    };
    format!(
        "[{}] {} {}: {} {}/{}{feature}{segment}",
        a.severity.as_str().to_uppercase(),
        a.status.as_str(),
        esc(&a.rule),
        esc(&a.metric),
        esc(&a.model_id),
        esc(&a.model_version)
    )
}

/// Plain text: no escaping (JSON string fields of receivers that render no markup).
fn plain(s: &str) -> String {
    s.to_owned()
}

/// The request for `alert` on a webhook of `kind`. `secret` is the HMAC key
/// (generic) or routing key (PagerDuty); `now_s` the signing time.
pub fn request(
    cfg: &WebhookConfig,
    alert: &AlertEvent,
    secret: Option<&str>,
    now_s: i64,
) -> Request {
    let json_header = ("content-type", "application/json".to_string());
    match cfg.kind {
        WebhookKind::Generic => {
            let body = serde_json::to_vec(alert).unwrap_or_default();
            let mut headers = vec![
                json_header,
                (TIMESTAMP_HEADER, now_s.to_string()),
                (ALERT_ID_HEADER, alert.alert_id.clone()),
            ];
            if let Some(s) = secret.filter(|s| !s.is_empty()) {
                headers.push((SIGNATURE_HEADER, sign(s.as_bytes(), now_s, &body)));
            }
            Request {
                path: "",
                headers,
                body,
            }
        }
        WebhookKind::Slack => {
            let icon = match (alert.status, alert.severity) {
                (AlertStatus::Resolved, _) => ":white_check_mark:",
                (AlertStatus::Firing, Severity::Critical) => ":rotating_light:",
                (AlertStatus::Firing, Severity::Warning) => ":warning:",
            };
            let text = format!(
                "{icon} *{}*\n{}\nalert id `{}`",
                title(alert, slack_escape),
                slack_escape(&alert.message),
                slack_escape(&alert.alert_id)
            );
            let text = bounded(&text, SLACK_TEXT_MAX);
            Request {
                path: "",
                headers: vec![json_header],
                body: serde_json::to_vec(&json!({ "text": text })).unwrap_or_default(),
            }
        }
        WebhookKind::Pagerduty => {
            let key = secret.unwrap_or_default();
            let body = match alert.status {
                AlertStatus::Resolved => json!({
                    "routing_key": key,
                    "event_action": "resolve",
                    "dedup_key": alert.alert_id,
                }),
                AlertStatus::Firing => {
                    // PagerDuty renders no markup: plain text, bounded.
                    let summary = bounded(
                        &format!("{}: {}", title(alert, plain), alert.message),
                        PAGERDUTY_SUMMARY_MAX,
                    );
                    json!({
                        "routing_key": key,
                        "event_action": "trigger",
                        "dedup_key": alert.alert_id,
                        "payload": {
                            "summary": summary,
                            "source": bounded(&format!("modelwatch/{}", alert.model_id), PAGERDUTY_FIELD_MAX),
                            "severity": alert.severity.as_str(),
                            "timestamp": fmt_time(alert.fired_at),
                            "component": bounded(&alert.model_id, PAGERDUTY_FIELD_MAX),
                            "group": bounded(&alert.model_version, PAGERDUTY_FIELD_MAX),
                            "class": bounded(&alert.metric, PAGERDUTY_FIELD_MAX),
                            "custom_details": alert,
                        }
                    })
                }
            };
            Request {
                path: "",
                headers: vec![json_header],
                body: serde_json::to_vec(&body).unwrap_or_default(),
            }
        }
        WebhookKind::Jira => {
            let body = json!({
                "fields": {
                    "project": { "key": cfg.jira_project.clone().unwrap_or_default() },
                    "issuetype": { "name": cfg.jira_issue_type.clone().unwrap_or_else(|| "Bug".into()) },
                    // The summary is plain text in Jira; the description is wiki markup.
                    "summary": bounded(&title(alert, plain).replace(['\r', '\n'], " "), JIRA_SUMMARY_MAX),
                    "description": bounded(&format!(
                        "{}\n\n{}\n\nalert id: {}\nwindow: {} to {}\nvalue: {}, threshold: {}{}",
                        title(alert, jira_escape),
                        jira_escape(&alert.message),
                        jira_escape(&alert.alert_id),
                        fmt_time(alert.window_start),
                        fmt_time(alert.window_end),
                        alert.value,
                        alert.threshold,
                        alert.baseline.map(|b| format!(", reference: {b}")).unwrap_or_default()
                    ), JIRA_DESCRIPTION_MAX),
                    // A label holds no whitespace and at most 255 chars.
                    "labels": ["modelwatch", bounded(&alert.rule.replace(char::is_whitespace, "_"), PAGERDUTY_FIELD_MAX), alert.severity.as_str()],
                }
            });
            Request {
                path: "/rest/api/2/issue",
                headers: vec![json_header],
                body: serde_json::to_vec(&body).unwrap_or_default(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_reject_tampering() {
        let sig = sign(b"k", 1_700_000_000, b"{}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert!(verify(b"k", 1_700_000_000, b"{}", &sig));
        assert!(!verify(b"k", 1_700_000_001, b"{}", &sig));
        assert!(!verify(b"other", 1_700_000_000, b"{}", &sig));
        assert!(!verify(b"k", 1_700_000_000, b"{ }", &sig));
        assert!(!verify(b"k", 1_700_000_000, b"{}", "sha256=zz"));
        // RFC 4231 test case 2 shape: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    fn hostile() -> AlertEvent {
        let evil = "<!channel> <http://evil|click>";
        AlertEvent {
            alert_id: "0123456789abcdef".into(),
            rule: "feature_drift".into(),
            status: AlertStatus::Firing,
            severity: Severity::Critical,
            model_id: evil.into(),
            model_version: "[x|http://evil]{html}<b>".into(),
            segment: "country=<@U123>".into(),
            feature: Some("!http://evil/i.png!".into()),
            metric: "psi".into(),
            value: 0.5,
            threshold: 0.2,
            baseline: None,
            p_value: None,
            window_start: 0,
            window_end: 300_000,
            fired_at: 400_000,
            message: format!("{evil} & {}", "x".repeat(5000)),
        }
    }

    fn hook(kind: WebhookKind) -> WebhookConfig {
        WebhookConfig {
            name: "h".into(),
            kind,
            url: crate::config::Secret("http://127.0.0.1:1".into()),
            url_env: None,
            secret_env: None,
            secret_file: None,
            min_severity: Severity::Warning,
            rules: Vec::new(),
            send_resolved: true,
            timeout: std::time::Duration::from_secs(1),
            max_attempts: 1,
            initial_backoff: std::time::Duration::from_millis(1),
            jira_project: Some("OPS".into()),
            jira_issue_type: None,
            jira_user: None,
        }
    }

    fn body(kind: WebhookKind) -> serde_json::Value {
        serde_json::from_slice(&request(&hook(kind), &hostile(), Some("k"), 1).body).unwrap()
    }

    #[test]
    fn escapers() {
        assert_eq!(
            slack_escape("<!channel> <http://evil|click> & co"),
            "&lt;!channel&gt; &lt;http://evil|click&gt; &amp; co"
        );
        assert_eq!(
            jira_escape("[x|http://e]{html}!i.png! *b*\nh1. t"),
            "\\[x\\|http://e\\]\\{html\\}\\!i.png\\! \\*b\\* h1. t"
        );
        assert_eq!(slack_escape("plain v1.2"), "plain v1.2");
    }

    #[test]
    fn slack_text_has_no_markup_from_identifiers() {
        let text = body(WebhookKind::Slack)["text"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(!text.contains('<') && !text.contains('>'), "{text}");
        assert!(
            text.contains("&lt;!channel&gt; &lt;http://evil|click&gt;"),
            "{text}"
        );
        assert!(text.contains("country=&lt;@U123&gt;"), "{text}");
        assert!(text.chars().count() <= SLACK_TEXT_MAX);
    }

    #[test]
    fn jira_description_is_escaped_and_bounded() {
        let f = &body(WebhookKind::Jira)["fields"];
        let d = f["description"].as_str().unwrap();
        assert!(
            d.contains("\\[x\\|http://evil\\]\\{html\\}<b>"),
            "{}",
            &d[..200]
        );
        assert!(d.contains("\\!http://evil/i.png\\!"));
        // Every markup character of the identifiers is escaped.
        for raw in ["[x", "{html", "!http", "|http"] {
            for (i, _) in d.match_indices(raw) {
                assert_eq!(&d[i - 1..i], "\\", "{raw} unescaped at {i}");
            }
        }
        assert!(d.chars().count() <= JIRA_DESCRIPTION_MAX);
        let summary = f["summary"].as_str().unwrap();
        assert!(summary.chars().count() <= JIRA_SUMMARY_MAX);
    }

    #[test]
    fn pagerduty_fields_are_bounded() {
        let mut a = hostile();
        a.model_id = "m".repeat(2000);
        let b: serde_json::Value =
            serde_json::from_slice(&request(&hook(WebhookKind::Pagerduty), &a, Some("k"), 1).body)
                .unwrap();
        let p = &b["payload"];
        assert_eq!(
            p["summary"].as_str().unwrap().chars().count(),
            PAGERDUTY_SUMMARY_MAX
        );
        for f in ["source", "component"] {
            assert_eq!(
                p[f].as_str().unwrap().chars().count(),
                PAGERDUTY_FIELD_MAX,
                "{f}"
            );
        }
        // Generic: JSON keeps the raw value, escaped by serde.
        let g: serde_json::Value =
            serde_json::from_slice(&request(&hook(WebhookKind::Generic), &hostile(), None, 1).body)
                .unwrap();
        assert_eq!(g["model_id"], "<!channel> <http://evil|click>");
    }
}
