//! Alerts and pings: what the daemon tells the outside world besides
//! `/metrics`.
//!
//! - `[[daemon.alert]]` webhooks get a JSON document (`format = "json"`) or a
//!   Slack-compatible `{"text": …}` message (`format = "slack"`) for each
//!   [`Event`]: a job run that failed (`job_failed`, `verify_failed` for
//!   restore-verify jobs), and conditions that start and stop — a source past
//!   its RPO (`rpo_breach`), a target that does not answer (`target_down`) or
//!   that a backup or sync left behind (`target_lagging`), stored bytes above
//!   `[daemon.capacity]` (`capacity`). A condition fires once when it starts
//!   (`state = "firing"`) and once when it ends (`state = "resolved"`), not on
//!   every check.
//! - A job's `ping_url` gets healthchecks.io-style pings: `<url>/start` when a
//!   run starts, `<url>` when it succeeds, `<url>/fail` when it does not (the
//!   body carries the summary and the problems).
//!
//! Delivery never blocks a job and never ends the daemon: each message is
//! sent from its own task, retried with exponential backoff (1 s, 2 s, 4 s …
//! at most 60 s apart) up to the alert's `retries`, and a final failure is
//! logged and counted (`custos_alerts_total{outcome="failed"}`). URLs are
//! secrets (Slack and healthchecks URLs carry their token): they come from
//! `url_env`, `url_file`, `url_command` (or a plain `url` for an internal
//! endpoint) and are never logged; logs name the alert instead.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::settings::SecretSource;

/// Timeout of one delivery attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What an alert is about (the `event` field; `events = [...]` filters on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A job run ended with an error, a timeout, or partially.
    JobFailed,
    /// A restore-verify run found a failure (or could not run).
    VerifyFailed,
    /// A source's newest snapshot is older than its `rpo`.
    RpoBreach,
    /// A target does not answer.
    TargetDown,
    /// A backup or sync left a target behind the others.
    TargetLagging,
    /// A target stores more than its `[daemon.capacity]`.
    Capacity,
}

impl EventKind {
    /// Every kind, in the order documented.
    pub const ALL: [EventKind; 6] = [
        EventKind::JobFailed,
        EventKind::VerifyFailed,
        EventKind::RpoBreach,
        EventKind::TargetDown,
        EventKind::TargetLagging,
        EventKind::Capacity,
    ];

    /// The name written in the config and the payload.
    pub fn label(self) -> &'static str {
        match self {
            EventKind::JobFailed => "job_failed",
            EventKind::VerifyFailed => "verify_failed",
            EventKind::RpoBreach => "rpo_breach",
            EventKind::TargetDown => "target_down",
            EventKind::TargetLagging => "target_lagging",
            EventKind::Capacity => "capacity",
        }
    }

    fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.label() == s)
    }
}

/// Firing or resolved (one-shot events are always firing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Firing,
    Resolved,
}

/// One alert, as sent (the generic JSON payload).
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event: EventKind,
    pub state: State,
    /// `critical` (data at risk: failures, RPO, target down) or `warning`.
    pub severity: &'static str,
    /// One line for humans; names things, never content or secrets.
    pub summary: String,
    /// Problems, one per line (for job events).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The repository id (short form) and this machine, so one receiver can
    /// serve several daemons.
    pub repository: String,
    pub host: String,
    pub time: DateTime<Utc>,
    /// The audit trail's head after the daemon's last entry (an anchor kept
    /// outside the repository: a later cut-back of the log is detectable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_head: Option<String>,
}

/// The two payload styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The [`Event`] as JSON.
    Json,
    /// `{"text": "…"}` for Slack incoming webhooks (and Mattermost, Rocket.Chat …).
    Slack,
}

/// Where a URL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlSource {
    /// Written in the config (an internal endpoint without a token).
    Plain(String),
    /// A secret (env, file, command).
    Secret(SecretSource),
}

impl UrlSource {
    fn resolve(&self) -> Result<String> {
        match self {
            UrlSource::Plain(u) => Ok(u.clone()),
            UrlSource::Secret(s) => s.resolve(),
        }
    }
}

/// One validated `[[daemon.alert]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSpec {
    pub name: String,
    pub url: UrlSource,
    pub format: Format,
    /// Events this alert wants (default: all).
    pub events: BTreeSet<EventKind>,
    /// Only job events of these jobs (default: every job); conditions are not filtered.
    pub jobs: Option<BTreeSet<String>>,
    /// Attempts after the first one.
    pub retries: u32,
}

impl AlertSpec {
    fn wants(&self, e: &Event) -> bool {
        self.events.contains(&e.event)
            && match (&self.jobs, &e.job) {
                (Some(jobs), Some(job)) => jobs.contains(job),
                _ => true,
            }
    }
}

/// Keys of a `[[daemon.alert]]` table.
pub const ALERT_KEYS: &[&str] = &[
    "name",
    "url",
    "url_env",
    "url_file",
    "url_command",
    "format",
    "events",
    "jobs",
    "retries",
];

/// Default `retries` of alerts and pings.
pub const DEFAULT_RETRIES: u32 = 5;

/// Take `url`, `url_env`, `url_file` or `url_command` (exactly one) out of `t`.
pub fn take_url(t: &mut toml::Table, section: &str, key: &str) -> Result<Option<UrlSource>> {
    let mut found: Vec<UrlSource> = Vec::new();
    let text = |t: &mut toml::Table, k: &str| -> Result<Option<String>> {
        match t.remove(k) {
            None => Ok(None),
            Some(toml::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s)),
            Some(_) => Err(Error::Config(format!(
                "{section}: {k} must be a non-empty string"
            ))),
        }
    };
    if let Some(u) = text(t, key)? {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            // Do not echo the value: it may be a token pasted in the wrong key.
            return Err(Error::Config(format!(
                "{section}: {key} must be an http:// or https:// URL"
            )));
        }
        found.push(UrlSource::Plain(u));
    }
    if let Some(v) = text(t, &format!("{key}_env"))? {
        found.push(UrlSource::Secret(SecretSource::Env(v)));
    }
    if let Some(v) = text(t, &format!("{key}_file"))? {
        found.push(UrlSource::Secret(SecretSource::File(v.into())));
    }
    if let Some(v) = text(t, &format!("{key}_command"))? {
        found.push(UrlSource::Secret(SecretSource::Command(v)));
    }
    if found.len() > 1 {
        return Err(Error::Config(format!(
            "{section}: give only one of {key}, {key}_env, {key}_file, {key}_command"
        )));
    }
    Ok(found.pop())
}

/// Validate one `[[daemon.alert]]` table (at index `i`).
pub fn parse_alert(mut t: toml::Table, i: usize) -> Result<AlertSpec> {
    let name = match t.remove("name") {
        Some(toml::Value::String(n)) if !n.trim().is_empty() => n,
        Some(_) => {
            return Err(Error::Config(format!(
                "[[daemon.alert]] #{}: name must be a non-empty string",
                i + 1
            )))
        }
        None => {
            return Err(Error::Config(format!(
                "[[daemon.alert]] #{}: an alert has no name",
                i + 1
            )))
        }
    };
    let section = format!("[[daemon.alert]] {name:?}");
    if let Some(k) = t.keys().find(|k| !ALERT_KEYS.contains(&k.as_str())) {
        return Err(Error::Config(format!(
            "{section}: unknown key {k:?} (allowed: {})",
            ALERT_KEYS.join(", ")
        )));
    }
    let url = take_url(&mut t, &section, "url")?.ok_or_else(|| {
        Error::Config(format!(
            "{section}: give one of url, url_env, url_file, url_command"
        ))
    })?;
    let format = match t.remove("format") {
        None => Format::Json,
        Some(toml::Value::String(f)) if f == "json" => Format::Json,
        Some(toml::Value::String(f)) if f == "slack" => Format::Slack,
        Some(_) => {
            return Err(Error::Config(format!(
                "{section}: format must be \"json\" or \"slack\""
            )))
        }
    };
    let names = |v: Option<toml::Value>, key: &str| -> Result<Option<Vec<String>>> {
        match v {
            None => Ok(None),
            Some(toml::Value::Array(a)) if !a.is_empty() => a
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    _ => Err(Error::Config(format!(
                        "{section}: {key} must be a list of strings"
                    ))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(Error::Config(format!(
                "{section}: {key} must be a non-empty list of strings"
            ))),
        }
    };
    let events = match names(t.remove("events"), "events")? {
        None => EventKind::ALL.into_iter().collect(),
        Some(list) => list
            .iter()
            .map(|s| {
                EventKind::parse(s).ok_or_else(|| {
                    Error::Config(format!(
                        "{section}: events: unknown event {s:?} (one of: {})",
                        EventKind::ALL.map(|k| k.label()).join(", ")
                    ))
                })
            })
            .collect::<Result<BTreeSet<_>>>()?,
    };
    let jobs = names(t.remove("jobs"), "jobs")?.map(|v| v.into_iter().collect());
    let retries = match t.remove("retries") {
        None => DEFAULT_RETRIES,
        Some(toml::Value::Integer(n)) if (0..=20).contains(&n) => n as u32,
        Some(_) => {
            return Err(Error::Config(format!(
                "{section}: retries must be a number from 0 to 20"
            )))
        }
    };
    Ok(AlertSpec {
        name,
        url,
        format,
        events,
        jobs,
        retries,
    })
}

/// Counts of deliveries per alert (or `ping:<job>`) and outcome, for `/metrics`.
pub type DeliveryCounts = Arc<Mutex<BTreeMap<(String, &'static str), u64>>>;

/// Sends alerts and pings from background tasks.
#[derive(Debug, Clone)]
pub struct Notifier {
    client: reqwest::Client,
    counts: DeliveryCounts,
    /// First wait between attempts (1 s; shorter in unit tests).
    base_backoff: Duration,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier::new(Duration::from_secs(1))
    }
}

impl Notifier {
    /// A notifier whose retries start `base_backoff` apart.
    pub fn new(base_backoff: Duration) -> Notifier {
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .user_agent(concat!("custos/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client with default TLS settings builds");
        Notifier {
            client,
            counts: Arc::default(),
            base_backoff,
        }
    }

    /// Deliveries so far per (alert, outcome).
    pub fn counts(&self) -> BTreeMap<(String, &'static str), u64> {
        self.counts.lock().expect("counts lock").clone()
    }

    /// Send `event` to every alert that wants it.
    pub fn alert(&self, alerts: &[AlertSpec], event: &Event) {
        for a in alerts.iter().filter(|a| a.wants(event)) {
            let body = match a.format {
                Format::Json => serde_json::to_vec(event).expect("events serialize"),
                Format::Slack => {
                    serde_json::to_vec(&serde_json::json!({ "text": slack_text(event) }))
                        .expect("json serializes")
                }
            };
            tracing::info!(
                alert = %a.name,
                event = event.event.label(),
                state = ?event.state,
                "sending alert"
            );
            self.spawn(a.name.clone(), a.url.clone(), None, body, a.retries);
        }
    }

    /// A healthchecks-style ping: `suffix` is `/start`, `` or `/fail`.
    pub fn ping(&self, job: &str, url: &UrlSource, suffix: &'static str, body: String) {
        self.spawn(
            format!("ping:{job}"),
            url.clone(),
            Some(suffix),
            body.into_bytes(),
            DEFAULT_RETRIES,
        );
    }

    fn spawn(
        &self,
        name: String,
        url: UrlSource,
        suffix: Option<&'static str>,
        body: Vec<u8>,
        retries: u32,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = match me.deliver(&name, &url, suffix, body, retries).await {
                Ok(()) => "sent",
                Err(e) => {
                    tracing::error!(alert = %name, error = %e, "alert not delivered; giving up");
                    "failed"
                }
            };
            *me.counts
                .lock()
                .expect("counts lock")
                .entry((name, outcome))
                .or_default() += 1;
        });
    }

    async fn deliver(
        &self,
        name: &str,
        url: &UrlSource,
        suffix: Option<&str>,
        body: Vec<u8>,
        retries: u32,
    ) -> std::result::Result<(), String> {
        let mut wait = self.base_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self.attempt(url, suffix, &body).await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) if attempt > retries => {
                    return Err(format!("{e} (after {attempt} attempt(s))"))
                }
                Err(e) => {
                    tracing::warn!(alert = %name, attempt, error = %e, retry_in = ?wait, "alert delivery failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn attempt(
        &self,
        url: &UrlSource,
        suffix: Option<&str>,
        body: &[u8],
    ) -> std::result::Result<(), String> {
        let mut url = url.resolve().map_err(|e| e.to_string())?;
        if let Some(s) = suffix {
            url = format!("{}{s}", url.trim_end_matches('/'));
        }
        let content_type = if suffix.is_some() {
            "text/plain; charset=utf-8"
        } else {
            "application/json"
        };
        let resp = self
            .client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body.to_vec())
            .send()
            .await
            // Without the URL: it may hold a token.
            .map_err(|e| format!("request failed: {}", e.without_url()))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered HTTP {status}"))
        }
    }
}

/// The Slack message for `e`: one line with an emoji, then the problems.
pub fn slack_text(e: &Event) -> String {
    let mark = match (e.state, e.severity) {
        (State::Resolved, _) => ":large_green_circle:",
        (_, "critical") => ":red_circle:",
        _ => ":large_orange_circle:",
    };
    let state = match e.state {
        State::Firing => "",
        State::Resolved => " (resolved)",
    };
    let mut text = format!(
        "{mark} custos {}{state} on {} (repository {}): {}",
        e.event.label(),
        e.host,
        e.repository,
        e.summary
    );
    for p in e.problems.iter().take(10) {
        text.push_str("\n• ");
        text.push_str(p);
    }
    if e.problems.len() > 10 {
        text.push_str(&format!("\n… and {} more", e.problems.len() - 10));
    }
    text
}

/// Conditions that fire once when they start and once when they end.
#[derive(Debug, Default)]
pub struct Conditions {
    active: BTreeSet<(EventKind, String)>,
}

impl Conditions {
    /// Record whether (`kind`, `subject`) holds now; returns the state change
    /// to announce, if any.
    pub fn update(&mut self, kind: EventKind, subject: &str, holds: bool) -> Option<State> {
        let key = (kind, subject.to_string());
        match (holds, self.active.contains(&key)) {
            (true, false) => {
                self.active.insert(key);
                Some(State::Firing)
            }
            (false, true) => {
                self.active.remove(&key);
                Some(State::Resolved)
            }
            _ => None,
        }
    }

    /// End the conditions of `kind` whose subject is not in `keep` (a target
    /// or source a reload removed); returns those subjects.
    pub fn drop_others(&mut self, kind: EventKind, keep: &BTreeSet<String>) -> Vec<String> {
        let gone: Vec<String> = self
            .active
            .iter()
            .filter(|(k, s)| *k == kind && !keep.contains(s))
            .map(|(_, s)| s.clone())
            .collect();
        for s in &gone {
            self.active.remove(&(kind, s.clone()));
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    #[test]
    fn alert_tables_validate_naming_the_key() {
        let a = parse_alert(
            table(
                "name = \"ops\"\nurl_env = \"OPS_HOOK\"\nformat = \"slack\"\nevents = [\"rpo_breach\", \"capacity\"]\nretries = 2",
            ),
            0,
        )
        .unwrap();
        assert_eq!(a.format, Format::Slack);
        assert_eq!(
            a.url,
            UrlSource::Secret(SecretSource::Env("OPS_HOOK".into()))
        );
        assert_eq!(
            a.events,
            [EventKind::RpoBreach, EventKind::Capacity]
                .into_iter()
                .collect()
        );
        assert_eq!(a.retries, 2);
        let all = parse_alert(table("name = \"x\"\nurl = \"http://127.0.0.1:1/h\""), 0).unwrap();
        assert_eq!(all.events.len(), EventKind::ALL.len());
        assert_eq!(all.format, Format::Json);

        for (text, needle) in [
            ("url = \"http://x\"", "#1: an alert has no name"),
            ("name = \"a\"", "give one of url, url_env"),
            (
                "name = \"a\"\nurl = \"http://x\"\nurl_env = \"E\"",
                "only one of url",
            ),
            ("name = \"a\"\nurl = \"xoxb-secret\"", "http:// or https://"),
            (
                "name = \"a\"\nurl = \"http://x\"\nformat = \"xml\"",
                "format must be",
            ),
            (
                "name = \"a\"\nurl = \"http://x\"\nevents = [\"boom\"]",
                "unknown event \"boom\"",
            ),
            (
                "name = \"a\"\nurl = \"http://x\"\nevents = []",
                "events must be a non-empty",
            ),
            (
                "name = \"a\"\nurl = \"http://x\"\nretries = 99",
                "retries must be",
            ),
            (
                "name = \"a\"\nurl = \"http://x\"\nwebhook = 1",
                "unknown key \"webhook\"",
            ),
        ] {
            let e = parse_alert(table(text), 0).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(!e.contains("xoxb-secret"), "{e}");
        }
    }

    #[test]
    fn conditions_fire_once_and_resolve_once() {
        let mut c = Conditions::default();
        assert_eq!(c.update(EventKind::TargetDown, "eu", false), None);
        assert_eq!(
            c.update(EventKind::TargetDown, "eu", true),
            Some(State::Firing)
        );
        assert_eq!(c.update(EventKind::TargetDown, "eu", true), None);
        assert_eq!(
            c.update(EventKind::TargetLagging, "eu", true),
            Some(State::Firing)
        );
        assert_eq!(
            c.update(EventKind::TargetDown, "eu", false),
            Some(State::Resolved)
        );
        assert_eq!(c.update(EventKind::TargetDown, "eu", false), None);
        assert_eq!(
            c.drop_others(EventKind::TargetLagging, &BTreeSet::new()),
            vec!["eu".to_string()]
        );
        assert_eq!(c.update(EventKind::TargetLagging, "eu", false), None);
    }

    #[test]
    fn slack_text_names_the_event_and_lists_problems() {
        let e = Event {
            event: EventKind::JobFailed,
            state: State::Firing,
            severity: "critical",
            summary: "job nightly (backup) failed".into(),
            problems: (0..12).map(|i| format!("p{i}")).collect(),
            job: Some("nightly".into()),
            outcome: Some("error".into()),
            source: None,
            target: None,
            repository: "abcd1234".into(),
            host: "box".into(),
            time: Utc::now(),
            audit_head: None,
        };
        let t = slack_text(&e);
        assert!(
            t.starts_with(
                ":red_circle: custos job_failed on box (repository abcd1234): job nightly"
            ),
            "{t}"
        );
        assert!(
            t.contains("\n• p9") && !t.contains("p10") && t.ends_with("… and 2 more"),
            "{t}"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["event"], "job_failed");
        assert_eq!(json["state"], "firing");
        assert!(json.get("source").is_none());
    }
}
