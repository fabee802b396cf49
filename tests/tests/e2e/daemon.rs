//! `custos daemon` as a child process against a local repository: jobs on a
//! second-granularity cron schedule, `/readyz`, `/healthz` and `/metrics` over
//! HTTP on loopback, no overlapping runs of a slow job (skips counted), SIGHUP
//! reloads (an invalid config is refused and logged, the old one keeps
//! running), SIGTERM stops within the grace period leaving a repository that
//! `check` passes, and an invalid cron spec fails at start naming the job.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` → (status, body), or `None` when nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The value of the sample whose name and labels are exactly `series`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[track_caller]
fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running `custos daemon` with its stderr collected.
struct Daemon {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    port: u16,
}

impl Daemon {
    fn start(repo: &Repo, port: u16) -> Daemon {
        let mut cmd: Command = repo.cmd(["daemon"]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn custos daemon");
        let mut pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Daemon {
            child: Some(child),
            stderr,
            port,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path)
    }

    fn metrics(&self) -> String {
        match self.get("/metrics") {
            Some((200, body)) => body,
            other => panic!("/metrics: {other:?}\nstderr:\n{}", self.stderr()),
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {pid}");
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if let Some((200, _)) = self.get("/readyz") {
                return;
            }
            let exited = self
                .child
                .as_ref()
                .map(|c| c.id())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
            assert!(
                start.elapsed() < Duration::from_secs(15) && !exited,
                "daemon not ready\nstderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the exit (at most `limit`); returns the exit code and how long it took.
    fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let start = Instant::now();
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                // Let the reader thread drain the pipe.
                std::thread::sleep(Duration::from_millis(100));
                return (status.code(), start.elapsed());
            }
            assert!(
                start.elapsed() < limit,
                "daemon still running {limit:?} after the signal\nstderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Append TOML to the fixture's config (which ends inside its `[[target]]`).
fn append_config(repo: &Repo, toml: &str) {
    let mut text = std::fs::read_to_string(repo.config_path()).unwrap();
    text.push_str(toml);
    std::fs::write(repo.config_path(), text).unwrap();
}

fn snapshot_ids(repo: &Repo) -> Vec<String> {
    let mut ids: Vec<String> = repo
        .snapshots()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
fn daemon_runs_backups_on_schedule_reloads_and_stops_cleanly() {
    let started = Instant::now();
    let repo = Repo::with_via(Kind::Local, "daemon-schedule", Via::Config)
        .unwrap()
        .init();
    let mut rng = rng("daemon-schedule");
    let src = repo.p("src");
    random_files(&mut rng, &src, "doc", 5, 20_000);
    let port = free_port();
    append_config(
        &repo,
        &format!(
            r#"
[[source]]
name = "docs"
type = "directory"
paths = [{src}]

[daemon]
listen = "127.0.0.1:{port}"
shutdown_grace = "20s"

[[job]]
name = "every-second"
kind = "backup"
schedule = "*/1 * * * * *"
"#,
            src = toml_str(&src.display().to_string())
        ),
    );
    let good = std::fs::read_to_string(repo.config_path()).unwrap();
    let mut d = Daemon::start(&repo, port);
    d.wait_ready();
    let (status, body) = d.get("/readyz").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("config ok") && body.contains("target repo: ok"),
        "{body}"
    );
    assert_eq!(d.get("/healthz").map(|r| r.0), Some(200));
    assert_eq!(d.get("/nope").map(|r| r.0), Some(404));

    // Backups run every second.
    let ok = "custos_job_runs_total{job=\"every-second\",outcome=\"ok\"}";
    wait_until("two successful runs", Duration::from_secs(10), || {
        metric(&d.metrics(), ok).unwrap_or(0.0) >= 2.0
    });
    let m = d.metrics();
    assert_eq!(metric(&m, "custos_up"), Some(1.0), "{m}");
    assert!(
        metric(&m, "custos_snapshot_age_seconds{source=\"docs\"}").is_some(),
        "{m}"
    );
    assert!(
        metric(
            &m,
            "custos_job_last_success_timestamp_seconds{job=\"every-second\"}"
        )
        .is_some(),
        "{m}"
    );
    assert!(
        metric(&m, "custos_job_duration_seconds{job=\"every-second\"}").is_some(),
        "{m}"
    );
    assert_eq!(
        metric(&m, "custos_target_lagging{target=\"repo\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "custos_job_runs_total{job=\"every-second\",outcome=\"error\"}"
        ),
        Some(0.0),
        "{m}"
    );
    let snaps = snapshot_ids(&repo);
    assert!(snaps.len() >= 2, "{snaps:?}");

    // SIGHUP with an invalid config: refused, logged with the reason, the old config keeps running.
    std::fs::write(
        repo.config_path(),
        good.replace("*/1 * * * * *", "*/1 * * * * * *"),
    )
    .unwrap();
    d.signal("HUP");
    wait_until(
        "the reload failure in the log",
        Duration::from_secs(10),
        || d.stderr().contains("config reload failed"),
    );
    let log = d.stderr();
    assert!(
        log.contains("every-second") && log.contains("7 field"),
        "{log}"
    );
    assert_eq!(d.get("/readyz").map(|r| r.0), Some(200), "still ready");
    let before = metric(&d.metrics(), ok).unwrap();
    wait_until(
        "runs after the failed reload",
        Duration::from_secs(10),
        || metric(&d.metrics(), ok).unwrap() > before,
    );

    // SIGHUP with a valid config: the new job replaces the old one.
    std::fs::write(
        repo.config_path(),
        good.replace("name = \"every-second\"", "name = \"renamed\""),
    )
    .unwrap();
    d.signal("HUP");
    wait_until("the renamed job to run", Duration::from_secs(10), || {
        metric(
            &d.metrics(),
            "custos_job_runs_total{job=\"renamed\",outcome=\"ok\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    });
    assert!(!d.metrics().contains("job=\"every-second\""));

    // SIGTERM: stops taking work, lets the running backup finish, exits 0.
    let before_stop = snapshot_ids(&repo);
    d.signal("TERM");
    let (code, took) = d.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "stderr:\n{}", d.stderr());
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        http_get(port, "/healthz").is_none(),
        "nothing listens after exit"
    );
    // Nothing committed is lost; the repository checks clean.
    let after = snapshot_ids(&repo);
    for id in &before_stop {
        assert!(after.contains(id), "snapshot {id} lost");
    }
    repo.ok(["check", "--read-data"]);
    // The last successful run is kept for catch-up.
    let state = std::fs::read_dir(repo.p("cache"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("daemon-state.json"))
        .find(|p| p.is_file())
        .expect("daemon-state.json under the cache dir");
    let text = std::fs::read_to_string(state).unwrap();
    assert!(text.contains("\"renamed\""), "{text}");
    eprintln!("daemon-schedule took {:?}", started.elapsed());
}

#[test]
fn a_slow_job_is_never_run_twice_and_sigterm_abandons_it_safely() {
    let started = Instant::now();
    let repo = Repo::with_via(Kind::Local, "daemon-slow", Via::Config)
        .unwrap()
        .init();
    let mut rng = rng("daemon-slow");
    // A committed snapshot from before the daemon, which must survive.
    let small = repo.p("small");
    random_files(&mut rng, &small, "s", 2, 1_000);
    let kept = s(&repo.backup(&[&small]), "snapshot_id").to_string();
    // 1.5 MB of incompressible data at 128 KiB/s: a run takes ~12 s, the job fires every second.
    let big = repo.p("big");
    random_files(&mut rng, &big, "b", 3, 500_000);
    let port = free_port();
    append_config(
        &repo,
        &format!(
            r#"upload_limit_kib = 128

[[source]]
name = "big"
type = "directory"
paths = [{big}]

[daemon]
listen = "127.0.0.1:{port}"
shutdown_grace = "1s"

[[job]]
name = "slow"
kind = "backup"
schedule = "*/1 * * * * *"
"#,
            big = toml_str(&big.display().to_string())
        ),
    );
    let mut d = Daemon::start(&repo, port);
    d.wait_ready();
    wait_until("skipped runs", Duration::from_secs(10), || {
        metric(&d.metrics(), "custos_job_skipped_total{job=\"slow\"}").unwrap_or(0.0) >= 2.0
    });
    let m = d.metrics();
    assert_eq!(
        metric(&m, "custos_job_running{job=\"slow\"}"),
        Some(1.0),
        "{m}"
    );
    for outcome in ["ok", "error"] {
        assert_eq!(
            metric(
                &m,
                &format!("custos_job_runs_total{{job=\"slow\",outcome=\"{outcome}\"}}")
            ),
            Some(0.0),
            "the first run is still the only one: {m}"
        );
    }

    // SIGTERM mid-upload: the grace period (1 s) ends, the run is abandoned, exit 0.
    d.signal("TERM");
    let (code, took) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "stderr:\n{}", d.stderr());
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(d.stderr().contains("abandoning"), "{}", d.stderr());
    // Nothing half-committed: the old snapshot is there, no new one, check passes.
    assert_eq!(snapshot_ids(&repo), vec![kept]);
    repo.ok(["check", "--read-data"]);
    eprintln!("daemon-slow took {:?}", started.elapsed());
}

#[test]
fn an_invalid_cron_spec_fails_at_start_naming_the_job() {
    let repo = Repo::with_via(Kind::Local, "daemon-cron", Via::Config).unwrap();
    let src = repo.p("src");
    std::fs::create_dir_all(&src).unwrap();
    let port = free_port();
    let jobs = |schedule: &str| {
        format!(
            r#"
[[source]]
name = "docs"
type = "directory"
paths = [{src}]

[daemon]
listen = "127.0.0.1:{port}"

[[job]]
name = "nightly-docs"
kind = "backup"
schedule = "{schedule}"
"#,
            src = toml_str(&src.display().to_string())
        )
    };
    let base = std::fs::read_to_string(repo.config_path()).unwrap();

    std::fs::write(repo.config_path(), format!("{base}{}", jobs("0 2 * *"))).unwrap();
    let out = repo.run(["daemon"]);
    out.expect_failure()
        .expect_stderr("nightly-docs")
        .expect_stderr("schedule")
        .expect_stderr("4 field");
    assert!(http_get(port, "/healthz").is_none());

    std::fs::write(
        repo.config_path(),
        format!("{base}{}", jobs("0 2 * * * * *")),
    )
    .unwrap();
    repo.run(["daemon", "--check-config"])
        .expect_failure()
        .expect_stderr("nightly-docs");

    // --check-config validates without opening the repository (none exists here).
    std::fs::write(repo.config_path(), format!("{base}{}", jobs("0 2 * * *"))).unwrap();
    let out = repo.ok(["daemon", "--check-config"]);
    assert!(
        out.stdout
            .contains("job nightly-docs: backup on \"0 2 * * *\""),
        "{out}"
    );
}

/// A loopback HTTP receiver for webhooks and pings: answers 200 and keeps
/// (path, body) of every POST.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<(String, String)>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let sink = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let (path, body) = loop {
                    let n = match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break (String::new(), String::new()),
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                        break (path, body.to_string());
                    }
                };
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                if !path.is_empty() {
                    sink.lock().unwrap().push((path, body));
                }
            }
        });
        Receiver { port, got }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn bodies(&self, path: &str) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// JSON alerts received at `path` with `event` (and `state`).
    fn events(&self, path: &str, event: &str, state: &str) -> Vec<serde_json::Value> {
        self.bodies(path)
            .iter()
            .filter_map(|b| serde_json::from_str::<serde_json::Value>(b).ok())
            .filter(|v| v["event"] == event && v["state"] == state)
            .collect()
    }
}

/// The sidecar against SeaweedFS: backups and a restore-verify on a seconds
/// schedule, the issue's metric series, alerts (JSON and Slack) and
/// healthchecks pings reaching a local receiver, a target going down and
/// lagging after a reload, and SIGTERM in the middle of an upload.
#[test]
fn daemon_on_s3_runs_jobs_alerts_and_stops_mid_upload_safely() {
    let started = Instant::now();
    let Some(repo) = Repo::new(Kind::S3, "daemon-s3") else {
        return;
    };
    let mut repo = repo.init();
    let rx = Receiver::start();
    repo.env("DAEMON_S3_SLACK_URL", rx.url("/slack"));
    let mut rng = rng("daemon-s3");
    let docs = repo.p("docs");
    random_files(&mut rng, &docs, "doc", 4, 30_000);
    let big = repo.p("big");
    random_files(&mut rng, &big, "b", 3, 600_000);
    let port = free_port();
    let gone = repo.p("gone");
    let base = std::fs::read_to_string(repo.config_path()).unwrap();
    let daemon_part = |extra_target: &str, jobs: &str| {
        format!(
            r#"{extra_target}
[[source]]
name = "docs"
type = "directory"
paths = [{docs}]
rpo = "1h"

[[source]]
name = "archive"
type = "directory"
paths = [{docs}]
rpo = "2s"

[[source]]
name = "gone"
type = "directory"
paths = [{gone}]

[[source]]
name = "big"
type = "directory"
paths = [{big}]

[daemon]
listen = "127.0.0.1:{port}"
shutdown_grace = "1s"
check_every = "1s"
stats_every = "1s"

[daemon.capacity]
repo = "1 KiB"

[[daemon.alert]]
name = "ops"
url = "{json}"

[[daemon.alert]]
name = "chat"
url_env = "DAEMON_S3_SLACK_URL"
format = "slack"
events = ["job_failed"]
{jobs}"#,
            docs = toml_str(&docs.display().to_string()),
            gone = toml_str(&gone.display().to_string()),
            big = toml_str(&big.display().to_string()),
            json = rx.url("/json"),
        )
    };
    let jobs = format!(
        r#"
[[job]]
name = "docs"
kind = "backup"
sources = ["docs"]
schedule = "*/2 * * * * *"
ping_url = "{hc}"

[[job]]
name = "verify"
kind = "restore_verify"
sources = ["docs"]
schedule = "*/3 * * * * *"

[[job]]
name = "broken"
kind = "backup"
sources = ["gone"]
schedule = "*/5 * * * * *"
"#,
        hc = rx.url("/hc/docs")
    );
    std::fs::write(
        repo.config_path(),
        format!("{base}{}", daemon_part("", &jobs)),
    )
    .unwrap();
    let mut d = Daemon::start(&repo, port);
    d.wait_ready();

    let ok = |job: &str| format!("custos_job_runs_total{{job=\"{job}\",outcome=\"ok\"}}");
    wait_until(
        "two backups and a restore-verify",
        Duration::from_secs(30),
        || {
            let m = d.metrics();
            metric(&m, &ok("docs")).unwrap_or(0.0) >= 2.0
                && metric(&m, &ok("verify")).unwrap_or(0.0) >= 1.0
        },
    );
    wait_until("every alert", Duration::from_secs(20), || {
        !rx.events("/json", "job_failed", "firing").is_empty()
            && !rx.events("/json", "rpo_breach", "firing").is_empty()
            && !rx.events("/json", "capacity", "firing").is_empty()
            && !rx.bodies("/slack").is_empty()
            && rx.bodies("/hc/docs").len() >= 2
    });
    let m = d.metrics();
    for series in [
        "custos_backup_last_success_timestamp_seconds{job=\"docs\"}",
        "custos_backup_duration_seconds{job=\"docs\"}",
        "custos_restore_verify_last_success_timestamp_seconds{job=\"verify\"}",
        "custos_restore_verify_duration_seconds{job=\"verify\"}",
        "custos_rpo_seconds{source=\"docs\"}",
        "custos_job_skipped_overlap_total{job=\"docs\"}",
    ] {
        assert!(metric(&m, series).is_some(), "{series} missing:\n{m}");
    }
    assert_eq!(
        metric(&m, "custos_target_up{target=\"repo\"}"),
        Some(1.0),
        "{m}"
    );
    let stored = metric(&m, "custos_target_stored_bytes{target=\"repo\"}").unwrap();
    assert!(
        stored > 120_000.0,
        "4 x 30 kB of random data are stored: {m}"
    );
    let uploaded = metric(
        &m,
        "custos_backup_bytes_uploaded_total{job=\"docs\",source=\"docs\"}",
    )
    .unwrap();
    assert!(uploaded > 120_000.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "custos_backup_records_total{job=\"docs\",source=\"docs\"}"
        ),
        Some(4.0),
        "the first run stored 4 new files, later runs none: {m}"
    );
    assert!(
        metric(&m, "custos_backup_failures_total{job=\"broken\"}").unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "custos_alerts_total{alert=\"ops\",outcome=\"sent\"}").unwrap() >= 3.0,
        "{m}"
    );

    // The payloads: JSON names the job, source, target; Slack has a text line.
    let failed = &rx.events("/json", "job_failed", "firing")[0];
    assert_eq!(failed["job"], "broken", "{failed}");
    assert_eq!(failed["severity"], "critical", "{failed}");
    assert!(
        failed["problems"][0].as_str().unwrap().contains("gone"),
        "{failed}"
    );
    let rpo = &rx.events("/json", "rpo_breach", "firing")[0];
    assert_eq!(
        rpo["source"], "archive",
        "only the source never backed up: {rpo}"
    );
    let cap = &rx.events("/json", "capacity", "firing")[0];
    assert_eq!(cap["target"], "repo", "{cap}");
    assert_eq!(
        rx.events("/json", "capacity", "firing").len(),
        1,
        "fires once"
    );
    let slack: serde_json::Value = serde_json::from_str(&rx.bodies("/slack")[0]).unwrap();
    let text = slack["text"].as_str().unwrap();
    assert!(
        text.contains("job_failed") && text.contains("broken"),
        "{text}"
    );
    assert!(
        rx.bodies("/slack").iter().all(|b| b.contains("job_failed")),
        "slack filter"
    );
    // Pings: /start then success for each run of the docs job.
    assert!(!rx.bodies("/hc/docs/start").is_empty(), "start pings");
    assert!(
        rx.bodies("/hc/docs").iter().all(|b| b.starts_with("ok ")),
        "{:?}",
        rx.bodies("/hc/docs")
    );
    assert!(rx.bodies("/hc/docs/fail").is_empty());
    assert!(
        d.stderr().find("DAEMON_S3_SLACK_URL").is_none() && !d.stderr().contains("/slack"),
        "the Slack URL is a secret: {}",
        d.stderr()
    );

    // A second target that does not answer: down, and the backups leave it behind.
    let dead = free_port();
    let down = format!(
        "\n[[target]]\nname = \"down\"\nurl = \"s3://custos-a/never\"\nendpoint = \"http://127.0.0.1:{dead}\"\n"
    );
    std::fs::write(
        repo.config_path(),
        format!("{base}{}", daemon_part(&down, &jobs)),
    )
    .unwrap();
    d.signal("HUP");
    wait_until(
        "target_down and target_lagging",
        Duration::from_secs(30),
        || {
            !rx.events("/json", "target_down", "firing").is_empty()
                && !rx.events("/json", "target_lagging", "firing").is_empty()
        },
    );
    let m = d.metrics();
    assert_eq!(
        metric(&m, "custos_target_up{target=\"down\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "custos_target_lagging{target=\"down\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        rx.events("/json", "target_down", "firing")[0]["target"],
        "down"
    );

    // Back to one target, plus a slow backup (600 kB x 3 at 256 KiB/s).
    let slow_jobs = format!(
        "{jobs}\n[[job]]\nname = \"slow\"\nkind = \"backup\"\nsources = [\"big\"]\nschedule = \"*/1 * * * * *\"\n"
    );
    let limited = base.replacen("[[target]]", "[[target]]\nupload_limit_kib = 256", 1);
    std::fs::write(
        repo.config_path(),
        format!("{limited}{}", daemon_part("", &slow_jobs)),
    )
    .unwrap();
    d.signal("HUP");
    wait_until("target_down resolved", Duration::from_secs(20), || {
        !rx.events("/json", "target_down", "resolved").is_empty()
    });
    wait_until("the slow backup uploading", Duration::from_secs(20), || {
        metric(&d.metrics(), "custos_job_running{job=\"slow\"}") == Some(1.0)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let before_stop = snapshot_ids(&repo);
    d.signal("TERM");
    let (code, took) = d.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "stderr:\n{}", d.stderr());
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        d.stderr().contains("abandoning"),
        "stopped mid-upload: {}",
        d.stderr()
    );
    let after = snapshot_ids(&repo);
    for id in &before_stop {
        assert!(after.contains(id), "snapshot {id} lost");
    }
    assert!(
        !repo.snapshots().iter().any(|s| s["source"] == "big"),
        "the abandoned backup committed nothing"
    );
    let chk = repo.json(["check", "--read-data"]);
    assert!(chk[0]["errors"].as_array().unwrap().is_empty(), "{chk}");
    eprintln!("daemon-s3 took {:?}", started.elapsed());
}
