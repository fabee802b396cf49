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
