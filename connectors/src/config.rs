//! The source registry: one serde-tagged enum with a variant per connector.
//!
//! An entry is a TOML/JSON table whose `type` key picks the variant:
//!
//! ```toml
//! [[source]]
//! type = "imap"
//! name = "support-mailbox"
//! host = "imap.example.org"
//! username = "support@example.org"
//! password_env = "SUPPORT_IMAP_PASSWORD"
//! ```
//!
//! Secrets are never written in the configuration: every secret key comes as
//! `<key>_env` (an environment variable), `<key>_file` (first line of a file)
//! or `<key>_command` (a shell command's standard output), resolved by
//! [`SecretRef::resolve`] when the connector needs it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::files::{
    CsvConfig, CsvConnector, EmlFolderConfig, EmlFolderConnector, JsonlConfig, JsonlConnector,
    MaildirConfig, MaildirConnector, MboxConfig, MboxConnector, SlackExportConfig,
    SlackExportConnector,
};
use crate::hubspot::{HubSpotConfig, HubSpotConnector};
use crate::imap::{ImapConfig, ImapConnector};
use crate::mastodon::{MastodonConfig, MastodonConnector};
use crate::matrix::{MatrixConfig, MatrixConnector};
use crate::rest::{RestConfig, RestConnector};
use crate::slack::{SlackConfig, SlackConnector};
use crate::x::{XConfig, XConnector};
use crate::zendesk::{ZendeskConfig, ZendeskConnector};
use crate::{Connector, ConnectorError, Result};

/// One configured record source; `type` selects the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// An IMAP mailbox (all or some folders).
    Imap(ImapConfig),
    /// An mbox file or a folder of `.mbox` files (mboxrd).
    Mbox(MboxConfig),
    /// A Maildir (or Maildir++ tree).
    Maildir(MaildirConfig),
    /// A folder of `.eml` files.
    EmlFolder(EmlFolderConfig),
    /// An unzipped Slack export.
    SlackExport(SlackExportConfig),
    /// A CSV export (one record per row).
    Csv(CsvConfig),
    /// A JSON Lines export (one record per line).
    Jsonl(JsonlConfig),
    /// A Slack workspace through the Web API.
    Slack(SlackConfig),
    /// Zendesk Support tickets through the API.
    Zendesk(ZendeskConfig),
    /// Matrix rooms through the client-server API.
    Matrix(MatrixConfig),
    /// Mastodon mentions and direct messages through the API.
    Mastodon(MastodonConfig),
    /// HubSpot CRM v3 contacts and engagements.
    Hubspot(HubSpotConfig),
    /// X API v2 mentions and direct messages.
    X(XConfig),
    /// A generic REST/JSON API described in the entry.
    Rest(RestConfig),
}

/// The `type` values [`SourceConfig`] accepts, in declaration order.
pub fn source_types() -> &'static [&'static str] {
    &[
        "imap",
        "mbox",
        "maildir",
        "eml_folder",
        "slack_export",
        "csv",
        "jsonl",
        "slack",
        "zendesk",
        "matrix",
        "mastodon",
        "hubspot",
        "x",
        "rest",
    ]
}

impl SourceConfig {
    /// The configured source name.
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Imap(c) => &c.name,
            SourceConfig::Mbox(c) => &c.name,
            SourceConfig::Maildir(c) => &c.name,
            SourceConfig::EmlFolder(c) => &c.name,
            SourceConfig::SlackExport(c) => &c.name,
            SourceConfig::Csv(c) => &c.name,
            SourceConfig::Jsonl(c) => &c.name,
            SourceConfig::Slack(c) => &c.name,
            SourceConfig::Zendesk(c) => &c.name,
            SourceConfig::Matrix(c) => &c.name,
            SourceConfig::Mastodon(c) => &c.name,
            SourceConfig::Hubspot(c) => &c.name,
            SourceConfig::X(c) => &c.name,
            SourceConfig::Rest(c) => &c.name,
        }
    }

    /// The `type` key of this entry.
    pub fn source_type(&self) -> &'static str {
        match self {
            SourceConfig::Imap(_) => "imap",
            SourceConfig::Mbox(_) => "mbox",
            SourceConfig::Maildir(_) => "maildir",
            SourceConfig::EmlFolder(_) => "eml_folder",
            SourceConfig::SlackExport(_) => "slack_export",
            SourceConfig::Csv(_) => "csv",
            SourceConfig::Jsonl(_) => "jsonl",
            SourceConfig::Slack(_) => "slack",
            SourceConfig::Zendesk(_) => "zendesk",
            SourceConfig::Matrix(_) => "matrix",
            SourceConfig::Mastodon(_) => "mastodon",
            SourceConfig::Hubspot(_) => "hubspot",
            SourceConfig::X(_) => "x",
            SourceConfig::Rest(_) => "rest",
        }
    }

    /// Check the entry without touching the source (secret keys, required
    /// keys, typed customer columns). [`build`] runs it too.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| ConnectorError::Malformed {
            source_name: self.name().to_string(),
            what: "configuration".into(),
            detail,
        };
        if self.name().trim().is_empty() {
            return Err(bad("name is empty".into()));
        }
        match self {
            SourceConfig::Imap(c) => {
                SecretRef::pick(
                    "password",
                    &c.password_env,
                    &c.password_file,
                    &c.password_command,
                )
                .map_err(bad)?
                .ok_or_else(|| {
                    bad("give one of password_env, password_file, password_command".into())
                })?;
                if c.host.trim().is_empty() {
                    return Err(bad("host is empty".into()));
                }
                if let Some(f) = &c.folders {
                    if f.is_empty() {
                        return Err(bad("folders is empty (leave it out for all folders)".into()));
                    }
                }
            }
            SourceConfig::Csv(c) => {
                crate::files::parse_customer_specs(&c.customer_columns).map_err(bad)?;
            }
            SourceConfig::Jsonl(c) => {
                crate::files::parse_customer_specs(&c.customer_fields).map_err(bad)?;
            }
            SourceConfig::Slack(c) => {
                SecretRef::pick("token", &c.token_env, &c.token_file, &c.token_command)
                    .map_err(bad)?
                    .ok_or_else(
                        || bad("give one of token_env, token_file, token_command".into()),
                    )?;
                if let Some(h) = &c.http {
                    h.validate().map_err(bad)?;
                }
                if c.channels.as_ref().is_some_and(|c| c.is_empty()) {
                    return Err(bad("channels is empty (leave it out for all)".into()));
                }
            }
            SourceConfig::Zendesk(c) => c.validate().map_err(bad)?,
            SourceConfig::Matrix(c) => c.validate().map_err(bad)?,
            SourceConfig::Mastodon(c) => c.validate().map_err(bad)?,
            SourceConfig::Hubspot(c) => c.validate().map_err(bad)?,
            SourceConfig::X(c) => c.validate().map_err(bad)?,
            SourceConfig::Rest(c) => c.validate().map_err(bad)?,
            _ => {}
        }
        Ok(())
    }
}

/// Turn a configuration entry into a connector. Nothing is contacted yet
/// (IMAP connects on first use); only the entry itself is validated.
pub fn build(config: &SourceConfig) -> Result<Box<dyn Connector>> {
    config.validate()?;
    Ok(match config {
        SourceConfig::Imap(c) => Box::new(ImapConnector::new(c.clone())?),
        SourceConfig::Mbox(c) => Box::new(MboxConnector::new(c.clone())),
        SourceConfig::Maildir(c) => Box::new(MaildirConnector::new(c.clone())),
        SourceConfig::EmlFolder(c) => Box::new(EmlFolderConnector::new(c.clone())),
        SourceConfig::SlackExport(c) => Box::new(SlackExportConnector::new(c.clone())),
        SourceConfig::Csv(c) => Box::new(CsvConnector::new(c.clone())?),
        SourceConfig::Jsonl(c) => Box::new(JsonlConnector::new(c.clone())?),
        SourceConfig::Slack(c) => Box::new(SlackConnector::new(c.clone())?),
        SourceConfig::Zendesk(c) => Box::new(ZendeskConnector::new(c.clone())?),
        SourceConfig::Matrix(c) => Box::new(MatrixConnector::new(c.clone())?),
        SourceConfig::Mastodon(c) => Box::new(MastodonConnector::new(c.clone())?),
        SourceConfig::Hubspot(c) => Box::new(HubSpotConnector::new(c.clone())?),
        SourceConfig::X(c) => Box::new(XConnector::new(c.clone())?),
        SourceConfig::Rest(c) => Box::new(RestConnector::new(c.clone())?),
    })
}

/// Where a secret comes from. Errors name the variable, file or command —
/// never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// An environment variable.
    Env(String),
    /// A file: its first line, trailing newline removed.
    File(PathBuf),
    /// A shell command (`sh -c`): its standard output, trailing newline removed.
    Command(String),
}

/// A secret could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SecretError(pub String);

impl SecretRef {
    /// Pick at most one of `<key>_env`, `<key>_file`, `<key>_command`.
    pub fn pick(
        key: &str,
        env: &Option<String>,
        file: &Option<PathBuf>,
        command: &Option<String>,
    ) -> std::result::Result<Option<SecretRef>, String> {
        let n = [env.is_some(), file.is_some(), command.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if n > 1 {
            return Err(format!(
                "give only one of {key}_env, {key}_file, {key}_command"
            ));
        }
        Ok(env
            .clone()
            .map(SecretRef::Env)
            .or_else(|| file.clone().map(SecretRef::File))
            .or_else(|| command.clone().map(SecretRef::Command)))
    }

    /// Read the secret now.
    pub fn resolve(&self) -> std::result::Result<String, SecretError> {
        match self {
            SecretRef::Env(var) => std::env::var(var)
                .map_err(|_| SecretError(format!("environment variable {var} is not set"))),
            SecretRef::File(p) => std::fs::read_to_string(p)
                .map(|s| s.lines().next().unwrap_or_default().to_string())
                .map_err(|e| SecretError(format!("secret file {}: {e}", p.display()))),
            SecretRef::Command(cmd) => {
                let out = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|e| SecretError(format!("secret command {cmd:?}: {e}")))?;
                if !out.status.success() {
                    return Err(SecretError(format!(
                        "secret command {cmd:?} failed: {}",
                        out.status
                    )));
                }
                let s = String::from_utf8(out.stdout).map_err(|_| {
                    SecretError(format!("secret command {cmd:?} printed non-UTF-8"))
                })?;
                Ok(s.trim_end_matches(['\n', '\r']).to_string())
            }
        }
    }

    /// Where the secret comes from, for messages (`environment variable X`).
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Env(v) => format!("environment variable {v}"),
            SecretRef::File(p) => format!("file {}", p.display()),
            SecretRef::Command(c) => format!("command {c:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<SourceConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn every_type_parses_and_builds() {
        let cases = [
            r#"{"type":"imap","name":"m","host":"127.0.0.1","port":143,"tls":false,"username":"u","password_env":"X","folders":["INBOX"]}"#,
            r#"{"type":"mbox","name":"b","path":"/tmp/a.mbox"}"#,
            r#"{"type":"maildir","name":"d","path":"/tmp/md"}"#,
            r#"{"type":"eml_folder","name":"e","path":"/tmp/e"}"#,
            r#"{"type":"slack_export","name":"s","path":"/tmp/s"}"#,
            r#"{"type":"csv","name":"c","path":"/tmp/t.csv","id_column":"id","time_column":"created","customer_columns":["email:requester_email"],"kind":"ticket"}"#,
            r#"{"type":"jsonl","name":"j","path":"/tmp/t.jsonl","id_field":"id","customer_fields":["email:user.email"],"kind":"social_post"}"#,
            r#"{"type":"slack","name":"sl","token_env":"SLACK_TOKEN","channels":["support"],"http":{"requests_per_second":0.8}}"#,
            r#"{"type":"zendesk","name":"zd","subdomain":"example","email":"agent@example.org","api_token_env":"ZD_TOKEN"}"#,
            r##"{"type":"matrix","name":"mx","base_url":"https://matrix.example.org","access_token_env":"MX_TOKEN","rooms":["#support:example.org"],"customer_ids":{"@ana:example.org":"email:ana@example.org"}}"##,
            r#"{"type":"mastodon","name":"md","base_url":"https://mastodon.example","access_token_file":"/etc/custos/mastodon-token"}"#,
            r#"{"type":"hubspot","name":"hs","access_token_env":"HUBSPOT_TOKEN","object_types":["contacts","notes"]}"#,
            r#"{"type":"x","name":"xa","bearer_token_env":"X_TOKEN","user_id":"42"}"#,
            r#"{"type":"rest","name":"crm","base_url":"https://crm.example.org/api/","bearer_token_env":"CRM_TOKEN","endpoints":[{"collection":"interactions","path":"v1/interactions","records":"/data","id":"/id","updated_at":"/updated_at","customer_fields":["email:/customer/email"],"incremental_query":"updated_since={cursor}","pagination":{"style":"cursor","param":"cursor","cursor":"/meta/next_cursor"}}]}"#,
        ];
        let mut types = Vec::new();
        for c in cases {
            let cfg = parse(c).unwrap_or_else(|e| panic!("{c}: {e}"));
            types.push(cfg.source_type());
            let conn = build(&cfg).unwrap();
            assert_eq!(conn.name(), cfg.name());
        }
        assert_eq!(types, source_types());
    }

    #[test]
    fn http_sources_refuse_plain_secrets_and_ambiguous_auth() {
        assert!(parse(r#"{"type":"slack","name":"s","token":"xoxb-plain"}"#).is_err());
        let none = parse(r#"{"type":"slack","name":"s"}"#).unwrap();
        assert!(build(&none).is_err());
        let two = parse(r#"{"type":"zendesk","name":"z","subdomain":"x","email":"a@b","api_token_env":"A","oauth_token_env":"B"}"#).unwrap();
        assert!(build(&two)
            .err()
            .unwrap()
            .to_string()
            .contains("only one of"));
        let no_email =
            parse(r#"{"type":"zendesk","name":"z","subdomain":"x","api_token_env":"A"}"#).unwrap();
        assert!(build(&no_email).is_err());
        let oauth = parse(r#"{"type":"zendesk","name":"z","base_url":"https://x.zendesk.com","oauth2":{"token_url":"https://x.zendesk.com/oauth/tokens","client_id":"c","refresh_token_env":"R","token_file":"/var/lib/custos/zd-token"}}"#).unwrap();
        build(&oauth).unwrap();
        let bad_rate = parse(
            r#"{"type":"slack","name":"s","token_env":"T","http":{"requests_per_second":0}}"#,
        )
        .unwrap();
        assert!(build(&bad_rate).is_err());
    }

    #[test]
    fn unknown_keys_and_types_are_refused() {
        assert!(parse(r#"{"type":"mbox","name":"b","path":"/x","colour":"red"}"#).is_err());
        assert!(parse(r#"{"type":"fax","name":"b"}"#).is_err());
        assert!(parse(
            r#"{"type":"imap","name":"m","host":"h","username":"u","password":"plain"}"#
        )
        .is_err());
    }

    #[test]
    fn secrets_pick_one_and_name_their_source() {
        let two = parse(r#"{"type":"imap","name":"m","host":"h","username":"u","password_env":"A","password_file":"/f"}"#).unwrap();
        assert!(build(&two)
            .err()
            .unwrap()
            .to_string()
            .contains("only one of"));
        let none = parse(r#"{"type":"imap","name":"m","host":"h","username":"u"}"#).unwrap();
        assert!(build(&none).is_err());
        let e = SecretRef::Env("CUSTOS_SURELY_UNSET_VAR_42".into())
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("CUSTOS_SURELY_UNSET_VAR_42"));
        let c = SecretRef::Command("printf 'hunter2\\n'".into())
            .resolve()
            .unwrap();
        assert_eq!(c, "hunter2");
        let f = SecretRef::Command("exit 3".into()).resolve().unwrap_err();
        assert!(!f.to_string().contains("hunter2"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\nsecond line\n").unwrap();
        assert_eq!(SecretRef::File(p).resolve().unwrap(), "s3cret");
    }
}
