//! The `custos` command line. Library errors are typed; this file alone adds
//! `anyhow` context and maps errors to exit codes (README, "Exit codes").
// One audited exception: `tune_malloc` (a single FFI call, measured
// need). The library itself is `forbid(unsafe_code)`.
#![deny(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use custos::backup::{self, BackupOptions, ParentMode, Progress};
use custos::blob::BlobType;
use custos::check::{self, ReadData};
use custos::crypto::Role;
use custos::error::{self as cerr, Error};
use custos::index::IndexFile;
use custos::keyfile::{KdfParams, KeyFile};
use custos::object::ObjectKind;
use custos::records::RecordBackupOptions;
use custos::repo::{Repository, CONFIG_OBJECT};
use custos::restore::{self, RestoreOptions};
use custos::settings::{SecretSource, Settings, SourceSettings, TargetSettings};
use custos::snapshot::{self, Snapshot, SnapshotEntry};
use custos::target::cache::Cached;
use custos::target::limit::Limited;
use custos::target::store::StoreTarget;
use custos::target::TargetRef;
use custos::tree::{parse_tree, NodeKind, TreeDoc};
use custos::Id;

// Every `print!`/`println!` of this file writes through `out`: a closed pipe
// (`custos cat … | head`) silences stdout instead of panicking.
macro_rules! println {
    () => {
        out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

macro_rules! print {
    ($($arg:tt)*) => {
        out(format_args!($($arg)*))
    };
}

/// Set once stdout's reader has gone away.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Write to stdout. After EPIPE (the reader went away) output is dropped
/// without a message and the command finishes as usual (its audit entry is
/// still written); another write error exits 1 naming it.
fn out(args: std::fmt::Arguments) {
    use std::io::Write;
    use std::sync::atomic::Ordering::Relaxed;
    if STDOUT_CLOSED.load(Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            STDOUT_CLOSED.store(true, Relaxed);
            return;
        }
        eprintln!("custos: writing to stdout: {e}");
        std::process::exit(cerr::EXIT_ERROR);
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "custos",
    version,
    about = "Encrypted, deduplicated backups of customer-communication records"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Global {
    /// Repository URL: /path, file:///path or s3://bucket/prefix.
    #[arg(short = 'r', long = "repo", env = "CUSTOS_REPOSITORY", global = true)]
    repo: Option<String>,
    /// Config file (TOML) with [[target]], [[source]] and [repository].
    #[arg(short = 'c', long = "config", env = "CUSTOS_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Act only on this configured target (repeatable).
    #[arg(long = "target", global = true)]
    target: Vec<String>,
    /// Read the password from this file.
    #[arg(long, env = "CUSTOS_PASSWORD_FILE", global = true)]
    password_file: Option<PathBuf>,
    /// Run this command and read the password from its output.
    #[arg(long, env = "CUSTOS_PASSWORD_COMMAND", global = true)]
    password_command: Option<String>,
    /// Machine-readable JSON on standard output.
    #[arg(long, global = true)]
    json: bool,
    /// Less output.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// More log output (repeatable).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Metadata cache directory.
    #[arg(long, env = "CUSTOS_CACHE_DIR", global = true)]
    cache_dir: Option<PathBuf>,
    /// Do not use the local metadata cache.
    #[arg(long, global = true)]
    no_cache: bool,
    /// Upload limit per target, KiB/s (overrides the config).
    #[arg(long, global = true)]
    limit_upload: Option<u64>,
    /// Download limit per target, KiB/s (overrides the config).
    #[arg(long, global = true)]
    limit_download: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a repository on every target.
    Init(InitArgs),
    /// Back up paths (or the configured sources) into a new snapshot.
    Backup(BackupArgs),
    /// Run the config's [[job]]s on cron schedules, with /metrics, /healthz and /readyz
    /// (SIGTERM/SIGINT: graceful stop; SIGHUP: reload the config).
    Daemon(custos::daemon::DaemonArgs),
    /// List snapshots.
    Snapshots(FilterArgs),
    /// List the contents of a snapshot.
    Ls {
        /// Snapshot id (prefix) or `latest`.
        snapshot: String,
        /// Path inside the snapshot (`mail/inbox`) or as backed up
        /// (`/srv/exports/mail/inbox`); a path the snapshot lacks is an error.
        path: Option<String>,
    },
    /// Restore a snapshot into a directory.
    Restore {
        /// Snapshot id (prefix) or `latest`, optionally `ID:path/inside`.
        snapshot: String,
        /// Destination directory.
        dest: PathBuf,
        /// Restore only paths matching this glob (repeatable).
        #[arg(long)]
        include: Vec<String>,
        /// Re-read every restored file and check it against the digest
        /// recorded at backup (every blob is authenticated either way).
        #[arg(long)]
        verify: bool,
        /// Append the email records back into this configured IMAP source
        /// instead of writing files (DEST is then not used; give `-`).
        #[arg(long)]
        to_source: Option<String>,
        /// With --to-source: this folder instead of each message's own.
        #[arg(long, requires = "to_source")]
        folder: Option<String>,
        /// With --to-source: also messages that were deleted at the source.
        #[arg(long, requires = "to_source")]
        include_deleted: bool,
    },
    /// Verify repository structure and, optionally, pack data.
    Check {
        /// Read and verify every pack.
        #[arg(long, conflicts_with = "read_data_subset")]
        read_data: bool,
        /// Read and verify a random share of packs, e.g. `10%`.
        #[arg(long)]
        read_data_subset: Option<String>,
        /// Replace objects other targets lack or hold damaged with verified
        /// copies from this target, then check again.
        #[arg(long, value_name = "TARGET")]
        repair_from: Option<String>,
    },
    /// Every target: reachable, snapshots, objects missing or extra versus the others, bytes stored.
    /// `custos targets check`: prove each target enforces Object Lock (locked canary, delete attempt).
    Targets {
        #[command(subcommand)]
        cmd: Option<TargetsCmd>,
    },
    /// Object Lock maintenance: `custos locks extend`.
    Locks {
        #[command(subcommand)]
        cmd: LocksCmd,
    },
    /// Copy to every target what any other target holds (lagging targets catch up).
    Sync,
    /// Configured sources: `custos sources check` tests credentials and reachability.
    Sources {
        #[command(subcommand)]
        cmd: SourcesCmd,
    },
    /// List records matching a filter, from tree metadata (no bodies downloaded).
    Find(FindArgs),
    /// Write matching records in open formats: eml (a folder), mbox or jsonl (a file).
    Export {
        /// eml | mbox | jsonl
        #[arg(long)]
        format: String,
        /// Output folder (eml) or file (mbox, jsonl).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        filter: FindArgs,
    },
    /// Remove data no snapshot references (two-phase: mark now, delete after the grace period).
    Prune(PruneArgs),
    /// The audit trail: who did what with the archive (hash-chained).
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Customer rights: what we hold on a customer, the access export, erasure.
    Customer {
        #[command(subcommand)]
        cmd: CustomerCmd,
    },
    /// Legal holds: records they cover are never removed by retention.
    Hold {
        #[command(subcommand)]
        cmd: HoldCmd,
    },
    /// Record retention: remove records past their retention from every snapshot.
    Retention {
        #[command(subcommand)]
        cmd: RetentionCmd,
    },
    /// Remove snapshots by id or by a retention policy (rules are ORed).
    Forget(ForgetArgs),
    /// Repository and snapshot statistics.
    Stats {
        /// Snapshot to report on (default: the whole repository).
        snapshot: Option<String>,
    },
    /// Manage passwords (key objects).
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Repository format migrations (restic's `migrate`).
    Migrate {
        #[command(subcommand)]
        cmd: MigrateCmd,
    },
    /// Print a decrypted metadata object (debugging).
    Cat {
        /// config | snapshot | index | key | tree
        kind: String,
        /// Object id (not for config).
        id: Option<String>,
    },
    /// DR test: restore each source's latest snapshot on every target to a scratch
    /// directory, verify every file/record and the counts, check RPO/RTO, record the result.
    RestoreVerify(RestoreVerifyArgs),
    /// List stored restore-verify results, newest first.
    VerifyHistory(VerifyHistoryArgs),
}

#[derive(Args, Debug)]
struct RestoreVerifyArgs {
    /// Verify this snapshot (id, prefix or `latest`) instead of the latest of each source.
    #[arg(long, conflicts_with = "source")]
    snapshot: Option<String>,
    /// Only this source (repeatable).
    #[arg(long)]
    source: Vec<String>,
    /// Restore only a random share of files/records plus the newest ones, e.g. `10%`
    /// (throughput and an estimated full-restore time; no RTO verdict).
    #[arg(long)]
    sample: Option<String>,
    /// Directory for the scratch restore (default: the system temporary directory).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Leave the restored files in the scratch directory.
    #[arg(long)]
    keep_scratch: bool,
    /// Recovery point objective for every source, e.g. `26h` (overrides the config's `rpo`).
    #[arg(long)]
    rpo: Option<humantime::Duration>,
    /// Recovery time objective for every source, e.g. `4h` (overrides the config's `rto`).
    #[arg(long)]
    rto: Option<humantime::Duration>,
    /// Also fetch N random records of each record source live and compare their digests.
    #[arg(long, value_name = "N")]
    against_source: Option<usize>,
}

#[derive(Args, Debug)]
struct VerifyHistoryArgs {
    /// Only verifications of this source.
    #[arg(long)]
    source: Option<String>,
}

#[derive(Args, Debug)]
struct InitArgs {
    /// Argon2id memory for the first key, KiB.
    #[arg(long)]
    kdf_memory_kib: Option<u32>,
    /// Argon2id iterations for the first key.
    #[arg(long)]
    kdf_iterations: Option<u32>,
    /// zstd level (-7..=22, 0 = off).
    #[arg(long)]
    compression: Option<i32>,
    /// Target pack size in MiB.
    #[arg(long)]
    pack_size_mib: Option<u32>,
    /// Repository format to create: 3 (the default: small blobs sealed in
    /// groups) or 2 (readable by custos builds from before format 3).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=3))]
    format_version: Option<u32>,
}

#[derive(Args, Debug)]
struct BackupArgs {
    /// Files and directories to back up.
    paths: Vec<PathBuf>,
    /// Back up only this configured source (repeatable).
    #[arg(long)]
    source: Vec<String>,
    /// Tag the snapshot (repeatable).
    #[arg(long)]
    tag: Vec<String>,
    /// Host name recorded (default: this host).
    #[arg(long)]
    host: Option<String>,
    /// Compare against this snapshot instead of the latest matching one.
    #[arg(long)]
    parent: Option<String>,
    /// Read every file, ignoring the parent snapshot.
    #[arg(long)]
    force: bool,
    /// Configured sources backed up at once (each within its own rate limit).
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// IANA time zone recorded with the snapshot (default: the source's, the
    /// repository's, else UTC; never the machine's `TZ`).
    #[arg(long)]
    time_zone: Option<String>,
    /// Leave out entries matching this glob (repeatable): with a `/` it is
    /// matched against the absolute path, without one against the name.
    #[arg(long)]
    exclude: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum TargetsCmd {
    /// Preflight: versioning, Object Lock, and whether a locked canary version can be
    /// deleted. Exits 1 when a target with `object_lock` does not enforce it.
    Check,
}

#[derive(Subcommand, Debug)]
enum LocksCmd {
    /// Raise the retain-until of every object a live snapshot still needs to that
    /// snapshot's horizon (README, "Object Lock"). Never shortens a lock.
    Extend {
        /// Report what would be extended.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SourcesCmd {
    /// Check credentials and reachability of every configured source (or --source).
    Check {
        /// Only this source (repeatable).
        #[arg(long)]
        source: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct FindArgs {
    /// Records naming this customer identifier (`ana@example.org`, `email:…`, `phone:+…`).
    #[arg(long)]
    customer: Option<String>,
    /// Records created at or after this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    since: Option<String>,
    /// Records created before this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    until: Option<String>,
    /// Records of this kind (email, chat_message, ticket …).
    #[arg(long)]
    kind: Option<String>,
    /// Only this source.
    #[arg(long)]
    source: Option<String>,
    /// Search this snapshot instead of the latest snapshot of every source.
    #[arg(long)]
    snapshot: Option<String>,
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Every entry, oldest first (forks shown), then the current head.
    Log,
    /// Check the chain: altered, removed or reordered entries; with --head, a
    /// cut-back tail. Exit 1 when anything is wrong.
    Verify {
        /// A head recorded earlier outside the repository (`custos audit head`).
        #[arg(long)]
        head: Option<String>,
    },
    /// Print the current head (record it outside the repository).
    Head,
}

#[derive(Subcommand, Debug)]
enum CustomerCmd {
    /// Sources, record counts, first and last contact, snapshots and targets
    /// holding the customer's records (from the customer index; no bodies read).
    Show {
        /// An identifier (`email:ana@example.org`, `phone:+351…`, `crm:hubspot:7`,
        /// or a bare address or number) or a `[[customer]]` name.
        customer: String,
    },
    /// Write every record naming the customer in open formats (emails as .eml,
    /// chats, tickets and posts as JSON, attachments) with manifest.json and index.md.
    Export {
        /// Identifier or `[[customer]]` name.
        customer: String,
        /// A new or empty folder, or a file ending in .zip.
        #[arg(long)]
        out: PathBuf,
        /// Only this snapshot (default: every retained snapshot, newest version of each record).
        #[arg(long)]
        snapshot: Option<String>,
    },
    /// Remove every record naming the customer from every retained snapshot on
    /// every target (legal holds win), suppress the customer for later restores,
    /// exports and backups, and log the erasure. With --retry-pending: complete
    /// the erasures an Object Lock held back whose retain-until has passed.
    Erase {
        /// Identifier or `[[customer]]` name.
        #[arg(required_unless_present = "retry_pending")]
        customer: Option<String>,
        /// Why (the request, case number): stored in the ledger and the erasure log.
        #[arg(long, required_unless_present = "retry_pending")]
        reason: Option<String>,
        /// Retry every pending erasure now (no customer): delete what its locks
        /// kept once their retain-until has passed, prune with --prune-grace,
        /// and mark it complete when nothing of the erased data is left.
        #[arg(long, conflicts_with_all = ["customer", "reason", "dry_run"])]
        retry_pending: bool,
        /// Report what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Prune afterwards with this grace period (`0s` deletes the data now; default:
        /// leave it to the next prune, which respects the usual grace period).
        #[arg(long)]
        prune_grace: Option<humantime::Duration>,
    },
    /// Lift a customer's suppression (later backups store their records again).
    Lift {
        /// Identifier or `[[customer]]` name.
        customer: String,
        #[arg(long)]
        reason: String,
    },
    /// The erasure log: each erasure, pending (what a lock still keeps, until
    /// when) or complete (since when).
    Log,
}

#[derive(Subcommand, Debug)]
enum HoldCmd {
    /// Place a hold (named, with a reason; until released).
    Add {
        /// Hold name.
        name: String,
        /// Why (case number, request).
        #[arg(long)]
        reason: String,
        /// Records naming this customer identifier.
        #[arg(long)]
        customer: Option<String>,
        /// Records of this source.
        #[arg(long)]
        source: Option<String>,
        /// Records of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Records of this collection.
        #[arg(long)]
        collection: Option<String>,
        /// Records created at or after this time (RFC 3339 or YYYY-MM-DD, UTC).
        #[arg(long)]
        from: Option<String>,
        /// Records created before this time (RFC 3339 or YYYY-MM-DD, UTC).
        #[arg(long)]
        until: Option<String>,
    },
    /// Active holds.
    List,
    /// Release a hold.
    Release {
        /// Hold name.
        name: String,
        /// Why it is released.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum RetentionCmd {
    /// Remove records past retention ([record_retention] rules) from all snapshots; holds win.
    Apply {
        /// Report what would be removed: each record (id, collection, kind, rule).
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Do not prune afterwards (the removed records' data stays until the next prune).
        #[arg(long)]
        no_prune: bool,
        /// Grace period of the prune that follows (as `custos prune --grace`).
        #[arg(long, default_value = "24h", conflicts_with = "no_prune")]
        prune_grace: humantime::Duration,
    },
    /// The disposal log: what was removed, when, under which rule.
    Log,
}

#[derive(Args, Debug)]
struct PruneArgs {
    /// How long marked data waits before it is deleted (longer than any backup runs).
    #[arg(long, default_value = "24h")]
    grace: humantime::Duration,
    /// Repack packs with at least this share of unused bytes, in percent.
    #[arg(long, default_value_t = 50.0)]
    repack_threshold: f64,
    /// Report what would be marked and deleted.
    #[arg(long, short = 'n')]
    dry_run: bool,
}

#[derive(Args, Debug)]
struct ForgetArgs {
    /// Snapshots to remove (ids or prefixes); without them the policy decides.
    snapshots: Vec<String>,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    keep_last: Option<String>,
    /// Keep the newest snapshot of each of the N newest hours that have one.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<String>,
    /// ... days.
    #[arg(long, value_name = "N")]
    keep_daily: Option<String>,
    /// ... ISO weeks.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<String>,
    /// ... months.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<String>,
    /// ... years.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<String>,
    /// Keep every snapshot newer than this (now minus 2y6m, 30d, 1w3d12h).
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<String>,
    /// Keep the newest snapshot of each hour within this window.
    #[arg(long, value_name = "DURATION")]
    keep_within_hourly: Option<String>,
    /// ... each day within this window.
    #[arg(long, value_name = "DURATION")]
    keep_within_daily: Option<String>,
    /// ... each week within this window.
    #[arg(long, value_name = "DURATION")]
    keep_within_weekly: Option<String>,
    /// ... each month within this window.
    #[arg(long, value_name = "DURATION")]
    keep_within_monthly: Option<String>,
    /// ... each year within this window.
    #[arg(long, value_name = "DURATION")]
    keep_within_yearly: Option<String>,
    /// Keep snapshots with this tag (repeatable).
    #[arg(long)]
    keep_tag: Vec<String>,
    /// Group snapshots by these keys before applying the policy (host,source,tags,paths; "" = one group).
    #[arg(long)]
    group_by: Option<String>,
    /// Show what would be removed, and why each snapshot is kept, without removing.
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// Allow the policy to remove every snapshot of a group.
    #[arg(long)]
    allow_empty_group: bool,
    /// Run prune afterwards (with its default grace period).
    #[arg(long)]
    prune: bool,
}

impl ForgetArgs {
    /// The policy from the flags, or None when no keep flag was given.
    fn policy(&self) -> anyhow::Result<Option<custos_schedules::retention::Policy>> {
        let mut p = custos_schedules::retention::Policy::default();
        let mut any = false;
        let counts = [
            ("keep-last", &self.keep_last),
            ("keep-hourly", &self.keep_hourly),
            ("keep-daily", &self.keep_daily),
            ("keep-weekly", &self.keep_weekly),
            ("keep-monthly", &self.keep_monthly),
            ("keep-yearly", &self.keep_yearly),
            ("keep-within", &self.keep_within),
            ("keep-within-hourly", &self.keep_within_hourly),
            ("keep-within-daily", &self.keep_within_daily),
            ("keep-within-weekly", &self.keep_within_weekly),
            ("keep-within-monthly", &self.keep_within_monthly),
            ("keep-within-yearly", &self.keep_within_yearly),
        ];
        for (name, value) in counts {
            if let Some(v) = value {
                p.set_option(name, v)
                    .map_err(|e| Error::Invalid(e.to_string()))?;
                any = true;
            }
        }
        for t in &self.keep_tag {
            p.set_option("keep-tag", t)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            any = true;
        }
        Ok(any.then_some(p))
    }
}

#[derive(Args, Debug)]
struct FilterArgs {
    /// Only snapshots with this tag.
    #[arg(long)]
    tag: Vec<String>,
    /// Only snapshots of this host.
    #[arg(long)]
    host: Option<String>,
    /// Only snapshots of this source.
    #[arg(long)]
    source: Option<String>,
}

#[derive(Subcommand, Debug)]
enum MigrateCmd {
    /// Raise a format 2 repository to format 3 on every target, in place: new
    /// backups then seal small blobs in groups. Nothing stored is rewritten;
    /// custos builds older than format 3 can no longer open it.
    UpgradeFormat,
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
    /// List key objects.
    List,
    /// Add a key (password read from --new-password-file, CUSTOS_NEW_PASSWORD or a
    /// prompt). Admin only.
    Add {
        /// What the key may do: `admin` (everything), `restore` (read
        /// everything, change nothing but add snapshots and verification
        /// records), `backup` (add data and snapshots, read metadata, never
        /// content). FORMAT.md, "Roles".
        #[arg(long, default_value = "admin", value_parser = parse_role)]
        role: Role,
        #[command(flatten)]
        np: NewPassword,
    },
    /// Remove a key object (not the one in use, not the last one).
    Remove {
        /// Key id (prefix).
        id: String,
    },
    /// Change the password of the key in use.
    Passwd(NewPassword),
}

#[derive(Args, Debug)]
struct NewPassword {
    /// File holding the new password.
    #[arg(long)]
    new_password_file: Option<PathBuf>,
    /// Argon2id memory, KiB.
    #[arg(long)]
    kdf_memory_kib: Option<u32>,
    /// Argon2id iterations.
    #[arg(long)]
    kdf_iterations: Option<u32>,
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("unknown role {s:?} (admin, restore, backup)"))
}

/// Tune glibc malloc before any thread exists (measured need; bench/README.md,
/// Findings, "Peak RSS is glibc malloc").
///
/// - Arenas capped at 2. By default every thread that allocates gets its own
///   arena (up to 8 per core) and keeps the multi-MiB pack and blob buffers
///   freed in it: a 1 GiB local restore peaked at 172–179 MiB with the
///   default, 92–124 MiB with 2 arenas at the same speed (1 arena: 84–97 MiB,
///   ~10 % slower); backup speed is unchanged.
/// - The mmap threshold fixed at 16 MiB. Pack buffers (~16 MiB: packs being
///   filled, whole packs read by check and local restores) come and go; after
///   the first one is freed glibc raises its threshold past them, so later
///   ones come from an arena and stay resident when freed. Fixed, they go
///   back to the system: 1 GiB `check --read-data` 104 → 57 MiB for ~0.1 s
///   more system time, local restore 97–114 → 66 MiB at the same speed
///   (within noise), backup 91–98 → 86–90 MiB.
/// - The trim threshold at 16 MiB too. A fixed mmap threshold leaves it at
///   glibc's 128 KiB, so the heap top was given back and faulted in again
///   over and over: a 1 GiB backup took 390 000–530 000 page faults and
///   0.8–0.9 s of system time; with 16 MiB, ~178 000 and 0.5–0.6 s, for
///   ~5 MiB more peak RSS (restore: +3 MiB, 20 % fewer faults).
///
/// A user's own `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_` or `GLIBC_TUNABLES` wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    let tuned = |var: &str, tunable: &str| {
        std::env::var_os(var).is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains(tunable))
    };
    if !tuned("MALLOC_ARENA_MAX", "arena_max") {
        // SAFETY: mallopt only sets an allocator parameter, is thread-safe in
        // glibc, and runs in `main` before any thread exists. Its result is
        // deliberately ignored: on failure the default stands.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
    if !tuned("MALLOC_MMAP_THRESHOLD_", "mmap_threshold") {
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        }
    }
    if !tuned("MALLOC_TRIM_THRESHOLD_", "trim_threshold") {
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tune_malloc();
    init_logging(&cli.global);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("custos: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("custos: {e:#}");
            let code = e
                .chain()
                .find_map(|c| c.downcast_ref::<Error>())
                .map(Error::exit_code)
                .unwrap_or(cerr::EXIT_ERROR);
            ExitCode::from(code as u8)
        }
    }
}

fn init_logging(g: &Global) {
    let level = match (g.quiet, g.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUSTOS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("custos={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Everything a command needs before it opens the repository.
struct Ctx {
    g: Global,
    settings: Option<Settings>,
    /// The repository the command opened (for its audit entry).
    opened: std::sync::Mutex<Option<Repository>>,
    /// What the command reports for its audit entry (subjects, counts).
    audit: std::sync::Mutex<custos::audit::Action>,
}

impl Ctx {
    fn target_settings(&self) -> anyhow::Result<Vec<TargetSettings>> {
        if let Some(s) = &self.settings {
            if s.targets.is_empty() {
                return Err(Error::Config("the config file has no [[target]]".into()).into());
            }
            let chosen: Vec<TargetSettings> = s
                .targets
                .iter()
                .filter(|t| self.g.target.is_empty() || self.g.target.contains(&t.name))
                .cloned()
                .collect();
            for n in &self.g.target {
                if !s.targets.iter().any(|t| &t.name == n) {
                    return Err(Error::Invalid(format!(
                        "--target {n}: no such target in the config"
                    ))
                    .into());
                }
            }
            return Ok(chosen);
        }
        match &self.g.repo {
            Some(url) => Ok(vec![TargetSettings::from_url(url)?]),
            None => Err(Error::Invalid(
                "no repository given: use -r/--repo (or CUSTOS_REPOSITORY) or -c/--config".into(),
            )
            .into()),
        }
    }

    fn open_targets(&self, create: bool) -> anyhow::Result<Vec<TargetRef>> {
        self.target_settings()?
            .iter()
            .map(|t| {
                let store = StoreTarget::open(&t.name, &t.url, &t.s3_options()?, create)?;
                let mut limits = t.limits;
                if let Some(k) = self.g.limit_upload {
                    limits.upload_bps = Some(k * 1024);
                }
                if let Some(k) = self.g.limit_download {
                    limits.download_bps = Some(k * 1024);
                }
                Ok(Limited::wrap(Arc::new(store), limits))
            })
            .collect()
    }

    fn password(&self) -> anyhow::Result<String> {
        let source = if let Some(f) = &self.g.password_file {
            Some(SecretSource::File(f.clone()))
        } else if let Some(c) = &self.g.password_command {
            Some(SecretSource::Command(c.clone()))
        } else if std::env::var_os("CUSTOS_PASSWORD").is_some() {
            Some(SecretSource::Env("CUSTOS_PASSWORD".into()))
        } else {
            self.settings
                .as_ref()
                .and_then(|s| s.repository.password.clone())
        };
        match source {
            Some(s) => Ok(s.resolve()?),
            None if std::io::stdin().is_terminal() => {
                Ok(rpassword::prompt_password("repository password: ")
                    .context("reading password")?)
            }
            None => Err(Error::Password(
                "no password given: set CUSTOS_PASSWORD, --password-file or --password-command"
                    .into(),
            )
            .into()),
        }
    }

    /// The password for a new repository: typed twice when prompted.
    fn new_repository_password(&self) -> anyhow::Result<String> {
        let pw = self.password()?;
        if self.prompts_for_password() {
            let again = rpassword::prompt_password("repeat repository password: ")
                .context("reading password")?;
            if again != pw {
                return Err(Error::Password("the two passwords differ".into()).into());
            }
        }
        if pw.is_empty() {
            return Err(Error::Password("an empty password is not a password".into()).into());
        }
        Ok(pw)
    }

    fn prompts_for_password(&self) -> bool {
        self.g.password_file.is_none()
            && self.g.password_command.is_none()
            && std::env::var_os("CUSTOS_PASSWORD").is_none()
            && self
                .settings
                .as_ref()
                .is_none_or(|s| s.repository.password.is_none())
            && std::io::stdin().is_terminal()
    }

    fn cache_root(&self) -> Option<PathBuf> {
        if self.g.no_cache {
            return None;
        }
        self.g
            .cache_dir
            .clone()
            .or_else(|| {
                self.settings
                    .as_ref()
                    .and_then(|s| s.repository.cache_dir.clone())
            })
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("custos")))
            .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/custos")))
    }

    /// Open the repository; `cached` wraps targets with the metadata cache.
    async fn open(&self, cached: bool) -> anyhow::Result<Repository> {
        let targets = self.open_targets(false)?;
        let password = self.password()?;
        let (mut repo, empty) = Repository::open(targets, password.as_bytes()).await?;
        for t in &empty {
            // Not silently skipped: backups report it as lagging, check as failed.
            repo.mark_unreachable(
                t.name(),
                "holds no repository (wrong bucket or prefix? run `custos init` with this config to add it)".into(),
            );
        }
        *self.opened.lock().expect("opened lock") = Some(repo.clone());
        if !cached {
            return Ok(repo);
        }
        let Some(root) = self.cache_root() else {
            return Ok(repo);
        };
        let max = self
            .settings
            .as_ref()
            .map(|s| s.repository.cache_max_bytes)
            .unwrap_or(1 << 30);
        let dir = root.join(repo.config().id.to_hex());
        let wrapped = repo
            .targets()
            .iter()
            // One cache for all targets: objects are identical everywhere and verified on read.
            .map(|t| Cached::wrap(t.clone(), dir.clone(), max))
            .collect();
        Ok(repo.with_targets(wrapped))
    }

    fn progress_enabled(&self) -> bool {
        !self.g.json && !self.g.quiet && std::io::stderr().is_terminal()
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let settings = match &cli.global.config {
        Some(p) => Some(Settings::load(p)?),
        None => None,
    };
    let ctx = Ctx {
        g: cli.global,
        settings,
        opened: std::sync::Mutex::new(None),
        audit: std::sync::Mutex::default(),
    };
    let audited = audited_command(&cli.command);
    let result = dispatch(&ctx, cli.command).await;
    if let Some(command) = audited {
        record_audit(&ctx, command, &result).await;
    }
    result
}

/// The audit name of a command that changes state or reads data (None:
/// listings, statistics, the audit log itself, the daemon — which audits each job).
fn audited_command(c: &Command) -> Option<String> {
    let name = match c {
        Command::Init(_) => "init",
        Command::Backup(_) => "backup",
        Command::Ls { .. } => "ls",
        Command::Restore { .. } => "restore",
        Command::Check { .. } => "check",
        Command::Sync => "sync",
        Command::Find(_) => "find",
        Command::Export { .. } => "export",
        Command::Prune(_) => "prune",
        Command::Forget(_) => "forget",
        Command::Cat { .. } => "cat",
        Command::Migrate {
            cmd: MigrateCmd::UpgradeFormat,
        } => "migrate upgrade-format",
        Command::RestoreVerify(_) => "restore-verify",
        Command::Locks { .. } => "locks extend",
        Command::Customer { cmd } => match cmd {
            CustomerCmd::Show { .. } => "customer show",
            CustomerCmd::Export { .. } => "customer export",
            CustomerCmd::Erase {
                retry_pending: true,
                ..
            } => "customer erase --retry-pending",
            CustomerCmd::Erase { .. } => "customer erase",
            CustomerCmd::Lift { .. } => "customer lift",
            CustomerCmd::Log => return None,
        },
        Command::Hold { cmd } => match cmd {
            HoldCmd::Add { .. } => "hold add",
            HoldCmd::Release { .. } => "hold release",
            HoldCmd::List => return None,
        },
        Command::Retention {
            cmd: RetentionCmd::Apply { .. },
        } => "retention apply",
        Command::Key { cmd } => match cmd {
            KeyCmd::List => return None,
            KeyCmd::Add { .. } => "key add",
            KeyCmd::Remove { .. } => "key remove",
            KeyCmd::Passwd(_) => "key passwd",
        },
        _ => return None,
    };
    Some(name.to_string())
}

/// Append the command's entry to the audit trail of the repository it opened.
async fn record_audit(ctx: &Ctx, command: String, result: &anyhow::Result<i32>) {
    let Some(repo) = ctx.opened.lock().expect("opened lock").clone() else {
        return; // Failed before the repository was open: nothing was read or changed.
    };
    let mut action = std::mem::take(&mut *ctx.audit.lock().expect("audit lock"));
    action.command = command;
    action.outcome = match result {
        Ok(0) => "ok".into(),
        Ok(code) => format!("exit {code}"),
        Err(e) => format!("error: {e}"),
    };
    // Where the log's top was at this host's last append (local cache only:
    // a starting point for a short listing, verified against the store).
    let hint_file = ctx
        .cache_root()
        .map(|r| r.join(repo.config().id.to_hex()).join("audit-hint"));
    if let Some(seq) = hint_file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|t| t.trim().parse::<u64>().ok())
    {
        custos::audit::set_hint(&repo, seq);
    }
    match custos::audit::append(&repo, &current_actor(ctx), action).await {
        Ok(head) => {
            tracing::info!(head = %head, "audit entry written");
            if let (Some(f), Some(seq)) = (hint_file, custos::audit::hint(&repo)) {
                let _ = f
                    .parent()
                    .map(std::fs::create_dir_all)
                    .transpose()
                    .and_then(|_| std::fs::write(&f, seq.to_string()));
            }
        }
        Err(e) => eprintln!("warning: the audit entry could not be written: {e}"),
    }
}

/// Who runs this command, for the audit trail.
fn current_actor(ctx: &Ctx) -> custos::audit::Actor {
    let operator = std::env::var("CUSTOS_OPERATOR").ok().or_else(|| {
        ctx.settings
            .as_ref()
            .and_then(|s| s.repository.operator.clone())
    });
    custos::audit::Actor::current(operator.as_deref())
}

/// Note a subject (snapshot id, source, target) for the command's audit entry.
fn audit_subject(ctx: &Ctx, subject: impl Into<String>) {
    ctx.audit
        .lock()
        .expect("audit lock")
        .subjects
        .push(subject.into());
}

/// Note a count for the command's audit entry.
fn audit_count(ctx: &Ctx, key: &str, n: u64) {
    *ctx.audit
        .lock()
        .expect("audit lock")
        .counts
        .entry(key.to_string())
        .or_default() += n;
}

async fn dispatch(ctx: &Ctx, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Init(a) => cmd_init(ctx, a).await,
        Command::Backup(a) => cmd_backup(ctx, a).await,
        Command::Daemon(a) => cmd_daemon(ctx, &a).await,
        Command::Snapshots(f) => cmd_snapshots(ctx, f).await,
        Command::Ls { snapshot, path } => cmd_ls(ctx, &snapshot, path.as_deref()).await,
        Command::Restore {
            snapshot,
            dest,
            include,
            to_source: Some(source),
            folder,
            include_deleted,
            ..
        } => {
            let _ = (dest, include);
            cmd_restore_to_source(ctx, &snapshot, &source, folder.as_deref(), include_deleted).await
        }
        Command::Restore {
            snapshot,
            dest,
            include,
            verify,
            ..
        } => cmd_restore(ctx, &snapshot, &dest, include, verify).await,
        Command::Check {
            read_data,
            read_data_subset,
            repair_from,
        } => {
            if let Some(source) = repair_from {
                cmd_repair(ctx, &source, read_data).await?;
            }
            cmd_check(ctx, read_data, read_data_subset).await
        }
        Command::Targets { cmd: None } => cmd_targets(ctx).await,
        Command::Targets {
            cmd: Some(TargetsCmd::Check),
        } => cmd_targets_check(ctx).await,
        Command::Locks {
            cmd: LocksCmd::Extend { dry_run },
        } => cmd_locks_extend(ctx, dry_run).await,
        Command::Forget(a) => cmd_forget(ctx, a).await,
        Command::Sync => cmd_sync(ctx).await,
        Command::Sources {
            cmd: SourcesCmd::Check { source },
        } => cmd_sources_check(ctx, &source).await,
        Command::Find(a) => cmd_find(ctx, &a).await,
        Command::Export {
            format,
            out,
            filter,
        } => cmd_export(ctx, &format, &out, &filter).await,
        Command::Prune(a) => cmd_prune(ctx, &a).await,
        Command::Customer { cmd } => cmd_customer(ctx, cmd).await,
        Command::Audit { cmd } => cmd_audit(ctx, cmd).await,
        Command::Hold { cmd } => cmd_hold(ctx, cmd).await,
        Command::Retention { cmd } => cmd_retention(ctx, cmd).await,
        Command::Stats { snapshot } => cmd_stats(ctx, snapshot.as_deref()).await,
        Command::Key { cmd } => cmd_key(ctx, cmd).await,
        Command::Cat { kind, id } => cmd_cat(ctx, &kind, id.as_deref()).await,
        Command::Migrate {
            cmd: MigrateCmd::UpgradeFormat,
        } => cmd_upgrade_format(ctx).await,
        Command::RestoreVerify(a) => cmd_restore_verify(ctx, a).await,
        Command::VerifyHistory(a) => cmd_verify_history(ctx, &a).await,
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

async fn cmd_init(ctx: &Ctx, a: InitArgs) -> anyhow::Result<i32> {
    let mut opts = ctx
        .settings
        .as_ref()
        .map(|s| s.repository.init.clone())
        .unwrap_or_default();
    if let Some(m) = a.kdf_memory_kib {
        opts.kdf.memory_kib = m;
    }
    if let Some(i) = a.kdf_iterations {
        opts.kdf.iterations = i;
    }
    if let Some(c) = a.compression {
        opts.compression = c;
    }
    if let Some(p) = a.pack_size_mib {
        opts.pack_size = p.saturating_mul(1 << 20);
    }
    if let Some(v) = a.format_version {
        opts.format_version = v;
    }
    let targets = ctx.open_targets(true)?;
    // Targets that already hold this repository adopt the rest (adding a target).
    let mut holders = Vec::new();
    for t in &targets {
        match t.get(CONFIG_OBJECT).await {
            Ok(_) => holders.push(t.name().to_string()),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let password = if holders.is_empty() {
        ctx.new_repository_password()?
    } else {
        ctx.password()?
    };
    let (repo, added) = if holders.is_empty() {
        let repo = Repository::init(targets, password.as_bytes(), &opts).await?;
        *ctx.opened.lock().expect("opened lock") = Some(repo.clone());
        let names: Vec<String> = repo
            .targets()
            .iter()
            .map(|t| t.name().to_string())
            .collect();
        (repo, names)
    } else {
        let (mut repo, empty) = Repository::open(targets, password.as_bytes()).await?;
        if empty.is_empty() {
            return Err(Error::Invalid(format!(
                "every target already holds repository {} ({})",
                repo.config().id.short(),
                holders.join(", ")
            ))
            .into());
        }
        let names: Vec<String> = empty.iter().map(|t| t.name().to_string()).collect();
        repo.adopt_targets(empty).await?;
        (repo, names)
    };
    if ctx.g.json {
        print_json(&json!({
            "id": repo.config().id,
            "key": repo.key_id(),
            "targets": repo.targets().iter().map(|t| t.name()).collect::<Vec<_>>(),
            "initialized": added,
        }));
    } else if !ctx.g.quiet {
        println!(
            "repository {} on {}",
            repo.config().id.short(),
            added.join(", ")
        );
        println!("keep the password safe: without it the data cannot be read");
    }
    Ok(0)
}

fn default_time_zone(
    ctx: &Ctx,
    source_tz: Option<&String>,
    flag: Option<String>,
) -> anyhow::Result<String> {
    let tz = flag
        .or_else(|| source_tz.cloned())
        .or_else(|| {
            ctx.settings
                .as_ref()
                .and_then(|s| s.repository.time_zone.clone())
        })
        // Never the machine's `TZ`: calendar periods must not depend on where
        // the backup ran, so the default is UTC.
        .unwrap_or_else(|| "UTC".into());
    custos::settings::validate_time_zone("--time-zone", &tz)?;
    Ok(tz)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// One source to back up.
enum Job {
    Files(BackupOptions),
    Records(
        RecordBackupOptions,
        Box<custos_connectors::config::SourceConfig>,
    ),
}

impl Job {
    fn source(&self) -> &str {
        match self {
            Job::Files(o) => &o.source,
            Job::Records(o, _) => &o.source,
        }
    }
}

async fn cmd_backup(ctx: &Ctx, a: BackupArgs) -> anyhow::Result<i32> {
    let repo = ctx.open(true).await?;
    let snapshots = if a.parent.is_some() {
        Some(repo.snapshots().await?.0)
    } else {
        None
    };
    let parent = match (&a.parent, a.force) {
        (_, true) => ParentMode::None,
        (Some(p), false) => {
            ParentMode::Id(snapshot::find(snapshots.as_deref().unwrap_or(&[]), p)?.id)
        }
        (None, false) => ParentMode::Auto,
    };
    let host = a.host.clone().unwrap_or_else(hostname);
    let mut jobs: Vec<Job> = Vec::new();
    if !a.paths.is_empty() {
        jobs.push(Job::Files(BackupOptions {
            source: "files".into(),
            paths: a.paths.clone(),
            tags: a.tag.clone(),
            hostname: host.clone(),
            time_zone: default_time_zone(ctx, None, a.time_zone.clone())?,
            parent: parent.clone(),
            exclude: a.exclude.clone(),
        }));
    } else {
        let Some(settings) = &ctx.settings else {
            return Err(Error::Invalid(
                "nothing to back up: give paths, or -c with [[source]] tables".into(),
            )
            .into());
        };
        for n in &a.source {
            if !settings.sources.iter().any(|s| s.name() == n) {
                return Err(
                    Error::Invalid(format!("--source {n}: no such source in the config")).into(),
                );
            }
        }
        for s in &settings.sources {
            if !a.source.is_empty() && !a.source.iter().any(|n| n == s.name()) {
                continue;
            }
            match s {
                SourceSettings::Directory {
                    name,
                    paths,
                    tags,
                    time_zone,
                    exclude,
                    ..
                } => jobs.push(Job::Files(BackupOptions {
                    source: name.clone(),
                    paths: paths.clone(),
                    tags: tags.iter().chain(&a.tag).cloned().collect(),
                    hostname: host.clone(),
                    time_zone: default_time_zone(ctx, time_zone.as_ref(), a.time_zone.clone())?,
                    parent: parent.clone(),
                    exclude: exclude.iter().chain(&a.exclude).cloned().collect(),
                })),
                SourceSettings::Records {
                    name,
                    config,
                    mode,
                    tags,
                    time_zone,
                    reconcile_every,
                    index_mentions,
                    jurisdiction,
                    ..
                } => jobs.push(Job::Records(
                    RecordBackupOptions {
                        source: name.clone(),
                        source_type: config.source_type().to_string(),
                        mode: *mode,
                        tags: tags.iter().chain(&a.tag).cloned().collect(),
                        hostname: host.clone(),
                        time_zone: default_time_zone(ctx, time_zone.as_ref(), a.time_zone.clone())?,
                        reconcile_every: reconcile_every
                            .and_then(|d| chrono::Duration::from_std(d).ok()),
                        full: a.force,
                        index_mentions: *index_mentions,
                        jurisdiction: jurisdiction.clone(),
                        state_memory: custos::records::STATE_MEMORY,
                    },
                    config.clone(),
                )),
            }
        }
        if jobs.is_empty() {
            return Err(Error::Invalid("the config has no [[source]] to back up".into()).into());
        }
    }
    let mut code = 0;
    let mut outputs = Vec::new();
    // Sources run concurrently (each connector within its own rate limit),
    // `--parallel` at a time; reports are taken in config order.
    let parallel = a.parallel.max(1);
    let progress = Arc::new(Progress::default());
    let bar = ctx
        .progress_enabled()
        .then(|| spawn_progress(progress.clone()));
    let results: Vec<(String, Result<custos::backup::BackupReport, Error>)> = {
        use futures::StreamExt as _;
        futures::stream::iter(jobs.iter().map(|job| {
            let (repo, progress) = (&repo, progress.clone());
            async move {
                let source = job.source().to_string();
                let result = match job {
                    Job::Files(opts) => backup::backup(repo, opts, progress).await,
                    Job::Records(opts, config) => match custos_connectors::config::build(config) {
                        Ok(connector) => {
                            custos::records::backup_records(
                                repo,
                                connector.as_ref(),
                                opts,
                                progress,
                            )
                            .await
                        }
                        Err(e) => Err(Error::Config(format!("source {source}: {e}"))),
                    },
                };
                (source, result)
            }
        }))
        .buffered(parallel)
        .collect()
        .await
    };
    finish_bar(bar);
    for (source, result) in results {
        let report = result.with_context(|| format!("backup of source {source}"))?;
        for w in &report.warnings {
            tracing::warn!(warning = %w, "repository metadata problem");
        }
        if !report.unreadable.is_empty() {
            code = code.max(cerr::EXIT_PARTIAL_SOURCE);
        }
        if !report.lagging.is_empty() {
            code = cerr::EXIT_TARGETS_LAGGING;
        }
        let s = &report.snapshot.summary;
        audit_subject(
            ctx,
            format!("{}:{}", report.snapshot.source, report.id.short()),
        );
        audit_count(ctx, "files", s.files_new + s.files_changed);
        audit_count(ctx, "records", s.records_new + s.records_changed);
        audit_count(ctx, "bytes_stored", s.bytes_stored);
        if ctx.g.json {
            outputs.push(json!({
                "snapshot_id": report.id,
                "short_id": report.id.short(),
                "time": report.snapshot.time,
                "source": report.snapshot.source,
                "paths": report.snapshot.paths,
                "tags": report.snapshot.tags,
                "parent": report.snapshot.parent,
                "summary": report.snapshot.summary,
                "committed": report.committed,
                "lagging": report.lagging.iter().map(|(t, e)| json!({"target": t, "error": e})).collect::<Vec<_>>(),
                "unreadable": report.unreadable.iter().map(|(p, e)| json!({"path": p, "error": e})).collect::<Vec<_>>(),
            }));
        } else if !ctx.g.quiet {
            if report.snapshot.cursors.is_empty() {
                println!(
                    "source {}: files {} new, {} changed, {} unmodified; dirs {}",
                    report.snapshot.source,
                    s.files_new,
                    s.files_changed,
                    s.files_unmodified,
                    s.dirs
                );
            } else {
                println!(
                    "source {}: records {} new, {} changed, {} deleted, {} carried forward; {} in {} collection(s)",
                    report.snapshot.source,
                    s.records_new,
                    s.records_changed,
                    s.records_deleted,
                    s.records_unchanged,
                    s.records_total,
                    s.collections
                );
            }
            println!(
                "added {} ({} stored) in {} data / {} tree blobs; processed {} in {:.1}s",
                human_bytes(s.bytes_added),
                human_bytes(s.bytes_stored),
                s.data_blobs_added,
                s.tree_blobs_added,
                human_bytes(s.total_bytes),
                s.duration_seconds
            );
            println!(
                "snapshot {} saved on {}",
                report.id.short(),
                report.committed.join(", ")
            );
        }
        for (t, e) in &report.lagging {
            eprintln!("custos: target {t} lags (snapshot not committed there): {e}");
        }
        for (p, e) in &report.unreadable {
            eprintln!("custos: unreadable, skipped: {p}: {e}");
        }
    }
    if ctx.g.json {
        print_json(&serde_json::Value::Array(outputs));
    }
    Ok(code)
}

async fn cmd_daemon(ctx: &Ctx, a: &custos::daemon::DaemonArgs) -> anyhow::Result<i32> {
    let Some(config_path) = ctx.g.config.clone() else {
        return Err(Error::Invalid(
            "custos daemon needs -c CONFIG (its jobs are the config's [[job]] tables)".into(),
        )
        .into());
    };
    if a.check_config {
        let (_, config) = custos::daemon::load_config(&config_path)?;
        if !ctx.g.quiet {
            let now = chrono::Utc::now();
            for j in &config.jobs {
                let next = j
                    .schedule
                    .next_after(now)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "never".into());
                println!(
                    "job {}: {} on {:?} (UTC), next {next}",
                    j.name,
                    j.kind.label(),
                    j.schedule.as_str()
                );
            }
            for a in &config.alerts {
                let events: Vec<&str> = a.events.iter().map(|e| e.label()).collect();
                println!("alert {}: {}", a.name, events.join(", "));
            }
        }
        return Ok(0);
    }
    // The command line and environment win over the config's password source (as elsewhere);
    // the daemon never prompts.
    let password = if let Some(f) = &ctx.g.password_file {
        Some(SecretSource::File(f.clone()))
    } else if let Some(c) = &ctx.g.password_command {
        Some(SecretSource::Command(c.clone()))
    } else if std::env::var_os("CUSTOS_PASSWORD").is_some() {
        Some(SecretSource::Env("CUSTOS_PASSWORD".into()))
    } else {
        None
    };
    let opts = custos::daemon::DaemonOptions {
        config_path,
        password,
        cache_dir: ctx.g.cache_dir.clone(),
        no_cache: ctx.g.no_cache,
        only_targets: ctx.g.target.clone(),
        limit_upload_kib: ctx.g.limit_upload,
        limit_download_kib: ctx.g.limit_download,
    };
    let stopped = custos::daemon::run(opts).await?;
    if stopped.abandoned > 0 {
        // Abandoned runs may still hold blocking threads (file reads) that the
        // runtime would wait for on drop; nothing of theirs can commit any more.
        std::process::exit(0);
    }
    Ok(0)
}

fn spawn_progress(p: Arc<Progress>) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .expect("static template"),
    );
    let b = bar.clone();
    let handle = tokio::spawn(async move {
        loop {
            use std::sync::atomic::Ordering::Relaxed;
            b.set_message(format!(
                "{} files, {} read, {} uploaded",
                p.files.load(Relaxed),
                human_bytes(p.bytes.load(Relaxed)),
                human_bytes(p.bytes_uploaded.load(Relaxed))
            ));
            b.tick();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (bar, handle)
}

/// What a progress bar shows: (items done, bytes done, items total, bytes total);
/// a zero byte total means unknown (a spinner without ETA).
type Counts = (u64, u64, u64, u64);

/// A bar of bytes with a total and ETA (or a spinner when the total is
/// unknown), polling `counts` five times a second; `items` names what is counted.
fn spawn_bar(
    items: &'static str,
    counts: impl Fn() -> Counts + Send + 'static,
) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = indicatif::ProgressBar::new(0);
    let b = bar.clone();
    let handle = tokio::spawn(async move {
        let mut styled_total = None;
        loop {
            let (n, bytes, n_total, bytes_total) = counts();
            b.set_message(if n_total > 0 {
                format!("{n}/{n_total} {items}")
            } else {
                format!("{n} {items}")
            });
            let with_total = bytes_total > 0;
            if styled_total != Some(with_total) {
                let template = if with_total {
                    "{spinner} {elapsed} [{bar:30}] {bytes}/{total_bytes} {msg}, ETA {eta}"
                } else {
                    "{spinner} {elapsed} {bytes} {msg}"
                };
                b.set_style(
                    indicatif::ProgressStyle::with_template(template)
                        .expect("static template")
                        .progress_chars("=> "),
                );
                styled_total = Some(with_total);
            }
            b.set_length(bytes_total);
            b.set_position(bytes);
            b.tick();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (bar, handle)
}

/// Stop a bar from [`spawn_bar`] or [`spawn_progress`] and clear its line.
fn finish_bar(bar: Option<(indicatif::ProgressBar, tokio::task::JoinHandle<()>)>) {
    if let Some((bar, handle)) = bar {
        handle.abort();
        bar.finish_and_clear();
    }
}

fn snapshot_json(s: &SnapshotEntry) -> serde_json::Value {
    let mut v = s.snapshot.listing_json();
    v["id"] = json!(s.id);
    v["short_id"] = json!(s.id.short());
    // The stored document skips empty fields; the JSON output always has the documented keys.
    v["paths"] = json!(s.snapshot.paths);
    v["tags"] = json!(s.snapshot.tags);
    v["username"] = json!(s.snapshot.username);
    v["parent"] = json!(s.snapshot.parent);
    v
}

async fn load_snapshots(repo: &Repository) -> anyhow::Result<Vec<SnapshotEntry>> {
    let (snaps, warnings) = repo.snapshots().await?;
    for w in warnings {
        eprintln!("custos: skipping damaged snapshot: {w}");
    }
    Ok(snaps)
}

async fn cmd_snapshots(ctx: &Ctx, f: FilterArgs) -> anyhow::Result<i32> {
    let repo = ctx.open(true).await?;
    let snaps: Vec<SnapshotEntry> = load_snapshots(&repo)
        .await?
        .into_iter()
        .filter(|s| f.tag.iter().all(|t| s.snapshot.tags.contains(t)))
        .filter(|s| f.host.as_ref().is_none_or(|h| &s.snapshot.hostname == h))
        .filter(|s| f.source.as_ref().is_none_or(|x| &s.snapshot.source == x))
        .collect();
    if ctx.g.json {
        print_json(&serde_json::Value::Array(
            snaps.iter().map(snapshot_json).collect(),
        ));
        return Ok(0);
    }
    println!(
        "{:<8}  {:<20}  {:<14}  {:<12}  {:>14}  {:>10}  paths / tags",
        "ID", "time (UTC)", "source", "host", "files/records", "size"
    );
    for s in &snaps {
        let sn = &s.snapshot;
        let records = !sn.cursors.is_empty();
        println!(
            "{:<8}  {:<20}  {:<14}  {:<12}  {:>14}  {:>10}  {}{}",
            s.id.short(),
            sn.time.format("%Y-%m-%d %H:%M:%S"),
            sn.source,
            sn.hostname,
            if records {
                format!("{} rec", sn.summary.records_total)
            } else {
                sn.summary.total_files.to_string()
            },
            if records {
                "-".to_string()
            } else {
                human_bytes(sn.summary.total_bytes)
            },
            if records {
                sn.source_type.clone().unwrap_or_default()
            } else {
                sn.paths.join(" ")
            },
            if sn.tags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", sn.tags.join(","))
            }
        );
    }
    println!("{} snapshot(s)", snaps.len());
    Ok(0)
}

/// `ID` or `ID:sub/path`.
fn split_snapshot_spec(spec: &str) -> (&str, Option<&str>) {
    match spec.split_once(':') {
        Some((id, path)) => (id, Some(path)),
        None => (spec, None),
    }
}

async fn cmd_ls(ctx: &Ctx, spec: &str, path: Option<&str>) -> anyhow::Result<i32> {
    let repo = ctx.open(true).await?;
    let snaps = load_snapshots(&repo).await?;
    let snap = snapshot::find(&snaps, spec)?;
    let (index, warnings) = repo.load_index().await?;
    for w in warnings {
        eprintln!("custos: damaged index object skipped: {w}");
    }
    let mut out = Vec::new();
    let mut stack: Vec<(String, Id)> = vec![(String::new(), snap.snapshot.tree)];
    let prefix = path
        .map(|p| ls_path_in_snapshot(&snap.snapshot.paths, p))
        .unwrap_or_default();
    while let Some((dir, tree)) = stack.pop() {
        let nodes = repo.load_tree(&index, &tree).await?;
        for n in nodes.into_iter().rev() {
            let p = if dir.is_empty() {
                n.name.clone()
            } else {
                format!("{dir}/{}", n.name)
            };
            let under = prefix.is_empty() || p == prefix || p.starts_with(&format!("{prefix}/"));
            let above = prefix.starts_with(&format!("{p}/"));
            if n.kind == NodeKind::Dir && (under || above) {
                if let Some(sub) = n.subtree {
                    stack.push((p.clone(), sub));
                }
            }
            if under {
                out.push((p, n));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    if let (Some(path), true) = (path, out.is_empty() && !prefix.is_empty()) {
        return Err(Error::Invalid(format!(
            "ls: {path}: no such path in snapshot {}",
            snap.id.short()
        ))
        .into());
    }
    if ctx.g.json {
        let items: Vec<serde_json::Value> = out
            .iter()
            .map(|(p, n)| {
                json!({
                    "path": format!("/{p}"),
                    "kind": n.kind,
                    "size": n.size,
                    "mode": n.mode,
                    "mtime": n.mtime,
                    "digest": n.digest,
                    "link_target": n.link_target,
                    "meta": n.meta,
                })
            })
            .collect();
        print_json(&serde_json::Value::Array(items));
    } else {
        for (p, n) in &out {
            let kind = match n.kind {
                NodeKind::Dir => "d",
                NodeKind::File => "-",
                NodeKind::Symlink => "l",
                NodeKind::Record => "r",
                NodeKind::Attachment => "a",
                NodeKind::Special => "s",
            };
            let when = n
                .mtime
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            println!("{kind} {:>12} {when:<19} /{p}", n.size);
        }
    }
    Ok(0)
}

/// The snapshot-relative path `ls` lists: `mail/inbox` or `/mail/inbox` as
/// stored, or the original source path (`/srv/exports/mail/inbox` when
/// `/srv/exports/mail` was backed up, whose top-level entry is `mail`).
fn ls_path_in_snapshot(source_paths: &[String], path: &str) -> String {
    let given = path.trim_end_matches('/');
    for src in source_paths {
        let src = src.trim_end_matches('/');
        let Some(rest) = given.strip_prefix(src) else {
            continue;
        };
        if !(rest.is_empty() || rest.starts_with('/')) || src.is_empty() {
            continue;
        }
        let top = src.rsplit('/').next().unwrap_or(src);
        return format!("{top}{rest}").trim_matches('/').to_string();
    }
    path.trim_matches('/').to_string()
}

async fn cmd_restore(
    ctx: &Ctx,
    spec: &str,
    dest: &Path,
    include: Vec<String>,
    verify: bool,
) -> anyhow::Result<i32> {
    let repo = ctx.open(true).await?;
    let (id_spec, sub) = split_snapshot_spec(spec);
    let snaps = load_snapshots(&repo).await?;
    let snap = snapshot::find(&snaps, id_spec)?;
    let (index, warnings) = repo.load_index().await?;
    for w in &warnings {
        eprintln!("custos: damaged index object skipped: {w}");
    }
    let progress = Arc::new(Progress::default());
    // The totals are the snapshot's when all of it is restored; else unknown.
    let (files_total, bytes_total) = if sub.is_none() && include.is_empty() {
        (
            snap.snapshot.summary.total_files,
            snap.snapshot.summary.total_bytes,
        )
    } else {
        (0, 0)
    };
    let bar = ctx.progress_enabled().then(|| {
        let p = progress.clone();
        spawn_bar("files", move || {
            use std::sync::atomic::Ordering::Relaxed;
            (
                p.files.load(Relaxed),
                p.bytes.load(Relaxed),
                files_total,
                bytes_total,
            )
        })
    });
    let report = restore::restore(
        &repo,
        Arc::new(index),
        snap,
        sub,
        dest,
        &RestoreOptions {
            include,
            suppressed: custos::customer::Suppressed::load(&repo).await?,
            progress: Some(progress),
            verify,
        },
    )
    .await;
    finish_bar(bar);
    let report = report?;
    audit_subject(ctx, format!("snapshot:{}", snap.id.short()));
    audit_count(ctx, "files", report.files);
    audit_count(ctx, "bytes", report.bytes);
    if ctx.g.json {
        let mut v = serde_json::to_value(&report).expect("report json");
        v["snapshot_id"] = json!(snap.id);
        print_json(&v);
    } else if !ctx.g.quiet {
        println!(
            "restored snapshot {} to {}: {} files ({}), {} dirs, {} symlinks{}",
            snap.id.short(),
            dest.display(),
            report.files,
            human_bytes(report.bytes),
            report.dirs,
            report.symlinks,
            if report.special_skipped > 0 {
                format!(", {} special files not recreated", report.special_skipped)
            } else {
                String::new()
            }
        );
    }
    for e in &report.errors {
        eprintln!("custos: restore error: {e}");
    }
    if report.errors.is_empty() {
        Ok(0)
    } else {
        Err(Error::Failed(format!(
            "{} item(s) could not be restored (listed above)",
            report.errors.len()
        ))
        .into())
    }
}

async fn cmd_restore_to_source(
    ctx: &Ctx,
    spec: &str,
    source: &str,
    folder: Option<&str>,
    include_deleted: bool,
) -> anyhow::Result<i32> {
    let config = ctx
        .settings
        .as_ref()
        .and_then(|s| s.sources.iter().find(|x| x.name() == source))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "--to-source {source}: no such source in the config"
            ))
        })?;
    let imap = match config {
        SourceSettings::Records { config, .. } => match config.as_ref() {
            custos_connectors::config::SourceConfig::Imap(c) => c.clone(),
            other => {
                return Err(Error::Invalid(format!(
                    "--to-source {source}: restoring into a {} source is not supported (IMAP only)",
                    other.source_type()
                ))
                .into())
            }
        },
        SourceSettings::Directory { .. } => {
            return Err(Error::Invalid(format!(
                "--to-source {source}: a directory source; restore to a directory instead"
            ))
            .into())
        }
    };
    let repo = ctx.open(true).await?;
    let (id_spec, sub) = split_snapshot_spec(spec);
    let snaps = load_snapshots(&repo).await?;
    let snap = snapshot::find(&snaps, id_spec)?;
    let (index, _) = repo.load_index().await?;
    let tree = match sub {
        Some(p) => custos::restore::subtree_of(&repo, &index, snap.snapshot.tree, p).await?,
        None => snap.snapshot.tree,
    };
    let report =
        custos::to_source::restore_to_imap(&repo, &index, tree, &imap, folder, include_deleted)
            .await?;
    if ctx.g.json {
        let mut v = serde_json::to_value(&report)?;
        v["snapshot_id"] = json!(snap.id);
        print_json(&v);
    } else if !ctx.g.quiet {
        for (f, n) in &report.appended {
            println!("appended {n} message(s) to {source}:{f}");
        }
        if !report.skipped.is_empty() {
            println!(
                "{} record(s) skipped (not email, or deleted at the source)",
                report.skipped.len()
            );
        }
    }
    for e in &report.errors {
        eprintln!("custos: restore to {source}: {e}");
    }
    if report.errors.is_empty() {
        Ok(0)
    } else {
        Err(Error::Failed(format!(
            "{} message(s) could not be appended",
            report.errors.len()
        ))
        .into())
    }
}

async fn cmd_repair(ctx: &Ctx, source: &str, read_data: bool) -> anyhow::Result<()> {
    let repo = ctx.open(false).await?;
    let src = repo
        .targets()
        .iter()
        .find(|t| t.name() == source)
        .ok_or_else(|| Error::Invalid(format!("--repair-from {source}: no such reachable target")))?
        .clone();
    for t in repo.targets() {
        if t.name() == source {
            continue;
        }
        let r = custos::sync::repair_from(&src, t, read_data).await?;
        if !ctx.g.quiet && !ctx.g.json {
            println!(
                "target {}: {} object(s) copied, {} damaged object(s) replaced from {source}",
                r.target,
                r.copied.len(),
                r.replaced.len()
            );
        }
        for name in &r.replaced {
            eprintln!(
                "custos: repaired {name} on target {} from {source}",
                r.target
            );
        }
        for e in &r.errors {
            eprintln!("custos: repair of target {}: {e}", r.target);
        }
    }
    Ok(())
}

async fn cmd_targets(ctx: &Ctx) -> anyhow::Result<i32> {
    let repo = ctx.open(false).await?;
    let rows = custos::sync::status(&repo).await;
    let bad = rows
        .iter()
        .any(|r| !r.reachable || r.missing > 0 || r.removed > 0);
    if ctx.g.json {
        print_json(&serde_json::to_value(&rows)?);
    } else {
        for r in &rows {
            if r.reachable {
                println!(
                    "{:<12} {:<40} {:>4} snapshots {:>7} objects {:>10}  missing {} extra {}{}",
                    r.target,
                    r.location,
                    r.snapshots,
                    r.objects,
                    human_bytes(r.bytes),
                    r.missing,
                    r.extra,
                    if r.removed > 0 {
                        format!(" (removed elsewhere, sync deletes: {})", r.removed)
                    } else {
                        String::new()
                    }
                );
            } else {
                println!(
                    "{:<12} UNREACHABLE: {}",
                    r.target,
                    r.error.as_deref().unwrap_or("")
                );
            }
        }
    }
    Ok(if bad { cerr::EXIT_TARGETS_LAGGING } else { 0 })
}

async fn cmd_targets_check(ctx: &Ctx) -> anyhow::Result<i32> {
    let targets = ctx.open_targets(false)?;
    let mut rows = Vec::new();
    for t in &targets {
        rows.push(match t.check_immutability().await {
            Ok(r) => r,
            Err(e) => custos::target::Immutability {
                target: t.name().to_string(),
                object_lock_mode: t.object_lock().map(|l| l.mode),
                object_lock_period_secs: t.object_lock().map(|l| l.period.as_secs()),
                detail: format!("check failed: {e}"),
                ..Default::default()
            },
        });
    }
    // A target configured with object_lock that cannot prove it fails the check.
    let refused: Vec<&str> = rows
        .iter()
        .filter(|r| r.object_lock_mode.is_some() && !r.immutable)
        .map(|r| r.target.as_str())
        .collect();
    if ctx.g.json {
        print_json(&json!({ "targets": rows, "ok": refused.is_empty() }));
    } else {
        for r in &rows {
            println!(
                "{:<12} {:<13} versioning {:<9} bucket lock {:<3} {}",
                r.target,
                if r.immutable {
                    "IMMUTABLE"
                } else {
                    "NOT IMMUTABLE"
                },
                r.versioning.as_deref().unwrap_or("-"),
                if r.bucket_object_lock { "on" } else { "off" },
                r.detail
            );
        }
    }
    if refused.is_empty() {
        Ok(0)
    } else {
        eprintln!(
            "custos: targets check: object_lock is configured but not enforced on: {}",
            refused.join(", ")
        );
        Ok(cerr::EXIT_ERROR)
    }
}

async fn cmd_locks_extend(ctx: &Ctx, dry_run: bool) -> anyhow::Result<i32> {
    let repo = ctx.open(false).await?;
    let r = custos::locks::extend(&repo, dry_run).await?;
    if ctx.g.json {
        print_json(&serde_json::to_value(&r)?);
    } else if !ctx.g.quiet {
        let verb = if dry_run { "would extend" } else { "extended" };
        for t in &r.targets {
            println!(
                "{}: {} object(s) needed, {verb} {}, {} already locked long enough; horizon {}",
                t.target,
                t.objects,
                t.extended,
                t.current,
                t.horizon
                    .map_or("none (no live snapshot)".to_string(), |h| h.to_rfc3339())
            );
        }
    }
    for t in &r.targets {
        for e in &t.errors {
            eprintln!("custos: locks extend: {e}");
        }
    }
    Ok(if r.errors() == 0 { 0 } else { cerr::EXIT_ERROR })
}

/// Name the configured targets a destructive run (forget, prune, retention
/// apply) did not reach: they still hold what it removed. True when any.
fn report_unreached(repo: &Repository, what: &str) -> bool {
    for (t, e) in repo.unreachable() {
        eprintln!(
            "custos: {what}: target {t} was NOT reachable ({e}): it still holds what this run \
             removed; `custos sync` (or the next backup) deletes it there once the target is back"
        );
    }
    !repo.unreachable().is_empty()
}

/// `[{"target", "error"}]` of the unreachable targets.
fn lagging_json(repo: &Repository) -> serde_json::Value {
    json!(repo
        .unreachable()
        .iter()
        .map(|(t, e)| json!({"target": t, "error": e}))
        .collect::<Vec<_>>())
}

fn print_locked(what: &str, locked: &[custos::target::LockedObject]) {
    for l in locked {
        println!(
            "{what} {} on target {}: locked until {}",
            l.object,
            l.target,
            l.retain_until.to_rfc3339()
        );
    }
}

async fn cmd_check(ctx: &Ctx, read_data: bool, subset: Option<String>) -> anyhow::Result<i32> {
    let read = match (read_data, subset) {
        (true, _) => ReadData::All,
        (false, Some(s)) => {
            let pct: f64 = s.trim_end_matches('%').parse().map_err(|_| {
                Error::Invalid(format!(
                    "--read-data-subset {s:?}: give a percentage like 10%"
                ))
            })?;
            if !(pct > 0.0 && pct <= 100.0) {
                return Err(Error::Invalid(format!(
                    "--read-data-subset {s:?}: must be in (0, 100]"
                ))
                .into());
            }
            ReadData::Subset(pct)
        }
        (false, None) => ReadData::None,
    };
    // No cache: check must see what the targets hold, not local copies.
    let repo = ctx.open(false).await?;
    let mut reports = Vec::new();
    for t in repo.targets() {
        let progress = Arc::new(check::CheckProgress::default());
        let bar = (ctx.progress_enabled() && read != ReadData::None).then(|| {
            let p = progress.clone();
            spawn_bar("packs", move || {
                use std::sync::atomic::Ordering::Relaxed;
                (
                    p.packs_read.load(Relaxed),
                    p.bytes_read.load(Relaxed),
                    p.packs_total.load(Relaxed),
                    p.bytes_total.load(Relaxed),
                )
            })
        });
        let report = check::check_with_progress(&repo.only(t), read, Some(progress)).await;
        finish_bar(bar);
        reports.push(report?);
    }
    // A configured target that could not be reached was not checked: that is a failure.
    for (name, e) in repo.unreachable() {
        reports.push(check::CheckReport {
            target: name.clone(),
            errors: vec![format!("target unreachable, not checked: {e}")],
            ..Default::default()
        });
    }
    let failed = reports.iter().any(|r| !r.errors.is_empty());
    if ctx.g.json {
        print_json(&serde_json::to_value(&reports).expect("json"));
    } else {
        for r in &reports {
            if !ctx.g.quiet {
                println!(
                    "target {}: {} snapshots, {} index objects, {} packs, {} blobs, {} packs read",
                    r.target, r.snapshots, r.index_objects, r.packs, r.blobs, r.packs_read
                );
            }
            for w in &r.warnings {
                eprintln!("custos: warning: target {}: {w}", r.target);
            }
            for e in &r.errors {
                eprintln!("custos: error: target {}: {e}", r.target);
            }
            if !ctx.g.quiet {
                println!(
                    "target {}: {}",
                    r.target,
                    if r.errors.is_empty() {
                        "no errors"
                    } else {
                        "DAMAGED"
                    }
                );
            }
        }
    }
    if failed {
        Err(Error::Failed("check found errors (listed above)".into()).into())
    } else {
        Ok(0)
    }
}

async fn cmd_sources_check(ctx: &Ctx, only: &[String]) -> anyhow::Result<i32> {
    let Some(settings) = &ctx.settings else {
        return Err(Error::Invalid("sources check needs -c with [[source]] tables".into()).into());
    };
    let mut rows = Vec::new();
    let mut failed = false;
    for s in &settings.sources {
        if !only.is_empty() && !only.iter().any(|n| n == s.name()) {
            continue;
        }
        let row = match s {
            SourceSettings::Directory { paths, .. } => {
                let missing: Vec<String> = paths
                    .iter()
                    .filter(|p| !p.exists())
                    .map(|p| p.display().to_string())
                    .collect();
                let ok = missing.is_empty();
                json!({"source": s.name(), "type": "directory", "ok": ok, "reachable": ok,
                    "authenticated": null, "collections": null,
                    "detail": if ok { format!("{} path(s) present", paths.len()) } else { format!("missing: {}", missing.join(", ")) }})
            }
            SourceSettings::Records { config, .. } => check_record_source(config).await,
        };
        failed |= row["ok"] != true;
        rows.push(row);
    }
    if ctx.g.json {
        print_json(&serde_json::Value::Array(rows));
    } else {
        for r in &rows {
            let yn = |k: &str, yes: &str, no: &str| match r[k].as_bool() {
                Some(true) => Some(yes.to_string()),
                Some(false) => Some(no.to_string()),
                None => None,
            };
            let mut facts: Vec<String> = [
                yn("reachable", "reachable", "unreachable"),
                yn("authenticated", "authenticated", "NOT authenticated"),
            ]
            .into_iter()
            .flatten()
            .collect();
            if let Some(n) = r["collections"]["count"].as_u64() {
                let names: Vec<&str> = r["collections"]["names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str())
                    .collect();
                facts.push(format!("{n} collection(s): {}", names.join(", ")));
            }
            println!(
                "{} {} ({}): {}{}{}",
                if r["ok"] == true { "ok  " } else { "FAIL" },
                r["source"].as_str().unwrap_or(""),
                r["type"].as_str().unwrap_or(""),
                facts.join(", "),
                if facts.is_empty() { "" } else { " — " },
                r["detail"].as_str().unwrap_or("")
            );
        }
    }
    Ok(if failed { cerr::EXIT_ERROR } else { 0 })
}

/// One `sources check` row for a record source: build it, check
/// reachability and credentials, list its collections. `reachable` is false
/// only when no answer came (connection, timeout); `authenticated` is false
/// when credentials were refused, null when that was not reached.
async fn check_record_source(config: &custos_connectors::SourceConfig) -> serde_json::Value {
    use custos_connectors::ConnectorError;
    let row = |ok: bool, reachable: Value, auth: Value, colls: Value, detail: String| {
        json!({"source": config.name(), "type": config.source_type(), "ok": ok,
            "reachable": reachable, "authenticated": auth, "collections": colls, "detail": detail})
    };
    let failure = |e: ConnectorError| {
        let detail = e.to_string();
        let (reachable, auth) = match &e {
            ConnectorError::Auth { .. } => (json!(true), json!(false)),
            // An HTTP status is an answer: the server is reachable.
            ConnectorError::Unavailable { detail: d, .. } if d.contains("HTTP ") => {
                (json!(true), Value::Null)
            }
            ConnectorError::Unavailable { .. } | ConnectorError::Io { .. } => {
                (json!(false), Value::Null)
            }
            _ => (Value::Null, Value::Null),
        };
        row(false, reachable, auth, Value::Null, detail)
    };
    let conn = match custos_connectors::config::build(config) {
        Ok(c) => c,
        Err(e) => return row(false, Value::Null, Value::Null, Value::Null, e.to_string()),
    };
    let health = match conn.check().await {
        Ok(h) => h,
        Err(e) => return failure(e),
    };
    match conn.collections().await {
        Ok(colls) => {
            let names: Vec<&str> = colls.iter().map(|c| c.id.as_str()).collect();
            row(
                true,
                json!(true),
                json!(true),
                json!({"count": colls.len(), "names": names}),
                health.summary,
            )
        }
        Err(e) => failure(e),
    }
}

/// Parse `--since/--until`: RFC 3339 or a date (midnight UTC).
fn parse_time(flag: &str, v: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let d = chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .map_err(|_| Error::Invalid(format!("{flag} {v:?}: give RFC 3339 or YYYY-MM-DD")))?;
    Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
}

/// The records `a` selects: from the latest snapshot of each source, or `--snapshot`.
async fn select_records<'s>(
    repo: &Repository,
    index: &custos::index::Index,
    snaps: &'s [SnapshotEntry],
    a: &FindArgs,
) -> anyhow::Result<Vec<(&'s SnapshotEntry, String, custos::tree::Node)>> {
    let chosen: Vec<&SnapshotEntry> = match &a.snapshot {
        Some(spec) => vec![snapshot::find(snaps, spec)?],
        None => {
            let mut latest: std::collections::BTreeMap<&str, &SnapshotEntry> = Default::default();
            for s in snaps {
                latest.insert(&s.snapshot.source, s);
            }
            latest.into_values().collect()
        }
    };
    let filter = custos::find::Filter {
        customer: a.customer.clone(),
        since: a
            .since
            .as_deref()
            .map(|v| parse_time("--since", v))
            .transpose()?,
        until: a
            .until
            .as_deref()
            .map(|v| parse_time("--until", v))
            .transpose()?,
        kind: a.kind.clone(),
    };
    let mut hits = Vec::new();
    for s in chosen {
        if a.source.as_ref().is_some_and(|x| x != &s.snapshot.source) {
            continue;
        }
        for (path, node) in custos::find::records(repo, index, s.snapshot.tree, &filter).await? {
            hits.push((s, path, node));
        }
    }
    Ok(hits)
}

async fn cmd_export(ctx: &Ctx, format: &str, out: &Path, a: &FindArgs) -> anyhow::Result<i32> {
    let format: custos::export::Format = format.parse()?;
    let repo = ctx.open(true).await?;
    let snaps = load_snapshots(&repo).await?;
    let (index, _) = repo.load_index().await?;
    let mut items = select_records(&repo, &index, &snaps, a).await?;
    // Erased customers stay out of every export.
    let suppressed = custos::customer::Suppressed::load(&repo).await?;
    let before = items.len();
    items.retain(|(snap, _, node)| !suppressed.covers(repo.keys(), &snap.snapshot.source, node));
    if items.len() < before && !ctx.g.quiet {
        eprintln!(
            "left out {} record(s) naming an erased customer",
            before - items.len()
        );
    }
    let report = custos::export::export(&repo, &index, &items, format, out).await?;
    if ctx.g.json {
        print_json(&serde_json::to_value(&report)?);
    } else if !ctx.g.quiet {
        println!(
            "exported {} record(s) ({}) to {}{}",
            report.records,
            human_bytes(report.bytes),
            out.display(),
            if report.skipped > 0 {
                format!(
                    "; {} non-email record(s) left out of the mbox",
                    report.skipped
                )
            } else {
                String::new()
            }
        );
    }
    Ok(0)
}

async fn cmd_find(ctx: &Ctx, a: &FindArgs) -> anyhow::Result<i32> {
    let repo = ctx.open(true).await?;
    let snaps = load_snapshots(&repo).await?;
    let (index, _) = repo.load_index().await?;
    let hits = select_records(&repo, &index, &snaps, a).await?;
    if ctx.g.json {
        let rows: Vec<serde_json::Value> = hits
            .iter()
            .map(|(s, path, n)| {
                json!({"snapshot_id": s.id, "source": s.snapshot.source, "path": path, "size": n.size, "digest": n.digest, "meta": n.meta})
            })
            .collect();
        print_json(&serde_json::Value::Array(rows));
    } else {
        for (s, path, n) in &hits {
            let m = |k: &str| n.meta.get(k).map(String::as_str).unwrap_or("");
            println!(
                "{} {:<12} {:<25} {:<13} /{path}{}",
                s.id.short(),
                s.snapshot.source,
                m("created"),
                m("kind"),
                if n.meta.contains_key("deleted") {
                    " (deleted at source)"
                } else {
                    ""
                }
            );
        }
        if !ctx.g.quiet {
            println!("{} record(s)", hits.len());
        }
    }
    Ok(0)
}

async fn cmd_upgrade_format(ctx: &Ctx) -> anyhow::Result<i32> {
    let mut repo = ctx.open(false).await?;
    let done = repo.upgrade_format().await?;
    if ctx.g.json {
        print_json(&serde_json::to_value(&done)?);
    } else if !ctx.g.quiet {
        for t in &done.upgraded {
            println!("target {t}: format {} -> {}", done.from, done.to);
        }
        for t in &done.already {
            println!("target {t}: already format {}", done.to);
        }
    }
    Ok(0)
}

async fn cmd_sync(ctx: &Ctx) -> anyhow::Result<i32> {
    let repo = ctx.open(false).await?;
    let progress = Arc::new(custos::sync::SyncProgress::default());
    let bar = ctx.progress_enabled().then(|| {
        let p = progress.clone();
        spawn_bar("objects copied", move || {
            use std::sync::atomic::Ordering::Relaxed;
            (
                p.objects_copied.load(Relaxed),
                p.bytes_copied.load(Relaxed),
                p.objects_total.load(Relaxed),
                0,
            )
        })
    });
    let synced = custos::sync::sync_with_progress(&repo, false, Some(progress)).await;
    finish_bar(bar);
    let report = synced?;
    let mut failed: Vec<(String, String)> = report.failed.clone();
    failed.extend(repo.unreachable().iter().cloned());
    if ctx.g.json {
        print_json(&json!({
            "copied": report.copied.iter().map(|(t, n, b)| json!({"target": t, "objects": n, "bytes": b})).collect::<Vec<_>>(),
            "deleted": report.deleted.iter().map(|(t, n)| json!({"target": t, "objects": n})).collect::<Vec<_>>(),
            "locked": report.locked,
            "failed": failed.iter().map(|(t, e)| json!({"target": t, "error": e})).collect::<Vec<_>>(),
            "delete_failed": report.delete_failed.iter().map(|(t, e)| json!({"target": t, "error": e})).collect::<Vec<_>>(),
            "warnings": report.warnings,
        }));
    } else if !ctx.g.quiet {
        for (t, n) in &report.deleted {
            println!(
                "target {t}: deleted {n} object(s) forget, prune or an erasure removed elsewhere"
            );
        }
        for (t, n, b) in &report.copied {
            println!("target {t}: copied {n} object(s), {}", human_bytes(*b));
        }
        print_locked("kept (removed elsewhere)", &report.locked);
        if report.copied.is_empty() && report.deleted.is_empty() && failed.is_empty() {
            println!("all {} targets hold the same objects", repo.targets().len());
        }
    }
    for w in &report.warnings {
        eprintln!("custos: sync: warning: {w}");
    }
    for (t, e) in &report.delete_failed {
        eprintln!("custos: target {t}: a removed object could not be deleted: {e}");
    }
    for (t, e) in &failed {
        eprintln!("custos: target {t} still lags: {e}");
    }
    Ok(if failed.is_empty() && report.delete_failed.is_empty() {
        0
    } else {
        cerr::EXIT_TARGETS_LAGGING
    })
}

async fn cmd_audit(ctx: &Ctx, cmd: AuditCmd) -> anyhow::Result<i32> {
    let repo = ctx.open(false).await?;
    match cmd {
        AuditCmd::Head => {
            let heads = custos::audit::heads(&repo).await?;
            if ctx.g.json {
                print_json(&json!({ "heads": heads }));
            } else {
                for h in &heads {
                    println!("{h}");
                }
            }
            Ok(0)
        }
        AuditCmd::Log | AuditCmd::Verify { .. } => {
            let anchor = match &cmd {
                AuditCmd::Verify { head } => head.clone(),
                _ => None,
            };
            let log = custos::audit::verify(&repo, anchor.as_deref()).await?;
            if ctx.g.json {
                print_json(&serde_json::to_value(&log)?);
            } else {
                if matches!(cmd, AuditCmd::Log) {
                    for (r, e) in &log.entries {
                        let who = if e.actor.operator.is_empty() {
                            format!("{}@{}", e.actor.os_user, e.actor.host)
                        } else {
                            format!(
                                "{} ({}@{})",
                                e.actor.operator, e.actor.os_user, e.actor.host
                            )
                        };
                        let counts: Vec<String> = e
                            .action
                            .counts
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect();
                        println!(
                            "{:>5} {}  {:<18} {:<16} {}{}{}  [{}]",
                            e.seq,
                            e.time.format("%Y-%m-%d %H:%M:%S"),
                            who,
                            e.action.command,
                            e.action.outcome,
                            if e.action.subjects.is_empty() {
                                String::new()
                            } else {
                                format!("  {}", e.action.subjects.join(" "))
                            },
                            if counts.is_empty() {
                                String::new()
                            } else {
                                format!("  {}", counts.join(" "))
                            },
                            &r[21..29]
                        );
                    }
                }
                for f in &log.forks {
                    println!("fork: two writers appended entry {f} at once");
                }
                for p in &log.problems {
                    println!("PROBLEM: {p}");
                }
                println!(
                    "{} entr(ies); head {}",
                    log.entries.len(),
                    log.heads.join(", ")
                );
            }
            Ok(if log.problems.is_empty() {
                0
            } else {
                cerr::EXIT_ERROR
            })
        }
    }
}

/// The customer in an audit entry: keyed hashes only, never the identifiers.
fn audit_customer(ctx: &Ctx, repo: &Repository, ids: &std::collections::BTreeSet<String>) {
    for i in ids {
        audit_subject(ctx, format!("customer:{}", repo.keys().customer_key(i)));
    }
}

fn customer_ids(ctx: &Ctx, spec: &str) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let aliases = ctx
        .settings
        .as_ref()
        .map(|s| s.customers.clone())
        .unwrap_or_default();
    Ok(aliases.resolve(spec)?)
}

fn day(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "-".into())
}

fn print_erasure_state(
    state: custos::erasures::State,
    completed: Option<chrono::DateTime<chrono::Utc>>,
    pending: &[custos::target::LockedObject],
    packs_remaining: u64,
) {
    match state {
        custos::erasures::State::Complete => println!(
            "  complete since {}",
            completed.map(|t| t.to_rfc3339()).unwrap_or_default()
        ),
        custos::erasures::State::Pending => {
            println!("  pending:");
            for l in pending {
                println!(
                    "    {} on target {}: locked until {}",
                    l.object,
                    l.target,
                    l.retain_until.to_rfc3339()
                );
            }
            if packs_remaining > 0 {
                println!("    {packs_remaining} pack(s) with removed data wait for a prune");
            }
        }
    }
}

/// One audit entry per erasure (or retention disposal) a retry completed.
async fn audit_completions(ctx: &Ctx, repo: &Repository, r: &custos::erasures::RetryReport) {
    for e in r.all_completed() {
        let id = e.id;
        let word = match e.kind {
            custos::erasures::Tracked::Erasure => "erasure",
            custos::erasures::Tracked::Disposal => "disposal",
        };
        let mut counts = std::collections::BTreeMap::new();
        counts.insert("objects_removed".to_string(), e.removed.len() as u64);
        let action = custos::audit::Action {
            command: format!("{word} complete"),
            subjects: vec![format!("{word}:{id}")],
            outcome: "ok".into(),
            counts,
        };
        if let Err(err) = custos::audit::append(repo, &current_actor(ctx), action).await {
            eprintln!("warning: the audit entry of {word} {id} could not be written: {err}");
        }
    }
}

/// `customer erase --retry-pending`.
async fn cmd_erase_retry(
    ctx: &Ctx,
    repo: &Repository,
    grace: Option<std::time::Duration>,
) -> anyhow::Result<i32> {
    let opts = grace.map(|grace| custos::prune::PruneOptions {
        grace,
        ..Default::default()
    });
    let mode = match &opts {
        Some(o) => custos::erasures::PruneMode::WhenReady(o),
        None => custos::erasures::PruneMode::Never,
    };
    let r = custos::erasures::retry(repo, chrono::Utc::now(), mode).await?;
    audit_completions(ctx, repo, &r).await;
    audit_count(ctx, "erasures_completed", r.completed.len() as u64);
    if ctx.g.json {
        print_json(&serde_json::to_value(&r)?);
    } else if !ctx.g.quiet {
        print_retry(&r);
        if opts.is_none() && r.erasures.iter().any(|e| e.packs_remaining > 0) {
            println!("the erased data goes with the next prune (or give --prune-grace)");
        }
    }
    for e in &r.errors {
        eprintln!("custos: customer erase --retry-pending: {e}");
    }
    Ok(if r.errors.is_empty() {
        0
    } else {
        cerr::EXIT_ERROR
    })
}

fn print_retry(r: &custos::erasures::RetryReport) {
    if !r.any_open() {
        println!("no pending erasure");
        return;
    }
    for e in r.all() {
        println!(
            "{} {}: {}{}",
            match e.kind {
                custos::erasures::Tracked::Erasure => "erasure",
                custos::erasures::Tracked::Disposal => "retention disposal",
            },
            e.id.short(),
            match e.state {
                custos::erasures::State::Complete => "complete",
                custos::erasures::State::Pending => "pending",
            },
            if e.not_due {
                " (every lock still runs)"
            } else {
                ""
            }
        );
        for l in &e.removed {
            println!("  deleted {} on target {}", l.object, l.target);
        }
        if e.state == custos::erasures::State::Pending {
            print_erasure_state(e.state, None, &e.pending, e.packs_remaining);
        }
    }
}

async fn cmd_customer(ctx: &Ctx, cmd: CustomerCmd) -> anyhow::Result<i32> {
    use custos::rights;
    let repo = ctx.open(false).await?;
    match cmd {
        CustomerCmd::Show { customer } => {
            let ids = customer_ids(ctx, &customer)?;
            let r = rights::show(&repo, &customer, &ids).await?;
            audit_customer(ctx, &repo, &ids);
            if ctx.g.json {
                print_json(&serde_json::to_value(&r)?);
            } else {
                println!("customer {} ({})", r.customer, r.identifiers.join(", "));
                if r.suppressed {
                    println!("  erased: in the suppression ledger");
                }
                println!(
                    "  {} record(s), first contact {}, last contact {}",
                    r.records,
                    day(r.first_contact),
                    day(r.last_contact)
                );
                for s in &r.sources {
                    let kinds: Vec<String> =
                        s.kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
                    println!(
                        "  source {}: {} ({}), {} .. {}, in {} snapshot(s)",
                        s.source,
                        s.records,
                        kinds.join(", "),
                        day(s.first_contact),
                        day(s.last_contact),
                        s.snapshots.len()
                    );
                }
                for t in &r.targets {
                    println!(
                        "  target {}: {} of those snapshot(s)",
                        t.target, t.snapshots
                    );
                }
            }
            Ok(0)
        }
        CustomerCmd::Export {
            customer,
            out,
            snapshot,
        } => {
            let ids = customer_ids(ctx, &customer)?;
            let r = rights::export(&repo, &customer, &ids, snapshot.as_deref(), &out).await?;
            audit_customer(ctx, &repo, &ids);
            audit_count(ctx, "records", r.records);
            if ctx.g.json {
                print_json(&serde_json::to_value(&r)?);
            } else if !ctx.g.quiet {
                println!(
                    "exported {} record(s) and {} attachment(s) ({}) to {}",
                    r.records,
                    r.attachments,
                    human_bytes(r.bytes),
                    r.out
                );
                if r.suppressed > 0 {
                    println!(
                        "left out {} record(s) that also name an erased customer",
                        r.suppressed
                    );
                }
            }
            Ok(0)
        }
        CustomerCmd::Erase {
            retry_pending: true,
            prune_grace,
            ..
        } => cmd_erase_retry(ctx, &repo, prune_grace.map(Into::into)).await,
        CustomerCmd::Erase {
            customer,
            reason,
            dry_run,
            prune_grace,
            ..
        } => {
            let customer = customer.unwrap_or_default();
            let reason = reason.unwrap_or_default();
            let ids = customer_ids(ctx, &customer)?;
            let r = rights::erase(
                &repo,
                &customer,
                &ids,
                &reason,
                dry_run,
                prune_grace.map(Into::into),
            )
            .await?;
            audit_customer(ctx, &repo, &ids);
            audit_count(ctx, "records_removed", r.removed.values().sum());
            audit_count(ctx, "records_held", r.held);
            if ctx.g.json {
                print_json(&serde_json::to_value(&r)?);
            } else {
                let total: u64 = r.removed.values().sum();
                let verb = if r.dry_run { "would remove" } else { "removed" };
                println!(
                    "{verb} {total} record copy(ies) naming {} from {} snapshot(s) on {}",
                    r.customer,
                    r.snapshots_rewritten,
                    r.targets.join(", ")
                );
                for (src, n) in &r.removed {
                    println!("  {src}: {n}");
                }
                for l in &r.locked {
                    println!(
                        "target {}: {} is locked until {}: it (and the erased data it holds or references) stays until then",
                        l.target, l.object, l.retain_until.to_rfc3339()
                    );
                }
                if !r.locked.is_empty() && !r.dry_run {
                    println!("the erasure is pending: a prune (or `customer erase --retry-pending`) after that date completes it; `customer log` shows its state");
                }
                if r.held > 0 {
                    println!(
                        "kept {} record copy(ies) under legal hold ({}): not erased",
                        r.held,
                        r.holds.join(", ")
                    );
                }
                if !r.dry_run {
                    println!("the customer is in the suppression ledger: restores, exports and backups leave them out");
                    for p in &r.prune {
                        println!(
                            "prune: {} pack(s) marked, {} repacked, {} deleted ({} freed)",
                            p.packs_marked,
                            p.packs_repacked,
                            p.packs_deleted,
                            human_bytes(p.bytes_freed)
                        );
                    }
                    if r.prune.is_empty() {
                        println!("the data goes with the next prune (after its grace period)");
                    }
                }
            }
            Ok(0)
        }
        CustomerCmd::Lift { customer, reason } => {
            let ids = customer_ids(ctx, &customer)?;
            let written = rights::lift(&repo, &ids, &reason).await?;
            audit_customer(ctx, &repo, &ids);
            if ctx.g.json {
                print_json(&json!({"entries": written}));
            } else if !ctx.g.quiet {
                println!("suppression lifted for {customer}");
            }
            Ok(0)
        }
        CustomerCmd::Log => {
            let log = custos::erasures::statuses(&repo).await?;
            if ctx.g.json {
                print_json(&serde_json::to_value(&log)?);
            } else {
                for st in &log {
                    let d = &st.entry;
                    let total: u64 = d.removed.values().sum();
                    println!(
                        "{} {}  {} record copy(ies) removed, {} held, {} snapshot(s)  ({})",
                        st.id.short(),
                        d.time.format("%Y-%m-%d %H:%M"),
                        total,
                        d.held,
                        d.snapshots.len(),
                        d.reason
                    );
                    print_erasure_state(st.state, st.completed, &st.pending, st.packs_remaining);
                }
            }
            Ok(0)
        }
    }
}

async fn cmd_hold(ctx: &Ctx, cmd: HoldCmd) -> anyhow::Result<i32> {
    use custos::disposal::{active_holds, write_hold, HoldAction, HoldDoc};
    let repo = ctx.open(false).await?;
    match cmd {
        HoldCmd::List => {
            let holds = active_holds(&repo).await?;
            if ctx.g.json {
                print_json(&serde_json::to_value(&holds)?);
            } else {
                for h in &holds {
                    let scope: Vec<String> = [
                        h.customer.as_ref().map(|c| format!("customer {c}")),
                        h.source.as_ref().map(|s| format!("source {s}")),
                        h.kind.as_ref().map(|k| format!("kind {k}")),
                        h.collection.as_ref().map(|c| format!("collection {c}")),
                        h.from.map(|t| format!("created from {}", t.to_rfc3339())),
                        h.until
                            .map(|t| format!("created before {}", t.to_rfc3339())),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    println!(
                        "{:<20} since {}  {}  ({})",
                        h.name,
                        h.time.format("%Y-%m-%d %H:%M"),
                        if scope.is_empty() {
                            "all records".to_string()
                        } else {
                            scope.join(", ")
                        },
                        h.reason
                    );
                }
                println!("{} active hold(s)", holds.len());
            }
        }
        HoldCmd::Add {
            name,
            reason,
            customer,
            source,
            kind,
            collection,
            from,
            until,
        } => {
            let from = from
                .as_deref()
                .map(|v| parse_time("--from", v))
                .transpose()?;
            let until = until
                .as_deref()
                .map(|v| parse_time("--until", v))
                .transpose()?;
            if let (Some(f), Some(u)) = (from, until) {
                if f >= u {
                    return Err(Error::Invalid(format!(
                        "--from {f} is not before --until {u}: the hold would cover no dated record"
                    ))
                    .into());
                }
            }
            let doc = HoldDoc {
                name,
                action: HoldAction::Place,
                time: chrono::Utc::now(),
                reason,
                customer,
                source,
                kind,
                collection,
                from,
                until,
            };
            let id = write_hold(&repo, &doc).await?;
            if ctx.g.json {
                print_json(&json!({"id": id, "name": doc.name}));
            } else if !ctx.g.quiet {
                println!("hold {} placed", doc.name);
            }
        }
        HoldCmd::Release { name, reason } => {
            let doc = HoldDoc {
                name,
                action: HoldAction::Release,
                time: chrono::Utc::now(),
                reason,
                customer: None,
                source: None,
                kind: None,
                collection: None,
                from: None,
                until: None,
            };
            let id = write_hold(&repo, &doc).await?;
            if ctx.g.json {
                print_json(&json!({"id": id, "name": doc.name}));
            } else if !ctx.g.quiet {
                println!("hold {} released", doc.name);
            }
        }
    }
    Ok(0)
}

async fn cmd_retention(ctx: &Ctx, cmd: RetentionCmd) -> anyhow::Result<i32> {
    let repo = ctx.open(false).await?;
    match cmd {
        RetentionCmd::Log => {
            let log = custos::erasures::disposal_statuses(&repo).await?;
            if ctx.g.json {
                print_json(&serde_json::to_value(&log)?);
            } else {
                for st in &log {
                    let d = &st.entry;
                    for c in &d.removed {
                        println!(
                            "{}  {:<20} {:<14} {:<16} {} record(s)",
                            d.time.format("%Y-%m-%d %H:%M"),
                            c.rule,
                            c.kind,
                            c.source,
                            c.records
                        );
                    }
                    if d.held > 0 {
                        println!(
                            "{}  {} expired record(s) kept under legal hold",
                            d.time.format("%Y-%m-%d %H:%M"),
                            d.held
                        );
                    }
                    // Only entries a lock held back say more: "complete since <time>" or what is pending.
                    if !d.pending.is_empty() || st.last_retry.is_some() {
                        println!(
                            "{}  disposal {}:",
                            d.time.format("%Y-%m-%d %H:%M"),
                            st.id.short()
                        );
                        print_erasure_state(
                            st.state,
                            st.completed,
                            &st.pending,
                            st.packs_remaining,
                        );
                    }
                }
            }
            Ok(0)
        }
        RetentionCmd::Apply {
            dry_run,
            no_prune,
            prune_grace,
        } => {
            let policy = ctx
                .settings
                .as_ref()
                .and_then(|s| s.record_retention.clone())
                .ok_or_else(|| {
                    Error::Invalid(
                        "retention apply needs a [record_retention] section in the config".into(),
                    )
                })?;
            let report =
                custos::disposal::apply(&repo, &policy, chrono::Utc::now(), dry_run).await?;
            let then_prune = !dry_run && !no_prune;
            if ctx.g.json && !then_prune {
                let mut v = serde_json::to_value(&report)?;
                v["lagging"] = lagging_json(&repo);
                print_json(&v);
            } else if !ctx.g.json && !ctx.g.quiet {
                let verb = if dry_run { "would remove" } else { "removed" };
                for r in &report.records {
                    println!(
                        "would remove {}/{}/{} ({}, created {}) under {} from {} snapshot(s)",
                        r.source,
                        r.collection,
                        r.record_id,
                        r.kind,
                        r.created
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_else(|| "unknown".into()),
                        r.rule,
                        r.snapshots
                    );
                }
                for c in &report.removed {
                    println!(
                        "{verb} {} {} record(s) of {} under {}",
                        c.records, c.kind, c.source, c.rule
                    );
                }
                println!(
                    "{} snapshot(s) checked, {} {}; {} expired record(s) kept under legal hold; {} undated record(s) cannot expire",
                    report.snapshots_checked,
                    report.snapshots_rewritten,
                    if dry_run { "would be rewritten" } else { "rewritten" },
                    report.held,
                    report.undated
                );
                print_locked("kept replaced", &report.locked);
                if !report.locked.is_empty() {
                    println!(
                        "the disposal is pending until those locks run out; every prune retries it"
                    );
                }
                if !dry_run && no_prune && report.snapshots_rewritten > 0 {
                    println!("run `custos prune` to delete the data of the removed records");
                }
            }
            let lagging = report_unreached(&repo, "retention apply") && !dry_run;
            let lagging_code = |code: i32| {
                if code == 0 && lagging {
                    cerr::EXIT_TARGETS_LAGGING
                } else {
                    code
                }
            };
            if !then_prune {
                return Ok(lagging_code(0));
            }
            // Then prune, as `forget --prune`: two-phase, the data goes once
            // its marks are older than the grace period.
            if ctx.g.json {
                let (pr, erasures) = custos::erasures::prune_completing(
                    &repo,
                    &custos::prune::PruneOptions {
                        grace: prune_grace.into(),
                        ..Default::default()
                    },
                    chrono::Utc::now(),
                )
                .await?;
                audit_completions(ctx, &repo, &erasures).await;
                let code = if pr.errors.is_empty() && erasures.errors.is_empty() {
                    0
                } else {
                    cerr::EXIT_ERROR
                };
                let mut v = serde_json::to_value(&report)?;
                v["lagging"] = lagging_json(&repo);
                let mut pv = serde_json::to_value(&pr)?;
                if erasures.any_open() {
                    pv["erasures"] = serde_json::to_value(&erasures)?;
                }
                v["prune"] = pv;
                print_json(&v);
                return Ok(lagging_code(code));
            }
            let prune = PruneArgs {
                grace: prune_grace,
                repack_threshold: 50.0,
                dry_run: false,
            };
            Ok(lagging_code(cmd_prune(ctx, &prune).await?))
        }
    }
}

async fn cmd_prune(ctx: &Ctx, a: &PruneArgs) -> anyhow::Result<i32> {
    if !(0.0..=100.0).contains(&a.repack_threshold) {
        return Err(Error::Invalid(format!(
            "--repack-threshold {}: give a percentage 0..=100",
            a.repack_threshold
        ))
        .into());
    }
    let repo = ctx.open(false).await?;
    let progress = Arc::new(custos::prune::PruneProgress::default());
    let opts = custos::prune::PruneOptions {
        grace: a.grace.into(),
        repack_threshold: a.repack_threshold / 100.0,
        dry_run: a.dry_run,
        progress: Some(progress.clone()),
        ..Default::default()
    };
    let bar = ctx.progress_enabled().then(|| {
        spawn_bar("blobs repacked", move || {
            use std::sync::atomic::Ordering::Relaxed;
            (
                progress.blobs_copied.load(Relaxed),
                progress.bytes_copied.load(Relaxed),
                progress.blobs_total.load(Relaxed),
                progress.bytes_total.load(Relaxed),
            )
        })
    });
    let completed = custos::erasures::prune_completing(&repo, &opts, chrono::Utc::now()).await;
    finish_bar(bar);
    let (report, erasures) = completed?;
    audit_completions(ctx, &repo, &erasures).await;
    audit_count(ctx, "packs_deleted", report.packs_deleted as u64);
    audit_count(ctx, "bytes_freed", report.bytes_freed);
    if ctx.g.json {
        let mut v = serde_json::to_value(&report)?;
        if erasures.any_open() {
            v["erasures"] = serde_json::to_value(&erasures)?;
        }
        v["lagging"] = lagging_json(&repo);
        print_json(&v);
    } else if !ctx.g.quiet {
        if erasures.any_open() {
            print_retry(&erasures);
        }
        let r = &report;
        println!(
            "{} snapshots, {} packs: {} blobs used, {} unused ({})",
            r.snapshots,
            r.packs,
            r.used_blobs,
            r.unused_blobs,
            human_bytes(r.unused_bytes)
        );
        let verb = if a.dry_run { "would mark" } else { "marked" };
        println!(
            "{verb} {} unused pack(s) and {} pack(s) to repack; {} pack(s) wait for the grace period ({})",
            r.packs_marked, r.packs_repacked, r.packs_pending, a.grace
        );
        let verb = if a.dry_run { "would delete" } else { "deleted" };
        println!(
            "{verb} {} pack(s) and {} index object(s) marked earlier, {} freed",
            r.packs_deleted,
            r.index_deleted,
            human_bytes(r.bytes_freed)
        );
        if r.marks_dropped > 0 {
            println!(
                "{} mark(s) dropped: newer snapshots still use their data",
                r.marks_dropped
            );
        }
        if r.marks_locked > 0 {
            println!(
                "{} mark(s) kept: Object Lock still protects some of their objects",
                r.marks_locked
            );
        }
        if r.staging_files > 0 {
            let verb = if a.dry_run { "would remove" } else { "removed" };
            println!(
                "{verb} {} staging file(s) interrupted writes left behind, {}",
                r.staging_files,
                human_bytes(r.staging_bytes)
            );
        }
        print_locked("kept", &r.locked);
    }
    for e in report.errors.iter().chain(&erasures.errors) {
        eprintln!("custos: prune: {e}");
    }
    let unreached = report_unreached(&repo, "prune") && !a.dry_run;
    Ok(
        if !report.errors.is_empty() || !erasures.errors.is_empty() {
            cerr::EXIT_ERROR
        } else if unreached {
            cerr::EXIT_TARGETS_LAGGING
        } else {
            0
        },
    )
}

async fn cmd_forget(ctx: &Ctx, a: ForgetArgs) -> anyhow::Result<i32> {
    use custos_schedules::retention::GroupBy;
    let repo = ctx.open(false).await?;
    if !a.dry_run {
        repo.require(Role::Admin, "forget")?;
    }
    let snaps = load_snapshots(&repo).await?;
    let flag_policy = a.policy()?;
    let mut remove: Vec<Id> = Vec::new();
    let mut report = serde_json::Map::new();
    if !a.snapshots.is_empty() {
        if flag_policy.is_some() {
            return Err(
                Error::Invalid("give snapshot ids or --keep-* rules, not both".into()).into(),
            );
        }
        // Refuses (nothing removed) when a legal hold covers one of them.
        remove = custos::forget::select(&repo, &snaps, &a.snapshots).await?;
        if !ctx.g.json {
            for id in &remove {
                println!(
                    "{} {}",
                    if a.dry_run { "would remove" } else { "remove" },
                    id.short()
                );
            }
        }
    } else {
        let config = ctx.settings.as_ref().and_then(|s| s.retention.clone());
        let (policy, config_group) = match (flag_policy, config) {
            (Some(p), c) => (p, c.map(|c| c.group_by)),
            (None, Some(c)) => (c.policy, Some(c.group_by)),
            (None, None) => {
                return Err(Error::Invalid(
                    "no policy: give --keep-* rules, snapshot ids, or a [retention] section in the config".into(),
                )
                .into())
            }
        };
        let group_by = match &a.group_by {
            Some(g) => GroupBy::parse_list(g).map_err(|e| Error::Invalid(e.to_string()))?,
            None => config_group.unwrap_or_else(|| GroupBy::DEFAULT.to_vec()),
        };
        let groups = custos::forget::plan(
            &repo,
            &snaps,
            &policy,
            chrono::Utc::now(),
            &group_by,
            a.allow_empty_group,
        )
        .await?;
        for g in &groups {
            if !ctx.g.json && !ctx.g.quiet {
                println!("group {}: policy {policy}", g.key);
                for d in &g.decisions {
                    println!("  {}", d.explain());
                }
            }
            remove.extend(g.removed().filter_map(|d| Id::from_hex(&d.id)));
        }
        report.insert("groups".into(), serde_json::to_value(&groups)?);
    }
    let removal = if a.dry_run {
        custos::forget::Removal::default()
    } else {
        custos::forget::remove(&repo, &remove).await?
    };
    let failures = removal.failures;
    let locked_ids: Vec<&str> = removal
        .locked
        .iter()
        .map(|l| l.object.rsplit('/').next().unwrap_or(""))
        .collect();
    let removed: Vec<Id> = remove
        .iter()
        .filter(|id| !locked_ids.contains(&id.to_hex().as_str()))
        .copied()
        .collect();
    if ctx.g.json {
        report.insert(
            "removed".into(),
            json!(if a.dry_run {
                Vec::new()
            } else {
                removed.clone()
            }),
        );
        report.insert("locked".into(), json!(removal.locked));
        report.insert("dry_run".into(), json!(a.dry_run));
        report.insert("errors".into(), json!(failures));
        report.insert("lagging".into(), lagging_json(&repo));
        // With --prune, one JSON document: the prune report nested under "prune".
        if failures.is_empty() && a.prune && !a.dry_run {
            let (pr, erasures) = custos::erasures::prune_completing(
                &repo,
                &custos::prune::PruneOptions::default(),
                chrono::Utc::now(),
            )
            .await?;
            audit_completions(ctx, &repo, &erasures).await;
            let code = if !pr.errors.is_empty() || !erasures.errors.is_empty() {
                cerr::EXIT_ERROR
            } else if report_unreached(&repo, "forget") {
                cerr::EXIT_TARGETS_LAGGING
            } else {
                0
            };
            let mut pv = serde_json::to_value(&pr)?;
            if erasures.any_open() {
                pv["erasures"] = serde_json::to_value(&erasures)?;
            }
            report.insert("prune".into(), pv);
            print_json(&serde_json::Value::Object(report));
            return Ok(code);
        }
        print_json(&serde_json::Value::Object(report));
    } else if !ctx.g.quiet {
        let verb = if a.dry_run { "would remove" } else { "removed" };
        println!(
            "{verb} {} snapshot(s); data they alone referenced stays until prune",
            if a.dry_run {
                remove.len()
            } else {
                removed.len()
            }
        );
        print_locked("kept snapshot", &removal.locked);
    }
    for f in &failures {
        eprintln!("custos: forget: {f}");
    }
    if failures.is_empty() && a.prune && !a.dry_run {
        let prune = PruneArgs {
            grace: std::time::Duration::from_secs(24 * 3600).into(),
            repack_threshold: 50.0,
            dry_run: false,
        };
        return cmd_prune(ctx, &prune).await;
    }
    if failures.is_empty() {
        Ok(if report_unreached(&repo, "forget") && !a.dry_run {
            cerr::EXIT_TARGETS_LAGGING
        } else {
            0
        })
    } else {
        Err(Error::Failed(format!(
            "{} snapshot deletion(s) failed (listed above)",
            failures.len()
        ))
        .into())
    }
}

async fn cmd_stats(ctx: &Ctx, spec: Option<&str>) -> anyhow::Result<i32> {
    let repo = ctx.open(true).await?;
    let snaps = load_snapshots(&repo).await?;
    let (index, _) = repo.load_index().await?;
    let stored: u64 = index.packs().iter().map(|p| p.2).sum();
    let packs = index.packs().len();
    let (blobs, raw) = index.totals();
    let v = match spec {
        Some(spec) => {
            let s = snapshot::find(&snaps, spec)?;
            json!({
                "snapshot_id": s.id,
                "total_files": s.snapshot.summary.total_files,
                "total_size": s.snapshot.summary.total_bytes,
                "summary": s.snapshot.summary,
            })
        }
        None => json!({
            "snapshots": snaps.len(),
            "total_size": snaps.iter().map(|s| s.snapshot.summary.total_bytes).sum::<u64>(),
            "blobs": blobs,
            "unique_raw_size": raw,
            "packs": packs,
            "stored_size": stored,
            "compression_ratio": if stored > 0 { raw as f64 / stored as f64 } else { 0.0 },
            "index_memory_bytes": index.memory_bytes(),
        }),
    };
    if ctx.g.json {
        print_json(&v);
    } else if let Some(map) = v.as_object() {
        for (k, val) in map {
            let shown = match (k.ends_with("size") || k.ends_with("bytes"), val.as_u64()) {
                (true, Some(n)) => human_bytes(n),
                _ => val.to_string(),
            };
            println!("{k:>18}: {shown}");
        }
    }
    Ok(0)
}

fn new_password(np: &NewPassword) -> anyhow::Result<String> {
    if let Some(f) = &np.new_password_file {
        return Ok(SecretSource::File(f.clone()).resolve()?);
    }
    if std::env::var_os("CUSTOS_NEW_PASSWORD").is_some() {
        return Ok(SecretSource::Env("CUSTOS_NEW_PASSWORD".into()).resolve()?);
    }
    if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password("new password: ")?;
        let b = rpassword::prompt_password("repeat new password: ")?;
        if a != b {
            return Err(anyhow!("the passwords differ"));
        }
        return Ok(a);
    }
    Err(
        Error::Password("no new password: use --new-password-file or CUSTOS_NEW_PASSWORD".into())
            .into(),
    )
}

fn kdf_for(ctx: &Ctx, np: &NewPassword) -> KdfParams {
    let mut k = ctx
        .settings
        .as_ref()
        .map(|s| s.repository.init.kdf)
        .unwrap_or_default();
    if let Some(m) = np.kdf_memory_kib {
        k.memory_kib = m;
    }
    if let Some(i) = np.kdf_iterations {
        k.iterations = i;
    }
    k
}

async fn resolve_key(repo: &Repository, prefix: &str) -> anyhow::Result<Id> {
    let list = repo.primary()?.list("keys/").await?;
    let hits: Vec<Id> = list
        .iter()
        .filter_map(|m| m.name.strip_prefix("keys/").and_then(Id::from_hex))
        .filter(|id| id.to_hex().starts_with(&prefix.to_ascii_lowercase()))
        .collect();
    match hits.as_slice() {
        [one] => Ok(*one),
        [] => Err(Error::Invalid(format!("key {prefix} not found")).into()),
        _ => Err(Error::Invalid(format!("key {prefix} is ambiguous: give more digits")).into()),
    }
}

async fn remove_key(repo: &Repository, id: &Id) -> anyhow::Result<()> {
    for t in repo.targets() {
        t.delete(&format!("keys/{id}")).await?;
    }
    Ok(())
}

async fn cmd_key(ctx: &Ctx, cmd: KeyCmd) -> anyhow::Result<i32> {
    let repo = ctx.open(false).await?;
    match cmd {
        KeyCmd::List => {
            let t = repo.primary()?;
            let mut rows = Vec::new();
            for m in t.list("keys/").await? {
                let id = m.name.trim_start_matches("keys/").to_string();
                let bytes = t.get(&m.name).await?;
                match KeyFile::parse(&id, &bytes) {
                    Ok(kf) => rows.push(json!({
                        "id": id,
                        "current": id == repo.key_id().to_hex(),
                        "created": kf.created,
                        "role": kf.role,
                        "kdf": kf.params,
                    })),
                    Err(e) => rows.push(json!({"id": id, "error": e.to_string()})),
                }
            }
            if ctx.g.json {
                print_json(&serde_json::Value::Array(rows));
            } else {
                for r in rows {
                    println!(
                        "{} {:<8} {:<6} {}",
                        if r["current"].as_bool() == Some(true) {
                            "*"
                        } else {
                            " "
                        },
                        &r["id"].as_str().unwrap_or("")[..8],
                        r["role"].as_str().unwrap_or("?"),
                        r["created"].as_str().or(r["error"].as_str()).unwrap_or("")
                    );
                }
            }
        }
        KeyCmd::Add { role, np } => {
            repo.require(Role::Admin, "key add")?;
            let pw = new_password(&np)?;
            let id = repo.add_key(role, pw.as_bytes(), kdf_for(ctx, &np)).await?;
            if ctx.g.json {
                print_json(&json!({"id": id, "role": role.as_str()}));
            } else if !ctx.g.quiet {
                println!("added {role} key {}", id.short());
            }
        }
        KeyCmd::Remove { id } => {
            repo.require(Role::Admin, "key remove")?;
            let id = resolve_key(&repo, &id).await?;
            if id == repo.key_id() {
                return Err(Error::Invalid(format!(
                    "key {} is the one in use: open the repository with another password to remove it",
                    id.short()
                ))
                .into());
            }
            remove_key(&repo, &id).await?;
            if ctx.g.json {
                print_json(&json!({"removed": id}));
            } else if !ctx.g.quiet {
                println!("removed key {}", id.short());
            }
        }
        KeyCmd::Passwd(np) => {
            let pw = new_password(&np)?;
            let new = repo
                .rewrap_own_key(pw.as_bytes(), kdf_for(ctx, &np))
                .await?;
            remove_key(&repo, &repo.key_id()).await?;
            if ctx.g.json {
                print_json(&json!({"id": new, "removed": repo.key_id()}));
            } else if !ctx.g.quiet {
                println!(
                    "password changed: key {} replaces {}",
                    new.short(),
                    repo.key_id().short()
                );
            }
        }
    }
    Ok(0)
}

async fn cmd_cat(ctx: &Ctx, kind: &str, id: Option<&str>) -> anyhow::Result<i32> {
    let repo = ctx.open(false).await?;
    let need_id = || id.ok_or_else(|| Error::Invalid(format!("cat {kind}: give an id")));
    let v: serde_json::Value = match kind {
        "config" => serde_json::to_value(repo.config())?,
        "snapshot" => {
            let snaps = load_snapshots(&repo).await?;
            let s = snapshot::find(&snaps, need_id()?)?;
            let doc: Snapshot = s.snapshot.clone();
            serde_json::to_value(doc)?
        }
        "index" => {
            let ids = repo.list_ids(ObjectKind::Index).await?;
            let id = custos::id::resolve_prefix("cat index", need_id()?, ids)?;
            serde_json::to_value(
                repo.load_object::<IndexFile>(ObjectKind::Index, &id)
                    .await?,
            )?
        }
        "key" => {
            let kid = resolve_key(&repo, need_id()?).await?;
            let bytes = repo.primary()?.get(&format!("keys/{kid}")).await?;
            serde_json::from_slice(&bytes)?
        }
        "tree" => {
            let spec = need_id()?;
            let id = match Id::from_hex(spec) {
                Some(id) => id,
                None => {
                    // A prefix: the tree blobs the index objects list.
                    let mut trees = std::collections::BTreeSet::new();
                    for iid in repo.list_ids(ObjectKind::Index).await? {
                        let file = repo
                            .load_object::<IndexFile>(ObjectKind::Index, &iid)
                            .await?;
                        for p in file.packs.iter().filter(|p| p.ty == BlobType::Tree) {
                            trees.extend(p.blobs.iter().map(|b| b.id));
                        }
                    }
                    custos::id::resolve_prefix("cat tree", spec, trees)?
                }
            };
            let (index, _) = repo.load_index().await?;
            let plain = repo.read_blob(&index, BlobType::Tree, &id).await?;
            match parse_tree(&id, &plain)? {
                TreeDoc::Leaf { nodes } => json!({ "nodes": nodes }),
                TreeDoc::Split { parts } => json!({ "parts": parts }),
            }
        }
        other => {
            return Err(Error::Invalid(format!(
                "cat {other}: unknown kind (config, snapshot, index, key, tree)"
            ))
            .into())
        }
    };
    print_json(&v);
    Ok(0)
}

async fn cmd_restore_verify(ctx: &Ctx, a: RestoreVerifyArgs) -> anyhow::Result<i32> {
    let opts = custos::verify::VerifyOptions {
        sample_percent: a
            .sample
            .as_deref()
            .map(|v| custos::verify::parse_percent("--sample", v))
            .transpose()?,
        snapshot: a.snapshot,
        sources: a.source,
        scratch: a.scratch,
        keep_scratch: a.keep_scratch,
        rpo: a.rpo.map(Into::into),
        rto: a.rto.map(Into::into),
        configured: ctx
            .settings
            .as_ref()
            .map(|s| s.sources.clone())
            .unwrap_or_default(),
        against_source: a.against_source,
    };
    // No cache: every read must come from the target being verified.
    let repo = ctx.open(false).await?;
    let report = custos::verify::run(&repo, &opts).await?;
    if ctx.g.json {
        print_json(&report.to_json());
    } else if !ctx.g.quiet {
        print!("{}", report.human());
    }
    for line in report.failure_lines() {
        eprintln!("custos: restore-verify: {line}");
    }
    if report.ok() {
        Ok(0)
    } else {
        Err(Error::Failed(format!(
            "restore-verify failed: {} failure(s) (listed above)",
            report.failure_count()
        ))
        .into())
    }
}

async fn cmd_verify_history(ctx: &Ctx, a: &VerifyHistoryArgs) -> anyhow::Result<i32> {
    let repo = ctx.open(true).await?;
    let (rows, warnings) = custos::verify::history(&repo, a.source.as_deref()).await?;
    for w in warnings {
        eprintln!("custos: skipping damaged verification record: {w}");
    }
    if ctx.g.json {
        print_json(&serde_json::to_value(&rows)?);
    } else {
        print!("{}", custos::verify::history_table(&rows));
    }
    Ok(0)
}
