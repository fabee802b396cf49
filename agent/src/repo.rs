//! The repository: config, keys, and reads/writes across all targets.
//!
//! One repository (one id, one config, one key set) is replicated to every
//! configured target: writes go to all of them, reads take the first target
//! that returns verified bytes and fall back to the next one (so a damaged
//! or missing object on one target is read from another).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::join_all;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::blob::{self, BlobType, EncodeSettings, Member};
use crate::chunker::ChunkerParams;
use crate::crypto::{DataKeyId, KeyUse, Keys, MasterKey, Role};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{BlobLocation, Index, IndexFile};
use crate::keyfile::{KdfParams, KeyFile, Unwrapped};
use crate::object::{open_object, seal_object, ObjectKind};
use crate::snapshot::{Snapshot, SnapshotEntry};
use crate::target::{PutOutcome, TargetRef};
use crate::tree::{parse_tree, Node, TreeDoc};

/// The repository format version this build writes.
pub const FORMAT_VERSION: u32 = 3;
/// Every format version this build reads (and keeps writing in its own format).
pub const READ_VERSIONS: [u32; 3] = [1, 2, 3];

fn supported_versions() -> String {
    READ_VERSIONS.map(|v| v.to_string()).join(", ")
}
/// Magic prefix of the `config` object.
pub const CONFIG_MAGIC: &[u8; 8] = b"CUSTOSRP";
/// Associated data of the sealed config document.
pub const CONFIG_AD: &[u8] = b"custos/v1/config";
/// Name of the config object.
pub const CONFIG_OBJECT: &str = "config";

/// The sealed JSON document inside the `config` object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// Format version (must equal the one in the object header).
    pub version: u32,
    /// Random repository id.
    pub id: Id,
    /// When the repository was created.
    pub created: chrono::DateTime<chrono::Utc>,
    /// Chunk sizes.
    pub chunker: ChunkerParams,
    /// zstd level for new blobs (0 = off).
    pub compression: i32,
    /// Target pack size in bytes.
    pub pack_size: u32,
    /// Padmé padding of blob plaintext.
    pub padding: bool,
}

/// Settings chosen at `init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub kdf: KdfParams,
    pub chunker: ChunkerParams,
    pub compression: i32,
    pub pack_size: u32,
    pub padding: bool,
    /// Repository format to create: [`FORMAT_VERSION`]; 1 only to test reading
    /// and writing repositories made by earlier builds.
    pub format_version: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            kdf: KdfParams::default(),
            chunker: ChunkerParams::default(),
            compression: 3,
            pack_size: 16 * 1024 * 1024,
            padding: true,
            format_version: FORMAT_VERSION,
        }
    }
}

impl InitOptions {
    fn validate(&self) -> Result<()> {
        if !READ_VERSIONS.contains(&self.format_version) {
            return Err(Error::Config(format!(
                "format version {} is not one this build writes ({})",
                self.format_version,
                supported_versions()
            )));
        }
        self.chunker.validate()?;
        self.kdf.validate().map_err(Error::Config)?;
        if !(-7..=22).contains(&self.compression) {
            return Err(Error::Config(format!(
                "compression level {} outside zstd's -7..=22",
                self.compression
            )));
        }
        if !(1024 * 1024..=512 * 1024 * 1024).contains(&self.pack_size) {
            return Err(Error::Config(format!(
                "pack size {} outside 1 MiB..=512 MiB",
                self.pack_size
            )));
        }
        Ok(())
    }
}

/// A blob reached by [`Repository::walk_reachable`].
#[derive(Debug, Clone, Copy)]
pub enum Reached<'a> {
    /// A tree blob (a directory, a split part, a subtree).
    Tree(&'a Id),
    /// A content blob a tree node names.
    Content(&'a Id),
}

/// An open repository.
#[derive(Debug, Clone)]
pub struct Repository {
    targets: Vec<TargetRef>,
    /// The master key: admin keys only.
    master: Option<Arc<MasterKey>>,
    keys: Arc<Keys>,
    config: RepoConfig,
    key_id: Id,
    /// Configured targets left out because they failed at open: (name, error).
    unreachable: Vec<(String, String)>,
    /// Groups decoded lately by [`Repository::read_blob`]; a view on other
    /// targets ([`Repository::only`], [`Repository::with_targets`]) gets its
    /// own, so a check of one target never reads another target's bytes.
    groups: Arc<GroupCache>,
}

/// Groups [`GroupCache`] keeps.
const GROUP_CACHE: usize = 4;

/// The last few groups decoded, by group id: reads of several members of one
/// group in a row (exports, record reads, a customer's records written
/// together) would otherwise fetch and decompress the whole group each time.
#[derive(Debug, Default)]
struct GroupCache(Mutex<std::collections::VecDeque<(Id, Arc<Vec<u8>>)>>);

impl GroupCache {
    fn get(&self, id: &Id) -> Option<Arc<Vec<u8>>> {
        let held = self.0.lock().expect("group cache lock");
        held.iter().find(|(g, _)| g == id).map(|(_, p)| p.clone())
    }

    fn put(&self, id: Id, plain: Arc<Vec<u8>>) {
        let mut held = self.0.lock().expect("group cache lock");
        if held.len() >= GROUP_CACHE {
            held.pop_front();
        }
        held.push_back((id, plain));
    }
}

/// The working keys of a repository of format `version` opened with its master key.
fn keys_for(version: u32, master: &MasterKey) -> Keys {
    if version < 2 {
        Keys::derive_v1(master)
    } else {
        Keys::derive(master)
    }
}

/// A problem found while loading metadata that did not stop the operation.
pub type Warning = String;

fn encode_config(keys: &Keys, cfg: &RepoConfig) -> Bytes {
    let json = serde_json::to_vec(cfg).expect("config serializes");
    let mut out = Vec::with_capacity(12 + json.len() + 40);
    out.extend_from_slice(CONFIG_MAGIC);
    out.extend_from_slice(&cfg.version.to_le_bytes());
    out.extend_from_slice(&keys.seal(KeyUse::Metadata, CONFIG_AD, &json));
    Bytes::from(out)
}

/// Read the format version from a config object without any key.
pub fn config_version(target: &str, bytes: &[u8]) -> Result<u32> {
    if bytes.len() < 12 || &bytes[..8] != CONFIG_MAGIC {
        return Err(Error::corrupt(
            format!("{CONFIG_OBJECT} on target {target}"),
            "not a custos repository config (bad magic)",
        ));
    }
    Ok(u32::from_le_bytes(
        bytes[8..12].try_into().expect("4 bytes"),
    ))
}

fn decode_config(target: &str, keys: &Keys, bytes: &[u8]) -> Result<RepoConfig> {
    let object = format!("{CONFIG_OBJECT} on target {target}");
    let version = config_version(target, bytes)?;
    if !READ_VERSIONS.contains(&version) {
        return Err(Error::UnsupportedVersion {
            object,
            found: version,
            supported: supported_versions(),
        });
    }
    let json = keys
        .open(KeyUse::Metadata, CONFIG_AD, &bytes[12..])
        .ok_or_else(|| Error::corrupt(&object, "authentication failed"))?;
    let cfg: RepoConfig =
        serde_json::from_slice(&json).map_err(|e| Error::corrupt(&object, format!("json: {e}")))?;
    if cfg.version != version {
        return Err(Error::corrupt(
            &object,
            "sealed version differs from header",
        ));
    }
    Ok(cfg)
}

/// The format a repository whose targets hold `versions` writes: the
/// lowest, so that a format upgrade stopped midway never puts newer objects
/// on a target an older reader may open alone (warned, naming the targets).
fn lowest_version(versions: &[(String, u32)], opened: u32) -> u32 {
    let lowest = versions.iter().map(|(_, v)| *v).min().unwrap_or(opened);
    if versions.iter().any(|(_, v)| *v != lowest) {
        let formats = (versions.iter())
            .map(|(t, v)| format!("{t}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(
            formats = %formats,
            writing = lowest,
            "targets are at different repository formats (an upgrade stopped midway); \
             run `custos migrate upgrade-format` to finish it"
        );
    }
    lowest
}

/// What [`Repository::upgrade_format`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct FormatUpgrade {
    /// The format the repository was written in before.
    pub from: u32,
    /// The format it is written in now.
    pub to: u32,
    /// Targets whose config was replaced.
    pub upgraded: Vec<String>,
    /// Targets that were already at `to`.
    pub already: Vec<String>,
}

async fn put_everywhere(
    targets: &[TargetRef],
    object: &str,
    data: &Bytes,
) -> Vec<Result<PutOutcome>> {
    join_all(targets.iter().map(|t| t.put_new(object, data.clone()))).await
}

impl Repository {
    /// Create a repository on every target (all must be empty of repositories).
    pub async fn init(
        targets: Vec<TargetRef>,
        password: &[u8],
        opts: &InitOptions,
    ) -> Result<Repository> {
        opts.validate()?;
        if targets.is_empty() {
            return Err(Error::Config(
                "no target to create the repository on".into(),
            ));
        }
        for t in &targets {
            match t.get(CONFIG_OBJECT).await {
                Ok(_) => {
                    return Err(Error::Invalid(format!(
                        "target {} ({}) already holds a repository",
                        t.name(),
                        t.location()
                    )))
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let master = MasterKey::generate();
        let keys = keys_for(opts.format_version, &master);
        let config = RepoConfig {
            version: opts.format_version,
            id: Id(rand::random()),
            created: chrono::Utc::now(),
            chunker: opts.chunker,
            compression: opts.compression,
            pack_size: opts.pack_size,
            padding: opts.padding,
        };
        let keyfile = KeyFile::create(&master, password, opts.kdf)?.to_bytes();
        let key_id = KeyFile::id_of(&keyfile);
        let key_bytes = Bytes::from(keyfile);
        // Keys first, config last: a target with a config always has a key.
        for r in put_everywhere(&targets, &format!("keys/{key_id}"), &key_bytes).await {
            r?;
        }
        let cfg_bytes = encode_config(&keys, &config);
        for r in put_everywhere(&targets, CONFIG_OBJECT, &cfg_bytes).await {
            r?;
        }
        Ok(Repository {
            targets,
            master: Some(Arc::new(master)),
            keys: Arc::new(keys),
            config,
            key_id,
            unreachable: Vec::new(),
            groups: Arc::default(),
        })
    }

    /// Open the repository held by `targets` with `password`.
    ///
    /// The first target that holds a config is opened; every other target must
    /// hold the same repository (same id) or none: targets without a
    /// repository are reported in the returned warnings and get the
    /// repository's config and keys copied by [`Repository::adopt_targets`].
    pub async fn open(
        targets: Vec<TargetRef>,
        password: &[u8],
    ) -> Result<(Repository, Vec<TargetRef>)> {
        if targets.is_empty() {
            return Err(Error::Config("no target configured".into()));
        }
        let mut first_err: Option<Error> = None;
        let mut opened: Option<(usize, Repository)> = None;
        for (i, t) in targets.iter().enumerate() {
            match Self::open_one(t, password).await {
                Ok((master, keys, config, key_id)) => {
                    opened = Some((
                        i,
                        Repository {
                            targets: vec![],
                            keys: Arc::new(keys),
                            master: master.map(Arc::new),
                            config,
                            key_id,
                            unreachable: Vec::new(),
                            groups: Arc::default(),
                        },
                    ));
                    break;
                }
                Err(e) => {
                    // A wrong password is final; a missing repo may exist on the next target.
                    if matches!(
                        e,
                        Error::WrongPassword { .. } | Error::UnsupportedVersion { .. }
                    ) {
                        return Err(e);
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some((_, mut repo)) = opened else {
            return Err(first_err.expect("at least one target tried"));
        };
        let mut empty = Vec::new();
        let mut usable = Vec::new();
        // Targets at different formats: a format upgrade stopped midway.
        let mut versions: Vec<(String, u32)> = Vec::new();
        for t in targets {
            match t.get(CONFIG_OBJECT).await {
                Ok(bytes) => {
                    let cfg = decode_config(t.name(), &repo.keys, &bytes).map_err(|e| match e {
                        Error::Corrupt { .. } => Error::Invalid(format!(
                            "target {} ({}) holds a different repository than the other targets",
                            t.name(),
                            t.location()
                        )),
                        other => other,
                    })?;
                    if cfg.id != repo.config.id {
                        return Err(Error::Invalid(format!(
                            "target {} holds repository {} but the others hold {}",
                            t.name(),
                            cfg.id.short(),
                            repo.config.id.short()
                        )));
                    }
                    versions.push((t.name().to_string(), cfg.version));
                    usable.push(t);
                }
                Err(e) if e.is_not_found() => empty.push(t),
                Err(e) => {
                    tracing::warn!(target = t.name(), error = %e, "target unreachable; continuing without it");
                    repo.unreachable.push((t.name().to_string(), e.to_string()));
                }
            }
        }
        repo.targets = usable;
        repo.config.version = lowest_version(&versions, repo.config.version);
        Ok((repo, empty))
    }

    /// Raise a format 2 repository to format 3 in place, on every target
    /// (`custos migrate upgrade-format`, restic's `migrate upgrade_repo_v2`).
    ///
    /// Format 3 only adds what writers may produce (groups); every format 2
    /// object is a valid format 3 one, so nothing stored is rewritten: each
    /// target's `config` is replaced by the same config at version 3 — the
    /// one sanctioned config replacement (FORMAT.md §10; on a locked bucket a
    /// new, locked version). Everything is checked before anything is
    /// written: every configured target must be reachable and at format 2 or
    /// already 3. A run stopped midway leaves targets at different formats;
    /// [`Repository::open`] then writes the lowest (format 2, no groups), and
    /// running the upgrade again finishes it. Needs an admin key.
    pub async fn upgrade_format(&mut self) -> Result<FormatUpgrade> {
        self.require(Role::Admin, "migrate upgrade-format")?;
        if let Some((name, reason)) = self.unreachable.first() {
            return Err(Error::Invalid(format!(
                "target {name} is not available ({reason}): every target's format is upgraded \
                 together; run the upgrade again when it is back"
            )));
        }
        let to = FORMAT_VERSION;
        let mut report = FormatUpgrade {
            from: self.config.version,
            to,
            ..Default::default()
        };
        let mut pending = Vec::new();
        for t in &self.targets {
            let bytes = t.get(CONFIG_OBJECT).await?;
            let version = decode_config(t.name(), &self.keys, &bytes)?.version;
            if version == to {
                report.already.push(t.name().to_string());
            } else if version == 2 {
                pending.push(t.clone());
            } else {
                return Err(Error::Invalid(format!(
                    "target {} holds a format {version} repository, which cannot be upgraded in \
                     place (every data blob would have to be sealed again): create a new \
                     repository and back up into it",
                    t.name()
                )));
            }
        }
        let cfg = RepoConfig {
            version: to,
            ..self.config.clone()
        };
        let bytes = encode_config(&self.keys, &cfg);
        for t in pending {
            if let Err(e) = t.overwrite(CONFIG_OBJECT, bytes.clone()).await {
                // Say where it stopped: those targets are at the new format,
                // the rest (this one included) at the old until a rerun.
                let done = (report.upgraded.iter().chain(&report.already))
                    .map(String::as_str)
                    .collect::<Vec<_>>();
                return Err(Error::Failed(format!(
                    "upgrading target {}: {e}; the format upgrade stopped (at format {to}: {}); \
                     custos keeps writing format 2 until it is run again",
                    t.name(),
                    if done.is_empty() {
                        "none".to_string()
                    } else {
                        done.join(", ")
                    }
                )));
            }
            tracing::info!(
                target = t.name(),
                from = 2,
                to,
                "repository format upgraded"
            );
            report.upgraded.push(t.name().to_string());
        }
        self.config.version = to;
        Ok(report)
    }

    async fn open_one(
        t: &TargetRef,
        password: &[u8],
    ) -> Result<(Option<MasterKey>, Keys, RepoConfig, Id)> {
        let cfg_bytes = match t.get(CONFIG_OBJECT).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(Error::RepoNotFound {
                    location: format!("{} ({})", t.name(), t.location()),
                    detail: "no config object".into(),
                })
            }
            Err(e) => return Err(e),
        };
        let version = config_version(t.name(), &cfg_bytes)?;
        if !READ_VERSIONS.contains(&version) {
            return Err(Error::UnsupportedVersion {
                object: format!("repository on target {}", t.name()),
                found: version,
                supported: supported_versions(),
            });
        }
        let key_objects = t.list("keys/").await?;
        for k in &key_objects {
            let id = k.name.trim_start_matches("keys/").to_string();
            let bytes = t.get(&k.name).await?;
            let kf = match KeyFile::parse(&id, &bytes) {
                Ok(kf) => kf,
                Err(e) => {
                    tracing::warn!(key = %id, error = %e, "skipping unusable key object");
                    continue;
                }
            };
            let (master, keys) = match kf.open(&id, password)? {
                None => continue,
                Some(Unwrapped::Master(m)) => {
                    let keys = keys_for(version, &m);
                    (Some(m), keys)
                }
                Some(Unwrapped::Bundle(role, bundle)) => {
                    if version < 2 {
                        return Err(Error::Key {
                            id,
                            reason: format!(
                                "a {role} key in a format {version} repository (roles need format 2)"
                            ),
                        });
                    }
                    let keys = Keys::from_bundle(role, &bundle).map_err(|reason| Error::Key {
                        id: id.clone(),
                        reason,
                    })?;
                    (None, keys)
                }
            };
            let config = decode_config(t.name(), &keys, &cfg_bytes)?;
            let key_id = Id::from_hex(&id).unwrap_or_default();
            return Ok((master, keys, config, key_id));
        }
        Err(Error::WrongPassword {
            location: format!("{} ({})", t.name(), t.location()),
            keys: key_objects.len(),
        })
    }

    /// Copy config and key objects to targets that hold no repository yet.
    pub async fn adopt_targets(&mut self, empty: Vec<TargetRef>) -> Result<()> {
        if empty.is_empty() {
            return Ok(());
        }
        let source = self.primary()?.clone();
        let keys = source.list("keys/").await?;
        for k in &keys {
            let bytes = source.get(&k.name).await?;
            for r in put_everywhere(&empty, &k.name, &bytes).await {
                r?;
            }
        }
        let cfg = source.get(CONFIG_OBJECT).await?;
        for r in put_everywhere(&empty, CONFIG_OBJECT, &cfg).await {
            r?;
        }
        self.targets.extend(empty);
        Ok(())
    }

    /// The targets this repository writes to and reads from, in read order.
    pub fn targets(&self) -> &[TargetRef] {
        &self.targets
    }

    /// Configured targets left out at open because they failed: (name, error).
    pub fn unreachable(&self) -> &[(String, String)] {
        &self.unreachable
    }

    /// Leave a configured target out of this run, reporting it as lagging.
    pub fn mark_unreachable(&mut self, name: &str, reason: String) {
        self.targets.retain(|t| t.name() != name);
        self.unreachable.push((name.to_string(), reason));
    }

    /// The first target.
    pub fn primary(&self) -> Result<&TargetRef> {
        self.targets
            .first()
            .ok_or_else(|| Error::Invalid("no reachable target".into()))
    }

    /// A view of this repository on one of its targets only.
    pub fn only(&self, target: &TargetRef) -> Repository {
        Repository {
            targets: vec![target.clone()],
            groups: Arc::default(),
            ..self.clone()
        }
    }

    /// Replace the targets (e.g. wrapped with a cache) keeping keys and config.
    pub fn with_targets(&self, targets: Vec<TargetRef>) -> Repository {
        Repository {
            targets,
            groups: Arc::default(),
            ..self.clone()
        }
    }

    /// Working keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Shared working keys.
    pub fn keys_arc(&self) -> Arc<Keys> {
        self.keys.clone()
    }

    /// The role of the key this repository was opened with.
    pub fn role(&self) -> Role {
        self.keys.role()
    }

    /// Fail unless the key's role is at least `needed` (admin > restore > backup).
    pub fn require(&self, needed: Role, operation: &str) -> Result<()> {
        let have = self.keys.role();
        if have >= needed {
            return Ok(());
        }
        Err(Error::Role {
            operation: operation.to_string(),
            needed: needed.key_phrase(),
            have,
        })
    }

    /// [`Repository::ensure_data_keys`] for one blob of type `ty`.
    async fn ensure_blob_key(&self, ty: BlobType, sealed: &[u8]) -> Result<()> {
        match ty {
            BlobType::Data => self.ensure_data_keys([sealed]).await,
            BlobType::Tree => Ok(()),
        }
    }

    /// Unwrap the data keys these sealed content blobs name that are not
    /// loaded yet (format 2), reading `datakeys/<id>` with target fallback.
    /// A backup key gets a role error: it cannot read content.
    pub async fn ensure_data_keys<'a>(
        &self,
        sealed: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<()> {
        let mut missing: Vec<DataKeyId> = Vec::new();
        for s in sealed {
            if let Some(id) = self.keys.missing_data_key(s) {
                if !missing.contains(&id) {
                    missing.push(id);
                }
            }
        }
        for id in missing {
            self.require(Role::Restore, "reading content")?;
            let object = crate::crypto::data_key_object(&id);
            let keys = self.keys.clone();
            self.read_verified(&object, |b| {
                keys.load_data_key(&id, b)
                    .map_err(|reason| Error::corrupt(&object, reason))
            })
            .await?;
        }
        Ok(())
    }

    /// The config document.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Id of the key object the repository was opened with.
    pub fn key_id(&self) -> Id {
        self.key_id
    }

    /// Blob encoding settings from the config.
    pub fn encode_settings(&self) -> EncodeSettings {
        EncodeSettings {
            zstd_level: self.config.compression,
            padding: self.config.padding,
        }
    }

    /// Read an object, validating it; falls back to the next target when a
    /// target lacks it or returns bytes that fail validation.
    pub async fn read_verified<T>(
        &self,
        object: &str,
        validate: impl Fn(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let mut first_err = None;
        for t in &self.targets {
            match t.get(object).await {
                Ok(bytes) => match validate(&bytes) {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        tracing::warn!(target = t.name(), object, error = %e, "damaged copy; trying next target");
                        first_err.get_or_insert(e);
                    }
                },
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| Error::Invalid("no reachable target".into())))
    }

    /// Write a new immutable object to the given targets; returns per-target results.
    pub async fn put_to(
        &self,
        targets: &[TargetRef],
        object: &str,
        data: &Bytes,
    ) -> Vec<Result<PutOutcome>> {
        put_everywhere(targets, object, data).await
    }

    /// Seal and store a metadata object on `targets`; returns its id and per-target results.
    pub async fn save_object<T: Serialize>(
        &self,
        targets: &[TargetRef],
        kind: ObjectKind,
        doc: &T,
    ) -> (Id, Vec<Result<PutOutcome>>) {
        let (id, bytes) = seal_object(&self.keys, kind, doc);
        let results = put_everywhere(targets, &kind.name(&id), &bytes).await;
        (id, results)
    }

    /// Load one sealed metadata object.
    pub async fn load_object<T: serde::de::DeserializeOwned>(
        &self,
        kind: ObjectKind,
        id: &Id,
    ) -> Result<T> {
        let keys = self.keys.clone();
        self.read_verified(&kind.name(id), |b| open_object(&keys, kind, id, b))
            .await
    }

    /// Ids of all objects of a kind, across all targets (union).
    pub async fn list_ids(&self, kind: ObjectKind) -> Result<Vec<Id>> {
        let mut ids = std::collections::BTreeSet::new();
        let mut ok = false;
        let mut first_err = None;
        for t in &self.targets {
            match t.list(&format!("{}/", kind.folder())).await {
                Ok(list) => {
                    ok = true;
                    ids.extend(
                        list.iter()
                            .filter_map(|m| m.name.rsplit('/').next().and_then(Id::from_hex)),
                    );
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if !ok {
            return Err(first_err.unwrap_or_else(|| Error::Invalid("no reachable target".into())));
        }
        Ok(ids.into_iter().collect())
    }

    /// Load every snapshot; damaged ones are returned as warnings naming them.
    pub async fn snapshots(&self) -> Result<(Vec<SnapshotEntry>, Vec<Warning>)> {
        let ids = self.list_ids(ObjectKind::Snapshot).await?;
        let loaded = join_all(
            ids.iter()
                .map(|id| self.load_object::<Snapshot>(ObjectKind::Snapshot, id)),
        )
        .await;
        let mut out = Vec::new();
        let mut warnings = Vec::new();
        for (id, r) in ids.into_iter().zip(loaded) {
            match r {
                Ok(snapshot) => out.push(SnapshotEntry { id, snapshot }),
                Err(e) => warnings.push(e.to_string()),
            }
        }
        out.sort_by_key(|s| s.snapshot.time);
        Ok((out, warnings))
    }

    /// Load and merge every index object; damaged ones are returned as warnings.
    pub async fn load_index(&self) -> Result<(Index, Vec<Warning>)> {
        let (index, warnings, _) = self.load_index_with_ids().await?;
        Ok((index, warnings))
    }

    /// [`Repository::load_index`], also returning the ids of the index objects it merged.
    pub async fn load_index_with_ids(&self) -> Result<(Index, Vec<Warning>, Vec<Id>)> {
        let ids = self.list_ids(ObjectKind::Index).await?;
        let mut index = crate::index::IndexBuilder::default();
        let mut warnings = Vec::new();
        let loaded = futures::stream::iter(
            ids.iter()
                .map(|id| self.load_object::<IndexFile>(ObjectKind::Index, id)),
        )
        .buffered(16);
        futures::pin_mut!(loaded);
        let mut merged = Vec::with_capacity(ids.len());
        let mut ids_in_order = ids.iter();
        while let Some(r) = loaded.next().await {
            let id = ids_in_order.next().expect("one result per id");
            match r {
                Ok(file) => {
                    index.add_file(&file);
                    merged.push(*id);
                }
                Err(e) => warnings.push(e.to_string()),
            }
        }
        // Prefer copies outside packs prune has marked: those may vanish soon.
        let doomed = crate::prune::marked_packs(self).await.unwrap_or_default();
        Ok((index.build_avoiding(&doomed), warnings, merged))
    }

    /// Read a byte range of an object from the first target that has it.
    pub async fn read_range(&self, object: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let mut first_err = None;
        for t in &self.targets {
            match t.get_range(object, range.clone()).await {
                Ok(b) => return Ok(b),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| Error::Invalid("no reachable target".into())))
    }

    /// Open a streamed read of a byte range from the first target that
    /// answers ([`crate::target::Target::get_range_stream`]). A transfer
    /// that fails midway is not retried on another target: the reader
    /// falls back blob by blob ([`Repository::read_blob`]).
    pub async fn read_range_stream(
        &self,
        object: &str,
        range: std::ops::Range<u64>,
    ) -> Result<crate::target::ByteStream> {
        let mut first_err = None;
        for t in &self.targets {
            match t.get_range_stream(object, range.clone()).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| Error::Invalid("no reachable target".into())))
    }

    /// Authenticate and decode a sealed blob read from a pack (loading its
    /// data key first if needed); its id is recomputed and compared.
    pub async fn decode_blob(&self, ty: BlobType, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
        self.ensure_blob_key(ty, sealed).await?;
        blob::decode(&self.keys, ty, id, sealed)
    }

    /// The members of the group a grouped blob is in, from its pack's header
    /// (read from the first target that has it intact): what copying the
    /// sealed group as it is needs to describe it again.
    pub async fn group_members(&self, index: &Index, loc: &BlobLocation) -> Result<Vec<Member>> {
        let Some(g) = loc.group else {
            return Ok(Vec::new());
        };
        let name = loc.pack_name();
        let size = index
            .pack_size(&loc.pack)
            .ok_or_else(|| Error::Failed(format!("pack {name} is not in the index")))?;
        let mut first_err = None;
        for t in &self.targets {
            match crate::check::fetch_header(&self.keys, t, &name, size).await {
                Ok(entries) => {
                    let members: Vec<Member> = entries
                        .iter()
                        .filter(|e| e.offset == loc.offset && e.group.is_some_and(|h| h.id == g.id))
                        .map(|e| Member {
                            id: e.id,
                            inner: e.group.expect("filtered").inner,
                            len: e.raw_length,
                        })
                        .collect();
                    if members.is_empty() {
                        return Err(Error::corrupt(
                            name,
                            format!("header does not list group {}", g.id),
                        ));
                    }
                    return Ok(members);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| Error::Invalid("no reachable target".into())))
    }

    /// Authenticate and decode a blob read from where `loc` places it: a
    /// single blob, or the sealed group a grouped blob is in (the blob is cut
    /// from the group and its id checked). A decoded group is kept for the
    /// next member read from it (the last [`GROUP_CACHE`] groups of this view).
    pub async fn decode_located(
        &self,
        loc: &BlobLocation,
        id: &Id,
        sealed: &[u8],
    ) -> Result<Vec<u8>> {
        let Some(g) = loc.group else {
            return self.decode_blob(loc.ty, id, sealed).await;
        };
        if let Some(member) = self.cached_member(loc, id) {
            return member;
        }
        let plain = Arc::new(self.decode_group(&g.id, sealed).await?);
        let out = blob::member(&self.keys, id, &plain, g.inner, loc.raw_length)?.to_vec();
        self.groups.put(g.id, plain);
        Ok(out)
    }

    /// A grouped blob cut from its group when this view decoded the group lately.
    fn cached_member(&self, loc: &BlobLocation, id: &Id) -> Option<Result<Vec<u8>>> {
        let g = loc.group?;
        let plain = self.groups.get(&g.id)?;
        Some(blob::member(&self.keys, id, &plain, g.inner, loc.raw_length).map(<[u8]>::to_vec))
    }

    /// Authenticate and decode a sealed group (loading its data key first if
    /// needed): its members' plaintexts, concatenated.
    pub async fn decode_group(&self, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
        self.ensure_blob_key(BlobType::Data, sealed).await?;
        blob::decode_group(&self.keys, id, sealed)
    }

    /// Read and verify one blob (falling back across targets).
    pub async fn read_blob(&self, index: &Index, ty: BlobType, id: &Id) -> Result<Vec<u8>> {
        let loc = index.get(id).ok_or_else(|| Error::BlobMissing {
            id: id.to_hex(),
            needed_by: format!("{ty:?} read").to_lowercase(),
        })?;
        if loc.ty != ty {
            return Err(Error::corrupt(
                format!("blob {id}"),
                "indexed with another type",
            ));
        }
        if let Some(member) = self.cached_member(&loc, id) {
            return member;
        }
        let pack = loc.pack_name();
        let range = u64::from(loc.offset)..u64::from(loc.offset) + u64::from(loc.length);
        let mut first_err = None;
        for t in &self.targets {
            let r = match t.get_range(&pack, range.clone()).await {
                Ok(sealed) => self
                    .decode_located(&loc, id, &sealed)
                    .await
                    .map_err(|e| match e {
                        Error::Corrupt { reason, .. } => Error::corrupt(
                            format!("{pack} (blob {id}) on target {}", t.name()),
                            reason,
                        ),
                        other => other,
                    }),
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| Error::Invalid("no reachable target".into())))
    }

    /// A collection's connector cursor: inline, or joined from its cursor
    /// blobs (FORMAT.md, "Snapshot documents").
    pub async fn load_cursor(
        &self,
        index: &Index,
        c: &crate::snapshot::CollectionCursor,
    ) -> Result<serde_json::Value> {
        if c.cursor_blobs.is_empty() {
            return Ok(c.cursor.clone());
        }
        let mut json = Vec::new();
        for id in &c.cursor_blobs {
            json.extend_from_slice(&self.read_blob(index, BlobType::Tree, id).await?);
        }
        serde_json::from_slice(&json).map_err(|e| {
            Error::corrupt(
                format!(
                    "cursor blobs {}…",
                    c.cursor_blobs.first().map(Id::short).unwrap_or_default()
                ),
                format!("not a cursor: {e}"),
            )
        })
    }

    /// Load a whole tree (joining the parts of a split tree).
    /// Every node of a tree (split or not), one leaf blob at a time: for
    /// large listings whose nodes the caller keeps in a smaller form.
    pub async fn for_each_tree_node(
        &self,
        index: &Index,
        id: &Id,
        mut f: impl FnMut(Node),
    ) -> Result<()> {
        let plain = self.read_blob(index, BlobType::Tree, id).await?;
        let parts = match parse_tree(id, &plain)? {
            TreeDoc::Leaf { nodes } => {
                nodes.into_iter().for_each(f);
                return Ok(());
            }
            TreeDoc::Split { parts } => parts,
        };
        drop(plain);
        for p in parts {
            let plain = self.read_blob(index, BlobType::Tree, &p.tree).await?;
            match parse_tree(&p.tree, &plain)? {
                TreeDoc::Leaf { nodes } => nodes.into_iter().for_each(&mut f),
                TreeDoc::Split { .. } => {
                    return Err(Error::corrupt(
                        format!("tree blob {}", p.tree),
                        "nested split tree",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Walk every tree blob reachable from `root` (split parts and
    /// subtrees) and every content blob those trees name, depth first.
    /// `visit` sees each tree before it is read and says whether to read it
    /// (false: seen already); its answer for content blobs is ignored.
    pub async fn walk_reachable(
        &self,
        index: &Index,
        root: Id,
        mut visit: impl FnMut(Reached<'_>) -> bool,
    ) -> Result<()> {
        let mut stack = vec![root];
        while let Some(tree) = stack.pop() {
            if !visit(Reached::Tree(&tree)) {
                continue;
            }
            let plain = self.read_blob(index, BlobType::Tree, &tree).await?;
            match parse_tree(&tree, &plain)? {
                TreeDoc::Split { parts } => stack.extend(parts.iter().map(|p| p.tree)),
                TreeDoc::Leaf { nodes } => {
                    for n in nodes {
                        for c in &n.content {
                            visit(Reached::Content(c));
                        }
                        stack.extend(n.subtree);
                    }
                }
            }
        }
        Ok(())
    }

    pub async fn load_tree(&self, index: &Index, id: &Id) -> Result<Vec<Node>> {
        let plain = self.read_blob(index, BlobType::Tree, id).await?;
        match parse_tree(id, &plain)? {
            TreeDoc::Leaf { nodes } => Ok(nodes),
            TreeDoc::Split { parts } => {
                let mut nodes = Vec::new();
                for p in parts {
                    let plain = self.read_blob(index, BlobType::Tree, &p.tree).await?;
                    match parse_tree(&p.tree, &plain)? {
                        TreeDoc::Leaf { nodes: n } => nodes.extend(n),
                        TreeDoc::Split { .. } => {
                            return Err(Error::corrupt(
                                format!("tree blob {}", p.tree),
                                "nested split tree",
                            ))
                        }
                    }
                }
                Ok(nodes)
            }
        }
    }

    /// Add a key object of `role` for `password` (admin only: it wraps the
    /// master key, or a bundle derived from it).
    pub async fn add_key(&self, role: Role, password: &[u8], kdf: KdfParams) -> Result<Id> {
        self.require(Role::Admin, "adding a key")?;
        let master = self
            .master
            .as_ref()
            .expect("admin keys hold the master key");
        let kf = match role {
            Role::Admin => KeyFile::create(master, password, kdf)?,
            role => {
                let bundle = self.keys.bundle(role).ok_or_else(|| {
                    Error::Invalid(format!(
                        "{role} keys need repository format 2; this repository is format {} \
                         (FORMAT.md, section Versioning)",
                        self.config.version
                    ))
                })?;
                KeyFile::create_role(role, &bundle, password, kdf)?
            }
        };
        self.put_key(kf).await
    }

    /// Wrap this key's own secret again under a new password (any role).
    pub async fn rewrap_own_key(&self, password: &[u8], kdf: KdfParams) -> Result<Id> {
        let kf = match (&self.master, self.keys.role()) {
            (Some(m), _) => KeyFile::create(m, password, kdf)?,
            (None, role) => {
                let bundle = self
                    .keys
                    .bundle(role)
                    .ok_or_else(|| Error::Invalid(format!("a {role} key cannot be re-wrapped")))?;
                KeyFile::create_role(role, &bundle, password, kdf)?
            }
        };
        self.put_key(kf).await
    }

    async fn put_key(&self, kf: KeyFile) -> Result<Id> {
        let bytes = Bytes::from(kf.to_bytes());
        let id = KeyFile::id_of(&bytes);
        for r in put_everywhere(&self.targets, &format!("keys/{id}"), &bytes).await {
            r?;
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::store::StoreTarget;

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

    fn mem(name: &str) -> TargetRef {
        Arc::new(StoreTarget::memory(name))
    }

    /// Blobs in groups, counted from every data pack's header on `t`.
    async fn grouped_blobs(repo: &Repository, t: &TargetRef) -> usize {
        let mut n = 0;
        for m in t.list("data/").await.unwrap() {
            let bytes = t.get(&m.name).await.unwrap();
            let entries = crate::pack::read_header(repo.keys(), &m.name, &bytes).unwrap();
            n += entries.iter().filter(|e| e.group.is_some()).count();
        }
        n
    }

    /// Every file read back equals the file of that name in `dir`, and a
    /// full check of the repository is clean.
    async fn same_as_folder_and_checked(
        repo: &Repository,
        files: &[(String, Vec<u8>)],
        dir: &std::path::Path,
    ) {
        for (path, body) in files {
            let name = path.rsplit('/').next().unwrap();
            assert_eq!(body, &std::fs::read(dir.join(name)).unwrap(), "{path}");
        }
        let report = crate::check::check(repo, crate::check::ReadData::All)
            .await
            .unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    /// Small files are stored in groups in a version 3 repository (and
    /// restore, check and a repack read them back), one by one in version 2.
    #[tokio::test]
    async fn small_files_are_grouped_from_version_3_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut expected_blobs = 0;
        for i in 0..300u32 {
            let body = format!(
                "Subject: note {i}\n\n{}",
                "hello world ".repeat(i as usize % 90 + 1)
            );
            std::fs::write(dir.path().join(format!("{i:03}.eml")), body).unwrap();
            expected_blobs += 1;
        }
        let big: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(dir.path().join("big.bin"), &big).unwrap();
        for (version, grouped) in [(3, true), (2, false)] {
            let t = mem("g");
            let opts = InitOptions {
                format_version: version,
                ..cheap()
            };
            let repo = Repository::init(vec![t.clone()], b"pw", &opts)
                .await
                .unwrap();
            let first = backup_dir(&repo, dir.path()).await;
            let n = grouped_blobs(&repo, &t).await;
            if grouped {
                // Every small file, and the tail of the big one if it is short.
                assert!(n >= expected_blobs, "{n} grouped blobs");
            } else {
                assert_eq!(n, 0);
            }
            let files = files_of(&repo, &first.snapshot).await;
            assert_eq!(files.len(), 301);
            same_as_folder_and_checked(&repo, &files, dir.path()).await;
            // Half the files go; a repack of every pack regroups the rest.
            let kept = tempfile::tempdir().unwrap();
            for (i, (path, body)) in files.iter().enumerate() {
                if i % 2 == 0 {
                    let name = path.rsplit('/').next().unwrap();
                    std::fs::write(kept.path().join(name), body).unwrap();
                }
            }
            let second = backup_dir(&repo, kept.path()).await;
            crate::forget::remove(&repo, &[first.id]).await.unwrap();
            let pruned = crate::prune::prune(
                &repo,
                &crate::prune::PruneOptions {
                    repack_threshold: 0.01,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            assert!(pruned.packs_repacked >= 1, "{pruned:?}");
            let swept = crate::prune::prune(
                &repo,
                &crate::prune::PruneOptions {
                    grace: std::time::Duration::ZERO,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            assert!(swept.packs_deleted >= 1, "{swept:?}");
            let (fresh, _) = Repository::open(vec![t.clone()], b"pw").await.unwrap();
            let after = files_of(&fresh, &second.snapshot).await;
            assert_eq!(after.len(), 151);
            same_as_folder_and_checked(&fresh, &after, kept.path()).await;
            // What was dropped is gone from the index (and so from the
            // packs: every pack left is indexed, check says so).
            let (index, _) = fresh.load_index().await.unwrap();
            assert_eq!(grouped_blobs(&fresh, &t).await > 0, grouped);
            for (i, (_, body)) in files.iter().enumerate() {
                if body.len() > 65536 {
                    continue; // the big file: chunked where its keyed chunker cuts
                }
                let id = fresh.keys().blob_id(body);
                assert_eq!(index.contains(&id), i % 2 == 0, "file {i}");
            }
        }
    }

    /// A format 2 repository upgraded in place on both its targets: old
    /// snapshots restore as they were, new backups are grouped. An upgrade
    /// stopped after one target keeps writing format 2 until it is finished.
    #[tokio::test]
    async fn a_format_2_repository_is_upgraded_in_place_on_every_target() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..40u32 {
            let body = format!("Subject: {i}\n\n{}", "note ".repeat(i as usize + 1));
            std::fs::write(dir.path().join(format!("{i:02}.eml")), body).unwrap();
        }
        let (a, b) = (mem("a"), mem("b"));
        let opts = InitOptions {
            format_version: 2,
            ..cheap()
        };
        let repo = Repository::init(vec![a.clone(), b.clone()], b"pw", &opts)
            .await
            .unwrap();
        let old = backup_dir(&repo, dir.path()).await;
        let version = |t: TargetRef| async move {
            config_version(t.name(), &t.get(CONFIG_OBJECT).await.unwrap()).unwrap()
        };
        let open = || Repository::open(vec![a.clone(), b.clone()], b"pw");

        // Stopped midway: only `a` got the new config.
        let cfg = RepoConfig {
            version: 3,
            ..repo.config().clone()
        };
        a.overwrite(CONFIG_OBJECT, encode_config(repo.keys(), &cfg))
            .await
            .unwrap();
        let (mixed, _) = open().await.unwrap();
        assert_eq!(mixed.config().version, 2);
        backup_dir(&mixed, dir.path()).await;
        assert_eq!(grouped_blobs(&mixed, &a).await, 0);

        // An unreachable target stops it before anything is written.
        let (mut admin, _) = open().await.unwrap();
        let mut partial = admin.clone();
        partial.mark_unreachable("b", "down".into());
        let e = partial.upgrade_format().await.unwrap_err().to_string();
        assert!(e.contains("target b") && e.contains("down"), "{e}");
        assert_eq!(version(b.clone()).await, 2);

        // A target refusing the new config: the error names it and where it stopped.
        let refusing = Arc::new(crate::target::recording::Recording::new(b.clone()));
        refusing.refuse_overwrites(true);
        let (mut stuck, _) = Repository::open(vec![a.clone(), refusing], b"pw")
            .await
            .unwrap();
        let e = stuck.upgrade_format().await.unwrap_err().to_string();
        assert!(
            e.contains("upgrading target b")
                && e.contains("format 3: a")
                && e.contains("run again"),
            "{e}"
        );
        assert_eq!(version(b.clone()).await, 2);

        let done = admin.upgrade_format().await.unwrap();
        assert_eq!(
            done,
            FormatUpgrade {
                from: 2,
                to: 3,
                upgraded: vec!["b".into()],
                already: vec!["a".into()],
            }
        );
        assert_eq!((version(a.clone()).await, version(b.clone()).await), (3, 3));
        let again = admin.upgrade_format().await.unwrap();
        assert!(
            again.upgraded.is_empty() && again.already.len() == 2,
            "{again:?}"
        );

        // Reopened: format 3, new small files grouped, the old snapshot intact.
        let (fresh, _) = open().await.unwrap();
        assert_eq!(fresh.config().version, 3);
        for i in 40..60u32 {
            std::fs::write(dir.path().join(format!("{i:02}.eml")), format!("new {i}")).unwrap();
        }
        let new = backup_dir(&fresh, dir.path()).await;
        assert!(grouped_blobs(&fresh, &a).await >= 20);
        let then = files_of(&fresh, &old.snapshot).await;
        assert_eq!(then.len(), 40);
        same_as_folder_and_checked(&fresh, &then, dir.path()).await;
        let now = files_of(&fresh, &new.snapshot).await;
        assert_eq!(now.len(), 60);
        same_as_folder_and_checked(&fresh, &now, dir.path()).await;
    }

    /// A format 1 repository cannot be upgraded in place; nothing is written.
    #[tokio::test]
    async fn a_format_1_repository_is_not_upgraded() {
        let t = mem("old");
        let opts = InitOptions {
            format_version: 1,
            ..cheap()
        };
        let mut repo = Repository::init(vec![t.clone()], b"pw", &opts)
            .await
            .unwrap();
        let before = t.get(CONFIG_OBJECT).await.unwrap();
        let e = repo.upgrade_format().await.unwrap_err().to_string();
        assert!(
            e.contains("target old") && e.contains("format 1") && e.contains("new repository"),
            "{e}"
        );
        assert_eq!(t.get(CONFIG_OBJECT).await.unwrap(), before);
        assert_eq!(repo.config().version, 1);
    }

    /// Members of one group read one after another cost one read of the
    /// group; a view on one target does not see what another view decoded.
    #[tokio::test]
    async fn reads_of_one_group_fetch_it_once() {
        use crate::target::recording::Recording;
        let rec = Arc::new(Recording::new(mem("m")));
        let target: TargetRef = rec.clone();
        let repo = Repository::init(vec![target.clone()], b"pw", &cheap())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        for i in 0..20u32 {
            std::fs::write(
                dir.path().join(format!("{i}.txt")),
                format!("note {i} ").repeat(40),
            )
            .unwrap();
        }
        let done = backup_dir(&repo, dir.path()).await;
        let (index, _) = repo.load_index().await.unwrap();
        let mut ids = Vec::new();
        let mut stack = vec![done.snapshot.tree];
        while let Some(t) = stack.pop() {
            for n in repo.load_tree(&index, &t).await.unwrap() {
                stack.extend(n.subtree);
                ids.extend(n.content);
            }
        }
        assert_eq!(ids.len(), 20);
        assert!(ids.iter().all(|id| index.get(id).unwrap().group.is_some()));
        let data_reads = |calls: Vec<crate::target::recording::Call>| {
            calls
                .iter()
                .filter(|c| c.object.starts_with("data/"))
                .count()
        };
        rec.take();
        for id in &ids {
            let plain = repo.read_blob(&index, BlobType::Data, id).await.unwrap();
            assert_eq!(repo.keys().blob_id(&plain), *id);
        }
        assert_eq!(data_reads(rec.take()), 1);
        let view = repo.only(&target);
        view.read_blob(&index, BlobType::Data, &ids[0])
            .await
            .unwrap();
        assert_eq!(
            data_reads(rec.take()),
            1,
            "a new view reads the group itself"
        );
    }

    /// Back up `dir` as source `files`.
    async fn backup_dir(repo: &Repository, dir: &std::path::Path) -> crate::backup::BackupReport {
        let opts = crate::backup::BackupOptions {
            source: "files".into(),
            paths: vec![dir.to_path_buf()],
            tags: vec![],
            hostname: "h".into(),
            time_zone: "UTC".into(),
            parent: crate::backup::ParentMode::Auto,
            exclude: vec![],
        };
        crate::backup::backup(repo, &opts, Arc::default())
            .await
            .unwrap()
    }

    /// Every file's bytes in a snapshot (one directory level), by name.
    async fn files_of(repo: &Repository, snap: &Snapshot) -> Vec<(String, Vec<u8>)> {
        let (index, _) = repo.load_index().await.unwrap();
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), snap.tree)];
        while let Some((path, tree)) = stack.pop() {
            for n in repo.load_tree(&index, &tree).await.unwrap() {
                let p = format!("{path}/{}", n.name);
                if let Some(sub) = n.subtree {
                    stack.push((p.clone(), sub));
                }
                if !n.content.is_empty() {
                    let mut body = Vec::new();
                    for b in &n.content {
                        body.extend(repo.read_blob(&index, BlobType::Data, b).await.unwrap());
                    }
                    out.push((p, body));
                }
            }
        }
        out.sort();
        out
    }

    /// A repository initialized on `t` with password `pw` (admin), with a
    /// key of each given role and password added.
    async fn admin_with_keys(t: &TargetRef, keys: &[(Role, &[u8])]) -> Repository {
        let admin = Repository::init(vec![t.clone()], b"pw", &cheap())
            .await
            .unwrap();
        for (role, pw) in keys {
            admin.add_key(*role, pw, cheap().kdf).await.unwrap();
        }
        admin
    }

    #[tokio::test]
    async fn roles_open_with_their_bundle_and_only_admin_adds_keys() {
        let t = mem("a");
        let admin = admin_with_keys(&t, &[(Role::Backup, b"bk"), (Role::Restore, b"rs")]).await;
        assert_eq!(admin.config().version, FORMAT_VERSION);
        let (backup, _) = Repository::open(vec![t.clone()], b"bk").await.unwrap();
        let (restore, _) = Repository::open(vec![t.clone()], b"rs").await.unwrap();
        assert_eq!(
            (backup.role(), restore.role()),
            (Role::Backup, Role::Restore)
        );
        assert!(backup.master.is_none() && restore.master.is_none());

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("mail.eml"),
            b"Subject: hi\r\n\r\nbody".repeat(500),
        )
        .unwrap();
        let r = backup_dir(&backup, dir.path()).await;
        assert_eq!(files_of(&restore, &r.snapshot).await.len(), 1);
        assert_eq!(
            files_of(&admin, &r.snapshot).await,
            files_of(&restore, &r.snapshot).await
        );

        // The backup key reads trees but no content, with a role error.
        let (index, _) = backup.load_index().await.unwrap();
        let nodes = backup.load_tree(&index, &r.snapshot.tree).await.unwrap();
        let sub = backup
            .load_tree(&index, &nodes[0].subtree.unwrap())
            .await
            .unwrap();
        let e = backup
            .read_blob(&index, BlobType::Data, &sub[0].content[0])
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_ROLE, "{e}");
        assert!(e.to_string().contains("a restore or admin key"), "{e}");
        for repo in [&backup, &restore] {
            let e = repo
                .add_key(Role::Backup, b"x", cheap().kdf)
                .await
                .unwrap_err();
            assert_eq!(e.exit_code(), crate::error::EXIT_ROLE, "{e}");
        }
        // A restore key re-wraps its own bundle under a new password.
        restore.rewrap_own_key(b"rs2", cheap().kdf).await.unwrap();
        let (again, _) = Repository::open(vec![t.clone()], b"rs2").await.unwrap();
        assert_eq!(again.role(), Role::Restore);
        assert_eq!(
            files_of(&again, &r.snapshot).await,
            files_of(&admin, &r.snapshot).await
        );
    }

    #[tokio::test]
    async fn format_1_repositories_stay_readable_and_writable_without_roles() {
        let t = mem("a");
        let opts = InitOptions {
            format_version: 1,
            ..cheap()
        };
        let repo = Repository::init(vec![t.clone()], b"pw", &opts)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![7u8; 300_000]).unwrap();
        let r = backup_dir(&repo, dir.path()).await;
        let (reopened, _) = Repository::open(vec![t.clone()], b"pw").await.unwrap();
        assert_eq!(reopened.config().version, 1);
        assert!(!reopened.keys().wraps_data_keys());
        assert_eq!(
            files_of(&reopened, &r.snapshot).await[0].1,
            vec![7u8; 300_000]
        );
        assert!(t.list("datakeys/").await.unwrap().is_empty());
        let e = reopened
            .add_key(Role::Backup, b"bk", cheap().kdf)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("format 2") && e.contains("format 1"), "{e}");
        // Admin keys still work.
        reopened
            .add_key(Role::Admin, b"pw2", cheap().kdf)
            .await
            .unwrap();
        Repository::open(vec![t], b"pw2").await.unwrap();
    }

    /// Forgetting needs an admin key inside the library (not only in the
    /// CLI): a backup or restore key is refused with a role error naming the
    /// operation and nothing is deleted; the admin key removes the snapshot.
    #[tokio::test]
    async fn forget_remove_needs_an_admin_key() {
        let t = mem("a");
        let admin = admin_with_keys(&t, &[(Role::Backup, b"bk"), (Role::Restore, b"rk")]).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"forget me not").unwrap();
        let first = backup_dir(&admin, dir.path()).await;
        let name = ObjectKind::Snapshot.name(&first.id);
        for pw in [&b"bk"[..], &b"rk"[..]] {
            let (weak, _) = Repository::open(vec![t.clone()], pw).await.unwrap();
            assert!(weak.role() < Role::Admin);
            let err = crate::forget::remove(&weak, &[first.id]).await.unwrap_err();
            assert!(matches!(err, Error::Role { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("forget") && msg.contains("admin"), "{msg}");
            assert!(t.get(&name).await.is_ok(), "{name} deleted by a {pw:?} key");
        }
        let removal = crate::forget::remove(&admin, &[first.id]).await.unwrap();
        assert!(removal.failures.is_empty() && removal.locked.is_empty());
        assert!(t.get(&name).await.is_err(), "{name} still there");
    }

    /// A repository initialised on two memory targets `a` and `b`.
    /// A writer killed between staging and publishing leaves `NAME#N`
    /// beside the object's place, which no listing shows. Prune removes one
    /// older than the grace period (and an hour), keeps a younger one (a
    /// live writer may still be filling it) and every object; a dry run
    /// only counts.
    #[tokio::test]
    async fn prune_removes_staging_files_that_interrupted_writes_left() {
        use std::time::{Duration, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let url = root.to_str().unwrap();
        let t: TargetRef =
            Arc::new(StoreTarget::open("l", url, &Default::default(), true).unwrap());
        let repo = Repository::init(vec![t.clone()], b"pw", &cheap())
            .await
            .unwrap();
        let src = tempfile::tempdir().unwrap();
        std::fs::write(
            src.path().join("mail.eml"),
            b"Subject: x\r\n\r\nhi".repeat(900),
        )
        .unwrap();
        let r = backup_dir(&repo, src.path()).await;
        let expected = files_of(&repo, &r.snapshot).await;
        let objects = |t: TargetRef| async move {
            let mut v: Vec<_> = t
                .list("")
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.name)
                .collect();
            v.sort();
            v
        };
        let before = objects(t.clone()).await;
        let pack = before
            .iter()
            .find(|n| n.starts_with("data/"))
            .unwrap()
            .clone();
        let (stale, fresh) = (
            root.join(format!("{pack}#3")),
            root.join(format!("{pack}#4")),
        );
        std::fs::copy(root.join(&pack), &stale).unwrap();
        std::fs::write(&fresh, b"half a pack").unwrap();
        let half_an_hour_ago = SystemTime::now() - Duration::from_secs(1800);
        let f = std::fs::File::options().write(true).open(&fresh).unwrap();
        f.set_modified(half_an_hour_ago).unwrap();
        let two_days_ago = SystemTime::now() - Duration::from_secs(48 * 3600);
        let f = std::fs::File::options().write(true).open(&stale).unwrap();
        f.set_modified(two_days_ago).unwrap();
        let stale_len = f.metadata().unwrap().len();
        assert_eq!(
            objects(t.clone()).await,
            before,
            "listings skip staging files"
        );

        let dry = crate::prune::PruneOptions {
            dry_run: true,
            ..Default::default()
        };
        let report = crate::prune::prune(&repo, &dry).await.unwrap();
        assert_eq!((report.staging_files, report.staging_bytes), (1, stale_len));
        assert!(stale.exists(), "a dry run removes nothing");

        // Even with no grace period (an erasure's `--prune-grace 0s`) a file
        // written half an hour ago may belong to a live writer: it stays.
        let now = crate::prune::PruneOptions {
            grace: Duration::ZERO,
            ..Default::default()
        };
        let report = crate::prune::prune(&repo, &now).await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!((report.staging_files, report.staging_bytes), (1, stale_len));
        assert!(!stale.exists() && fresh.exists());
        assert_eq!(objects(t.clone()).await, before);
        assert_eq!(files_of(&repo, &r.snapshot).await, expected);
    }

    async fn two_targets() -> (TargetRef, TargetRef, Repository) {
        let (a, b) = (mem("a"), mem("b"));
        let repo = Repository::init(vec![a.clone(), b.clone()], b"pw", &cheap())
            .await
            .unwrap();
        (a, b, repo)
    }

    /// `n` one-blob files (below the minimum chunk size, incompressible)
    /// backed up, every other one deleted and backed up again, the first
    /// snapshot forgotten: every pack is about half garbage. Returns the
    /// second backup.
    async fn half_garbage(repo: &Repository, n: u32) -> crate::backup::BackupReport {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..n {
            let body: Vec<u8> = (0..9_000u32)
                .map(|j| (j.wrapping_mul(2_654_435_761) ^ i.wrapping_mul(40_503)) as u8)
                .collect();
            std::fs::write(dir.path().join(format!("f{i:02}")), body).unwrap();
        }
        let first = backup_dir(repo, dir.path()).await;
        for i in (0..n).step_by(2) {
            std::fs::remove_file(dir.path().join(format!("f{i:02}"))).unwrap();
        }
        let second = backup_dir(repo, dir.path()).await;
        crate::forget::remove(repo, &[first.id]).await.unwrap();
        second
    }

    /// A repack reads its source packs from the first target; a blob
    /// damaged there is read again from the target that holds it intact,
    /// and the progress counters end at their totals.
    #[tokio::test]
    async fn a_repack_falls_back_per_blob_to_an_intact_target() {
        let (a, b, repo) = two_targets().await;
        let second = half_garbage(&repo, 60).await;
        let expected = files_of(&repo, &second.snapshot).await;
        // Damage every data pack on target a, every 1 KiB: no blob of it decodes.
        for m in a.list("data/").await.unwrap() {
            let mut bytes = a.get(&m.name).await.unwrap().to_vec();
            for at in (100..bytes.len().saturating_sub(64)).step_by(1024) {
                bytes[at] ^= 0x55;
            }
            a.overwrite(&m.name, Bytes::from(bytes)).await.unwrap();
        }
        let data_bytes: u64 = a.list("data/").await.unwrap().iter().map(|m| m.size).sum();
        let progress = Arc::new(crate::prune::PruneProgress::default());
        let opts = crate::prune::PruneOptions {
            grace: std::time::Duration::ZERO,
            repack_threshold: 0.2,
            progress: Some(progress.clone()),
            ..Default::default()
        };
        let marked = crate::prune::prune(&repo, &opts).await.unwrap();
        assert!(marked.packs_repacked >= 1, "{marked:?}");
        use std::sync::atomic::Ordering::Relaxed;
        let copied = progress.blobs_copied.load(Relaxed);
        assert!(copied >= 30, "copied {copied}");
        assert_eq!(copied, progress.blobs_total.load(Relaxed));
        assert_eq!(
            progress.bytes_copied.load(Relaxed),
            progress.bytes_total.load(Relaxed)
        );
        // Sealed bytes: a group shared by many copied files counts once.
        let total = progress.bytes_total.load(Relaxed);
        assert!(total > 0 && total <= data_bytes, "{total} of {data_bytes}");
        let swept = crate::prune::prune(&repo, &opts).await.unwrap();
        assert!(swept.packs_deleted >= 1, "{swept:?}");
        // The damaged packs are gone; both targets hold good copies.
        for t in [&a, &b] {
            let (fresh, _) = Repository::open(vec![t.clone()], b"pw").await.unwrap();
            assert_eq!(files_of(&fresh, &second.snapshot).await, expected);
            let report = crate::check::check(&fresh, crate::check::ReadData::All)
                .await
                .unwrap();
            assert!(
                report.errors.is_empty(),
                "{}: {:?}",
                t.name(),
                report.errors
            );
        }
    }

    /// Without damage, a repack makes one read per source pack, not one per
    /// blob copied.
    #[tokio::test]
    async fn a_repack_reads_each_source_pack_once() {
        let rec = Arc::new(crate::target::recording::Recording::new(mem("a")));
        let t: TargetRef = rec.clone();
        let repo = Repository::init(vec![t], b"pw", &cheap()).await.unwrap();
        half_garbage(&repo, 80).await;
        let progress = Arc::new(crate::prune::PruneProgress::default());
        let opts = crate::prune::PruneOptions {
            repack_threshold: 0.2,
            progress: Some(progress.clone()),
            ..Default::default()
        };
        rec.take();
        let marked = crate::prune::prune(&repo, &opts).await.unwrap();
        let data_reads = rec
            .take()
            .iter()
            .filter(|c| c.op.starts_with("get") && c.object.starts_with("data/"))
            .count();
        let copied = progress
            .blobs_copied
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(copied >= 40, "copied {copied}");
        assert!(
            data_reads >= 1 && data_reads <= marked.packs_repacked,
            "{data_reads} data pack reads for {copied} blobs from {} packs",
            marked.packs_repacked
        );
    }

    /// sync's progress counters end at what its report says it copied.
    #[tokio::test]
    async fn sync_progress_counts_what_was_copied() {
        let (_, b, repo) = two_targets().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), vec![7u8; 300_000]).unwrap();
        backup_dir(&repo, dir.path()).await;
        // Target b loses its packs and snapshots (a target that lagged).
        let mut lost = 0;
        for prefix in ["data/", "tree/", "snapshots/"] {
            for m in b.list(prefix).await.unwrap() {
                b.purge(&m.name).await.unwrap();
                lost += 1;
            }
        }
        assert!(lost >= 3, "{lost}");
        let progress = Arc::new(crate::sync::SyncProgress::default());
        let report = crate::sync::sync_with_progress(&repo, false, Some(progress.clone()))
            .await
            .unwrap();
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(report.copied.len(), 1, "{report:?}");
        let (target, n, bytes) = &report.copied[0];
        assert_eq!((target.as_str(), *n), ("b", lost), "{report:?}");
        assert_eq!(progress.objects_copied.load(Relaxed), lost as u64);
        assert_eq!(progress.objects_total.load(Relaxed), lost as u64);
        assert_eq!(progress.bytes_copied.load(Relaxed), *bytes);
    }

    /// A prune marks the packs a running backup-key session relies on: at
    /// commit the session stores them again, copying content it cannot
    /// decrypt as sealed bytes, and after the sweep everything restores.
    #[tokio::test]
    async fn a_backup_key_rescues_marked_content_as_sealed_bytes() {
        let t = mem("a");
        let admin = admin_with_keys(&t, &[(Role::Backup, b"bk")]).await;
        let (backup, _) = Repository::open(vec![t.clone()], b"bk").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..400_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(dir.path().join("attachment.pdf"), &body).unwrap();
        // Small files: sealed in groups, which are copied whole.
        for i in 0..40u32 {
            let mail = format!(
                "From: a{i}@example.org\n\n{}",
                "text ".repeat(500 + i as usize)
            );
            std::fs::write(dir.path().join(format!("{i}.eml")), mail).unwrap();
        }
        let first = backup_dir(&admin, dir.path()).await;
        assert!(grouped_blobs(&admin, &t).await > 0, "the mails are grouped");
        let expected = files_of(&admin, &first.snapshot).await;
        let removal = crate::forget::remove(&admin, &[first.id]).await.unwrap();
        assert!(removal.failures.is_empty(), "{:?}", removal.failures);

        // A backup-key session starts while the data is still live ...
        let session = crate::pipeline::Session::start(&backup, Arc::default())
            .await
            .unwrap();
        // ... then prune marks every pack: nothing references them.
        let marked = crate::prune::prune(&admin, &crate::prune::PruneOptions::default())
            .await
            .unwrap();
        assert!(marked.packs_marked >= 2, "{marked:?}");
        // The session commits a snapshot of the same tree.
        let mut snap = first.snapshot.clone();
        snap.time = chrono::Utc::now();
        let committed = session.commit(snap).await.unwrap();
        // The sweep deletes the marked packs; the rescued copies remain.
        let swept = crate::prune::prune(
            &admin,
            &crate::prune::PruneOptions {
                grace: std::time::Duration::ZERO,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(swept.packs_deleted >= 2, "{swept:?}");
        let (fresh, _) = Repository::open(vec![t.clone()], b"pw").await.unwrap();
        assert_eq!(files_of(&fresh, &committed.snapshot).await, expected);
        let report = crate::check::check(&fresh, crate::check::ReadData::All)
            .await
            .unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    #[tokio::test]
    async fn open_reports_missing_repo_wrong_password_and_unknown_version() {
        let t = mem("a");
        let e = Repository::open(vec![t.clone()], b"pw").await.unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_REPO_NOT_FOUND, "{e}");
        Repository::init(vec![t.clone()], b"pw", &cheap())
            .await
            .unwrap();
        let e = Repository::open(vec![t.clone()], b"nope")
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_WRONG_PASSWORD, "{e}");
        let (repo, empty) = Repository::open(vec![t.clone()], b"pw").await.unwrap();
        assert!(empty.is_empty());
        // A config claiming version 4 is refused before any key is tried.
        let mut cfg = t.get(CONFIG_OBJECT).await.unwrap().to_vec();
        cfg[8..12].copy_from_slice(&4u32.to_le_bytes());
        t.overwrite(CONFIG_OBJECT, Bytes::from(cfg)).await.unwrap();
        let e = Repository::open(vec![t.clone()], b"pw")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("version 4") && e.contains("1, 2, 3") && e.contains("upgrade"),
            "{e}"
        );
        // init refuses a target that already holds a repository.
        let e = Repository::init(vec![t], b"pw", &cheap())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("already holds"), "{e}");
        drop(repo);
    }

    #[tokio::test]
    async fn targets_are_replicas_and_new_targets_are_adopted() {
        let (a, b, c) = (mem("a"), mem("b"), mem("c"));
        Repository::init(vec![a.clone(), b.clone()], b"pw", &cheap())
            .await
            .unwrap();
        for t in [&a, &b] {
            assert_eq!(t.list("keys/").await.unwrap().len(), 1);
        }
        assert_eq!(
            a.get(CONFIG_OBJECT).await.unwrap(),
            b.get(CONFIG_OBJECT).await.unwrap()
        );
        let (mut repo, empty) = Repository::open(vec![a.clone(), b.clone(), c.clone()], b"pw")
            .await
            .unwrap();
        assert_eq!(empty.len(), 1);
        repo.adopt_targets(empty).await.unwrap();
        assert_eq!(repo.targets().len(), 3);
        assert_eq!(
            a.get(CONFIG_OBJECT).await.unwrap(),
            c.get(CONFIG_OBJECT).await.unwrap()
        );
        // A target holding another repository is refused by name.
        let d = mem("other");
        Repository::init(vec![d.clone()], b"pw", &cheap())
            .await
            .unwrap();
        let e = Repository::open(vec![a, d], b"pw")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("other"), "{e}");
    }

    #[tokio::test]
    async fn reads_fall_back_to_the_next_target_when_a_copy_is_damaged() {
        let (a, _, repo) = two_targets().await;
        let doc = crate::index::IndexFile::default();
        let (id, results) = repo
            .save_object(repo.targets(), ObjectKind::Index, &doc)
            .await;
        assert!(results.iter().all(|r| r.is_ok()));
        let name = ObjectKind::Index.name(&id);
        let mut bad = a.get(&name).await.unwrap().to_vec();
        bad[30] ^= 1;
        a.overwrite(&name, Bytes::from(bad)).await.unwrap();
        let back: crate::index::IndexFile = repo.load_object(ObjectKind::Index, &id).await.unwrap();
        assert_eq!(back, doc);
        let e = repo
            .only(&a)
            .load_object::<crate::index::IndexFile>(ObjectKind::Index, &id)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&name), "{e}");
    }
}
