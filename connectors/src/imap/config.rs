//! `type = "imap"` configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

fn default_tls() -> bool {
    true
}

/// An IMAP mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImapConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// Server host name or address.
    pub host: String,
    /// Server port; default 993 with `tls = true`, 143 without.
    #[serde(default)]
    pub port: Option<u16>,
    /// Implicit TLS (IMAPS; certificates checked against the system's roots).
    /// `false` speaks plaintext: meant for a server on loopback.
    #[serde(default = "default_tls")]
    pub tls: bool,
    /// Login user name.
    pub username: String,
    /// Password from this environment variable.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Password from the first line of this file.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Password from this shell command's standard output.
    #[serde(default)]
    pub password_command: Option<String>,
    /// Folders to back up, by name as the server shows them (`INBOX`,
    /// `Archive/2023`); default: every selectable folder.
    #[serde(default)]
    pub folders: Option<Vec<String>>,
    /// Seconds to wait for any server response before giving up; default 120.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Messages whose RFC822.SIZE exceeds this many MiB are fetched in
    /// pieces into a temporary file and streamed from it, instead of being
    /// held in memory; default 8.
    #[serde(default)]
    pub stream_threshold_mib: Option<u64>,
    /// Folder for those temporary files (unnamed, mode 0600, gone when
    /// closed); default the system's temporary folder (`TMPDIR`).
    #[serde(default)]
    pub temp_dir: Option<PathBuf>,
}

impl ImapConfig {
    /// The port to connect to.
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 993 } else { 143 })
    }
}
