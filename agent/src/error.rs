//! Typed errors of the custos library.
//!
//! Rules every error here follows (they are what an operator reads at 3 a.m.):
//! - An error names the thing at fault: the object (`data/ab/ab12…`), the target
//!   (`backup-eu`), the file path, the snapshot or blob id, the config key.
//! - It never carries content: no record bodies, no addresses, no secrets, no
//!   passwords. Ids are keyed hashes and reveal nothing.
//! - It maps to one process exit code ([`Error::exit_code`]), so scripts can
//!   tell "wrong password" from "repository missing" from "damaged object".
//! - Library code returns these; only `main.rs` uses `anyhow` for context.

use std::path::PathBuf;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: any error not covered by a more specific code.
pub const EXIT_ERROR: i32 = 1;
/// Exit code: backup finished, but some source items could not be read.
pub const EXIT_PARTIAL_SOURCE: i32 = 3;
/// Exit code: the snapshot committed on some targets but not all (lagging).
pub const EXIT_TARGETS_LAGGING: i32 = 4;
/// Exit code: no repository at the given location.
pub const EXIT_REPO_NOT_FOUND: i32 = 10;
/// Exit code: no key of the repository opens with the given password.
pub const EXIT_WRONG_PASSWORD: i32 = 12;
/// Exit code: the key's role does not allow the operation (FORMAT.md, "Roles").
pub const EXIT_ROLE: i32 = 13;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the custos library reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No repository (no `config` object) at the location.
    #[error("no repository at {location}: {detail}")]
    RepoNotFound { location: String, detail: String },

    /// The password opened none of the key objects.
    #[error("wrong password: none of the {keys} key(s) in {location} opens with it")]
    WrongPassword { location: String, keys: usize },

    /// A repository or object of a format version this build does not read.
    #[error(
        "{object} has format version {found}, this custos reads version(s) {supported}; \
         upgrade custos (FORMAT.md, section Versioning)"
    )]
    UnsupportedVersion {
        object: String,
        found: u32,
        supported: String,
    },

    /// A storage operation failed on a target.
    #[error("target {target}: {op} {object}: {detail}")]
    Storage {
        target: String,
        op: &'static str,
        object: String,
        detail: String,
        kind: StorageErrorKind,
    },

    /// An object failed authentication, hashing or parsing.
    #[error("object {object} is damaged: {reason}")]
    Corrupt { object: String, reason: String },

    /// A blob an operation needs is in no index.
    #[error("blob {id} is not in any index (needed by {needed_by})")]
    BlobMissing { id: String, needed_by: String },

    /// A snapshot id or prefix matched nothing, or more than one snapshot.
    #[error("snapshot {0}")]
    Snapshot(String),

    /// A key file is malformed or hostile (e.g. KDF parameters above the caps).
    #[error("key {id}: {reason}")]
    Key { id: String, reason: String },

    /// The configuration file or a command-line setting is invalid.
    #[error("{0}")]
    Config(String),

    /// A local file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The password could not be obtained.
    #[error("password: {0}")]
    Password(String),

    /// An invalid request (bad argument, unknown target name, ...).
    #[error("{0}")]
    Invalid(String),

    /// The repository was opened with a key whose role does not allow this.
    #[error(
        "{operation} needs {needed}; this repository was opened with a {have} key \
         (give the password of a key with that role; `custos key list` shows roles)"
    )]
    Role {
        operation: String,
        needed: &'static str,
        have: crate::crypto::Role,
    },

    /// An operation completed with failures that were already reported one by one.
    #[error("{0}")]
    Failed(String),
}

/// The class of a storage failure, used to decide retries and fallbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageErrorKind {
    /// The object does not exist.
    NotFound,
    /// The object exists already (create-only write refused).
    AlreadyExists,
    /// Anything else (network, permission, server error).
    Other,
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::RepoNotFound { .. } => EXIT_REPO_NOT_FOUND,
            Error::WrongPassword { .. } => EXIT_WRONG_PASSWORD,
            Error::Role { .. } => EXIT_ROLE,
            _ => EXIT_ERROR,
        }
    }

    /// Build an [`Error::Io`] naming `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Build an [`Error::Corrupt`] naming `object`.
    pub fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.into(),
            reason: reason.into(),
        }
    }

    /// True when this is a storage "object not found".
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::Storage {
                kind: StorageErrorKind::NotFound,
                ..
            }
        )
    }
}
