//! Authentication: bearer token, HTTP basic, OAuth2 (client credentials or
//! refresh token) with automatic refresh.
//!
//! Secrets are resolved once per client, on first use, and never logged or
//! put in error messages (those name where a secret comes from). A refresh
//! token the server rotates is written to the configured `token_file`
//! atomically (temporary file in the same folder, mode 0600, fsync, rename),
//! and read back from it on the next start, so a rotation survives restarts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OnceCell};

use super::{HttpClient, HttpError, RequestSpec};
use crate::SecretRef;

/// A secret value: from a [`SecretRef`] (resolved once, lazily) or given.
pub struct Secret {
    source: Option<SecretRef>,
    value: OnceCell<String>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(s) => write!(f, "Secret({})", s.describe()),
            None => f.write_str("Secret(<given>)"),
        }
    }
}

impl Secret {
    /// A secret read from `r` when first needed.
    pub fn from_ref(r: SecretRef) -> Secret {
        Secret {
            source: Some(r),
            value: OnceCell::new(),
        }
    }

    /// A secret given as a value (tests, tokens from a token file).
    pub fn value(v: impl Into<String>) -> Secret {
        Secret {
            source: None,
            value: OnceCell::new_with(Some(v.into())),
        }
    }

    /// The value (read now if not yet read).
    pub fn get(&self) -> Result<&str, HttpError> {
        if let Some(v) = self.value.get() {
            return Ok(v);
        }
        let r = self.source.as_ref().expect("an unset secret has a source");
        let v = r.resolve().map_err(|e| HttpError::Auth {
            endpoint: "credentials".into(),
            detail: e.to_string(),
        })?;
        let _ = self.value.set(v);
        Ok(self.value.get().expect("just set"))
    }
}

/// How requests authenticate.
#[derive(Debug)]
pub enum Auth {
    /// No credentials.
    None,
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// `Authorization: Basic base64(user:password)`.
    Basic {
        /// User name (Zendesk API tokens: `agent@example.org/token`).
        username: String,
        /// Password or API token.
        password: Secret,
    },
    /// OAuth2 access tokens, fetched and refreshed automatically.
    OAuth2(Box<OAuth2>),
}

/// The `[source.oauth2]` table of an HTTP connector.
///
/// With a refresh token (`refresh_token_*` or an existing `token_file`) the
/// refresh-token grant is used, otherwise client credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    /// The token endpoint (`https://example.zendesk.com/oauth/tokens`).
    pub token_url: String,
    /// The OAuth client id.
    pub client_id: String,
    /// Client secret from this environment variable.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// Client secret from the first line of this file.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Client secret from this shell command's standard output.
    #[serde(default)]
    pub client_secret_command: Option<String>,
    /// Initial refresh token from this environment variable.
    #[serde(default)]
    pub refresh_token_env: Option<String>,
    /// Initial refresh token from the first line of this file.
    #[serde(default)]
    pub refresh_token_file: Option<PathBuf>,
    /// Initial refresh token from this shell command's standard output.
    #[serde(default)]
    pub refresh_token_command: Option<String>,
    /// Where a rotated refresh token is saved (mode 0600, written
    /// atomically); when it exists it is preferred over `refresh_token_*`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Space-separated scopes to request (`read`).
    #[serde(default)]
    pub scope: Option<String>,
}

impl OAuth2Config {
    /// Check the secret keys (at most one source each).
    pub fn validate(&self) -> Result<(), String> {
        SecretRef::pick(
            "client_secret",
            &self.client_secret_env,
            &self.client_secret_file,
            &self.client_secret_command,
        )?;
        SecretRef::pick(
            "refresh_token",
            &self.refresh_token_env,
            &self.refresh_token_file,
            &self.refresh_token_command,
        )?;
        if self.token_url.trim().is_empty() || self.client_id.trim().is_empty() {
            return Err("oauth2 needs token_url and client_id".into());
        }
        Ok(())
    }

    /// The OAuth2 state for this configuration (nothing is read yet).
    pub fn build(&self) -> Result<Box<OAuth2>, String> {
        self.validate()?;
        let secret = SecretRef::pick(
            "client_secret",
            &self.client_secret_env,
            &self.client_secret_file,
            &self.client_secret_command,
        )?
        .map(Secret::from_ref);
        let refresh = SecretRef::pick(
            "refresh_token",
            &self.refresh_token_env,
            &self.refresh_token_file,
            &self.refresh_token_command,
        )?
        .map(Secret::from_ref);
        Ok(Box::new(OAuth2 {
            token_url: self.token_url.clone(),
            client_id: self.client_id.clone(),
            client_secret: secret,
            initial_refresh: refresh,
            token_file: self.token_file.clone(),
            scope: self.scope.clone(),
            state: Mutex::new(TokenState::default()),
        }))
    }
}

#[derive(Default)]
struct TokenState {
    access: Option<String>,
    expires: Option<Instant>,
    refresh: Option<String>,
    /// Bumped at every new access token; a 401 answer to an older
    /// generation does not refresh again.
    generation: u64,
}

/// OAuth2 token state (one per client).
pub struct OAuth2 {
    token_url: String,
    client_id: String,
    client_secret: Option<Secret>,
    initial_refresh: Option<Secret>,
    token_file: Option<PathBuf>,
    scope: Option<String>,
    state: Mutex<TokenState>,
}

impl std::fmt::Debug for OAuth2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<String>,
}

impl OAuth2 {
    /// `(Authorization value, generation)`; fetches a token when there is
    /// none or it expires within 30 s.
    pub(super) async fn header(&self, http: &HttpClient) -> Result<(String, u64), HttpError> {
        let mut st = self.state.lock().await;
        let fresh = st.access.is_some()
            && st
                .expires
                .is_none_or(|e| e > Instant::now() + Duration::from_secs(30));
        if !fresh {
            self.fetch(http, &mut st).await?;
        }
        Ok((
            format!("Bearer {}", st.access.as_deref().unwrap_or_default()),
            st.generation,
        ))
    }

    /// The server refused the token of `generation`: get a new one (unless
    /// another request already did).
    pub(super) async fn refresh(
        &self,
        http: &HttpClient,
        generation: u64,
    ) -> Result<(), HttpError> {
        let mut st = self.state.lock().await;
        if st.generation != generation && st.access.is_some() {
            return Ok(());
        }
        st.access = None;
        self.fetch(http, &mut st).await
    }

    async fn fetch(&self, http: &HttpClient, st: &mut TokenState) -> Result<(), HttpError> {
        let endpoint_url = reqwest::Url::parse(&self.token_url).map_err(|e| HttpError::Config {
            detail: format!("oauth2 token_url: {e}"),
        })?;
        if st.refresh.is_none() {
            st.refresh = match self.token_file.as_deref().and_then(read_token_file) {
                Some(t) => Some(t),
                None => match &self.initial_refresh {
                    Some(s) => Some(s.get()?.to_string()),
                    None => None,
                },
            };
        }
        let mut form: Vec<(String, String)> = Vec::new();
        match &st.refresh {
            Some(rt) => {
                form.push(("grant_type".into(), "refresh_token".into()));
                form.push(("refresh_token".into(), rt.clone()));
            }
            None => form.push(("grant_type".into(), "client_credentials".into())),
        }
        form.push(("client_id".into(), self.client_id.clone()));
        if let Some(s) = &self.client_secret {
            form.push(("client_secret".into(), s.get()?.to_string()));
        }
        if let Some(scope) = &self.scope {
            form.push(("scope".into(), scope.clone()));
        }
        let spec = RequestSpec::new(reqwest::Method::POST, endpoint_url)
            .form(form)
            .without_auth();
        let endpoint = spec.endpoint();
        let resp = match Box::pin(http.execute_bytes(&spec)).await {
            Ok(r) => r,
            Err(HttpError::Status { status, detail, .. }) if (400..500).contains(&status) => {
                return Err(HttpError::Auth {
                    endpoint,
                    detail: format!("token refresh refused: HTTP {status}{detail}"),
                })
            }
            Err(HttpError::Auth { detail, .. }) => {
                return Err(HttpError::Auth {
                    endpoint,
                    detail: format!("token refresh refused: {detail}"),
                })
            }
            Err(e) => return Err(e),
        };
        let ans: TokenAnswer =
            serde_json::from_slice(&resp.body).map_err(|e| HttpError::Malformed {
                endpoint: endpoint.clone(),
                path: "$.access_token".into(),
                detail: e.to_string(),
            })?;
        if let Some(new_rt) = ans.refresh_token {
            if st.refresh.as_deref() != Some(new_rt.as_str()) {
                if let Some(path) = &self.token_file {
                    write_token_file(path, &new_rt).map_err(|e| HttpError::Config {
                        detail: format!(
                            "saving the rotated refresh token to {}: {e}",
                            path.display()
                        ),
                    })?;
                    tracing::info!(token_file = %path.display(), "oauth2: rotated refresh token saved");
                } else {
                    tracing::warn!(
                        "oauth2: the server rotated the refresh token but no token_file is configured; the next start uses the old one"
                    );
                }
                st.refresh = Some(new_rt);
            }
        }
        st.access = Some(ans.access_token);
        st.expires = ans
            .expires_in
            .map(|s| Instant::now() + Duration::from_secs(s));
        st.generation += 1;
        tracing::debug!(endpoint = %endpoint, generation = st.generation, "oauth2: new access token");
        Ok(())
    }
}

fn read_token_file(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let t = s.lines().next().unwrap_or_default().trim().to_string();
    (!t.is_empty()).then_some(t)
}

/// Write `token` + newline to `path` atomically with mode 0600.
pub fn write_token_file(path: &Path, token: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".custos-token-")
        .tempfile_in(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    tmp.write_all(token.as_bytes())?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

impl Auth {
    /// The `Authorization` header value and the token generation (OAuth2).
    pub(super) async fn header(
        &self,
        http: &HttpClient,
    ) -> Result<Option<(String, u64)>, HttpError> {
        Ok(match self {
            Auth::None => None,
            Auth::Bearer(t) => Some((format!("Bearer {}", t.get()?), 0)),
            Auth::Basic { username, password } => {
                let raw = format!("{username}:{}", password.get()?);
                Some((
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(raw)
                    ),
                    0,
                ))
            }
            Auth::OAuth2(o) => Some(o.header(http).await?),
        })
    }
}

/// The usual choice of an API source: a bearer token from `<key>_env`,
/// `<key>_file` or `<key>_command`, or an `oauth2` table — exactly one.
pub fn token_or_oauth2(
    key: &str,
    env: &Option<String>,
    file: &Option<PathBuf>,
    command: &Option<String>,
    oauth2: Option<&OAuth2Config>,
) -> Result<Auth, String> {
    let token = SecretRef::pick(key, env, file, command)?;
    match (token, oauth2) {
        (Some(t), None) => Ok(Auth::Bearer(Secret::from_ref(t))),
        (None, Some(o)) => Ok(Auth::OAuth2(o.build()?)),
        (None, None) => Err(format!(
            "give {key}_env, {key}_file, {key}_command or an oauth2 table"
        )),
        (Some(_), Some(_)) => Err(format!("give only one of {key}_*, oauth2")),
    }
}
