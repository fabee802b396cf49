//! The daemon's HTTP endpoints (hyper 1, HTTP/1.1, no TLS: bind it to
//! loopback or a private interface): `/metrics` (Prometheus text format
//! 0.0.4), `/healthz`, `/readyz`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use custos_schedules::cron::Overlap;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::config::JobSpec;
use super::jobs::Outcome;
use super::Shared;

/// What `/metrics` reports, besides the overlap counters.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Runs per job and outcome.
    pub runs: BTreeMap<String, BTreeMap<Outcome, u64>>,
    /// End of the last successful run per job (persisted in the state file).
    pub last_success: BTreeMap<String, DateTime<Utc>>,
    /// Duration of the last run per job, seconds.
    pub last_duration: BTreeMap<String, f64>,
    /// Newest snapshot per source, as last listed.
    pub newest_snapshot: BTreeMap<String, DateTime<Utc>>,
    /// Per target: lagging after the last backup or sync.
    pub target_lagging: BTreeMap<String, bool>,
    /// Per (job, source): sealed bytes uploaded by backups, summed over targets.
    pub backup_bytes: BTreeMap<(String, String), u64>,
    /// Per (job, source): records (files) backed up, new or changed.
    pub backup_records: BTreeMap<(String, String), u64>,
    /// Per target: answered the last probe.
    pub target_up: BTreeMap<String, bool>,
    /// Per target: bytes stored, as last listed.
    pub target_stored: BTreeMap<String, u64>,
    /// Per (alert or `ping:<job>`, outcome `sent`/`failed`): deliveries.
    pub deliveries: BTreeMap<(String, &'static str), u64>,
    /// The audit trail's head after the daemon's last entry (`<seq>-<hash>`).
    pub audit_head: Option<String>,
}

/// Prometheus label value escaping: backslash, double quote, newline.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Render the metrics of the configured `jobs` at `now`.
pub fn render(m: &Metrics, overlap: &Overlap, jobs: &[JobSpec], now: DateTime<Utc>) -> String {
    let mut out = String::new();
    header(&mut out, "custos_up", "gauge", "1 while the daemon runs.");
    out.push_str("custos_up 1\n");

    header(
        &mut out,
        "custos_job_runs_total",
        "counter",
        "Finished runs per job and outcome (ok, partial, error, timeout).",
    );
    for j in jobs {
        let runs = m.runs.get(&j.name);
        for o in Outcome::ALL {
            let n = runs.and_then(|r| r.get(&o)).copied().unwrap_or(0);
            // ok and error always appear (so rate() and absent() work from the start).
            if n > 0 || matches!(o, Outcome::Ok | Outcome::Error) {
                let _ = writeln!(
                    out,
                    "custos_job_runs_total{{job=\"{}\",outcome=\"{}\"}} {n}",
                    label(&j.name),
                    o.label()
                );
            }
        }
    }

    header(
        &mut out,
        "custos_job_last_success_timestamp_seconds",
        "gauge",
        "Unix time the last successful run of the job finished.",
    );
    for j in jobs {
        if let Some(t) = m.last_success.get(&j.name) {
            let _ = writeln!(
                out,
                "custos_job_last_success_timestamp_seconds{{job=\"{}\"}} {}",
                label(&j.name),
                t.timestamp_millis() as f64 / 1000.0
            );
        }
    }

    header(
        &mut out,
        "custos_job_duration_seconds",
        "gauge",
        "Duration of the job's last run.",
    );
    for j in jobs {
        if let Some(d) = m.last_duration.get(&j.name) {
            let _ = writeln!(
                out,
                "custos_job_duration_seconds{{job=\"{}\"}} {d:.3}",
                label(&j.name)
            );
        }
    }

    header(
        &mut out,
        "custos_job_skipped_total",
        "counter",
        "Runs not started because the job's previous run was still running.",
    );
    for j in jobs {
        let _ = writeln!(
            out,
            "custos_job_skipped_total{{job=\"{}\"}} {}",
            label(&j.name),
            overlap.skipped(&j.name)
        );
    }

    header(
        &mut out,
        "custos_job_running",
        "gauge",
        "1 while a run of the job is in progress.",
    );
    for j in jobs {
        let _ = writeln!(
            out,
            "custos_job_running{{job=\"{}\"}} {}",
            label(&j.name),
            u8::from(overlap.is_running(&j.name))
        );
    }

    per_kind_metrics(&mut out, m, overlap, jobs, now);

    header(
        &mut out,
        "custos_snapshot_age_seconds",
        "gauge",
        "Age of the newest snapshot of each source in the repository.",
    );
    for (source, t) in &m.newest_snapshot {
        let age = (now - *t).num_milliseconds().max(0) as f64 / 1000.0;
        let _ = writeln!(
            out,
            "custos_snapshot_age_seconds{{source=\"{}\"}} {age:.3}",
            label(source)
        );
    }

    header(
        &mut out,
        "custos_target_lagging",
        "gauge",
        "1 when the last backup or sync left the target behind, else 0.",
    );
    for (target, lagging) in &m.target_lagging {
        let _ = writeln!(
            out,
            "custos_target_lagging{{target=\"{}\"}} {}",
            label(target),
            u8::from(*lagging)
        );
    }

    header(
        &mut out,
        "custos_target_up",
        "gauge",
        "1 when the target answered the daemon's last probe, else 0.",
    );
    for (target, up) in &m.target_up {
        let _ = writeln!(
            out,
            "custos_target_up{{target=\"{}\"}} {}",
            label(target),
            u8::from(*up)
        );
    }
    header(
        &mut out,
        "custos_target_stored_bytes",
        "gauge",
        "Bytes stored in the target, as last listed (every stats_every).",
    );
    for (target, bytes) in &m.target_stored {
        let _ = writeln!(
            out,
            "custos_target_stored_bytes{{target=\"{}\"}} {bytes}",
            label(target)
        );
    }
    header(
        &mut out,
        "custos_audit_head",
        "gauge",
        "Sequence number of the audit trail's head after the daemon's last entry; the head is the label (record it outside the repository).",
    );
    if let Some(h) = &m.audit_head {
        let seq: u64 = h
            .split('-')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let _ = writeln!(out, "custos_audit_head{{head=\"{}\"}} {seq}", label(h));
    }
    header(
        &mut out,
        "custos_alerts_total",
        "counter",
        "Alert and ping deliveries per receiver and outcome (sent, failed after retries).",
    );
    for ((name, outcome), n) in &m.deliveries {
        let _ = writeln!(
            out,
            "custos_alerts_total{{alert=\"{}\",outcome=\"{outcome}\"}} {n}",
            label(name)
        );
    }
    out
}

/// `custos_backup_bytes_uploaded_total` and `custos_backup_records_total`.
fn backup_counters(out: &mut String, m: &Metrics, jobs: &[&JobSpec]) {
    for (name, help, map) in [
        (
            "custos_backup_bytes_uploaded_total",
            "Sealed bytes of new data a backup job uploaded, summed over targets.",
            &m.backup_bytes,
        ),
        (
            "custos_backup_records_total",
            "Records (files, for directory sources) a backup job stored new or changed.",
            &m.backup_records,
        ),
    ] {
        header(out, name, "counter", help);
        // Only the jobs of the config in force (a reload may rename or drop some).
        for ((job, source), n) in map
            .iter()
            .filter(|((j, _), _)| jobs.iter().any(|s| &s.name == j))
        {
            let _ = writeln!(
                out,
                "{name}{{job=\"{}\",source=\"{}\"}} {n}",
                label(job),
                label(source)
            );
        }
    }
}

/// The series named in the operations guide (issue 6): the same data as the
/// `custos_job_*` series, split by what the job does, plus the RPO age.
fn per_kind_metrics(
    out: &mut String,
    m: &Metrics,
    overlap: &Overlap,
    jobs: &[JobSpec],
    now: DateTime<Utc>,
) {
    for (kind, prefix) in [
        ("backup", "custos_backup"),
        ("restore_verify", "custos_restore_verify"),
    ] {
        let of_kind: Vec<&JobSpec> = jobs.iter().filter(|j| j.kind.label() == kind).collect();
        let last = format!("{prefix}_last_success_timestamp_seconds");
        header(
            out,
            &last,
            "gauge",
            &format!("Unix time the last successful {kind} job run finished."),
        );
        for j in &of_kind {
            if let Some(t) = m.last_success.get(&j.name) {
                let _ = writeln!(
                    out,
                    "{last}{{job=\"{}\"}} {}",
                    label(&j.name),
                    t.timestamp_millis() as f64 / 1000.0
                );
            }
        }
        let dur = format!("{prefix}_duration_seconds");
        header(
            out,
            &dur,
            "gauge",
            &format!("Duration of the last {kind} job run."),
        );
        for j in &of_kind {
            if let Some(d) = m.last_duration.get(&j.name) {
                let _ = writeln!(out, "{dur}{{job=\"{}\"}} {d:.3}", label(&j.name));
            }
        }
        if kind == "backup" {
            backup_counters(out, m, &of_kind);
            header(
                out,
                "custos_backup_failures_total",
                "counter",
                "Backup job runs that failed or timed out.",
            );
            for j in &of_kind {
                let runs = m.runs.get(&j.name);
                let n: u64 = [Outcome::Error, Outcome::Timeout]
                    .iter()
                    .map(|o| runs.and_then(|r| r.get(o)).copied().unwrap_or(0))
                    .sum();
                let _ = writeln!(
                    out,
                    "custos_backup_failures_total{{job=\"{}\"}} {n}",
                    label(&j.name)
                );
            }
        }
    }
    header(
        out,
        "custos_rpo_seconds",
        "gauge",
        "Recovery point age: seconds since the newest snapshot of each source.",
    );
    for (source, t) in &m.newest_snapshot {
        let age = (now - *t).num_milliseconds().max(0) as f64 / 1000.0;
        let _ = writeln!(
            out,
            "custos_rpo_seconds{{source=\"{}\"}} {age:.3}",
            label(source)
        );
    }
    header(
        out,
        "custos_job_skipped_overlap_total",
        "counter",
        "Runs skipped because the previous run still ran.",
    );
    for j in jobs {
        let _ = writeln!(
            out,
            "custos_job_skipped_overlap_total{{job=\"{}\"}} {}",
            label(&j.name),
            overlap.skipped(&j.name)
        );
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, shared.metrics_text()),
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let (ready, body) = shared.readiness().await;
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

/// Serve until the process ends.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "http: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(peer = %peer, error = %e, "http: connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::config::JobKind;
    use custos_schedules::cron::CronSpec;

    fn job(name: &str) -> JobSpec {
        JobSpec {
            name: name.into(),
            kind: JobKind::Sync,
            schedule: CronSpec::parse("0 * * * *").unwrap(),
            jitter: None,
            catch_up: false,
            timeout: None,
            ping: None,
        }
    }

    #[test]
    fn metrics_text_has_every_series_with_escaped_labels() {
        let now = DateTime::parse_from_rfc3339("2026-01-05T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut m = Metrics::default();
        m.runs
            .entry("nightly".into())
            .or_default()
            .insert(Outcome::Ok, 3);
        m.runs
            .entry("nightly".into())
            .or_default()
            .insert(Outcome::Timeout, 1);
        m.last_success
            .insert("nightly".into(), now - chrono::Duration::seconds(90));
        m.last_duration.insert("nightly".into(), 1.25);
        m.newest_snapshot.insert(
            "mail \"export\"".into(),
            now - chrono::Duration::seconds(30),
        );
        m.target_lagging.insert("eu".into(), true);
        m.target_lagging.insert("onprem".into(), false);
        m.target_up.insert("eu".into(), false);
        m.target_stored.insert("eu".into(), 12345);
        m.backup_bytes
            .insert(("nightly".into(), "mail".into()), 4096);
        m.backup_records
            .insert(("nightly".into(), "mail".into()), 17);
        m.deliveries.insert(("ops".into(), "sent"), 2);
        let mut o = Overlap::default();
        assert!(o.try_start("nightly"));
        assert!(!o.try_start("nightly"));
        let mut nightly = job("nightly");
        nightly.kind = JobKind::Backup { sources: vec![] };
        let text = render(&m, &o, &[nightly, job("weekly")], now);
        for line in [
            "custos_up 1",
            "custos_job_runs_total{job=\"nightly\",outcome=\"ok\"} 3",
            "custos_job_runs_total{job=\"nightly\",outcome=\"error\"} 0",
            "custos_job_runs_total{job=\"nightly\",outcome=\"timeout\"} 1",
            "custos_job_runs_total{job=\"weekly\",outcome=\"ok\"} 0",
            "custos_job_last_success_timestamp_seconds{job=\"nightly\"} 1767614310",
            "custos_job_duration_seconds{job=\"nightly\"} 1.250",
            "custos_job_skipped_total{job=\"nightly\"} 1",
            "custos_job_skipped_total{job=\"weekly\"} 0",
            "custos_job_running{job=\"nightly\"} 1",
            "custos_job_running{job=\"weekly\"} 0",
            "custos_snapshot_age_seconds{source=\"mail \\\"export\\\"\"} 30.000",
            "custos_target_lagging{target=\"eu\"} 1",
            "custos_target_lagging{target=\"onprem\"} 0",
            "# TYPE custos_job_runs_total counter",
            "custos_backup_last_success_timestamp_seconds{job=\"nightly\"} 1767614310",
            "custos_backup_duration_seconds{job=\"nightly\"} 1.250",
            "custos_backup_failures_total{job=\"nightly\"} 1",
            "custos_job_skipped_overlap_total{job=\"nightly\"} 1",
            "custos_rpo_seconds{source=\"mail \\\"export\\\"\"} 30.000",
            "custos_target_up{target=\"eu\"} 0",
            "custos_target_stored_bytes{target=\"eu\"} 12345",
            "custos_backup_bytes_uploaded_total{job=\"nightly\",source=\"mail\"} 4096",
            "custos_backup_records_total{job=\"nightly\",source=\"mail\"} 17",
            "custos_alerts_total{alert=\"ops\",outcome=\"sent\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("outcome=\"partial\""), "{text}");
        assert!(!text.contains("last_success_timestamp_seconds{job=\"weekly\"}"));
        assert!(
            !text.contains("custos_backup_failures_total{job=\"weekly\"}"),
            "{text}"
        );
    }
}
