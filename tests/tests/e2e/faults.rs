//! Transient storage faults, concurrency and bandwidth limits, through an
//! in-process HTTP proxy on 127.0.0.1:0 in front of the SeaweedFS test server.
//!
//! The proxy forwards every request unchanged (the `Host` header included, so
//! SigV4 signatures stay valid), counts requests and the most in flight at
//! once, and injects faults on a deterministic share of requests: a 503
//! answer (not forwarded), a connection closed without an answer (after
//! forwarding: the write may have landed) and an answer held back past the
//! client's `request_timeout` (after forwarding).

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::support::*;

/// What the proxy does to requests.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// Forward everything, each answer delayed by this long (makes requests overlap).
    Pass(Duration),
    /// Request n: n % 6 == 2 → 503; n % 8 == 5 → connection closed after
    /// forwarding; n % 23 == 11 → answer held back for this long after forwarding.
    Faulty(Duration),
    /// Every request answered 503 (nothing forwarded).
    FailAll,
    /// PUT and POST answered 503; reads are forwarded.
    FailWrites,
    /// The first n requests fail (even: 503, odd: connection closed), then all pass.
    FailFirst(usize),
    /// Every PUT of a data pack is forwarded with one byte of its body changed.
    CorruptDataPuts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Unavailable,
    Dropped,
    Slow,
}

impl Plan {
    fn fault(self, n: usize, method: &hyper::Method) -> Option<Fault> {
        match self {
            Plan::Pass(_) => None,
            Plan::FailAll => Some(Fault::Unavailable),
            Plan::FailWrites => (method == hyper::Method::PUT || method == hyper::Method::POST)
                .then_some(Fault::Unavailable),
            Plan::Faulty(_) if n % 23 == 11 => Some(Fault::Slow),
            Plan::Faulty(_) if n % 6 == 2 => Some(Fault::Unavailable),
            Plan::Faulty(_) if n % 8 == 5 => Some(Fault::Dropped),
            Plan::Faulty(_) => None,
            Plan::FailFirst(k) if n < k && n.is_multiple_of(2) => Some(Fault::Unavailable),
            Plan::FailFirst(k) if n < k => Some(Fault::Dropped),
            Plan::FailFirst(_) | Plan::CorruptDataPuts => None,
        }
    }
}

#[derive(Default, Debug)]
struct Stats {
    requests: AtomicUsize,
    puts: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    unavailable: AtomicUsize,
    dropped: AtomicUsize,
    slow: AtomicUsize,
    corrupted: AtomicUsize,
    /// Requests (method and path) whose answer is being held back.
    held: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Requests that arrived while the same request's answer was held back:
    /// the client timed out and retried.
    retried_while_held: AtomicUsize,
}

/// Decrements the in-flight count when a request's handling ends.
struct InFlight(Arc<Stats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Proxy {
    url: String,
    stats: Arc<Stats>,
    plan: Arc<std::sync::Mutex<Plan>>,
    _rt: tokio::runtime::Runtime,
}

impl Proxy {
    fn start(upstream: &str, plan: Plan) -> Proxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stats = Arc::new(Stats::default());
        let plan = Arc::new(std::sync::Mutex::new(plan));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let upstream = upstream.trim_end_matches('/').to_string();
        let (st, pl) = (stats.clone(), plan.clone());
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (st, pl, client, upstream) =
                    (st.clone(), pl.clone(), client.clone(), upstream.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        handle(
                            req,
                            st.clone(),
                            pl.clone(),
                            client.clone(),
                            upstream.clone(),
                        )
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Proxy {
            url,
            stats,
            plan,
            _rt: rt,
        }
    }

    fn set_plan(&self, plan: Plan) {
        *self.plan.lock().unwrap() = plan;
    }

    fn reset(&self) {
        for c in [
            &self.stats.requests,
            &self.stats.puts,
            &self.stats.max_in_flight,
            &self.stats.unavailable,
            &self.stats.dropped,
            &self.stats.slow,
        ] {
            c.store(0, Ordering::SeqCst);
        }
    }

    fn get(&self, c: fn(&Stats) -> &AtomicUsize) -> usize {
        c(&self.stats).load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct Injected;

impl std::fmt::Display for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected connection drop")
    }
}

impl std::error::Error for Injected {}

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    stats: Arc<Stats>,
    plan: Arc<std::sync::Mutex<Plan>>,
    client: reqwest::Client,
    upstream: String,
) -> Result<hyper::Response<Full<Bytes>>, Injected> {
    let n = stats.requests.fetch_add(1, Ordering::SeqCst);
    let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(stats.clone());
    if req.method() == hyper::Method::PUT {
        stats.puts.fetch_add(1, Ordering::SeqCst);
    }
    let plan = *plan.lock().unwrap();
    let fault = plan.fault(n, req.method());
    let key = format!("{} {}", req.method(), req.uri());
    if stats.held.lock().unwrap().contains(&key) {
        stats.retried_while_held.fetch_add(1, Ordering::SeqCst);
    }

    let (parts, body) = req.into_parts();
    let mut body = body.collect().await.map_err(|_| Injected)?.to_bytes();
    if matches!(plan, Plan::CorruptDataPuts)
        && parts.method == hyper::Method::PUT
        && parts.uri.path().contains("/data/")
        && !body.is_empty()
    {
        stats.corrupted.fetch_add(1, Ordering::SeqCst);
        let mut changed = body.to_vec();
        changed[body.len() / 2] ^= 0x20;
        body = Bytes::from(changed);
    }
    if fault == Some(Fault::Unavailable) {
        stats.unavailable.fetch_add(1, Ordering::SeqCst);
        let xml =
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>ServiceUnavailable</Code>\
                   <Message>injected by the test proxy</Message></Error>";
        return Ok(hyper::Response::builder()
            .status(503)
            .header("content-type", "application/xml")
            .body(Full::new(Bytes::from(xml)))
            .unwrap());
    }

    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap();
    let mut rb = client.request(method, format!("{upstream}{path}"));
    for (k, v) in &parts.headers {
        if !matches!(
            k.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            rb = rb.header(k.as_str(), v.as_bytes());
        }
    }
    let resp = rb.body(body).send().await.map_err(|_| Injected)?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.map_err(|_| Injected)?;

    match (fault, plan) {
        (Some(Fault::Dropped), _) => {
            stats.dropped.fetch_add(1, Ordering::SeqCst);
            return Err(Injected);
        }
        (Some(Fault::Slow), Plan::Faulty(hold)) => {
            stats.slow.fetch_add(1, Ordering::SeqCst);
            stats.held.lock().unwrap().insert(key.clone());
            tokio::time::sleep(hold).await;
            stats.held.lock().unwrap().remove(&key);
        }
        (_, Plan::Pass(delay)) => tokio::time::sleep(delay).await,
        _ => {}
    }
    let mut out = hyper::Response::builder().status(status);
    let head = parts.method == hyper::Method::HEAD;
    for (k, v) in &headers {
        let skip = matches!(k.as_str(), "transfer-encoding" | "connection")
            || (k.as_str() == "content-length" && !head);
        if !skip {
            out = out.header(k.as_str(), v.as_bytes());
        }
    }
    Ok(out.body(Full::new(bytes)).unwrap())
}

/// An initialised S3 repository without a metadata cache (every read goes
/// through the proxy), its S3 server, the test's seeded rng and a source
/// folder path; None when S3 is not available.
fn s3_repo(test: &str) -> Option<(Repo, S3Env, rand::rngs::StdRng, std::path::PathBuf)> {
    let repo = Repo::new(Kind::S3, test)?.no_cache().init();
    let s3 = repo.s3.clone().unwrap();
    let src = repo.p("src");
    Some((repo, s3, rng(test), src))
}

/// Point the fixture's one S3 target at `endpoint`, with extra target keys.
fn target_config(repo: &Repo, endpoint: &str, extra: &str) {
    let mut t = format!(
        "[repository]\n\n[[target]]\nname = \"repo\"\nurl = {}\nendpoint = {}\n",
        toml_str(&repo.url),
        toml_str(endpoint)
    );
    let _ = writeln!(t, "{extra}");
    std::fs::write(repo.config_path(), t).unwrap();
}

fn restore_to(repo: &Repo, snapshot: &str, dest: &std::path::Path) -> Out {
    repo.ok([
        OsStr::new("restore"),
        OsStr::new(snapshot),
        dest.as_os_str(),
    ])
}

/// Backup, restore and `check --read-data` through a proxy that fails a third
/// of all requests (503, dropped connections, answers past the timeout): all
/// succeed, the restore is byte-identical, and the faults really happened.
#[test]
fn s3_transient_faults_are_retried() {
    let test = "faults-transient";
    let Some((repo, s3, mut rng, src)) = s3_repo(test) else {
        return;
    };
    random_files(&mut rng, &src, "big", 3, 700_000);
    random_files(&mut rng, &src, "small", 20, 3_000);

    // Answers held back 4 s against a 1 s timeout: every such request times out.
    let proxy = Proxy::start(&s3.endpoint, Plan::Faulty(Duration::from_secs(4)));
    target_config(&repo, &proxy.url, "request_timeout = \"1s\"");

    let snap = s(&repo.backup(&[&src]), "snapshot_id").to_string();
    let dest = repo.p("restore");
    restore_to(&repo, &snap, &dest);
    assert_same_dir(&src, &restored(&dest, &src), Compare::ALL);
    let out = repo.ok(["check", "--read-data"]);
    // A second backup of changed data also commits.
    random_files(&mut rng, &src, "more", 4, 50_000);
    let snap2 = s(&repo.backup(&[&src]), "snapshot_id").to_string();

    let (unavailable, dropped, slow) = (
        proxy.get(|s| &s.unavailable),
        proxy.get(|s| &s.dropped),
        proxy.get(|s| &s.slow),
    );
    eprintln!(
        "{test}: {} requests ({} PUT), injected: {unavailable} × 503, {dropped} dropped, {slow} timed out",
        proxy.get(|s| &s.requests),
        proxy.get(|s| &s.puts),
    );
    // Each held-back answer was given up on (request_timeout reached the
    // client) and retried while still held.
    let retried = proxy.get(|s| &s.retried_while_held);
    assert!(
        retried >= slow,
        "{slow} answers held back past the timeout, only {retried} retried meanwhile"
    );
    assert!(
        unavailable >= 3 && dropped >= 2 && slow >= 1,
        "too few faults injected: {unavailable} × 503, {dropped} dropped, {slow} slow\n{out}"
    );

    // Straight to the server: the repository is whole and the second snapshot restores.
    target_config(&repo, &s3.endpoint, "");
    repo.ok(["check", "--read-data"]);
    let dest2 = repo.p("restore2");
    restore_to(&repo, &snap2, &dest2);
    assert_same_dir(&src, &restored(&dest2, &src), Compare::ALL);
}

/// A store that fails every request: the run gives up after bounded retries
/// with an error naming the bucket and the object; a store that fails every
/// write: the backup fails naming the object and the bucket, and nothing
/// committed before is damaged.
#[test]
fn s3_persistent_failure_is_reported() {
    let test = "faults-persistent";
    let Some((repo, s3, mut rng, src)) = s3_repo(test) else {
        return;
    };
    random_files(&mut rng, &src, "f", 6, 100_000);
    let snap1 = s(&repo.backup(&[&src]), "snapshot_id").to_string();
    let prefix = repo.url.trim_start_matches("s3://").to_string();
    let objects_before = repo.raw().list("");

    let proxy = Proxy::start(&s3.endpoint, Plan::FailAll);
    target_config(&repo, &proxy.url, "");
    random_files(&mut rng, &src, "g", 3, 100_000);
    let start = Instant::now();
    let out = repo.run(backup_args(&[&src], &[]));
    let took = start.elapsed();
    out.expect_failure();
    assert!(
        out.stderr.contains(&s3.bucket) && out.stderr.contains(&prefix),
        "the error does not name the bucket and object key:\n{out}"
    );
    assert!(out.stderr.contains("503"), "{out}");
    eprintln!("{test}: every request failing reported as:\n{}", out.stderr);
    // One request plus object_store's 6 retries at least; bounded in time.
    let requests = proxy.get(|s| &s.requests);
    assert!(
        requests >= 7,
        "only {requests} requests: no retries?\n{out}"
    );
    assert!(
        took < Duration::from_secs(90),
        "gave up only after {took:?}"
    );

    // Reads work, every write fails.
    proxy.set_plan(Plan::FailWrites);
    proxy.reset();
    let out = repo.run(backup_args(&[&src], &[]));
    out.expect_failure();
    assert!(proxy.get(|s| &s.puts) >= 7, "{out}");
    // Writes go through the S3 API client (CRC32C-checked bodies).
    let (bucket, key_prefix) = prefix.split_once('/').unwrap();
    assert!(
        out.stderr.contains("HTTP 503")
            && out
                .stderr
                .contains(&format!("bucket {bucket}, key {key_prefix}/")),
        "the error does not name the status, the bucket and the object:\n{out}"
    );
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        (last.contains("pack data/") || last.contains("pack tree/"))
            && last.contains("could not be stored")
            && last.contains("HTTP 503"),
        "the final error does not name the pack and why it failed:\n{out}"
    );

    // Nothing was written or damaged: same objects, check clean, restore identical.
    target_config(&repo, &s3.endpoint, "");
    assert_eq!(repo.raw().list(""), objects_before);
    repo.ok(["check", "--read-data"]);
    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 1);
    let dest = repo.p("restore");
    restore_to(&repo, &snap1, &dest);
    let got = read_all_files(&restored(&dest, &src));
    assert_eq!(got.len(), 6, "{got:?}");
    for (p, data) in got {
        let name = p.file_name().unwrap();
        assert_eq!(data, std::fs::read(src.join(name)).unwrap(), "{p:?}");
    }
}

/// A pack whose body is changed on the way is refused by the server, which
/// checks the CRC32C sent with it, so it is never stored; the backup fails
/// naming the refusal and a clean run afterwards stores and checks clean.
#[test]
fn s3_pack_changed_in_transit_is_refused() {
    let test = "faults-corrupt";
    let Some((repo, s3, mut rng, src)) = s3_repo(test) else {
        return;
    };
    random_files(&mut rng, &src, "f", 4, 100_000);

    let proxy = Proxy::start(&s3.endpoint, Plan::CorruptDataPuts);
    target_config(&repo, &proxy.url, "");
    let out = repo.run(backup_args(&[&src], &[]));
    out.expect_failure();
    assert!(proxy.get(|s| &s.corrupted) >= 1, "{out}");
    assert!(out.stderr.contains("BadDigest"), "{out}");
    let stored = repo.raw().list("data/");
    assert!(stored.is_empty(), "changed packs were stored: {stored:?}");

    target_config(&repo, &s3.endpoint, "");
    repo.backup(&[&src]);
    assert!(!repo.raw().list("data/").is_empty());
    repo.ok(["check", "--read-data"]);
}

/// `max_concurrency = N` bounds the requests in flight at the store to N;
/// without it the same restore has more in flight.
#[test]
fn s3_max_concurrency_bounds_requests_in_flight() {
    let test = "faults-concurrency";
    let Some(repo) = Repo::new(Kind::S3, test) else {
        return;
    };
    let repo = repo
        .with_repository_settings("pack_size_mib = 1")
        .no_cache()
        .init();
    let s3 = repo.s3.clone().unwrap();
    let mut rng = rng(test);
    let src = repo.p("src");
    random_files(&mut rng, &src, "f", 8, 600_000);
    let proxy = Proxy::start(&s3.endpoint, Plan::Pass(Duration::from_millis(150)));
    let mut max = Vec::new();
    let mut snap = String::new();
    for n in [2usize, 1, 0] {
        target_config(&repo, &proxy.url, &format!("max_concurrency = {n}"));
        proxy.reset();
        if n == 2 {
            snap = s(&repo.backup(&[&src]), "snapshot_id").to_string();
            let packs = repo.raw().names("data/").len();
            assert!(packs >= 4, "only {packs} packs: nothing to overlap");
            let up = proxy.get(|s| &s.max_in_flight);
            assert!(
                up <= n,
                "backup: {up} requests in flight with max_concurrency {n}"
            );
            assert_eq!(up, n, "backup never had {n} requests in flight");
            proxy.reset();
        }
        let dest = repo.p(&format!("restore-{n}"));
        restore_to(&repo, &snap, &dest);
        assert_same_dir(&src, &restored(&dest, &src), Compare::ALL);
        max.push((n, proxy.get(|s| &s.max_in_flight)));
    }
    eprintln!("{test}: max in flight (max_concurrency, restore): {max:?}");
    assert_eq!(max[0], (2, 2));
    assert_eq!(max[1], (1, 1));
    assert!(max[2].1 > 2, "unlimited restore: {max:?}");
}

/// `--limit-upload` / `--limit-download` reach the target: X bytes at Y KiB/s
/// take at least 0.8 · X/Y seconds (a lower bound only: it cannot be flaky
/// on a slow machine).
#[test]
fn cli_bandwidth_limits_are_applied() {
    let test = "limits-cli";
    let Some(repo) = Repo::new(Kind::Local, test) else {
        return;
    };
    let repo = repo.no_cache().init();
    let mut rng = rng(test);
    let src = repo.p("src");
    random_files(&mut rng, &src, "f", 3, 1024 * 1024);
    let x = 3.0 * 1024.0 * 1024.0;
    let kib = 512u64;
    let floor = Duration::from_secs_f64(0.8 * x / (kib as f64 * 1024.0));

    let start = Instant::now();
    let out = repo.run(backup_args(&[&src], &["--limit-upload", &kib.to_string()]));
    out.expect_ok();
    let up = start.elapsed();
    let snap = s(&single_report(&out), "snapshot_id").to_string();
    assert!(
        up >= floor,
        "3 MiB uploaded at {kib} KiB/s in {up:?} (< {floor:?})"
    );

    let dest = repo.p("restore");
    let start = Instant::now();
    repo.ok([
        OsStr::new("--limit-download"),
        OsStr::new(&kib.to_string()),
        OsStr::new("restore"),
        OsStr::new(&snap),
        dest.as_os_str(),
    ]);
    let down = start.elapsed();
    assert!(
        down >= floor,
        "3 MiB downloaded at {kib} KiB/s in {down:?} (< {floor:?})"
    );
    assert_same_dir(&src, &restored(&dest, &src), Compare::ALL);
    eprintln!("{test}: upload {up:?}, download {down:?} (floor {floor:?})");
}

/// The aws-sdk-s3 calls (bucket versioning and Object Lock configuration,
/// asked by `targets check`) are retried too: the first requests fail (a 503,
/// a dropped connection, a 503) and the command still reports the bucket.
#[test]
fn s3_sdk_calls_are_retried() {
    let test = "faults-sdk";
    let Some(repo) = Repo::new(Kind::S3, test) else {
        return;
    };
    let s3 = repo.s3.clone().unwrap();
    let proxy = Proxy::start(&s3.endpoint, Plan::FailFirst(3));
    target_config(&repo, &proxy.url, "");
    let v = repo.json(["targets", "check"]);
    let t = &v["targets"][0];
    assert!(t["versioning"].is_string(), "{v}");
    assert_eq!(
        (proxy.get(|s| &s.unavailable), proxy.get(|s| &s.dropped)),
        (2, 1),
        "{v}"
    );
    assert!(proxy.get(|s| &s.requests) >= 5, "{v}");
}
