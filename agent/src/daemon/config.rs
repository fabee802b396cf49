//! `[daemon]` and `[[job]]`: validated at daemon start (and on every SIGHUP
//! reload) so that every bad key fails up front, naming the job and the key.
//!
//! `Settings` keeps both tables raw; other commands ignore them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use custos_schedules::cron::CronSpec;

use super::alerts::{parse_alert, take_url, AlertSpec, UrlSource};
use crate::check::ReadData;
use crate::error::{Error, Result};
use crate::settings::Settings;

/// Default HTTP address (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9181";
/// Default time running jobs get to finish after SIGTERM/SIGINT.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(60);
/// Default prune grace period (as `custos prune`).
pub const DEFAULT_PRUNE_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Default repack threshold in percent (as `custos prune`).
pub const DEFAULT_REPACK_THRESHOLD: f64 = 50.0;
/// Default interval of the monitor (target probes, RPO check).
pub const DEFAULT_CHECK_EVERY: Duration = Duration::from_secs(60);
/// Default interval of the stored-bytes listing of each target.
pub const DEFAULT_STATS_EVERY: Duration = Duration::from_secs(15 * 60);

/// The job kinds, as written in `kind = "…"`.
pub const KINDS: &[&str] = &[
    "backup",
    "forget",
    "prune",
    "sync",
    "check",
    "restore_verify",
    "retention_apply",
    "lock_extend",
];

/// Validated `[daemon]` plus `[[job]]`s.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// HTTP address for `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Default of each job's `catch_up`.
    pub catch_up: bool,
    /// How long running jobs may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// How often targets are probed and RPOs checked (`custos_target_up`, alerts).
    pub check_every: Duration,
    /// How often each target's objects are listed for `custos_target_stored_bytes`
    /// (a listing costs one request per 1000 objects on S3).
    pub stats_every: Duration,
    /// `[daemon.capacity]`: target name → bytes above which `capacity` fires.
    pub capacity: BTreeMap<String, u64>,
    /// `[[daemon.alert]]` webhooks.
    pub alerts: Vec<AlertSpec>,
    /// The jobs, in config order.
    pub jobs: Vec<JobSpec>,
}

impl DaemonConfig {
    /// The job named `name`.
    pub fn job(&self, name: &str) -> Option<&JobSpec> {
        self.jobs.iter().find(|j| j.name == name)
    }
}

/// One validated `[[job]]`.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    pub kind: JobKind,
    pub schedule: CronSpec,
    /// Each run starts after a random delay in `0..=jitter`.
    pub jitter: Option<Duration>,
    /// Run once at start when a scheduled run was missed while the daemon was down.
    pub catch_up: bool,
    /// A run still going after this long is abandoned (outcome `timeout`).
    pub timeout: Option<Duration>,
    /// healthchecks-style ping URL (`/start`, success, `/fail`).
    pub ping: Option<UrlSource>,
}

/// Prune parameters of a `prune` job (or `forget` with `prune = true`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneParams {
    pub grace: Duration,
    /// Percent, 0..=100.
    pub repack_threshold: f64,
}

/// What a job does.
#[derive(Debug, Clone, PartialEq)]
pub enum JobKind {
    /// Back up these configured sources (all of them when `sources` is not given).
    Backup { sources: Vec<String> },
    /// Apply `[retention]`; then prune when `prune` is set.
    Forget { prune: Option<PruneParams> },
    /// Two-phase prune; also completes pending erasures whose Object Lock
    /// ran out (`crate::erasures::prune_completing`).
    Prune(PruneParams),
    /// Bring lagging targets up to date.
    Sync,
    /// `check` on every target.
    Check { read_data: ReadData },
    /// `restore-verify` of these sources (empty: every source).
    RestoreVerify {
        sources: Vec<String>,
        sample_percent: Option<f64>,
        against_source: Option<usize>,
    },
    /// `retention apply` with `[record_retention]` (legal holds win); then
    /// prune unless `prune = false`.
    RetentionApply { prune: Option<PruneParams> },
    /// `locks extend` on every target with `object_lock`.
    LockExtend,
}

impl JobKind {
    /// The `kind` as written in the config.
    pub fn label(&self) -> &'static str {
        match self {
            JobKind::Backup { .. } => "backup",
            JobKind::Forget { .. } => "forget",
            JobKind::Prune(_) => "prune",
            JobKind::Sync => "sync",
            JobKind::Check { .. } => "check",
            JobKind::RestoreVerify { .. } => "restore_verify",
            JobKind::RetentionApply { .. } => "retention_apply",
            JobKind::LockExtend => "lock_extend",
        }
    }

    /// The least key role that may run this job (FORMAT.md, "Roles").
    pub fn role_needed(&self) -> crate::crypto::Role {
        use crate::crypto::Role;
        match self {
            JobKind::Backup { .. } | JobKind::Sync => Role::Backup,
            JobKind::Check { read_data } => {
                if matches!(read_data, ReadData::None) {
                    Role::Backup
                } else {
                    Role::Restore
                }
            }
            JobKind::RestoreVerify { .. } => Role::Restore,
            JobKind::Forget { .. }
            | JobKind::Prune(_)
            | JobKind::RetentionApply { .. }
            | JobKind::LockExtend => Role::Admin,
        }
    }

    /// Keys a job of this kind takes besides the common ones.
    fn keys(kind: &str) -> &'static [&'static str] {
        match kind {
            "backup" => &["sources"],
            "forget" => &["prune", "grace", "repack_threshold"],
            "prune" => &["grace", "repack_threshold"],
            "sync" => &[],
            "check" => &["read_data", "read_data_subset"],
            "restore_verify" => &["sources", "sample", "against_source"],
            "retention_apply" => &["prune", "grace", "repack_threshold"],
            "lock_extend" => &[],
            _ => &[],
        }
    }
}

/// Keys every job takes.
const COMMON_KEYS: &[&str] = &[
    "name",
    "kind",
    "schedule",
    "jitter",
    "catch_up",
    "timeout",
    "ping_url",
    "ping_url_env",
    "ping_url_file",
    "ping_url_command",
];
/// Keys of `[daemon]`.
const DAEMON_KEYS: &[&str] = &[
    "listen",
    "catch_up",
    "shutdown_grace",
    "check_every",
    "stats_every",
    "capacity",
    "alert",
];

/// Validate `[daemon]` and every `[[job]]` of `settings`; errors name the
/// table, the key and its line.
pub fn validate(settings: &Settings) -> Result<DaemonConfig> {
    validate_tables(settings).map_err(|e| settings.with_line(e))
}

fn validate_tables(settings: &Settings) -> Result<DaemonConfig> {
    let mut daemon = settings.daemon.clone().unwrap_or_default();
    let section = "[daemon]";
    if let Some(k) = daemon.keys().find(|k| !DAEMON_KEYS.contains(&k.as_str())) {
        return Err(Error::Config(format!(
            "{section}: unknown key {k:?} (allowed: {})",
            DAEMON_KEYS.join(", ")
        )));
    }
    let listen_text =
        take_str(&mut daemon, section, "listen")?.unwrap_or_else(|| DEFAULT_LISTEN.into());
    let listen: SocketAddr = listen_text.parse().map_err(|_| {
        Error::Config(format!(
            "{section}: listen {listen_text:?} is not an address like \"127.0.0.1:9181\""
        ))
    })?;
    let catch_up = take_bool(&mut daemon, section, "catch_up")?.unwrap_or(false);
    let shutdown_grace =
        take_duration(&mut daemon, section, "shutdown_grace")?.unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    let check_every =
        take_duration(&mut daemon, section, "check_every")?.unwrap_or(DEFAULT_CHECK_EVERY);
    let stats_every =
        take_duration(&mut daemon, section, "stats_every")?.unwrap_or(DEFAULT_STATS_EVERY);
    for (key, d) in [("check_every", check_every), ("stats_every", stats_every)] {
        if d < Duration::from_secs(1) {
            return Err(Error::Config(format!(
                "{section}: {key} must be at least 1s"
            )));
        }
    }
    let capacity = parse_capacity(daemon.remove("capacity"), settings)?;
    let alerts = match daemon.remove("alert") {
        None => Vec::new(),
        Some(toml::Value::Array(list)) => list
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                toml::Value::Table(t) => parse_alert(t, i),
                _ => Err(Error::Config(format!(
                    "[[daemon.alert]] #{}: must be a table",
                    i + 1
                ))),
            })
            .collect::<Result<Vec<_>>>()?,
        Some(_) => {
            return Err(Error::Config(
                "[daemon]: alert must be written as [[daemon.alert]] tables".into(),
            ))
        }
    };
    if let Some(dup) = alerts
        .iter()
        .enumerate()
        .find(|(i, a)| alerts[..*i].iter().any(|b| b.name == a.name))
    {
        return Err(Error::Config(format!(
            "[[daemon.alert]] {:?}: duplicate alert name",
            dup.1.name
        )));
    }

    if settings.jobs.is_empty() {
        return Err(Error::Config(
            "the config has no [[job]]: the daemon has nothing to run".into(),
        ));
    }
    let mut jobs: Vec<JobSpec> = Vec::new();
    for table in &settings.jobs {
        let job = parse_job(table.clone(), settings, catch_up)?;
        if jobs.iter().any(|j| j.name == job.name) {
            return Err(Error::Config(format!(
                "[[job]] {:?}: duplicate job name",
                job.name
            )));
        }
        jobs.push(job);
    }
    for a in &alerts {
        for j in a.jobs.iter().flatten() {
            if !jobs.iter().any(|s| &s.name == j) {
                return Err(Error::Config(format!(
                    "[[daemon.alert]] {:?}: jobs: no [[job]] named {j:?}",
                    a.name
                )));
            }
        }
    }
    Ok(DaemonConfig {
        listen,
        catch_up,
        shutdown_grace,
        check_every,
        stats_every,
        capacity,
        alerts,
        jobs,
    })
}

/// `[daemon.capacity]`: `target = "500 GiB"` (or a number of bytes).
fn parse_capacity(v: Option<toml::Value>, settings: &Settings) -> Result<BTreeMap<String, u64>> {
    let section = "[daemon.capacity]";
    let table = match v {
        None => return Ok(BTreeMap::new()),
        Some(toml::Value::Table(t)) => t,
        Some(_) => {
            return Err(Error::Config(format!(
                "{section}: must be a table of target = size"
            )))
        }
    };
    let mut out = BTreeMap::new();
    for (target, size) in table {
        if !settings.targets.iter().any(|t| t.name == target) {
            return Err(Error::Config(format!(
                "{section}: no [[target]] named {target:?}"
            )));
        }
        let bytes = match &size {
            toml::Value::Integer(n) if *n > 0 => *n as u64,
            toml::Value::String(s) => parse_size(s).ok_or_else(|| {
                Error::Config(format!(
                    "{section}: {target} = {s:?} is not a size like \"500 GiB\""
                ))
            })?,
            _ => {
                return Err(Error::Config(format!(
                    "{section}: {target} must be a size like \"500 GiB\""
                )))
            }
        };
        out.insert(target, bytes);
    }
    Ok(out)
}

/// `"500 GiB"`, `"1.5TB"`, `"1000"` → bytes (decimal and binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "p" | "pb" => 1e15,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        "pib" => 1024f64.powi(5),
        _ => return None,
    };
    let bytes = n * mult;
    (1.0..1.8e19).contains(&bytes).then_some(bytes as u64)
}

fn parse_job(mut t: toml::Table, settings: &Settings, default_catch_up: bool) -> Result<JobSpec> {
    let name = match t.remove("name") {
        Some(toml::Value::String(n)) => n,
        Some(_) => return Err(Error::Config("[[job]]: name must be a string".into())),
        None => return Err(Error::Config("[[job]]: a job has no name".into())),
    };
    let section = format!("[[job]] {name:?}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Error::Config(format!(
            "{section}: name must be non-empty and use only letters, digits, '-', '_' and '.'"
        )));
    }
    let kind = take_str(&mut t, &section, "kind")?.ok_or_else(|| {
        Error::Config(format!("{section}: no kind (one of: {})", KINDS.join(", ")))
    })?;
    if !KINDS.contains(&kind.as_str()) {
        return Err(Error::Config(format!(
            "{section}: unknown kind {kind:?} (one of: {})",
            KINDS.join(", ")
        )));
    }
    let allowed = JobKind::keys(&kind);
    if let Some(k) = t
        .keys()
        .find(|k| !COMMON_KEYS.contains(&k.as_str()) && !allowed.contains(&k.as_str()))
    {
        let mut keys: Vec<&str> = COMMON_KEYS.to_vec();
        keys.extend_from_slice(allowed);
        return Err(Error::Config(format!(
            "{section}: unknown key {k:?} for kind {kind} (allowed: {})",
            keys.join(", ")
        )));
    }
    let schedule_text = take_str(&mut t, &section, "schedule")?.ok_or_else(|| {
        Error::Config(format!(
            "{section}: no schedule (a cron spec like \"0 2 * * *\")"
        ))
    })?;
    let schedule = CronSpec::parse(&schedule_text)
        .map_err(|e| Error::Config(format!("{section}: schedule {schedule_text:?}: {e}")))?;
    let jitter = take_duration(&mut t, &section, "jitter")?;
    let catch_up = take_bool(&mut t, &section, "catch_up")?.unwrap_or(default_catch_up);
    let timeout = take_duration(&mut t, &section, "timeout")?;
    let ping = take_url(&mut t, &section, "ping_url")?;
    if timeout.is_some_and(|d| d.is_zero()) {
        return Err(Error::Config(format!(
            "{section}: timeout must be longer than zero"
        )));
    }

    let sources = |t: &mut toml::Table| -> Result<Vec<String>> {
        let given = take_str_list(t, &section, "sources")?;
        if let Some(given) = &given {
            if given.is_empty() {
                return Err(Error::Config(format!(
                    "{section}: sources is empty (leave it out for every source)"
                )));
            }
            for s in given {
                if !settings.sources.iter().any(|c| c.name() == s) {
                    return Err(Error::Config(format!(
                        "{section}: sources: no [[source]] named {s:?}"
                    )));
                }
            }
        }
        Ok(given.unwrap_or_default())
    };
    let prune_params = |t: &mut toml::Table| -> Result<PruneParams> {
        let grace = take_duration(t, &section, "grace")?.unwrap_or(DEFAULT_PRUNE_GRACE);
        let repack_threshold = match t.remove("repack_threshold") {
            None => DEFAULT_REPACK_THRESHOLD,
            Some(toml::Value::Integer(i)) => i as f64,
            Some(toml::Value::Float(f)) => f,
            Some(_) => {
                return Err(Error::Config(format!(
                    "{section}: repack_threshold must be a number (percent)"
                )))
            }
        };
        if !(0.0..=100.0).contains(&repack_threshold) {
            return Err(Error::Config(format!(
                "{section}: repack_threshold {repack_threshold} is outside 0..=100"
            )));
        }
        Ok(PruneParams {
            grace,
            repack_threshold,
        })
    };

    let kind = match kind.as_str() {
        "backup" => {
            let sources = sources(&mut t)?;
            if settings.sources.is_empty() {
                return Err(Error::Config(format!(
                    "{section}: the config has no [[source]] to back up"
                )));
            }
            JobKind::Backup { sources }
        }
        "forget" => {
            if settings.retention.is_none() {
                return Err(Error::Config(format!(
                    "{section}: kind forget needs a [retention] section"
                )));
            }
            let prune = take_bool(&mut t, &section, "prune")?.unwrap_or(false);
            if !prune && (t.contains_key("grace") || t.contains_key("repack_threshold")) {
                return Err(Error::Config(format!(
                    "{section}: grace and repack_threshold need prune = true"
                )));
            }
            JobKind::Forget {
                prune: if prune {
                    Some(prune_params(&mut t)?)
                } else {
                    None
                },
            }
        }
        "prune" => JobKind::Prune(prune_params(&mut t)?),
        "sync" => {
            if settings.targets.len() < 2 {
                tracing::warn!(
                    job = %name,
                    "a sync job with fewer than two [[target]]s has nothing to do"
                );
            }
            JobKind::Sync
        }
        "check" => {
            let all = take_bool(&mut t, &section, "read_data")?.unwrap_or(false);
            let subset = take_str(&mut t, &section, "read_data_subset")?;
            let read_data = match (all, subset) {
                (true, Some(_)) => {
                    return Err(Error::Config(format!(
                        "{section}: give read_data or read_data_subset, not both"
                    )))
                }
                (true, None) => ReadData::All,
                (false, Some(s)) => ReadData::Subset(percent(&section, "read_data_subset", &s)?),
                (false, None) => ReadData::None,
            };
            JobKind::Check { read_data }
        }
        "restore_verify" => {
            let sources = sources(&mut t)?;
            let sample_percent = take_str(&mut t, &section, "sample")?
                .map(|s| percent(&section, "sample", &s))
                .transpose()?;
            let against_source = match t.remove("against_source") {
                None => None,
                Some(toml::Value::Integer(n)) if n > 0 => Some(n as usize),
                Some(_) => {
                    return Err(Error::Config(format!(
                        "{section}: against_source must be a positive number of records"
                    )))
                }
            };
            JobKind::RestoreVerify {
                sources,
                sample_percent,
                against_source,
            }
        }
        "retention_apply" => {
            if settings.record_retention.is_none() {
                return Err(Error::Config(format!(
                    "{section}: kind retention_apply needs a [record_retention] section"
                )));
            }
            let prune = take_bool(&mut t, &section, "prune")?.unwrap_or(true);
            if !prune && (t.contains_key("grace") || t.contains_key("repack_threshold")) {
                return Err(Error::Config(format!(
                    "{section}: grace and repack_threshold need prune = true"
                )));
            }
            JobKind::RetentionApply {
                prune: if prune {
                    Some(prune_params(&mut t)?)
                } else {
                    None
                },
            }
        }
        "lock_extend" => {
            if !settings.targets.iter().any(|t| t.object_lock.is_some()) {
                return Err(Error::Config(format!(
                    "{section}: kind lock_extend needs a [[target]] with object_lock"
                )));
            }
            JobKind::LockExtend
        }
        other => unreachable!("kind {other} checked above"),
    };
    Ok(JobSpec {
        name,
        kind,
        schedule,
        jitter,
        catch_up,
        timeout,
        ping,
    })
}

/// `5%` or `5` → 5.0, in (0, 100].
fn percent(section: &str, key: &str, v: &str) -> Result<f64> {
    let p: f64 = v.trim().trim_end_matches('%').trim().parse().map_err(|_| {
        Error::Config(format!(
            "{section}: {key} {v:?}: give a percentage like \"5%\""
        ))
    })?;
    if !(p > 0.0 && p <= 100.0) {
        return Err(Error::Config(format!(
            "{section}: {key} {v:?} must be in (0, 100]%"
        )));
    }
    Ok(p)
}

fn take_str(t: &mut toml::Table, section: &str, key: &str) -> Result<Option<String>> {
    match t.remove(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Error::Config(format!(
            "{section}: {key} must be a string, not {}",
            other.type_str()
        ))),
    }
}

fn take_bool(t: &mut toml::Table, section: &str, key: &str) -> Result<Option<bool>> {
    match t.remove(key) {
        None => Ok(None),
        Some(toml::Value::Boolean(b)) => Ok(Some(b)),
        Some(other) => Err(Error::Config(format!(
            "{section}: {key} must be true or false, not {}",
            other.type_str()
        ))),
    }
}

fn take_duration(t: &mut toml::Table, section: &str, key: &str) -> Result<Option<Duration>> {
    let Some(text) = take_str(t, section, key).map_err(|_| {
        Error::Config(format!(
            "{section}: {key} must be a duration string like \"30s\""
        ))
    })?
    else {
        return Ok(None);
    };
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|e| Error::Config(format!("{section}: {key} {text:?}: {e}")))
}

fn take_str_list(t: &mut toml::Table, section: &str, key: &str) -> Result<Option<Vec<String>>> {
    match t.remove(key) {
        None => Ok(None),
        Some(toml::Value::Array(a)) => a
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
            "{section}: {key} must be a list of strings"
        ))),
    }
}
