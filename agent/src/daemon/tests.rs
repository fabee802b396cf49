//! Unit tests of the daemon: config validation (every bad key named with its
//! job) and the runner on the in-memory target.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::config::{self, JobKind, PruneParams};
use super::jobs::Outcome;
use super::*;
use crate::check::ReadData;
use crate::keyfile::KdfParams;
use crate::repo::InitOptions;
use crate::target::limit::Limits;

// ---------------------------------------------------------------------------
// Config validation

const BASE: &str = r#"
[repository]
password_env = "PW"

[[target]]
name = "mem"
url = "/tmp/custos-daemon-unit-never-used"

[[source]]
name = "docs"
type = "directory"
paths = ["/srv/docs"]

[[source]]
name = "mail"
type = "mbox"
path = "/srv/mail.mbox"

[retention]
keep_last = 3
"#;

fn validate(extra: &str) -> Result<DaemonConfig> {
    let settings = Settings::parse(&format!("{BASE}\n{extra}")).expect("settings parse");
    config::validate(&settings)
}

/// `retention_apply` prunes afterwards by default (grace as a prune job);
/// `prune = false` turns that off, and then takes no grace.
#[test]
fn retention_apply_jobs_prune_unless_told_not_to() {
    let c = validate(
        r#"
[record_retention]
default = "forever"

[[job]]
name = "apply"
kind = "retention_apply"
schedule = "0 3 * * *"

[[job]]
name = "apply-fast"
kind = "retention_apply"
grace = "1h"
schedule = "0 3 * * *"

[[job]]
name = "apply-only"
kind = "retention_apply"
prune = false
schedule = "0 3 * * *"
"#,
    )
    .unwrap();
    let kind = |n: &str| c.job(n).unwrap().kind.clone();
    let params = |secs| PruneParams {
        grace: Duration::from_secs(secs),
        repack_threshold: 50.0,
    };
    assert_eq!(
        kind("apply"),
        JobKind::RetentionApply {
            prune: Some(params(24 * 3600))
        }
    );
    assert_eq!(
        kind("apply-fast"),
        JobKind::RetentionApply {
            prune: Some(params(3600))
        }
    );
    assert_eq!(kind("apply-only"), JobKind::RetentionApply { prune: None });
    let err = validate(
        "[record_retention]\ndefault = \"forever\"\n[[job]]\nname = \"x\"\nkind = \"retention_apply\"\nprune = false\ngrace = \"1h\"\nschedule = \"0 3 * * *\"",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("prune = true"), "{err}");
}

#[test]
fn a_good_daemon_config_validates_with_defaults() {
    let c = validate(
        r#"
[daemon]
listen = "127.0.0.1:9999"
catch_up = true
shutdown_grace = "10s"

[[job]]
name = "nightly"
kind = "backup"
schedule = "0 2 * * *"
jitter = "30s"
timeout = "6h"

[[job]]
name = "mail-hourly"
kind = "backup"
sources = ["mail"]
schedule = "0 0 * * * *"
catch_up = false

[[job]]
name = "rotate"
kind = "forget"
prune = true
grace = "48h"
schedule = "0 4 * * SUN"

[[job]]
name = "rotate-only"
kind = "forget"
schedule = "0 4 * * MON"

[[job]]
name = "prune"
kind = "prune"
repack_threshold = 20
schedule = "0 5 * * *"

[[job]]
name = "sync"
kind = "sync"
schedule = "*/10 * * * *"

[[job]]
name = "check"
kind = "check"
read_data_subset = "5%"
schedule = "0 6 * * *"

[[job]]
name = "verify"
kind = "restore_verify"
sources = ["docs"]
sample = "10%"
against_source = 5
schedule = "0 7 * * SAT"
"#,
    )
    .unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:9999");
    assert_eq!(c.shutdown_grace, Duration::from_secs(10));
    let j = |n: &str| c.job(n).unwrap();
    assert_eq!(j("nightly").kind, JobKind::Backup { sources: vec![] });
    assert!(j("nightly").catch_up, "inherits [daemon] catch_up");
    assert_eq!(j("nightly").jitter, Some(Duration::from_secs(30)));
    assert_eq!(j("nightly").timeout, Some(Duration::from_secs(6 * 3600)));
    assert_eq!(j("nightly").schedule.normalized(), "0 0 2 * * *");
    assert!(!j("mail-hourly").catch_up);
    assert_eq!(
        j("mail-hourly").kind,
        JobKind::Backup {
            sources: vec!["mail".into()]
        }
    );
    assert_eq!(
        j("rotate").kind,
        JobKind::Forget {
            prune: Some(PruneParams {
                grace: Duration::from_secs(48 * 3600),
                repack_threshold: 50.0
            })
        }
    );
    assert_eq!(j("rotate-only").kind, JobKind::Forget { prune: None });
    assert_eq!(
        j("prune").kind,
        JobKind::Prune(PruneParams {
            grace: Duration::from_secs(24 * 3600),
            repack_threshold: 20.0
        })
    );
    assert_eq!(j("sync").kind, JobKind::Sync);
    assert_eq!(
        j("check").kind,
        JobKind::Check {
            read_data: ReadData::Subset(5.0)
        }
    );
    assert_eq!(
        j("verify").kind,
        JobKind::RestoreVerify {
            sources: vec!["docs".into()],
            sample_percent: Some(10.0),
            against_source: Some(5)
        }
    );
    // Defaults without [daemon].
    let c = validate("[[job]]\nname = \"s\"\nkind = \"sync\"\nschedule = \"0 * * * *\"\n").unwrap();
    assert_eq!(c.listen.to_string(), config::DEFAULT_LISTEN);
    assert_eq!(c.shutdown_grace, config::DEFAULT_SHUTDOWN_GRACE);
    assert!(!c.job("s").unwrap().catch_up);
}

#[test]
fn every_bad_key_is_named_with_its_job() {
    let job = |body: &str| format!("[[job]]\nname = \"nightly\"\n{body}\n");
    // (extra config, words the error must contain)
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            job("kind = \"backup\"\nschedule = \"0 2 * * *\"\nsorces = [\"docs\"]"),
            vec!["nightly", "sorces"],
        ),
        (
            job("kind = \"backup\"\nschedule = \"0 2 * * *\"\ngrace = \"1h\""),
            vec!["nightly", "grace", "backup"],
        ),
        (
            job("kind = \"backup\"\nschedule = \"61 2 * * *\""),
            vec!["nightly", "schedule", "61 2 * * *"],
        ),
        (
            job("kind = \"backup\"\nschedule = \"0 2 * *\""),
            vec!["nightly", "4 field"],
        ),
        (
            job("kind = \"backup\"\nschedule = \"@daily\""),
            vec!["nightly", "@daily"],
        ),
        (job("kind = \"backup\""), vec!["nightly", "no schedule"]),
        (
            job("kind = \"retention_apply\"\nschedule = \"0 3 * * *\""),
            vec!["nightly", "retention_apply", "[record_retention]"],
        ),
        (
            job("kind = \"bakup\"\nschedule = \"0 2 * * *\""),
            vec!["nightly", "bakup", "restore_verify"],
        ),
        (job("schedule = \"0 2 * * *\""), vec!["nightly", "no kind"]),
        (
            job("kind = \"backup\"\nschedule = \"0 2 * * *\"\nsources = [\"tickets\"]"),
            vec!["nightly", "sources", "tickets"],
        ),
        (
            job("kind = \"backup\"\nschedule = \"0 2 * * *\"\nsources = []"),
            vec!["nightly", "sources"],
        ),
        (
            job("kind = \"backup\"\nschedule = \"0 2 * * *\"\njitter = \"soon\""),
            vec!["nightly", "jitter", "soon"],
        ),
        (
            job("kind = \"backup\"\nschedule = \"0 2 * * *\"\ntimeout = 60"),
            vec!["nightly", "timeout"],
        ),
        (
            job("kind = \"backup\"\nschedule = \"0 2 * * *\"\ncatch_up = \"yes\""),
            vec!["nightly", "catch_up"],
        ),
        (
            job("kind = \"forget\"\nschedule = \"0 2 * * *\"\ngrace = \"1h\""),
            vec!["nightly", "prune = true"],
        ),
        (
            job("kind = \"prune\"\nschedule = \"0 2 * * *\"\nrepack_threshold = 150"),
            vec!["nightly", "repack_threshold"],
        ),
        (
            job("kind = \"check\"\nschedule = \"0 2 * * *\"\nread_data_subset = \"lots\""),
            vec!["nightly", "read_data_subset", "lots"],
        ),
        (
            job("kind = \"check\"\nschedule = \"0 2 * * *\"\nread_data = true\nread_data_subset = \"5%\""),
            vec!["nightly", "not both"],
        ),
        (
            job("kind = \"restore_verify\"\nschedule = \"0 2 * * *\"\nsample = \"0%\""),
            vec!["nightly", "sample"],
        ),
        (
            job("kind = \"restore_verify\"\nschedule = \"0 2 * * *\"\nagainst_source = -1"),
            vec!["nightly", "against_source"],
        ),
        (
            format!(
                "{}{}",
                job("kind = \"sync\"\nschedule = \"0 2 * * *\""),
                job("kind = \"sync\"\nschedule = \"0 3 * * *\"")
            ),
            vec!["nightly", "duplicate"],
        ),
        (
            "[[job]]\nname = \"bad name!\"\nkind = \"sync\"\nschedule = \"0 2 * * *\"\n".into(),
            vec!["bad name!", "name"],
        ),
        (
            "[daemon]\nlisen = \"127.0.0.1:1\"\n".to_string()
                + &job("kind = \"sync\"\nschedule = \"0 2 * * *\""),
            vec!["[daemon]", "lisen"],
        ),
        (
            "[daemon]\nlisten = \"localhost\"\n".to_string()
                + &job("kind = \"sync\"\nschedule = \"0 2 * * *\""),
            vec!["[daemon]", "listen", "localhost"],
        ),
        (
            "[daemon]\nshutdown_grace = \"a while\"\n".to_string()
                + &job("kind = \"sync\"\nschedule = \"0 2 * * *\""),
            vec!["[daemon]", "shutdown_grace"],
        ),
        (String::new(), vec!["no [[job]]"]),
    ];
    for (extra, needles) in cases {
        let e = validate(&extra)
            .expect_err(&format!("accepted:\n{extra}"))
            .to_string();
        for n in needles {
            assert!(e.contains(n), "{n:?} not in {e:?}\nconfig:\n{extra}");
        }
    }
    // forget needs [retention].
    let settings = Settings::parse(
        &format!("{BASE}\n[[job]]\nname = \"rot\"\nkind = \"forget\"\nschedule = \"0 2 * * *\"\n")
            .replace("[retention]\nkeep_last = 3", ""),
    )
    .unwrap();
    let e = config::validate(&settings).unwrap_err().to_string();
    assert!(e.contains("rot") && e.contains("[retention]"), "{e}");
}

#[test]
fn alerts_capacity_and_pings_validate() {
    let c = validate(
        r#"
[daemon]
check_every = "30s"
stats_every = "1h"

[daemon.capacity]
mem = "1.5 GiB"

[[daemon.alert]]
name = "ops"
url = "http://127.0.0.1:9/hook"

[[daemon.alert]]
name = "slack"
url_env = "SLACK_HOOK"
format = "slack"
events = ["job_failed", "verify_failed"]
jobs = ["nightly"]

[[job]]
name = "nightly"
kind = "backup"
schedule = "0 2 * * *"
ping_url_file = "/etc/custos/hc-url"
"#,
    )
    .unwrap();
    assert_eq!(c.check_every, Duration::from_secs(30));
    assert_eq!(c.stats_every, Duration::from_secs(3600));
    assert_eq!(c.capacity["mem"], 1_610_612_736);
    assert_eq!(c.alerts.len(), 2);
    assert_eq!(c.alerts[1].format, alerts::Format::Slack);
    assert_eq!(
        c.job("nightly").unwrap().ping,
        Some(alerts::UrlSource::Secret(SecretSource::File(
            "/etc/custos/hc-url".into()
        )))
    );
    let d = validate("[[job]]\nname = \"s\"\nkind = \"sync\"\nschedule = \"0 * * * *\"\n").unwrap();
    assert_eq!(d.check_every, config::DEFAULT_CHECK_EVERY);
    assert!(d.alerts.is_empty() && d.capacity.is_empty());

    let job = "[[job]]\nname = \"nightly\"\nkind = \"sync\"\nschedule = \"0 2 * * *\"\n";
    for (extra, needles) in [
        ("[daemon.capacity]\nnope = \"1 GiB\"\n", vec!["[daemon.capacity]", "nope"]),
        ("[daemon.capacity]\nmem = \"lots\"\n", vec!["[daemon.capacity]", "mem", "lots"]),
        ("[daemon]\ncheck_every = \"10ms\"\n", vec!["check_every", "1s"]),
        (
            "[[daemon.alert]]\nname = \"a\"\nurl = \"http://x\"\njobs = [\"weekly\"]\n",
            vec!["\"a\"", "jobs", "weekly"],
        ),
        (
            "[[daemon.alert]]\nname = \"a\"\nurl = \"http://x\"\n[[daemon.alert]]\nname = \"a\"\nurl = \"http://y\"\n",
            vec!["\"a\"", "duplicate"],
        ),
        ("[[daemon.alert]]\nname = \"a\"\nurl = \"http://x\"\nformat = 1\n", vec!["\"a\"", "format"]),
    ] {
        let e = validate(&format!("{extra}{job}"))
            .expect_err(extra)
            .to_string();
        for n in needles {
            assert!(e.contains(n), "{n:?} not in {e:?}");
        }
    }
    let e = validate(
        "[[job]]\nname = \"n\"\nkind = \"sync\"\nschedule = \"0 2 * * *\"\nping_url = \"hc-ping.com/x\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("\"n\"") && e.contains("ping_url"), "{e}");
}

#[test]
fn sizes_parse_in_decimal_and_binary_units() {
    for (text, bytes) in [
        ("1000", 1000),
        ("1 KiB", 1024),
        ("1.5GB", 1_500_000_000),
        ("2 tib", 2 << 40),
        ("10MB", 10_000_000),
    ] {
        assert_eq!(config::parse_size(text), Some(bytes), "{text}");
    }
    for bad in ["", "GiB", "1 XB", "-1", "0", "1e3"] {
        assert_eq!(config::parse_size(bad), None, "{bad}");
    }
}

/// A loopback receiver that answers the first `fail_first` requests with 500,
/// then 200, and keeps (path, body) of every request.
async fn receiver(fail_first: usize) -> (String, Arc<std::sync::Mutex<Vec<(String, String)>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let got: Arc<std::sync::Mutex<Vec<(String, String)>>> = Arc::default();
    let seen = got.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read head and body (Content-Length).
            loop {
                let k = s.read(&mut chunk).await.unwrap();
                if k == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..k]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&buf).to_string();
            let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
            let body = text
                .split_once("\r\n\r\n")
                .map(|x| x.1.to_string())
                .unwrap_or_default();
            n += 1;
            let status = if n <= fail_first {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            if n > fail_first {
                seen.lock().unwrap().push((path, body));
            }
            let _ = s
                .write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    (url, got)
}

#[tokio::test]
async fn alerts_are_retried_until_delivered_and_pings_use_the_suffix() {
    let (url, got) = receiver(2).await;
    let n = alerts::Notifier::new(Duration::from_millis(20));
    let spec = |name: &str, format| alerts::AlertSpec {
        name: name.into(),
        url: alerts::UrlSource::Plain(format!("{url}/{name}")),
        format,
        events: alerts::EventKind::ALL.into_iter().collect(),
        jobs: Some(["nightly".to_string()].into_iter().collect()),
        retries: 3,
    };
    let specs = [
        spec("json", alerts::Format::Json),
        spec("slack", alerts::Format::Slack),
    ];
    let e = alerts::Event {
        event: alerts::EventKind::JobFailed,
        state: alerts::State::Firing,
        severity: "critical",
        summary: "job nightly (backup) ended error: failed".into(),
        problems: vec!["source docs: /srv/docs: not found".into()],
        job: Some("nightly".into()),
        outcome: Some("error".into()),
        source: None,
        target: None,
        repository: "abcd".into(),
        host: "box".into(),
        time: chrono::Utc::now(),
        audit_head: None,
    };
    n.alert(&specs, &e);
    // Another job's failure is not for these alerts.
    let mut other = e.clone();
    other.job = Some("weekly".into());
    n.alert(&specs, &other);
    n.ping(
        "nightly",
        &alerts::UrlSource::Plain(format!("{url}/hc/")),
        "/fail",
        "error\n".into(),
    );
    let start = Instant::now();
    while got.lock().unwrap().len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            got.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "{got:?}");
    let by_path = |p: &str| {
        got.iter()
            .find(|(path, _)| path == p)
            .map(|x| x.1.clone())
            .unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&by_path("/json")).unwrap();
    assert_eq!(json["event"], "job_failed");
    assert_eq!(json["job"], "nightly");
    assert_eq!(json["problems"][0], "source docs: /srv/docs: not found");
    let slack: serde_json::Value = serde_json::from_str(&by_path("/slack")).unwrap();
    assert!(
        slack["text"].as_str().unwrap().contains("job_failed"),
        "{slack}"
    );
    assert_eq!(by_path("/hc/fail"), "error\n");
    let counts = n.counts();
    assert_eq!(counts.get(&("json".to_string(), "sent")), Some(&1));
    assert_eq!(counts.get(&("ping:nightly".to_string(), "sent")), Some(&1));
}

#[tokio::test]
async fn an_alert_that_never_gets_through_is_counted_failed() {
    // Nothing listens on a port just bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let n = alerts::Notifier::new(Duration::from_millis(10));
    let spec = alerts::AlertSpec {
        name: "dead".into(),
        url: alerts::UrlSource::Plain(format!("http://127.0.0.1:{port}/x")),
        format: alerts::Format::Json,
        events: alerts::EventKind::ALL.into_iter().collect(),
        jobs: None,
        retries: 2,
    };
    let e = alerts::Event {
        event: alerts::EventKind::TargetDown,
        state: alerts::State::Firing,
        severity: "critical",
        summary: "target eu does not answer".into(),
        problems: vec![],
        job: None,
        outcome: None,
        source: None,
        target: Some("eu".into()),
        repository: "abcd".into(),
        host: "box".into(),
        time: chrono::Utc::now(),
        audit_head: None,
    };
    n.alert(std::slice::from_ref(&spec), &e);
    let start = Instant::now();
    while !n.counts().contains_key(&("dead".to_string(), "failed")) {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Daemon and job errors name the line of the key at fault (or of the table).
#[test]
fn daemon_and_job_errors_name_the_line() {
    let line_of = |extra: &str, needle: &str| {
        let text = format!("{BASE}\n{extra}");
        text.lines().position(|l| l.starts_with(needle)).unwrap() + 1
    };
    let job = "[[job]]\nname = \"nightly\"\nkind = \"sync\"\nschedule = \"0 2 * * *\"\n";
    for (extra, needle, want) in [
        (
            format!("[daemon]\nlisten = \"127.0.0.1:9181\"\ncatch_up = \"yes\"\n\n{job}"),
            "catch_up",
            "[daemon] (line",
        ),
        (
            format!("[daemon]\nbogus = 1\n\n{job}"),
            "bogus",
            "[daemon] (line",
        ),
        (
            format!("{job}whatever = 1\n"),
            "whatever",
            "[[job]] \"nightly\" (line",
        ),
        (
            job.replace("0 2 * * *", "every day"),
            "schedule",
            "[[job]] \"nightly\" (line",
        ),
    ] {
        let e = validate(&extra).unwrap_err().to_string();
        let line = line_of(&extra, needle);
        assert!(
            e.contains(want) && e.contains(&format!("(line {line})")),
            "{e:?} should name line {line} ({needle})"
        );
    }
}

#[test]
fn unknown_daemon_and_job_keys_pass_settings_and_fail_in_the_daemon() {
    // Other commands ignore [daemon]/[[job]]; the daemon validates them.
    let text = format!(
        "{BASE}\n[[job]]\nname = \"x\"\nkind = \"sync\"\nschedule = \"0 2 * * *\"\nwhatever = 1\n"
    );
    let s = Settings::parse(&text).unwrap();
    assert_eq!(s.jobs.len(), 1);
    let e = config::validate(&s).unwrap_err().to_string();
    assert!(e.contains("\"x\"") && e.contains("whatever"), "{e}");
}

#[test]
fn load_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("custos.toml");
    std::fs::write(
        &p,
        format!("{BASE}\n[[job]]\nname = \"x\"\nkind = \"sync\"\nschedule = \"0 2 * *\"\n"),
    )
    .unwrap();
    let e = load_config(&p).unwrap_err().to_string();
    assert!(e.contains("custos.toml") && e.contains("\"x\""), "{e}");
}

#[tokio::test]
async fn tokio_cron_scheduler_accepts_every_normalized_spec() {
    // The daemon hands the scheduler `CronSpec::normalized()`; the scheduler's
    // own parser must agree with the validation.
    for spec in [
        "0 2 * * *",
        "*/1 * * * * *",
        "*/15 * * * *",
        "0 0 13 * FRI",
        "30 0 2 * * MON-FRI",
    ] {
        let c = custos_schedules::cron::CronSpec::parse(spec).unwrap();
        tokio_cron_scheduler::Job::new_async(c.normalized(), |_, _| Box::pin(async {}))
            .unwrap_or_else(|e| panic!("{spec}: {e:?}"));
    }
    // Given raw, a 5-field spec is refused by the scheduler: hence the normalization.
    assert!(tokio_cron_scheduler::Job::new_async("0 2 * * *", |_, _| Box::pin(async {})).is_err());
}

// ---------------------------------------------------------------------------
// The runner, on the in-memory target

fn cheap() -> InitOptions {
    InitOptions {
        kdf: KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        },
        ..InitOptions::default()
    }
}

struct Fixture {
    shared: Arc<Shared>,
    due: mpsc::UnboundedReceiver<(String, &'static str)>,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A daemon over an in-memory repository (`limits` on its target) with the
    /// directory source `docs` at `<dir>/docs` and the given `[[job]]`s.
    async fn new(jobs: &str, limits: Limits, seed_state: Option<&str>) -> Fixture {
        let mem: TargetRef = Arc::new(StoreTarget::memory("mem"));
        Fixture::on(jobs, mem, limits, seed_state).await
    }

    /// [`Fixture::new`] on the target `mem` (initialised here).
    async fn on(jobs: &str, mem: TargetRef, limits: Limits, seed_state: Option<&str>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let docs = dir.path().join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::write(docs.join("a.txt"), b"hello from the daemon test\n").unwrap();
        let text = format!(
            r#"
[repository]
password_env = "PW"

[[target]]
name = "mem"
url = "/tmp/custos-daemon-unit-never-used"

[[source]]
name = "docs"
type = "directory"
paths = [{docs:?}]

[retention]
keep_last = 1

{jobs}
"#
        );
        let settings = Settings::parse(&text).unwrap();
        let config = config::validate(&settings).unwrap();
        Repository::init(vec![mem.clone()], b"pw", &cheap())
            .await
            .unwrap();
        let target = Limited::wrap(mem, limits);
        let (repo, _) = Repository::open(vec![target.clone()], b"pw").await.unwrap();
        let state_path = dir.path().join("state").join(STATE_FILE);
        if let Some(s) = seed_state {
            std::fs::create_dir_all(state_path.parent().unwrap()).unwrap();
            std::fs::write(&state_path, s).unwrap();
        }
        let loaded = Loaded {
            settings: Arc::new(settings),
            config: Arc::new(config),
            cached: repo.clone(),
            repo,
            probes: vec![target],
            state_path: Some(state_path),
            opened_at: Instant::now(),
        };
        let (tx, due) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::new(DaemonOptions::default(), loaded, tx));
        shared.load_state();
        Fixture { shared, due, dir }
    }

    /// Start `job` now and wait for the run.
    async fn run(&self, job: &str) {
        let task = self
            .shared
            .start_run(job, "test")
            .unwrap_or_else(|| panic!("{job} did not start"));
        task.await;
    }

    fn metrics(&self) -> String {
        self.shared.metrics_text()
    }

    fn runs(&self, job: &str, outcome: Outcome) -> u64 {
        self.shared
            .metrics
            .lock()
            .unwrap()
            .runs
            .get(job)
            .and_then(|r| r.get(&outcome))
            .copied()
            .unwrap_or(0)
    }

    async fn snapshots(&self) -> usize {
        self.shared
            .current()
            .repo
            .snapshots()
            .await
            .unwrap()
            .0
            .len()
    }
}

fn has_line(text: &str, prefix: &str) -> bool {
    text.lines().any(|l| l.starts_with(prefix))
}

/// The daemon's `prune` job retries a pending erasure: while the Object Lock
/// on the replaced snapshot runs, a run leaves it pending and the snapshot in
/// place; once the lock ran out (the target's clock moved past the
/// retain-until), runs delete the snapshot, prune the erased data out and
/// complete the erasure (audited) — and the other customer's record stays.
#[tokio::test]
async fn the_prune_job_completes_an_erasure_once_its_lock_ran_out() {
    use crate::erasures::tests::{backup_lines, hits, line, Locking};
    use crate::erasures::State;
    const CANARY: &[u8] = b"CANARY-DAEMON-ERASE";
    // The target's clock runs two hours behind: what it locks for an hour
    // has a retain-until an hour in the (real) past, so the job (which uses
    // the real clock) finds the erasure due, and the target decides.
    let lock = Locking::new(
        chrono::Utc::now() - chrono::Duration::hours(2),
        Duration::from_secs(3600),
    );
    let t: TargetRef = lock.clone();
    let f = Fixture::on(
        r#"
[[job]]
name = "prune"
kind = "prune"
grace = "0s"
schedule = "0 4 * * *"
"#,
        t.clone(),
        Limits::default(),
        None,
    )
    .await;
    let repo = f.shared.current().repo.clone();
    let dir = tempfile::tempdir().unwrap();
    let canary = std::str::from_utf8(CANARY).unwrap();
    backup_lines(
        &repo,
        dir.path(),
        &[
            line("a1", "ana@example.org", canary),
            line("b1", "bo@example.org", "from bo"),
        ],
    )
    .await;
    let ana = ["email:ana@example.org".to_string()].into_iter().collect();
    let r = crate::rights::erase(&repo, "ana", &ana, "request", false, Some(Duration::ZERO))
        .await
        .unwrap();
    let id = r.erasure_log.unwrap();
    assert_eq!(r.locked.len(), 1, "{:?}", r.locked);
    let old = r.locked[0].object.clone();
    assert!(old.starts_with("snapshots/"), "{old}");
    let state = |repo: Repository| async move {
        let st = crate::erasures::statuses(&repo).await.unwrap();
        assert_eq!(st.len(), 1);
        (st[0].state, st[0].id)
    };
    assert_eq!(state(repo.clone()).await, (State::Pending, id));

    // The lock still runs: the job leaves everything as it is.
    f.run("prune").await;
    assert_eq!(f.runs("prune", Outcome::Ok), 1);
    assert_eq!(state(repo.clone()).await.0, State::Pending);
    assert!(t.get(&old).await.is_ok(), "{old} deleted while locked");
    assert!(!hits(&repo, &t, CANARY).await.is_empty());

    // The lock ran out: the job deletes the snapshot, and (its prune marks
    // the erased packs, the next one sweeps them) completes the erasure.
    lock.set_clock(chrono::Utc::now());
    f.run("prune").await;
    assert!(t.get(&old).await.is_err(), "{old} still there");
    let mut runs = 2;
    while state(repo.clone()).await.0 == State::Pending && runs < 4 {
        f.run("prune").await;
        runs += 1;
    }
    assert_eq!(f.runs("prune", Outcome::Ok), runs);
    assert_eq!(
        state(repo.clone()).await.0,
        State::Complete,
        "after {runs} runs"
    );
    assert_eq!(hits(&repo, &t, CANARY).await, Vec::<String>::new());
    let log = crate::audit::verify(&repo, None).await.unwrap();
    assert!(
        log.entries
            .iter()
            .any(|(_, e)| e.action.command == "erasure complete"
                && e.action.subjects == vec![format!("erasure:{id}")]),
        "{log:?}"
    );
    let bo = ["email:bo@example.org".to_string()].into_iter().collect();
    assert_eq!(
        crate::rights::show(&repo, "bo", &bo).await.unwrap().records,
        1
    );
}

#[tokio::test]
async fn every_job_kind_runs_against_the_repository() {
    let f = Fixture::new(
        r#"
[[job]]
name = "backup"
kind = "backup"
schedule = "0 2 * * *"

[[job]]
name = "rotate"
kind = "forget"
prune = true
grace = "0s"
schedule = "0 3 * * *"

[[job]]
name = "prune"
kind = "prune"
schedule = "0 4 * * *"

[[job]]
name = "sync"
kind = "sync"
schedule = "0 5 * * *"

[[job]]
name = "check"
kind = "check"
read_data = true
schedule = "0 6 * * *"

[[job]]
name = "verify"
kind = "restore_verify"
schedule = "0 7 * * *"
"#,
        Limits::default(),
        None,
    )
    .await;
    f.run("backup").await;
    std::fs::write(f.dir.path().join("docs/b.txt"), b"more\n").unwrap();
    f.run("backup").await;
    assert_eq!(f.runs("backup", Outcome::Ok), 2);
    assert_eq!(f.snapshots().await, 2);
    // keep_last = 1: forget removes one snapshot, then prunes.
    f.run("rotate").await;
    assert_eq!(f.runs("rotate", Outcome::Ok), 1, "{}", f.metrics());
    assert_eq!(f.snapshots().await, 1);
    for job in ["prune", "sync", "check", "verify"] {
        f.run(job).await;
        assert_eq!(f.runs(job, Outcome::Ok), 1, "{job}: {}", f.metrics());
    }
    let m = f.metrics();
    for prefix in [
        "custos_up 1",
        "custos_job_runs_total{job=\"backup\",outcome=\"ok\"} 2",
        "custos_job_last_success_timestamp_seconds{job=\"backup\"}",
        "custos_job_duration_seconds{job=\"check\"}",
        "custos_job_skipped_total{job=\"backup\"} 0",
        "custos_snapshot_age_seconds{source=\"docs\"}",
        "custos_target_lagging{target=\"mem\"} 0",
    ] {
        assert!(has_line(&m, prefix), "no {prefix:?} in\n{m}");
    }
    // Successful runs are persisted for catch-up.
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.dir.path().join("state").join(STATE_FILE)).unwrap(),
    )
    .unwrap();
    for job in ["backup", "rotate", "prune", "sync", "check", "verify"] {
        assert!(state["last_success"][job].is_string(), "{job}: {state}");
    }
    let (ready, body) = f.shared.readiness().await;
    assert!(ready, "{body}");
    assert!(
        body.contains("config ok") && body.contains("target mem: ok"),
        "{body}"
    );
}

#[tokio::test]
async fn a_run_due_while_the_previous_runs_is_skipped_and_counted() {
    let f = Fixture::new(
        "[[job]]\nname = \"b\"\nkind = \"backup\"\nschedule = \"*/1 * * * * *\"\n",
        Limits::default(),
        None,
    )
    .await;
    let first = f
        .shared
        .start_run("b", "schedule")
        .expect("first run starts");
    // Still running (not even polled yet): the next fires are refused.
    assert!(f.shared.start_run("b", "schedule").is_none());
    assert!(f.shared.start_run("b", "schedule").is_none());
    assert_eq!(*f.shared.running.borrow(), 1);
    assert!(has_line(&f.metrics(), "custos_job_running{job=\"b\"} 1"));
    first.await;
    assert_eq!(*f.shared.running.borrow(), 0);
    let m = f.metrics();
    assert!(has_line(&m, "custos_job_skipped_total{job=\"b\"} 2"), "{m}");
    assert!(
        has_line(&m, "custos_job_runs_total{job=\"b\",outcome=\"ok\"} 1"),
        "{m}"
    );
    // Once finished, the job runs again; unknown jobs never start.
    f.run("b").await;
    assert_eq!(f.runs("b", Outcome::Ok), 2);
    assert!(f.shared.start_run("nope", "schedule").is_none());
    // Once stopping, nothing starts.
    f.shared.runs.lock().unwrap().stopping = true;
    assert!(f.shared.start_run("b", "schedule").is_none());
}

#[tokio::test]
async fn a_run_over_its_timeout_is_abandoned_without_a_snapshot() {
    // 64 KiB/s upload and 1 MiB of incompressible data: the backup takes ~15 s.
    let f = Fixture::new(
        "[[job]]\nname = \"slow\"\nkind = \"backup\"\nschedule = \"0 2 * * *\"\ntimeout = \"300ms\"\n",
        Limits {
            upload_bps: Some(64 * 1024),
            ..Limits::default()
        },
        None,
    )
    .await;
    let data: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
    std::fs::write(f.dir.path().join("docs/big.bin"), data).unwrap();
    let started = Instant::now();
    f.run("slow").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(f.runs("slow", Outcome::Timeout), 1);
    assert_eq!(f.snapshots().await, 0, "nothing committed");
    let m = f.metrics();
    assert!(
        has_line(
            &m,
            "custos_job_runs_total{job=\"slow\",outcome=\"timeout\"} 1"
        ),
        "{m}"
    );
    assert!(
        !has_line(
            &m,
            "custos_job_last_success_timestamp_seconds{job=\"slow\"}"
        ),
        "{m}"
    );
}

#[tokio::test]
async fn failures_are_counted_and_not_persisted_as_success() {
    let f = Fixture::new(
        "[[job]]\nname = \"b\"\nkind = \"backup\"\nschedule = \"0 2 * * *\"\n",
        Limits::default(),
        None,
    )
    .await;
    std::fs::remove_dir_all(f.dir.path().join("docs")).unwrap();
    f.run("b").await;
    assert_eq!(f.runs("b", Outcome::Error), 1, "{}", f.metrics());
    assert!(!f.dir.path().join("state").join(STATE_FILE).exists());
}

#[tokio::test]
async fn catch_up_requests_a_run_only_when_one_was_missed() {
    let old = "{\"last_success\": {\"daily\": \"2020-01-01T03:00:00Z\", \"off\": \"2020-01-01T03:00:00Z\"}}";
    let mut f = Fixture::new(
        r#"
[daemon]
catch_up = true

[[job]]
name = "daily"
kind = "backup"
schedule = "0 2 * * *"

[[job]]
name = "off"
kind = "backup"
schedule = "0 2 * * *"
catch_up = false

[[job]]
name = "never-ran"
kind = "backup"
schedule = "0 2 * * *"
"#,
        Limits::default(),
        Some(old),
    )
    .await;
    // The persisted success shows in the metrics right away.
    assert!(has_line(
        &f.metrics(),
        "custos_job_last_success_timestamp_seconds{job=\"daily\"} 1577847600"
    ));
    f.shared.catch_up();
    assert_eq!(f.due.try_recv().unwrap(), ("daily".to_string(), "catch-up"));
    assert!(
        f.due.try_recv().is_err(),
        "only the missed job with catch_up"
    );
}

#[tokio::test]
async fn a_damaged_state_file_is_ignored() {
    let f = Fixture::new(
        "[[job]]\nname = \"b\"\nkind = \"backup\"\nschedule = \"0 2 * * *\"\n",
        Limits::default(),
        Some("{not json"),
    )
    .await;
    assert!(f.shared.metrics.lock().unwrap().last_success.is_empty());
    f.run("b").await;
    let text = std::fs::read_to_string(f.dir.path().join("state").join(STATE_FILE)).unwrap();
    assert!(text.contains("\"b\""), "{text}");
}

#[test]
fn the_state_file_lives_under_the_cache_dir() {
    let opts = DaemonOptions {
        cache_dir: Some("/var/cache/custos".into()),
        ..DaemonOptions::default()
    };
    let settings = Settings::parse(BASE).unwrap();
    assert_eq!(
        cache_root(&opts, &settings).as_deref(),
        Some(Path::new("/var/cache/custos"))
    );
}

#[test]
fn example_configs_parse_and_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schedules/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let settings = Settings::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let cfg = crate::daemon::config::validate(&settings)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!cfg.jobs.is_empty(), "{}", path.display());
        assert!(!cfg.alerts.is_empty(), "{}: show alerts", path.display());
        seen += 1;
    }
    assert!(seen >= 3, "examples missing in {}", dir.display());
}
