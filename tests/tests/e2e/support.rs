//! Shared helpers of the end-to-end suite: the `custos` binary, S3 settings,
//! repository fixtures driven through the CLI, raw object access through the
//! library's targets, source-tree builders and tree comparison.

#![allow(dead_code)] // not every helper is used by every module

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use custos::keyfile::KdfParams;
use custos::repo::InitOptions;
use custos::target::store::{S3Options, StoreTarget};
use custos::target::TargetRef;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;
use tempfile::TempDir;

/// Password of every fixture repository (unless a test picks another).
pub const PASSWORD: &str = "e2e correct horse battery staple";

/// Exit codes (README, "Exit codes").
pub const EXIT_PARTIAL_SOURCE: i32 = 3;
pub const EXIT_LAGGING: i32 = 4;
pub const EXIT_REPO_NOT_FOUND: i32 = 10;
pub const EXIT_WRONG_PASSWORD: i32 = 12;

// ---------------------------------------------------------------------------
// The binary

/// Path of the `custos` binary: `$CUSTOS_BIN`, else `<target dir>/debug/custos`.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let path = match std::env::var_os("CUSTOS_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                let target = match std::env::var_os("CARGO_TARGET_DIR") {
                    Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
                    Some(d) => root.join(d),
                    None => root.join("target"),
                };
                target.join("debug").join("custos")
            }
        };
        assert!(
            path.is_file(),
            "custos binary not found at {}: run `cargo build -p custos-agent --bin custos` first \
             (scripts/test.sh does), or point CUSTOS_BIN at it",
            path.display()
        );
        warn_if_stale(&path, &root.join("agent/src"));
        path
    })
}

/// Warn (once) when agent sources are newer than the binary under test.
fn warn_if_stale(bin: &Path, src: &Path) {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let mut newest = None;
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if let Ok(m) = md.modified() {
                if m > built && newest.as_ref().is_none_or(|(t, _)| m > *t) {
                    newest = Some((m, e.path()));
                }
            }
        }
    }
    if let Some((_, p)) = newest {
        eprintln!(
            "WARNING: {} is newer than {}: the suite may test a stale binary \
             (run `cargo build -p custos-agent --bin custos`)",
            p.display(),
            bin.display()
        );
    }
}

// ---------------------------------------------------------------------------
// S3

/// The S3 server the suite was given.
#[derive(Clone, Debug)]
pub struct S3Env {
    pub endpoint: String,
    pub bucket: String,
    pub bucket2: String,
}

/// The S3 server, or `None` (after printing a skip line) when there is none.
/// Panics when `CUSTOS_REQUIRE_S3=1` and no server is configured.
pub fn s3_env(test: &str) -> Option<S3Env> {
    match std::env::var("CUSTOS_TEST_S3_ENDPOINT") {
        Ok(ep) if !ep.is_empty() => Some(S3Env {
            endpoint: ep.trim_end_matches('/').to_string(),
            bucket: env_or("CUSTOS_TEST_S3_BUCKET", "custos-a"),
            bucket2: env_or("CUSTOS_TEST_S3_BUCKET2", "custos-b"),
        }),
        _ => {
            assert!(
                std::env::var("CUSTOS_REQUIRE_S3").as_deref() != Ok("1"),
                "{test}: CUSTOS_REQUIRE_S3=1 but CUSTOS_TEST_S3_ENDPOINT is not set \
                 (scripts/test.sh starts the S3 server and sets it)"
            );
            eprintln!("SKIP {test}: CUSTOS_TEST_S3_ENDPOINT is not set (scripts/test.sh starts a local S3 server)");
            None
        }
    }
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// `<test>-<random hex>`: a key prefix no other test (or run) uses.
pub fn unique(test: &str) -> String {
    let clean: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{clean}-{:016x}", rand::random::<u64>())
}

/// An integer knob from the environment.
pub fn knob(key: &str, default: usize) -> usize {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v:?} is not a number")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------
// Randomness

/// A reproducible RNG per test: `CUSTOS_TEST_SEED` fixes every test's seed.
pub fn rng(test: &str) -> StdRng {
    let base: u64 = match std::env::var("CUSTOS_TEST_SEED") {
        Ok(s) => s.parse().expect("CUSTOS_TEST_SEED must be a number"),
        Err(_) => rand::random(),
    };
    let seed = base
        ^ u64::from_le_bytes(
            blake3::hash(test.as_bytes()).as_bytes()[..8]
                .try_into()
                .unwrap(),
        );
    eprintln!("{test}: CUSTOS_TEST_SEED={base}");
    StdRng::seed_from_u64(seed)
}

/// `len` random (incompressible) bytes.
pub fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// `len` bytes of highly compressible text with some random variation.
pub fn text_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "customer", "ticket", "reply", "invoice", "shipment", "refund", "the", "and", "please",
        "order", "account", "thanks", "regards", "status", "delivery", "support",
    ];
    let mut block = String::new();
    for i in 0..400 {
        let w = WORDS[rng.gen_range(0..WORDS.len())];
        let _ = write!(block, "{w} {} ", rng.gen_range(0..1000));
        if i % 12 == 11 {
            block.push('\n');
        }
    }
    let block = block.into_bytes();
    let mut out = Vec::with_capacity(len + block.len());
    while out.len() < len {
        out.extend_from_slice(&block);
        let _ = writeln!(VecWriter(&mut out), "#{}", rng.gen::<u32>());
    }
    out.truncate(len);
    out
}

struct VecWriter<'a>(&'a mut Vec<u8>);
impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Write `data` to `path`, creating parent directories.
pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    }
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Does `hay` contain `needle`?
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Escape a string for a TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// Running the binary

/// A finished command.
#[derive(Debug)]
pub struct Out {
    pub what: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Out {
    /// Panic with the whole story unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "unexpected exit code\n{self}");
        self
    }

    /// Panic unless the command succeeded.
    #[track_caller]
    pub fn expect_ok(&self) -> &Self {
        self.expect_code(0)
    }

    /// Panic unless the command failed (any non-zero exit, not a signal).
    #[track_caller]
    pub fn expect_failure(&self) -> &Self {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a failure\n{self}"
        );
        self
    }

    /// Panic unless stderr contains `needle`.
    #[track_caller]
    pub fn expect_stderr(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr does not mention {needle:?}\n{self}"
        );
        self
    }

    /// Stdout parsed as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON: {e}\n{self}"))
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut = |s: &str| -> String {
            if s.len() > 6000 {
                let mut end = 6000;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                format!("{}… ({} bytes)", &s[..end], s.len())
            } else {
                s.to_string()
            }
        };
        write!(
            f,
            "command: {}\nexit: {:?} after {:.1?}\n--- stdout\n{}\n--- stderr\n{}",
            self.what,
            self.code,
            self.elapsed,
            cut(&self.stdout),
            cut(&self.stderr)
        )
    }
}

/// Run a prepared command to completion.
pub fn run_cmd(mut cmd: Command) -> Out {
    let what = format!("{cmd:?}");
    let start = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    Out {
        what,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// A `custos` command with an environment that only the test controls.
pub fn custos() -> Command {
    let mut cmd = Command::new(bin());
    for (k, _) in std::env::vars_os() {
        let k_str = k.to_string_lossy();
        if k_str.starts_with("CUSTOS_")
            || k_str.starts_with("AWS_ENDPOINT")
            || k_str == "XDG_CACHE_HOME"
        {
            cmd.env_remove(&k);
        }
    }
    for k in [
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_DEFAULT_REGION",
        "RUST_LOG",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

// ---------------------------------------------------------------------------
// Repository fixtures

/// Where a repository lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// In-memory target (library tests only).
    Memory,
    /// A local directory.
    Local,
    /// A prefix in the S3 test bucket.
    S3,
}

/// How the CLI is pointed at the repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `-r URL` (for S3 with `AWS_ENDPOINT_URL` in the child's environment).
    Url,
    /// `-c config.toml` with one `[[target]]` (S3 endpoint in the file).
    Config,
}

/// A repository driven through the CLI, with a scratch directory for sources,
/// restores and the metadata cache. Everything is removed on drop (S3 prefixes
/// are unique per test and left to the throw-away server).
pub struct Repo {
    pub test: String,
    pub kind: Kind,
    pub work: TempDir,
    /// Local path or `s3://bucket/prefix`.
    pub url: String,
    pub password: String,
    pub s3: Option<S3Env>,
    via: Via,
    cache: bool,
    extra_env: Vec<(OsString, OsString)>,
    user: Option<(u32, u32)>,
}

impl Repo {
    /// A fixture of `kind` (`None` when S3 is not available and not required).
    /// Local repositories use `-r`, S3 ones a config file.
    pub fn new(kind: Kind, test: &str) -> Option<Repo> {
        let via = if kind == Kind::S3 {
            Via::Config
        } else {
            Via::Url
        };
        Self::with_via(kind, test, via)
    }

    /// A fixture addressed `via` the URL or a config file.
    pub fn with_via(kind: Kind, test: &str, via: Via) -> Option<Repo> {
        let work = tempfile::Builder::new()
            .prefix(&format!("custos-e2e-{test}-"))
            .tempdir()
            .expect("tempdir");
        let (url, s3) = match kind {
            Kind::Local => (work.path().join("repo").display().to_string(), None),
            Kind::S3 => {
                let s3 = s3_env(test)?;
                (format!("s3://{}/{}", s3.bucket, unique(test)), Some(s3))
            }
            Kind::Memory => panic!("{test}: the in-memory target has no CLI fixture"),
        };
        let repo = Repo {
            test: test.to_string(),
            kind,
            work,
            url,
            password: PASSWORD.to_string(),
            s3,
            via,
            cache: true,
            extra_env: Vec::new(),
            user: None,
        };
        repo.write_config("");
        Some(repo)
    }

    /// Do not use the metadata cache (`--no-cache`).
    pub fn no_cache(mut self) -> Self {
        self.cache = false;
        self
    }

    /// Run every command as this uid/gid (root tests of permission errors).
    pub fn run_as(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// Use `-c` with extra `[repository]` settings (init options …).
    pub fn with_repository_settings(mut self, toml: &str) -> Self {
        self.via = Via::Config;
        self.write_config(toml);
        self
    }

    /// The config file (written for every fixture, used with `Via::Config`).
    pub fn config_path(&self) -> PathBuf {
        self.work.path().join("custos.toml")
    }

    fn write_config(&self, repository: &str) {
        let mut t = format!(
            "[repository]\n{repository}\n\n[[target]]\nname = \"repo\"\nurl = {}\n",
            toml_str(&self.url)
        );
        if let Some(s3) = &self.s3 {
            let _ = writeln!(t, "endpoint = {}", toml_str(&s3.endpoint));
        }
        std::fs::write(self.config_path(), t).expect("write config");
    }

    /// A path inside the scratch directory.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.work.path().join(rel)
    }

    /// Add an environment variable to every command of this fixture.
    pub fn env(&mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) {
        self.extra_env
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
    }

    /// A `custos` command for this repository with `args` (password in the environment).
    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = custos();
        match self.via {
            Via::Url => {
                cmd.arg("-r").arg(&self.url);
                if let Some(s3) = &self.s3 {
                    cmd.env("AWS_ENDPOINT_URL", &s3.endpoint);
                }
            }
            Via::Config => {
                cmd.arg("-c").arg(self.config_path());
            }
        }
        if self.cache {
            cmd.arg("--cache-dir").arg(self.p("cache"));
        } else {
            cmd.arg("--no-cache");
        }
        cmd.env("CUSTOS_PASSWORD", &self.password);
        cmd.env("XDG_CACHE_HOME", self.p("xdg-cache"));
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        cmd.args(args);
        cmd
    }

    /// Run `custos <args>`.
    pub fn run<I, S>(&self, args: I) -> Out
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_cmd(self.cmd(args))
    }

    /// Run `custos <args>` and require success.
    #[track_caller]
    pub fn ok<I, S>(&self, args: I) -> Out
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.run(args);
        out.expect_ok();
        out
    }

    /// Run `custos --json <args>`, require success, parse stdout.
    #[track_caller]
    pub fn json<I, S>(&self, args: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<OsString> = vec!["--json".into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self.ok(all).json()
    }

    /// `custos init` with cheap KDF parameters.
    #[track_caller]
    pub fn init(self) -> Self {
        self.init_with(&[])
    }

    /// `custos init` with cheap KDF parameters and extra arguments.
    #[track_caller]
    pub fn init_with(self, extra: &[&str]) -> Self {
        let mut args = vec!["init", "--kdf-memory-kib", "64", "--kdf-iterations", "1"];
        args.extend_from_slice(extra);
        self.ok(args);
        self
    }

    /// `custos backup --json <paths>` requiring exit 0; the report of the one source.
    #[track_caller]
    pub fn backup(&self, paths: &[&Path]) -> Value {
        self.backup_with(paths, &[])
    }

    /// `custos backup --json <extra> <paths>` requiring exit 0.
    #[track_caller]
    pub fn backup_with(&self, paths: &[&Path], extra: &[&str]) -> Value {
        let out = self.run(backup_args(paths, extra));
        out.expect_ok();
        single_report(&out)
    }

    /// `custos restore --json <snapshot> <dest>` requiring exit 0.
    #[track_caller]
    pub fn restore(&self, snapshot: &str, dest: &Path) -> Value {
        let v = self.json([
            OsStr::new("restore"),
            OsStr::new(snapshot),
            dest.as_os_str(),
        ]);
        assert_eq!(
            v["errors"],
            Value::Array(vec![]),
            "restore reported errors: {v}"
        );
        v
    }

    /// `custos snapshots --json`.
    #[track_caller]
    pub fn snapshots(&self) -> Vec<Value> {
        match self.json(["snapshots"]) {
            Value::Array(a) => a,
            other => panic!("snapshots --json is not an array: {other}"),
        }
    }

    /// `stats --json` → `stored_size`.
    #[track_caller]
    pub fn stored_size(&self) -> u64 {
        u(&self.json(["stats"]), "stored_size")
    }

    /// Raw access to the repository's objects.
    pub fn raw(&self) -> RawStore {
        RawStore::open(&self.url, self.s3.as_ref().map(|s| s.endpoint.as_str()))
    }
}

/// Arguments of `backup --json <extra> <paths>`.
pub fn backup_args(paths: &[&Path], extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--json".into(), "backup".into()];
    args.extend(extra.iter().map(OsString::from));
    args.extend(paths.iter().map(|p| p.as_os_str().to_owned()));
    args
}

/// The single report of a `backup --json` run.
#[track_caller]
pub fn single_report(out: &Out) -> Value {
    match out.json() {
        Value::Array(mut a) if a.len() == 1 => a.remove(0),
        other => panic!("backup --json printed {other}, expected one report\n{out}"),
    }
}

/// `v[key]` as u64.
#[track_caller]
pub fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// `v[key]` as str.
#[track_caller]
pub fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {v}"))
}

/// `v[key]` as a sorted list of strings.
#[track_caller]
pub fn strings(v: &Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> = v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is not an array in {v}"))
        .iter()
        .map(|x| {
            x.as_str()
                .unwrap_or_else(|| panic!("{key} holds a non-string: {v}"))
                .to_string()
        })
        .collect();
    out.sort();
    out
}

/// Spawn a command with piped output (for kill tests and parallel runs).
pub fn spawn(mut cmd: Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn custos")
}

/// Run `backup --force` (a full listing) and SIGKILL it after a random
/// part (`part` of `span`, the time a full run took). True only when the
/// child died by the signal: it may exit on its own between the sleep and
/// the kill, and a run that finished was not killed mid-run.
pub fn kill_backup_midway(
    repo: &Repo,
    span: Duration,
    rng: &mut StdRng,
    part: std::ops::Range<f64>,
) -> bool {
    let delay = span.mul_f64(rng.gen_range(part));
    let mut child = spawn(repo.cmd(["backup", "--force"]));
    std::thread::sleep(delay);
    let _ = child.kill();
    child.wait().expect("wait for custos").code().is_none()
}

/// Wait for a spawned child and collect its output.
pub fn finish(child: Child, what: &str, start: Instant) -> Out {
    let out = child.wait_with_output().expect("wait for custos");
    Out {
        what: what.to_string(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

// ---------------------------------------------------------------------------
// Raw object access (through the library's target implementation)

/// Synchronous access to a repository's stored objects.
pub struct RawStore {
    pub target: TargetRef,
    rt: tokio::runtime::Runtime,
}

impl RawStore {
    /// Open a local directory or `s3://bucket/prefix` (with `endpoint`).
    pub fn open(url: &str, endpoint: Option<&str>) -> RawStore {
        let opts = S3Options {
            endpoint: endpoint.map(str::to_string),
            ..Default::default()
        };
        let t = StoreTarget::open("raw", url, &opts, false)
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
        Self::wrap(Arc::new(t))
    }

    /// Wrap an existing target.
    pub fn wrap(target: TargetRef) -> RawStore {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        RawStore { target, rt }
    }

    /// `(name, size)` of every object under `prefix`, sorted by name.
    pub fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .rt
            .block_on(self.target.list(prefix))
            .unwrap_or_else(|e| panic!("list {prefix}: {e}"))
            .into_iter()
            .map(|m| (m.name, m.size))
            .collect();
        v.sort();
        v
    }

    /// Names under `prefix`, sorted.
    pub fn names(&self, prefix: &str) -> Vec<String> {
        self.list(prefix).into_iter().map(|(n, _)| n).collect()
    }

    pub fn get(&self, name: &str) -> Vec<u8> {
        self.rt
            .block_on(self.target.get(name))
            .unwrap_or_else(|e| panic!("get {name}: {e}"))
            .to_vec()
    }

    pub fn put(&self, name: &str, data: Vec<u8>) {
        self.rt
            .block_on(self.target.overwrite(name, Bytes::from(data)))
            .unwrap_or_else(|e| panic!("overwrite {name}: {e}"));
    }

    pub fn delete(&self, name: &str) {
        self.rt
            .block_on(self.target.delete(name))
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }

    /// Flip one bit of the byte at `offset` of `name`.
    pub fn flip(&self, name: &str, offset: usize) {
        let mut data = self.get(name);
        assert!(offset < data.len(), "{name} has only {} bytes", data.len());
        data[offset] ^= 0x01;
        self.put(name, data);
    }
}

/// Offset of a byte inside the blob region of a pack (not in its header), so a
/// flip there damages exactly one blob. Needs no key: the trailer gives the
/// sealed header's length.
pub fn blob_region_offset(pack: &[u8], fraction: f64) -> usize {
    let n = pack.len();
    let hlen = u32::from_le_bytes(pack[n - 4..].try_into().unwrap()) as usize;
    let blobs_end = n - 4 - hlen;
    assert!(blobs_end > 0, "pack without blobs");
    ((blobs_end as f64 * fraction) as usize).min(blobs_end - 1)
}

// ---------------------------------------------------------------------------
// Library-level targets and repositories

/// Cheap KDF for fixture repositories.
pub fn cheap_kdf() -> KdfParams {
    KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    }
}

/// Init options with a cheap KDF.
pub fn cheap_init() -> InitOptions {
    InitOptions {
        kdf: cheap_kdf(),
        ..Default::default()
    }
}

/// A library target of `kind` (`None` when S3 is skipped); `work` holds local data.
pub fn lib_target(kind: Kind, test: &str, work: &Path) -> Option<TargetRef> {
    let t = match kind {
        Kind::Memory => StoreTarget::memory("mem"),
        Kind::Local => StoreTarget::open(
            "local",
            &work.join("repo").display().to_string(),
            &S3Options::default(),
            true,
        )
        .expect("local target"),
        Kind::S3 => {
            let s3 = s3_env(test)?;
            let opts = S3Options {
                endpoint: Some(s3.endpoint.clone()),
                ..Default::default()
            };
            StoreTarget::open(
                "s3",
                &format!("s3://{}/{}", s3.bucket, unique(test)),
                &opts,
                false,
            )
            .expect("s3 target")
        }
    };
    Some(Arc::new(t))
}

// ---------------------------------------------------------------------------
// Trees on disk

/// What one path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    File { len: u64, hash: [u8; 32] },
    Dir,
    Symlink(Vec<u8>),
    Special,
}

/// One path with the metadata a restore must keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub item: Item,
    pub mode: u32,
    pub mtime_ns: i128,
}

/// Relative path bytes (`b""` is the root) → entry.
pub type Tree = BTreeMap<Vec<u8>, Entry>;

/// Read a whole tree (without following symlinks).
pub fn scan(root: &Path) -> Tree {
    let mut out = Tree::new();
    scan_into(root, root, &mut out);
    out
}

fn scan_into(root: &Path, path: &Path, out: &mut Tree) {
    let md =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    let ft = md.file_type();
    let item = if ft.is_dir() {
        Item::Dir
    } else if ft.is_file() {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Item::File {
            len: data.len() as u64,
            hash: *blake3::hash(&data).as_bytes(),
        }
    } else if ft.is_symlink() {
        Item::Symlink(
            std::fs::read_link(path)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec(),
        )
    } else {
        Item::Special
    };
    let rel = path
        .strip_prefix(root)
        .unwrap()
        .as_os_str()
        .as_bytes()
        .to_vec();
    out.insert(
        rel,
        Entry {
            item: item.clone(),
            mode: md.mode() & 0o7777,
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        },
    );
    if item == Item::Dir {
        let mut kids: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", path.display()))
            .map(|e| e.unwrap().path())
            .collect();
        kids.sort();
        for k in kids {
            scan_into(root, &k, out);
        }
    }
}

/// Show relative path bytes.
pub fn show(rel: &[u8]) -> String {
    if rel.is_empty() {
        "<root>".into()
    } else {
        format!("{:?}", String::from_utf8_lossy(rel))
    }
}

/// What to compare besides paths, kinds and contents.
#[derive(Debug, Clone, Copy)]
pub struct Compare {
    /// Compare mode bits.
    pub mode: bool,
    /// Compare mtimes (nanoseconds).
    pub mtime: bool,
    /// Compare the root entry's metadata too.
    pub root_meta: bool,
}

impl Compare {
    /// Everything.
    pub const ALL: Compare = Compare {
        mode: true,
        mtime: true,
        root_meta: true,
    };
    /// Paths, kinds and contents only.
    pub const CONTENT: Compare = Compare {
        mode: false,
        mtime: false,
        root_meta: false,
    };
}

/// Differences between two trees (empty = equal).
pub fn diff_trees(expected: &Tree, actual: &Tree, cmp: Compare) -> Vec<String> {
    let mut d = Vec::new();
    for (k, e) in expected {
        match actual.get(k) {
            None => d.push(format!("missing: {}", show(k))),
            Some(a) => {
                if a.item != e.item {
                    d.push(format!(
                        "{}: expected {:?}, restored {:?}",
                        show(k),
                        brief(&e.item),
                        brief(&a.item)
                    ));
                    continue;
                }
                let meta = cmp.root_meta || !k.is_empty();
                if meta && cmp.mode && a.mode != e.mode {
                    d.push(format!(
                        "{}: mode {:o}, restored {:o}",
                        show(k),
                        e.mode,
                        a.mode
                    ));
                }
                if meta && cmp.mtime && a.mtime_ns != e.mtime_ns {
                    d.push(format!(
                        "{}: mtime {} ns, restored {} ns",
                        show(k),
                        e.mtime_ns,
                        a.mtime_ns
                    ));
                }
            }
        }
    }
    for k in actual.keys() {
        if !expected.contains_key(k) {
            d.push(format!("unexpected: {}", show(k)));
        }
    }
    d
}

fn brief(i: &Item) -> String {
    match i {
        Item::File { len, hash } => format!("file of {len} bytes, blake3 {}…", hex8(hash)),
        Item::Dir => "dir".into(),
        Item::Symlink(t) => format!("symlink -> {:?}", String::from_utf8_lossy(t)),
        Item::Special => "special".into(),
    }
}

fn hex8(h: &[u8; 32]) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Panic listing the differences unless the trees are equal.
#[track_caller]
pub fn assert_trees_equal(expected: &Tree, actual: &Tree, cmp: Compare, what: &str) {
    let d = diff_trees(expected, actual, cmp);
    assert!(
        d.is_empty(),
        "{what}: {} difference(s):\n  {}",
        d.len(),
        d.iter().take(40).cloned().collect::<Vec<_>>().join("\n  ")
    );
}

/// Restore-equivalence of a source directory and its restored copy.
#[track_caller]
pub fn assert_same_dir(src: &Path, restored: &Path, cmp: Compare) {
    let what = format!("{} vs {}", src.display(), restored.display());
    assert_trees_equal(&scan(src), &scan(restored), cmp, &what);
}

/// Where a backed-up path lands in a restore: `dest/<last component>`.
pub fn restored(dest: &Path, src: &Path) -> PathBuf {
    dest.join(src.file_name().expect("source has a name"))
}

/// A directory of `n` random files of `size` bytes (`prefix-NNN.bin`).
pub fn random_files(rng: &mut StdRng, dir: &Path, prefix: &str, n: usize, size: usize) {
    for i in 0..n {
        write_file(
            &dir.join(format!("{prefix}-{i:03}.bin")),
            &random_bytes(rng, size),
        );
    }
}

/// Set an mtime (seconds and nanoseconds) without following symlinks.
pub fn set_mtime(path: &Path, secs: i64, nanos: u32) {
    let t = filetime::FileTime::from_unix_time(secs, nanos);
    filetime::set_symlink_file_times(path, t, t)
        .unwrap_or_else(|e| panic!("utimes {}: {e}", path.display()));
}

/// Set permission bits.
pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Is this process root (so permission bits do not stop reads)?
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Every file under `dir` (recursively), as (path, bytes).
pub fn read_all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                let data =
                    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                out.push((p, data));
            }
        }
    }
    out
}

/// Run `f` on a multi-threaded runtime (the library's backup needs one).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Bytes of a tree's regular files.
pub fn tree_bytes(t: &Tree) -> u64 {
    t.values()
        .map(|e| match e.item {
            Item::File { len, .. } => len,
            _ => 0,
        })
        .sum()
}

// ---------------------------------------------------------------------------
// Library-level repository (no process boundary)

/// A repository opened through the library on one target.
pub struct LibRepo {
    pub repo: custos::Repository,
    pub target: TargetRef,
}

impl LibRepo {
    /// Create a repository on `target`.
    pub async fn init(target: TargetRef, opts: &InitOptions) -> LibRepo {
        let repo = custos::Repository::init(vec![target.clone()], PASSWORD.as_bytes(), opts)
            .await
            .expect("init");
        // Re-open as the CLI does, so the open path is exercised too.
        let (repo2, empty) = custos::Repository::open(vec![target.clone()], PASSWORD.as_bytes())
            .await
            .expect("open");
        assert!(
            empty.is_empty(),
            "freshly initialised target reported empty"
        );
        assert_eq!(repo2.config().id, repo.config().id);
        LibRepo {
            repo: repo2,
            target,
        }
    }

    /// Back up `paths` (auto parent unless `force`).
    pub async fn backup(&self, paths: &[&Path], force: bool) -> custos::backup::BackupReport {
        use custos::backup::{BackupOptions, ParentMode, Progress};
        let opts = BackupOptions {
            source: "files".into(),
            paths: paths.iter().map(|p| p.to_path_buf()).collect(),
            tags: vec![],
            hostname: "e2e-host".into(),
            time_zone: "UTC".into(),
            exclude: vec![],
            parent: if force {
                ParentMode::None
            } else {
                ParentMode::Auto
            },
        };
        let report = custos::backup::backup(&self.repo, &opts, Arc::new(Progress::default()))
            .await
            .expect("backup");
        assert!(report.lagging.is_empty(), "lagging: {:?}", report.lagging);
        assert!(
            report.unreadable.is_empty(),
            "unreadable: {:?}",
            report.unreadable
        );
        report
    }

    /// Restore snapshot `id` into `dest`.
    pub async fn restore(&self, id: &custos::Id, dest: &Path) -> custos::restore::RestoreReport {
        let (snaps, warnings) = self.repo.snapshots().await.expect("snapshots");
        assert!(warnings.is_empty(), "snapshot warnings: {warnings:?}");
        let snap = snaps
            .iter()
            .find(|s| s.id == *id)
            .unwrap_or_else(|| panic!("snapshot {id} not listed"));
        let (index, _) = self.repo.load_index().await.expect("index");
        custos::restore::restore(
            &self.repo,
            Arc::new(index),
            snap,
            None,
            dest,
            &custos::restore::RestoreOptions::default(),
        )
        .await
        .expect("restore")
    }

    /// Check with `read`.
    pub async fn check(&self, read: custos::check::ReadData) -> custos::check::CheckReport {
        custos::check::check(&self.repo.only(&self.target), read)
            .await
            .expect("check")
    }

    /// Sum of pack sizes in the index (what `stats` calls `stored_size`).
    pub async fn stored_size(&self) -> u64 {
        let (index, _) = self.repo.load_index().await.expect("index");
        index.packs().iter().map(|p| p.2).sum()
    }

    /// `(name, size)` of the objects under `prefix`.
    pub async fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .target
            .list(prefix)
            .await
            .expect("list")
            .into_iter()
            .map(|m| (m.name, m.size))
            .collect();
        v.sort();
        v
    }
}
