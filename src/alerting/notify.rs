//! Notification payloads: what each kind of webhook receives for an alert.
//! Pure (no I/O): [`crate::sinks::webhook`] sends them.
//!
//! - generic: the `AlertEvent` as JSON (the Avro schema's field names), with
//!   `X-Modelwatch-Timestamp` (Unix seconds) and, when a secret is set,
//!   `X-Modelwatch-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`;
//! - Slack: an incoming-webhook message `{"text": ...}`;
//! - PagerDuty Events API v2: `trigger` / `resolve` with `dedup_key` = alert id;
//! - Jira: a `POST /rest/api/2/issue` body creating one issue per new alert.

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

fn title(a: &AlertEvent) -> String {
    let feature = a
        .feature
        .as_deref()
        .map(|f| format!(" feature {f}"))
        .unwrap_or_default();
    let segment = if a.segment.is_empty() {
        String::new()
    } else {
        format!(" [{}]", a.segment)
    };
    format!(
        "[{}] {} {}: {} {}/{}{feature}{segment}",
        a.severity.as_str().to_uppercase(),
        a.status.as_str(),
        a.rule,
        a.metric,
        a.model_id,
        a.model_version
    )
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
                title(alert),
                alert.message,
                alert.alert_id
            );
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
                    let summary: String = format!("{}: {}", title(alert), alert.message)
                        .chars()
                        .take(1024)
                        .collect();
                    json!({
                        "routing_key": key,
                        "event_action": "trigger",
                        "dedup_key": alert.alert_id,
                        "payload": {
                            "summary": summary,
                            "source": format!("modelwatch/{}", alert.model_id),
                            "severity": alert.severity.as_str(),
                            "timestamp": fmt_time(alert.fired_at),
                            "component": alert.model_id,
                            "group": alert.model_version,
                            "class": alert.metric,
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
                    "summary": title(alert).chars().take(250).collect::<String>(),
                    "description": format!(
                        "{}\n\nalert id: {}\nwindow: {} to {}\nvalue: {}, threshold: {}{}",
                        alert.message,
                        alert.alert_id,
                        fmt_time(alert.window_start),
                        fmt_time(alert.window_end),
                        alert.value,
                        alert.threshold,
                        alert.baseline.map(|b| format!(", reference: {b}")).unwrap_or_default()
                    ),
                    "labels": ["modelwatch", alert.rule.replace(' ', "_"), alert.severity.as_str()],
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
}
