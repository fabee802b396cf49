//! The TOML config file: parsed raw (unknown keys are errors naming key and
//! line), then validated into typed settings that fail at start-up naming the
//! bad key. Secrets are never values in the file: only `*_env`, `*_file` or
//! `*_command` keys that say where to fetch them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::chunker::ChunkerParams;
use crate::error::{Error, Result};
use crate::keyfile::KdfParams;
use crate::repo::InitOptions;
use crate::target::limit::Limits;
use crate::target::store::{S3Options, TargetUrl};
use crate::target::{LockMode, ObjectLock};

/// The config text with key positions, so that every error names the table,
/// the key and its line (`[[source]] "mail" path (line 12): …`).
struct Doc<'a> {
    text: &'a str,
    doc: Option<toml_edit::ImDocument<&'a str>>,
}

impl<'a> Doc<'a> {
    fn new(text: &'a str) -> Doc<'a> {
        Doc {
            text,
            doc: toml_edit::ImDocument::parse(text).ok(),
        }
    }

    /// Line (1-based) of a byte offset.
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|b| *b == b'\n')
            .count()
            + 1
    }

    /// A table of the document: `name` (`[name]`) or the `index`-th `[[name]]`.
    fn at(&'a self, name: &'static str, index: Option<usize>, section: String) -> At<'a> {
        At {
            doc: self,
            name,
            index,
            section,
        }
    }
}

/// One table of the config file, named as in messages (`[[target]] "s3-eu"`).
struct At<'a> {
    doc: &'a Doc<'a>,
    name: &'static str,
    index: Option<usize>,
    section: String,
}

impl At<'_> {
    /// The table's items and (where known) its header span.
    fn table(&self) -> Option<(&dyn toml_edit::TableLike, Option<std::ops::Range<usize>>)> {
        let item = self.doc.doc.as_ref()?.as_table().get(self.name)?;
        match (self.index, item) {
            (None, item) => {
                let span = item.as_table().and_then(|t| t.span()).or(item.span());
                Some((item.as_table_like()?, span))
            }
            (Some(i), toml_edit::Item::ArrayOfTables(a)) => {
                let t = a.get(i)?;
                Some((t as &dyn toml_edit::TableLike, t.span()))
            }
            (Some(i), toml_edit::Item::Value(toml_edit::Value::Array(a))) => {
                let t = a.get(i)?.as_inline_table()?;
                Some((t as &dyn toml_edit::TableLike, t.span()))
            }
            _ => None,
        }
    }

    /// The line of `key` (dotted for nested tables: `object_lock.mode`), else of the table.
    fn line(&self, key: Option<&str>) -> Option<usize> {
        let (table, header) = self.table()?;
        let mut span = header;
        if let Some(key) = key {
            let mut t = Some(table);
            for part in key.split('.') {
                let Some((k, item)) = t.and_then(|t| t.get_key_value(part)) else {
                    break;
                };
                span = k.span().or(item.span()).or(span);
                t = item.as_table_like();
            }
        }
        if span.is_none() {
            // No header (an inline table): its first key.
            span = table
                .iter()
                .next()
                .and_then(|(k, _)| table.get_key_value(k).and_then(|(k, _)| k.span()));
        }
        span.map(|s| self.doc.line_of(s.start))
    }

    /// An error at `key` of this table.
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        let line = self
            .line(Some(key))
            .map(|l| format!(" (line {l})"))
            .unwrap_or_default();
        Error::Config(format!("{} {key}{line}: {msg}", self.section))
    }

    /// An error about the table as a whole (a missing key, say): its header line.
    fn err_table(&self, msg: impl std::fmt::Display) -> Error {
        let line = self
            .line(None)
            .map(|l| format!(" (line {l})"))
            .unwrap_or_default();
        Error::Config(format!("{}{line}: {msg}", self.section))
    }

    /// An error whose text may mention a key of `table`: named at that key, else at the table.
    fn err_mentioning(&self, table: &toml::Table, msg: impl std::fmt::Display) -> Error {
        let msg = msg.to_string();
        let words: Vec<&str> = msg
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .collect();
        match words.iter().find(|w| table.contains_key(**w)) {
            Some(key) => self.err(key, &msg),
            None => self.err_table(&msg),
        }
    }

    /// Deserialize a table; an error names the key at fault and its line. serde
    /// does not report the field of an `invalid type` error through toml's
    /// `Value` (nor through an internally tagged enum), so the culprit is the one
    /// key whose removal changes the error.
    fn deserialize<T: serde::de::DeserializeOwned>(&self, table: toml::Table) -> Result<T> {
        let first = match toml::Value::Table(table.clone()).try_into::<T>() {
            Ok(v) => return Ok(v),
            Err(e) => e.to_string().trim_end().to_string(),
        };
        let quoted = |prefix: &str| {
            first
                .strip_prefix(prefix)
                .and_then(|r| r.split('`').next())
                .map(str::to_string)
        };
        if let Some(key) = quoted("unknown field `") {
            return Err(self.err(&key, &first));
        }
        if quoted("missing field `").is_some() {
            return Err(self.err_table(&first));
        }
        for key in table.keys().filter(|k| *k != "type") {
            let mut without = table.clone();
            without.remove(key);
            let again = toml::Value::Table(without)
                .try_into::<T>()
                .err()
                .map(|e| e.to_string().trim_end().to_string());
            if again.as_deref() != Some(first.as_str()) {
                return Err(self.err(key, &first));
            }
        }
        Err(self.err_table(&first))
    }
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable.
    Env(String),
    /// A file (first line, trailing newline removed).
    File(PathBuf),
    /// A shell command's standard output (trailing newline removed).
    Command(String),
}

impl SecretSource {
    /// Fetch the secret; errors name the variable, file or command, never the value.
    pub fn resolve(&self) -> Result<String> {
        match self {
            SecretSource::Env(var) => std::env::var(var)
                .map_err(|_| Error::Password(format!("environment variable {var} is not set"))),
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| Error::Password(format!("{}: {e}", p.display()))),
            SecretSource::Command(cmd) => {
                let out = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|e| Error::Password(format!("command {cmd:?}: {e}")))?;
                if !out.status.success() {
                    return Err(Error::Password(format!(
                        "command {cmd:?} failed: {}",
                        out.status
                    )));
                }
                let s = String::from_utf8(out.stdout)
                    .map_err(|_| Error::Password(format!("command {cmd:?} printed non-UTF-8")))?;
                Ok(s.trim_end_matches(['\n', '\r']).to_string())
            }
        }
    }
}

/// Pick at most one of `<key>_env`, `<key>_file`, `<key>_command`.
fn secret(
    at: &At,
    key: &str,
    env: &Option<String>,
    file: &Option<PathBuf>,
    cmd: &Option<String>,
) -> Result<Option<SecretSource>> {
    let given: Vec<&str> = [
        (env.is_some(), "_env"),
        (file.is_some(), "_file"),
        (cmd.is_some(), "_command"),
    ]
    .iter()
    .filter(|(b, _)| *b)
    .map(|(_, s)| *s)
    .collect();
    if given.len() > 1 {
        return Err(at.err(
            &format!("{key}{}", given[1]),
            format!("give only one of {key}_env, {key}_file, {key}_command"),
        ));
    }
    Ok(env
        .clone()
        .map(SecretSource::Env)
        .or_else(|| file.clone().map(SecretSource::File))
        .or_else(|| cmd.clone().map(SecretSource::Command)))
}

/// `[repository]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    /// Environment variable holding the repository password.
    password_env: Option<String>,
    /// File holding the repository password.
    password_file: Option<PathBuf>,
    /// Command printing the repository password.
    password_command: Option<String>,
    /// zstd level for new blobs (init only), -7..=22, 0 = off; default 3.
    compression: Option<i32>,
    /// Target pack size in MiB (init only); default 16.
    pack_size_mib: Option<u32>,
    /// Chunk sizes in KiB (init only); defaults 64 / 256 / 4096.
    chunk_min_kib: Option<u32>,
    chunk_avg_kib: Option<u32>,
    chunk_max_kib: Option<u32>,
    /// Padmé padding of blobs (init only); default true.
    padding: Option<bool>,
    /// Argon2id memory (KiB) and iterations for new keys; defaults 32768 / 4.
    kdf_memory_kib: Option<u32>,
    kdf_iterations: Option<u32>,
    /// Metadata cache directory; default `$XDG_CACHE_HOME/custos` or `~/.cache/custos`.
    cache_dir: Option<PathBuf>,
    /// Cache size bound in MiB; default 1024.
    cache_max_mib: Option<u64>,
    /// IANA time zone recorded with snapshots (calendar retention periods);
    /// default UTC (the machine's `TZ` is not used).
    time_zone: Option<String>,
    /// Operator name recorded in the audit trail (`CUSTOS_OPERATOR` wins).
    operator: Option<String>,
}

/// `[[target]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    /// Name used in messages and `--target`.
    name: String,
    /// `/path`, `file:///path`, `s3://bucket/prefix`.
    url: String,
    /// S3 endpoint URL (http allowed); default `AWS_ENDPOINT_URL` or AWS.
    endpoint: Option<String>,
    /// S3 region; default `AWS_REGION` or us-east-1.
    region: Option<String>,
    /// Path-style S3 addressing; default true when `endpoint` is set.
    path_style: Option<bool>,
    /// Access key id (not secret) or where to read it.
    access_key_id: Option<String>,
    access_key_id_env: Option<String>,
    access_key_id_file: Option<PathBuf>,
    access_key_id_command: Option<String>,
    /// Where to read the secret access key (default `AWS_SECRET_ACCESS_KEY`).
    secret_access_key_env: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    secret_access_key_command: Option<String>,
    /// Maximum requests in flight to this target (0 = unlimited).
    max_concurrency: Option<usize>,
    /// Upload limit in KiB/s.
    upload_limit_kib: Option<u64>,
    /// Download limit in KiB/s.
    download_limit_kib: Option<u64>,
    /// Time limit of one S3 request attempt (`"300s"`, `"2m"`); a timed-out
    /// attempt is retried. Default 300 s.
    request_timeout: Option<String>,
    /// `object_lock = { mode = "governance" | "compliance", period = "30d" }` (S3 only).
    object_lock: Option<RawObjectLock>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObjectLock {
    mode: String,
    period: String,
}

/// Validate a target's `object_lock`; errors name the key.
fn parse_object_lock(at: &At, url: &str, raw: RawObjectLock) -> Result<ObjectLock> {
    let mode = match raw.mode.as_str() {
        "governance" => LockMode::Governance,
        "compliance" => LockMode::Compliance,
        other => {
            return Err(at.err(
                "object_lock.mode",
                format!("{other:?} is not \"governance\" or \"compliance\""),
            ))
        }
    };
    let period = humantime::parse_duration(&raw.period).map_err(|e| {
        at.err(
            "object_lock.period",
            format!("{:?}: {e} (e.g. \"30d\")", raw.period),
        )
    })?;
    if period.as_secs() < 1 {
        return Err(at.err("object_lock.period", "must be at least 1s"));
    }
    if !matches!(TargetUrl::parse(url)?, TargetUrl::S3 { .. }) {
        return Err(at.err("object_lock", "only S3 targets (s3://) support Object Lock"));
    }
    Ok(ObjectLock { mode, period })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirectorySource {
    /// Source name (snapshots are grouped by it).
    name: String,
    /// Paths to back up.
    paths: Vec<PathBuf>,
    /// Tags added to every snapshot of this source.
    #[serde(default)]
    tags: Vec<String>,
    /// IANA time zone of this source (overrides `[repository] time_zone`).
    time_zone: Option<String>,
    /// Glob patterns to leave out (see `custos backup --exclude`).
    #[serde(default)]
    exclude: Vec<String>,
    /// Recovery point objective (`26h`): the newest snapshot may be at most this old.
    rpo: Option<String>,
    /// Recovery time objective (`4h`): a full restore may take at most this long.
    rto: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// `[repository]`: kept raw here, deserialized into `RawRepository` naming key and line.
    repository: Option<toml::Table>,
    /// `[retention]`: the `forget` policy (keys as the `--keep-*` flags with `_`) plus `group_by`.
    retention: Option<toml::Table>,
    /// `[record_retention]`: `default` and `[[record_retention.rule]]` tables (kind,
    /// source, collection, jurisdiction, tag, keep); see `custos retention apply`.
    record_retention: Option<toml::Table>,
    /// `[[target]]` tables: kept raw here, deserialized into `RawTarget` naming key and line.
    #[serde(default)]
    target: Vec<toml::Table>,
    /// `[[source]]` tables: `type = "directory"` is custos' own; every other
    /// type is a connector (`custos_connectors::config::SourceConfig`).
    #[serde(default)]
    source: Vec<toml::Table>,
    /// `[daemon]`: kept raw here, validated by `crate::daemon::config`.
    daemon: Option<toml::Table>,
    /// `[[job]]` tables of `custos daemon`: kept raw here, validated by `crate::daemon::config`.
    #[serde(default)]
    job: Vec<toml::Table>,
    /// `[[customer]]`: named customers (aliases linking several identifiers).
    #[serde(default)]
    customer: Vec<toml::Table>,
}

/// `[[customer]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCustomer {
    /// The name `custos customer show|export|erase NAME` accepts.
    name: String,
    /// Identifiers of this customer: `email:…`, `phone:+…` (E.164), `crm:…`.
    ids: Vec<String>,
}

/// Validated `[repository]`.
#[derive(Debug, Clone)]
pub struct RepositorySettings {
    /// Operator name for the audit trail.
    pub operator: Option<String>,
    pub password: Option<SecretSource>,
    pub init: InitOptions,
    pub cache_dir: Option<PathBuf>,
    pub cache_max_bytes: u64,
    pub time_zone: Option<String>,
}

/// Validated `[[target]]`.
#[derive(Debug, Clone)]
pub struct TargetSettings {
    pub name: String,
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    pub access_key_id: Option<SecretSource>,
    pub access_key_id_plain: Option<String>,
    pub secret_access_key: Option<SecretSource>,
    pub limits: Limits,
    pub object_lock: Option<ObjectLock>,
    /// Time limit of one S3 request attempt (None = the default).
    pub request_timeout: Option<std::time::Duration>,
}

impl TargetSettings {
    /// A target from a bare URL (`-r`), with credentials from the environment.
    pub fn from_url(url: &str) -> Result<TargetSettings> {
        TargetUrl::parse(url)?;
        Ok(TargetSettings {
            name: "repo".into(),
            url: url.to_string(),
            endpoint: None,
            region: None,
            path_style: None,
            access_key_id: None,
            access_key_id_plain: None,
            secret_access_key: None,
            limits: Limits::default(),
            object_lock: None,
            request_timeout: None,
        })
    }

    /// Resolve secrets into S3 options.
    pub fn s3_options(&self) -> Result<S3Options> {
        let key = match (&self.access_key_id_plain, &self.access_key_id) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(s)) => Some(s.resolve()?),
            (None, None) => None,
        };
        Ok(S3Options {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            access_key_id: key,
            secret_access_key: self
                .secret_access_key
                .as_ref()
                .map(|s| s.resolve())
                .transpose()?,
            session_token: None,
            object_lock: self.object_lock,
            request_timeout: self.request_timeout,
        })
    }
}

/// Validated source.
#[derive(Debug, Clone)]
pub enum SourceSettings {
    /// Local paths.
    Directory {
        name: String,
        paths: Vec<PathBuf>,
        tags: Vec<String>,
        time_zone: Option<String>,
        exclude: Vec<String>,
        /// Recovery point objective: the newest snapshot may be at most this old.
        rpo: Option<std::time::Duration>,
        /// Recovery time objective: a full restore may take at most this long.
        rto: Option<std::time::Duration>,
    },
    /// A connector (IMAP, mbox, Slack export …).
    Records {
        name: String,
        config: Box<custos_connectors::config::SourceConfig>,
        /// What happens to records deleted at the source.
        mode: crate::records::Mode,
        tags: Vec<String>,
        time_zone: Option<String>,
        /// Full listing at least this often (sources that cannot report deletions or edits).
        reconcile_every: Option<std::time::Duration>,
        /// Recovery point objective: the newest snapshot may be at most this old.
        rpo: Option<std::time::Duration>,
        /// Recovery time objective: a full restore may take at most this long.
        rto: Option<std::time::Duration>,
        /// Index email addresses mentioned in record bodies as customers too.
        index_mentions: bool,
        /// Jurisdiction (`jurisdiction = "EU"`, or an ISO 3166 code like
        /// `"DE"`) given to this source's records whose connector gives none;
        /// `[record_retention]` rules with `jurisdiction` match on it.
        jurisdiction: Option<String>,
    },
}

impl SourceSettings {
    /// The source's name.
    pub fn name(&self) -> &str {
        match self {
            SourceSettings::Directory { name, .. } | SourceSettings::Records { name, .. } => name,
        }
    }

    /// The recovery point objective (`rpo = "26h"`), checked by `restore-verify`.
    pub fn rpo(&self) -> Option<std::time::Duration> {
        match self {
            SourceSettings::Directory { rpo, .. } | SourceSettings::Records { rpo, .. } => *rpo,
        }
    }

    /// The recovery time objective (`rto = "4h"`), checked by `restore-verify`.
    pub fn rto(&self) -> Option<std::time::Duration> {
        match self {
            SourceSettings::Directory { rto, .. } | SourceSettings::Records { rto, .. } => *rto,
        }
    }
}

/// Parse an `rpo`/`rto` duration (humantime: `26h`, `4h 30m`, `2days`); errors name the key.
fn parse_objective(at: &At, key: &str, value: Option<&str>) -> Result<Option<std::time::Duration>> {
    let Some(v) = value else { return Ok(None) };
    let d = humantime::parse_duration(v)
        .map_err(|e| at.err(key, format!("{v:?}: {e} (give a duration like \"26h\")")))?;
    if d.is_zero() {
        return Err(at.err(key, "must be longer than zero"));
    }
    Ok(Some(d))
}

/// Take an `rpo`/`rto` key out of a connector source table.
fn take_objective(
    table: &mut toml::Table,
    at: &At,
    key: &str,
) -> Result<Option<std::time::Duration>> {
    match table.remove(key) {
        None => Ok(None),
        Some(toml::Value::String(v)) => parse_objective(at, key, Some(&v)),
        Some(_) => Err(at.err(key, "must be a duration string like \"26h\"")),
    }
}

/// Validated `[retention]`.
#[derive(Debug, Clone)]
pub struct RetentionSettings {
    pub policy: custos_schedules::retention::Policy,
    pub group_by: Vec<custos_schedules::retention::GroupBy>,
}

/// The whole validated config file.
#[derive(Debug, Clone)]
pub struct Settings {
    pub repository: RepositorySettings,
    pub retention: Option<RetentionSettings>,
    /// Record retention rules (`custos retention apply`).
    pub record_retention: Option<custos_schedules::record_retention::RecordPolicy>,
    pub targets: Vec<TargetSettings>,
    pub sources: Vec<SourceSettings>,
    /// `[daemon]` as written (validated by `crate::daemon::config::validate`).
    pub daemon: Option<toml::Table>,
    /// `[[job]]` tables as written (validated by `crate::daemon::config::validate`).
    pub jobs: Vec<toml::Table>,
    /// Named customers (`[[customer]]`), identifiers normalized.
    pub customers: crate::customer::Aliases,
    /// The config text, to name lines in errors found after parsing
    /// (`[daemon]`, `[[job]]`: [`Settings::with_line`]).
    pub text: std::sync::Arc<str>,
}

fn parse_retention(at: &At, mut table: toml::Table) -> Result<RetentionSettings> {
    use custos_schedules::retention::{GroupBy, Policy};
    let group_by = match table.remove("group_by") {
        None => GroupBy::DEFAULT.to_vec(),
        Some(toml::Value::String(s)) => {
            GroupBy::parse_list(&s).map_err(|e| at.err("group_by", e))?
        }
        Some(other) => {
            return Err(at.err(
                "group_by",
                format!("must be a string like \"source,tags\", not {other}"),
            ))
        }
    };
    let keys = table.clone();
    let policy: Policy = at.deserialize(table)?;
    policy.validate().map_err(|e| at.err_mentioning(&keys, e))?;
    Ok(RetentionSettings { policy, group_by })
}

/// One `[[source]]` table: agent keys (`mode`, `tags`, `time_zone`,
/// `reconcile_every`, `rpo`, `rto`, `index_mentions`, `jurisdiction`) are taken out,
/// the rest goes to the connector registry.
fn parse_source(doc: &Doc, index: usize, mut table: toml::Table) -> Result<SourceSettings> {
    let name = table
        .get("name")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let at = doc.at("source", Some(index), format!("[[source]] {name:?}"));
    let ty = match table.get("type") {
        Some(toml::Value::String(t)) => t.clone(),
        Some(_) => return Err(at.err("type", "must be a string")),
        None => {
            return Err(at.err_table(format!("no type (one of: {})", known_types())));
        }
    };
    check_name(&at, &name)?;
    if ty == "directory" {
        table.remove("type");
        let d: RawDirectorySource = at.deserialize(table)?;
        if d.paths.is_empty() {
            return Err(at.err("paths", "is empty"));
        }
        if let Some(tz) = &d.time_zone {
            time_zone_ok(tz).map_err(|e| at.err("time_zone", e))?;
        }
        return Ok(SourceSettings::Directory {
            rpo: parse_objective(&at, "rpo", d.rpo.as_deref())?,
            rto: parse_objective(&at, "rto", d.rto.as_deref())?,
            name: d.name,
            paths: d.paths,
            tags: d.tags,
            time_zone: d.time_zone,
            exclude: d.exclude,
        });
    }
    if !custos_connectors::config::source_types().contains(&ty.as_str()) {
        return Err(at.err(
            "type",
            format!("unknown type {ty:?} (one of: {})", known_types()),
        ));
    }
    let mode = match table.remove("mode") {
        None => crate::records::Mode::default(),
        Some(v) => v
            .try_into()
            .map_err(|_| at.err("mode", "must be \"mirror\" or \"archive\""))?,
    };
    let tags: Vec<String> = match table.remove("tags") {
        None => Vec::new(),
        Some(v) => v
            .try_into()
            .map_err(|_| at.err("tags", "must be a list of strings"))?,
    };
    let time_zone = match table.remove("time_zone") {
        None => None,
        Some(toml::Value::String(tz)) => {
            time_zone_ok(&tz).map_err(|e| at.err("time_zone", e))?;
            Some(tz)
        }
        Some(_) => return Err(at.err("time_zone", "must be a string")),
    };
    let reconcile_every = match table.remove("reconcile_every") {
        None => None,
        Some(toml::Value::String(d)) => Some(
            humantime::parse_duration(&d)
                .map_err(|e| at.err("reconcile_every", format!("{d:?}: {e}")))?,
        ),
        Some(_) => return Err(at.err("reconcile_every", "must be a duration like \"7days\"")),
    };
    let rpo = take_objective(&mut table, &at, "rpo")?;
    let rto = take_objective(&mut table, &at, "rto")?;
    let index_mentions = match table.remove("index_mentions") {
        None => false,
        Some(toml::Value::Boolean(b)) => b,
        Some(_) => return Err(at.err("index_mentions", "must be true or false")),
    };
    let jurisdiction = match table.remove("jurisdiction") {
        None => None,
        Some(toml::Value::String(j)) => {
            Some(parse_jurisdiction(&j).map_err(|e| at.err("jurisdiction", e))?)
        }
        Some(_) => return Err(at.err("jurisdiction", "must be a string like \"EU\" or \"DE\"")),
    };
    let keys = table.clone();
    let config: custos_connectors::config::SourceConfig = at.deserialize(table)?;
    config.validate().map_err(|e| at.err_mentioning(&keys, e))?;
    Ok(SourceSettings::Records {
        name,
        config: Box::new(config),
        mode,
        tags,
        time_zone,
        reconcile_every,
        rpo,
        rto,
        index_mentions,
        jurisdiction,
    })
}

/// A source's `jurisdiction`: `EU` or an ISO 3166 code (`DE`, `US-CA`),
/// stored upper-case.
fn parse_jurisdiction(j: &str) -> std::result::Result<String, String> {
    let t = j.trim();
    let ok = (2..=12).contains(&t.len())
        && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && t.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if !ok {
        return Err(format!(
            "{j:?} is not a region code (give \"EU\" or an ISO 3166 code like \"DE\" or \"US-CA\")"
        ));
    }
    Ok(t.to_ascii_uppercase())
}

fn known_types() -> String {
    std::iter::once("directory")
        .chain(custos_connectors::config::source_types().iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Check an IANA time zone name.
pub fn validate_time_zone(key: &str, tz: &str) -> Result<()> {
    time_zone_ok(tz).map_err(|e| Error::Config(format!("{key}: {e}")))
}

fn time_zone_ok(tz: &str) -> std::result::Result<(), String> {
    tz.parse::<chrono_tz::Tz>()
        .map(|_| ())
        .map_err(|_| format!("unknown time zone {tz:?} (use an IANA name like Europe/Berlin)"))
}

fn check_name(at: &At, name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(at.err(
            "name",
            format!("{name:?} must be non-empty and use only letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

impl Settings {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Settings> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parse and validate config text.
    pub fn parse(text: &str) -> Result<Settings> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| Error::Config(e.to_string().trim_end().to_string()))?;
        let doc = Doc::new(text);
        let at = doc.at("repository", None, "[repository]".into());
        let r: RawRepository = at.deserialize(raw.repository.unwrap_or_default())?;
        let defaults = InitOptions::default();
        let kib = |v: Option<u32>, d: u32| v.map(|k| k.saturating_mul(1024)).unwrap_or(d);
        let init = InitOptions {
            kdf: KdfParams {
                memory_kib: r.kdf_memory_kib.unwrap_or(defaults.kdf.memory_kib),
                iterations: r.kdf_iterations.unwrap_or(defaults.kdf.iterations),
                parallelism: 1,
            },
            chunker: ChunkerParams {
                min_size: kib(r.chunk_min_kib, defaults.chunker.min_size),
                avg_size: kib(r.chunk_avg_kib, defaults.chunker.avg_size),
                max_size: kib(r.chunk_max_kib, defaults.chunker.max_size),
            },
            compression: r.compression.unwrap_or(defaults.compression),
            pack_size: r
                .pack_size_mib
                .map(|m| m.saturating_mul(1 << 20))
                .unwrap_or(defaults.pack_size),
            padding: r.padding.unwrap_or(defaults.padding),
            format_version: defaults.format_version,
        };
        // The first of a group of keys that is written, for the line of an error about them.
        let first_of = |keys: &[(&'static str, bool)]| {
            keys.iter()
                .find(|(_, set)| *set)
                .map(|(k, _)| *k)
                .unwrap_or(keys[0].0)
        };
        init.chunker.validate().map_err(|e| {
            at.err(
                first_of(&[
                    ("chunk_min_kib", r.chunk_min_kib.is_some()),
                    ("chunk_avg_kib", r.chunk_avg_kib.is_some()),
                    ("chunk_max_kib", r.chunk_max_kib.is_some()),
                ]),
                e,
            )
        })?;
        init.kdf.validate().map_err(|e| {
            at.err(
                first_of(&[
                    ("kdf_memory_kib", r.kdf_memory_kib.is_some()),
                    ("kdf_iterations", r.kdf_iterations.is_some()),
                ]),
                e,
            )
        })?;
        if !(-7..=22).contains(&init.compression) {
            return Err(at.err(
                "compression",
                format!("{} is outside zstd's -7..=22", init.compression),
            ));
        }
        if let Some(tz) = &r.time_zone {
            time_zone_ok(tz).map_err(|e| at.err("time_zone", e))?;
        }
        let repository = RepositorySettings {
            operator: r.operator.filter(|o| !o.trim().is_empty()),
            password: secret(
                &at,
                "password",
                &r.password_env,
                &r.password_file,
                &r.password_command,
            )?,
            init,
            cache_dir: r.cache_dir,
            cache_max_bytes: r.cache_max_mib.unwrap_or(1024).saturating_mul(1 << 20),
            time_zone: r.time_zone,
        };

        let mut targets: Vec<TargetSettings> = Vec::new();
        for (i, table) in raw.target.into_iter().enumerate() {
            let name = table.get("name").and_then(|v| v.as_str()).unwrap_or("");
            let at = doc.at("target", Some(i), format!("[[target]] {name:?}"));
            let t: RawTarget = at.deserialize(table)?;
            check_name(&at, &t.name)?;
            if targets.iter().any(|o| o.name == t.name) {
                return Err(at.err("name", "duplicate target name"));
            }
            TargetUrl::parse(&t.url).map_err(|e| at.err("url", e))?;
            let key_src = secret(
                &at,
                "access_key_id",
                &t.access_key_id_env,
                &t.access_key_id_file,
                &t.access_key_id_command,
            )?;
            if key_src.is_some() && t.access_key_id.is_some() {
                return Err(at.err(
                    "access_key_id",
                    "give access_key_id or access_key_id_* , not both",
                ));
            }
            let object_lock = t
                .object_lock
                .map(|l| parse_object_lock(&at, &t.url, l))
                .transpose()?;
            let request_timeout = t
                .request_timeout
                .as_deref()
                .map(|v| {
                    humantime::parse_duration(v)
                        .ok()
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| {
                            at.err(
                                "request_timeout",
                                format!("{v:?} is not a positive duration (e.g. \"300s\")"),
                            )
                        })
                })
                .transpose()?;
            targets.push(TargetSettings {
                object_lock,
                request_timeout,
                secret_access_key: secret(
                    &at,
                    "secret_access_key",
                    &t.secret_access_key_env,
                    &t.secret_access_key_file,
                    &t.secret_access_key_command,
                )?,
                name: t.name,
                url: t.url,
                endpoint: t.endpoint,
                region: t.region,
                path_style: t.path_style,
                access_key_id: key_src,
                access_key_id_plain: t.access_key_id,
                limits: Limits {
                    max_concurrency: t.max_concurrency.unwrap_or(0),
                    upload_bps: t.upload_limit_kib.map(|k| k * 1024),
                    download_bps: t.download_limit_kib.map(|k| k * 1024),
                },
            });
        }

        let mut sources: Vec<SourceSettings> = Vec::new();
        for (i, table) in raw.source.into_iter().enumerate() {
            let s = parse_source(&doc, i, table)?;
            if sources.iter().any(|o| o.name() == s.name()) {
                let at = doc.at("source", Some(i), format!("[[source]] {:?}", s.name()));
                return Err(at.err("name", "duplicate source name"));
            }
            sources.push(s);
        }
        let retention = raw
            .retention
            .map(|t| parse_retention(&doc.at("retention", None, "[retention]".into()), t))
            .transpose()?;
        let record_retention = raw
            .record_retention
            .map(|t| {
                doc.at("record_retention", None, "[record_retention]".into())
                    .deserialize::<custos_schedules::record_retention::RecordPolicy>(t)
                    .map(|p| p.normalized())
            })
            .transpose()?;
        let mut customers = Vec::new();
        for (i, table) in raw.customer.into_iter().enumerate() {
            let name = table.get("name").and_then(|v| v.as_str()).unwrap_or("");
            let at = doc.at("customer", Some(i), format!("[[customer]] {name:?}"));
            let c: RawCustomer = at.deserialize(table)?;
            if customers.iter().any(|(n, _)| *n == c.name) {
                return Err(at.err("name", "duplicate customer name"));
            }
            // One customer at a time, so that an error names this table's line.
            let one = [(c.name, c.ids)];
            crate::customer::Aliases::new(&one).map_err(|e| {
                let e = e.to_string();
                let msg = e.split_once(": ").map(|(_, m)| m).unwrap_or(&e).to_string();
                at.err("ids", msg)
            })?;
            let [entry] = one;
            customers.push(entry);
        }
        Ok(Settings {
            repository,
            retention,
            record_retention,
            targets,
            sources,
            daemon: raw.daemon,
            jobs: raw.job,
            customers: crate::customer::Aliases::new(&customers)?,
            text: text.into(),
        })
    }

    /// A config error about `[daemon]`, `[daemon.capacity]`, `[[daemon.alert]]`
    /// or a `[[job]]` (validated after parsing, by the daemon) with the line
    /// of the key it names (or of its table) added: `[[job]] "x" (line 12): …`.
    pub fn with_line(&self, e: Error) -> Error {
        let Error::Config(msg) = &e else { return e };
        let Some((section, rest)) = msg.split_once(": ") else {
            return e;
        };
        let doc = Doc::new(&self.text);
        let Some(root) = doc.doc.as_ref().map(|d| d.as_table()) else {
            return e;
        };
        let quoted = |s: &str| {
            s.split_once(' ')
                .map(|(_, n)| n.trim_matches('"').to_string())
        };
        let table: Option<(&dyn toml_edit::TableLike, Option<std::ops::Range<usize>>)> =
            if section == "[daemon]" || section == "[daemon.capacity]" {
                let d = root.get("daemon").and_then(|i| i.as_table());
                let t = if section == "[daemon]" {
                    d
                } else {
                    d.and_then(|d| d.get("capacity")).and_then(|i| i.as_table())
                };
                t.map(|t| (t as &dyn toml_edit::TableLike, t.span()))
            } else if section.starts_with("[[job]] ") {
                let name = quoted(section);
                root.get("job")
                    .and_then(|i| i.as_array_of_tables())
                    .and_then(|a| {
                        a.iter()
                            .find(|t| t.get("name").and_then(|v| v.as_str()) == name.as_deref())
                    })
                    .map(|t| (t as &dyn toml_edit::TableLike, t.span()))
            } else if section.starts_with("[[daemon.alert]] ") {
                let name = quoted(section);
                root.get("daemon")
                    .and_then(|i| i.as_table())
                    .and_then(|d| d.get("alert"))
                    .and_then(|i| i.as_array_of_tables())
                    .and_then(|a| {
                        // Named, or `#N` (1-based) when it has no usable name.
                        match name.as_deref().and_then(|n| n.strip_prefix('#')) {
                            Some(n) => n
                                .parse::<usize>()
                                .ok()
                                .and_then(|n| a.get(n.checked_sub(1)?)),
                            None => a.iter().find(|t| {
                                t.get("name").and_then(|v| v.as_str()) == name.as_deref()
                            }),
                        }
                    })
                    .map(|t| (t as &dyn toml_edit::TableLike, t.span()))
            } else {
                None
            };
        let Some((table, header)) = table else {
            return e;
        };
        // The key: the first word of the message, or the quoted one of "unknown key \"k\"".
        let first = rest
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("");
        let key = if rest.starts_with("unknown key ") {
            quoted(rest.trim_start_matches("unknown "))
                .map(|k| k.split('"').next().unwrap_or_default().to_string())
        } else {
            Some(first.to_string())
        };
        let span = key
            .as_deref()
            .and_then(|k| table.get_key_value(k))
            .and_then(|(k, item)| k.span().or(item.span()))
            .or(header);
        match span {
            Some(sp) => Error::Config(format!(
                "{section} (line {}): {rest}",
                doc.line_of(sp.start)
            )),
            None => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[repository]
password_env = "PW"
compression = 6
time_zone = "Europe/Berlin"

[[target]]
name = "local"
url = "/tmp/x"

[[target]]
name = "s3-eu"
url = "s3://bucket/prefix"
endpoint = "http://127.0.0.1:8333"
secret_access_key_env = "SECRET"
upload_limit_kib = 1024

[[source]]
name = "mail-export"
type = "directory"
paths = ["/srv/mail"]
tags = ["mail"]
rpo = "26h"

[[source]]
name = "support-mail"
type = "imap"
host = "127.0.0.1"
port = 143
tls = false
username = "support"
password_env = "IMAP_PW"
mode = "mirror"
tags = ["mail"]
reconcile_every = "7days"
jurisdiction = "eu"
rpo = "1h"
rto = "4h 30m"

[retention]
keep_daily = 7
keep_within = "30d"
group_by = "source"
"#;

    #[test]
    fn a_good_config_validates() {
        let s = Settings::parse(GOOD).unwrap();
        assert_eq!(s.targets.len(), 2);
        assert_eq!(s.targets[1].limits.upload_bps, Some(1024 * 1024));
        assert_eq!(s.targets[1].request_timeout, None);
        let t = Settings::parse(&GOOD.replace(
            "upload_limit_kib = 1024",
            "upload_limit_kib = 1024\nrequest_timeout = \"2m\"",
        ))
        .unwrap();
        assert_eq!(
            t.targets[1].request_timeout,
            Some(std::time::Duration::from_secs(120))
        );
        assert_eq!(s.repository.password, Some(SecretSource::Env("PW".into())));
        assert_eq!(s.repository.init.compression, 6);
        assert_eq!(s.sources[0].name(), "mail-export");
        assert_eq!(
            s.sources[0].rpo(),
            Some(std::time::Duration::from_secs(26 * 3600))
        );
        assert_eq!(s.sources[0].rto(), None);
        assert_eq!(
            s.sources[1].rpo(),
            Some(std::time::Duration::from_secs(3600))
        );
        assert_eq!(
            s.sources[1].rto(),
            Some(std::time::Duration::from_secs(4 * 3600 + 1800))
        );
        match &s.sources[1] {
            SourceSettings::Records {
                mode,
                tags,
                reconcile_every,
                config,
                jurisdiction,
                ..
            } => {
                assert_eq!(jurisdiction.as_deref(), Some("EU"));
                assert_eq!(*mode, crate::records::Mode::Mirror);
                assert_eq!(tags, &["mail".to_string()]);
                assert_eq!(reconcile_every.unwrap().as_secs(), 7 * 86400);
                assert_eq!(config.source_type(), "imap");
            }
            other => panic!("{other:?}"),
        }
        let r = s.retention.unwrap();
        assert_eq!(r.policy.keep_daily, Some(7));
        assert_eq!(r.group_by.len(), 1);
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let bad = GOOD.replace("upload_limit_kib", "upload_limit_kb");
        let e = Settings::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("upload_limit_kb") && e.contains("line"), "{e}");
        let bad = GOOD.replace(
            "paths = [\"/srv/mail\"]",
            "paths = [\"/srv/mail\"]\npasword = 1",
        );
        let e = Settings::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("pasword"), "{e}");
    }

    #[test]
    fn wrong_values_are_named() {
        for (from, to, needle) in [
            ("Europe/Berlin", "Mars/Base", "time_zone"),
            ("compression = 6", "compression = 99", "compression"),
            ("url = \"/tmp/x\"", "url = \"ftp://x\"", "local"),
            ("name = \"s3-eu\"", "name = \"local\"", "duplicate"),
            ("type = \"directory\"", "type = \"telepathy\"", "telepathy"),
            ("type = \"imap\"", "type = \"imap\"\nhots = \"x\"", "hots"),
            ("mode = \"mirror\"", "mode = \"mirorr\"", "mode"),
            (
                "jurisdiction = \"eu\"",
                "jurisdiction = \"Europe/EU\"",
                "jurisdiction",
            ),
            ("rpo = \"26h\"", "rpo = \"soon\"", "rpo"),
            ("rpo = \"1h\"", "rpo = 3600", "rpo"),
            ("rto = \"4h 30m\"", "rto = \"0s\"", "rto"),
            ("password_env = \"IMAP_PW\"", "", "password"),
            (
                "upload_limit_kib = 1024",
                "upload_limit_kib = 1024\nrequest_timeout = \"0s\"",
                "request_timeout",
            ),
            (
                "upload_limit_kib = 1024",
                "upload_limit_kib = 1024\nrequest_timeout = \"soon\"",
                "request_timeout",
            ),
            (
                "password_env = \"PW\"",
                "password_env = \"PW\"\npassword_file = \"/f\"",
                "only one",
            ),
        ] {
            let e = Settings::parse(&GOOD.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{from} -> {to}: {e}");
        }
    }

    #[test]
    fn every_error_names_table_key_and_line() {
        let mbox = "\n[[source]]\nname = \"archive\"\ntype = \"mbox\"\npath = \"/srv/a.mbox\"\n";
        for (from, to, table, key, at) in [
            // An unknown key in a connector source and in a directory source.
            (
                "type = \"imap\"",
                "type = \"imap\"\nhots = \"x\"",
                "[[source]] \"support-mail\"",
                "hots",
                "hots",
            ),
            (
                "tags = [\"mail\"]\nrpo = \"26h\"",
                "tags = [\"mail\"]\nrpo = \"26h\"\npasword = 1",
                "[[source]] \"mail-export\"",
                "pasword",
                "pasword",
            ),
            // A wrong type in a connector source (the error names no field by itself).
            (
                "[retention]",
                &format!("{}\n[retention]", mbox.replace("\"/srv/a.mbox\"", "5")),
                "[[source]] \"archive\"",
                "path",
                "path = 5",
            ),
            (
                "port = 143",
                "port = \"143\"",
                "[[source]] \"support-mail\"",
                "port",
                "port =",
            ),
            // Semantic checks.
            (
                "compression = 6",
                "compression = 99",
                "[repository]",
                "compression",
                "compression",
            ),
            (
                "name = \"s3-eu\"",
                "name = \"local\"",
                "[[target]] \"local\"",
                "name",
                "name = \"local\"\nurl = \"s3:",
            ),
            (
                "\"Europe/Berlin\"",
                "\"Mars/Base\"",
                "[repository]",
                "time_zone",
                "time_zone",
            ),
            (
                "paths = [\"/srv/mail\"]",
                "paths = [\"/srv/mail\"]\ntime_zone = \"Mars/Base\"",
                "[[source]] \"mail-export\"",
                "time_zone",
                "time_zone",
            ),
            (
                "url = \"/tmp/x\"",
                "url = \"ftp://x\"",
                "[[target]] \"local\"",
                "url",
                "url = \"ftp",
            ),
            (
                "upload_limit_kib",
                "upload_limit_kb",
                "[[target]] \"s3-eu\"",
                "upload_limit_kb",
                "upload_limit_kb",
            ),
            (
                "compression = 6",
                "compression = 6\nchunk_min_kib = 1024",
                "[repository]",
                "chunk_min_kib",
                "chunk_min_kib",
            ),
            (
                "upload_limit_kib = 1024",
                "upload_limit_kib = 1024\nobject_lock = { mode = \"strict\", period = \"1d\" }",
                "[[target]] \"s3-eu\"",
                "object_lock.mode",
                "object_lock",
            ),
            (
                "keep_daily = 7",
                "keep_daily = \"seven\"",
                "[retention]",
                "keep_daily",
                "keep_daily",
            ),
            (
                "[retention]",
                "[[customer]]\nname = \"ana\"\nids = [\"nonsense\"]\n\n[retention]",
                "[[customer]] \"ana\"",
                "ids",
                "ids =",
            ),
            (
                "[retention]",
                "[[customer]]\nname = \"ana\"\nids = [\"email:a@example.org\"]\nid = 1\n\n[retention]",
                "[[customer]] \"ana\"",
                "id",
                "id = 1",
            ),
            (
                "name = \"support-mail\"",
                "name = \"mail-export\"",
                "[[source]] \"mail-export\"",
                "name",
                // The second source's (duplicate) name: its own `name` line (the last).
                "name = \"mail-export\"",
            ),
        ] {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD, "{from}");
            let e = Settings::parse(&text).unwrap_err().to_string();
            // The expected line: where `at` starts (multi-line needles: their first line).
            let first = at.split('\n').next().unwrap();
            let line = if at.contains('\n') {
                text.find(at).map(|o| text[..o].matches('\n').count() + 1)
            } else {
                text.lines()
                    .enumerate()
                    .filter(|(_, l)| l.trim_start().starts_with(first))
                    .map(|(i, _)| i + 1)
                    .last()
            }
            .unwrap_or_else(|| panic!("{at} not in config"));
            let want = format!("{table} {key} (line {line}):");
            assert!(e.starts_with(&want), "{from} -> {to}:\n{e}\nwant {want}");
        }
    }

    #[test]
    fn object_lock_is_validated_naming_the_key() {
        let with = |lock: &str| {
            GOOD.replace(
                "upload_limit_kib = 1024",
                &format!("upload_limit_kib = 1024\nobject_lock = {lock}"),
            )
        };
        let s = Settings::parse(&with(r#"{ mode = "compliance", period = "30d" }"#)).unwrap();
        let l = s.targets[1].object_lock.unwrap();
        assert_eq!(l.mode, LockMode::Compliance);
        assert_eq!(l.period.as_secs(), 30 * 86400);
        assert!(s.targets[0].object_lock.is_none());
        for (lock, needle) in [
            (r#"{ mode = "strict", period = "30d" }"#, "object_lock.mode"),
            (
                r#"{ mode = "governance", period = "soon" }"#,
                "object_lock.period",
            ),
            (
                r#"{ mode = "governance", period = "0s" }"#,
                "object_lock.period",
            ),
            (r#"{ mode = "governance" }"#, "period"),
            (
                r#"{ mode = "governance", period = "1d", extra = 1 }"#,
                "extra",
            ),
        ] {
            let e = Settings::parse(&with(lock)).unwrap_err().to_string();
            assert!(e.contains(needle), "{lock}: {e}");
        }
        let local = GOOD.replace(
            "url = \"/tmp/x\"",
            "url = \"/tmp/x\"\nobject_lock = { mode = \"governance\", period = \"1d\" }",
        );
        let e = Settings::parse(&local).unwrap_err().to_string();
        assert!(e.contains("only S3 targets"), "{e}");
    }

    #[test]
    fn secrets_resolve_from_file_and_command_without_echoing_them() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(SecretSource::File(f).resolve().unwrap(), "s3cret");
        assert_eq!(
            SecretSource::Command("printf abc".into())
                .resolve()
                .unwrap(),
            "abc"
        );
        let e = SecretSource::Command("exit 3".into())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("exit 3"), "{e}");
    }
}
