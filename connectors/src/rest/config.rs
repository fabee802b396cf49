//! `type = "rest"` configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::http::{HttpOptions, OAuth2Config};

/// A generic REST/JSON API (an in-house CRM). Authentication: a bearer
/// token (`bearer_token_*`), HTTP basic (`username` + `password_*`), an
/// `[source.oauth2]` table, or none. Every JSON location is a JSON pointer
/// (RFC 6901, `/data/0/id`; `""` is the whole body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// API root; endpoint paths are relative to it.
    pub base_url: String,
    /// Bearer token from this environment variable.
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// Bearer token from the first line of this file.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// Bearer token from this shell command's standard output.
    #[serde(default)]
    pub bearer_token_command: Option<String>,
    /// User name for HTTP basic authentication (with `password_*`).
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password from this environment variable.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Basic-auth password from the first line of this file.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Basic-auth password from this shell command's standard output.
    #[serde(default)]
    pub password_command: Option<String>,
    /// OAuth2 (client credentials or refresh token, refreshed on 401).
    #[serde(default)]
    pub oauth2: Option<Box<OAuth2Config>>,
    /// Record kind of every endpoint that sets none (`crm_activity`,
    /// `ticket`, `contact`, or any other name); default `crm_activity`.
    #[serde(default)]
    pub kind: Option<String>,
    /// System name in `crm:` customer ids (`crm:<crm_name>:<value>`);
    /// default the source name.
    #[serde(default)]
    pub crm_name: Option<String>,
    /// The listings to back up, one collection each (`[[source.endpoints]]`).
    pub endpoints: Vec<RestEndpoint>,
    /// Rate limit, retries, timeouts (default 5 requests/s).
    #[serde(default)]
    pub http: Option<HttpOptions>,
}

/// One listing endpoint of a [`RestConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestEndpoint {
    /// Collection id (`[A-Za-z0-9._-]`), unique within the source.
    pub collection: String,
    /// Path relative to `base_url` (`v1/interactions`).
    pub path: String,
    /// Fixed query parameters sent with every request.
    #[serde(default)]
    pub query: Option<BTreeMap<String, String>>,
    /// JSON pointer of the record array in a page (`/data`; `""`: the body
    /// is the array).
    pub records: String,
    /// JSON pointer of a record's id inside the record (`/id`).
    pub id: String,
    /// JSON pointer of the record's last-update time (RFC 3339 or Unix
    /// seconds/milliseconds); needed with `incremental_query`.
    #[serde(default)]
    pub updated_at: Option<String>,
    /// JSON pointer of the record's creation time.
    #[serde(default)]
    pub created_at: Option<String>,
    /// JSON pointer of a subject / title.
    #[serde(default)]
    pub subject: Option<String>,
    /// JSON pointer of a plain-text body.
    #[serde(default)]
    pub text: Option<String>,
    /// JSON pointer of the record's jurisdiction (an ISO 3166 code such as
    /// `DE`, or `EU`), matched by `[record_retention]` rules; a record
    /// without it gets the source's `jurisdiction`, if any.
    #[serde(default)]
    pub jurisdiction: Option<String>,
    /// Typed customer fields `TYPE:POINTER`, TYPE one of `email`, `phone`,
    /// `crm` (`["email:/customer/email", "crm:/customer/id"]`); a pointer
    /// to an array takes every element.
    #[serde(default)]
    pub customer_fields: Vec<String>,
    /// Query parameter for incremental syncs, `NAME={cursor}`
    /// (`updated_since={cursor}`); `{cursor}` is the highest `updated_at`
    /// value seen, as the API sent it. Without it every sync is a full
    /// listing (which also reports deletions).
    #[serde(default)]
    pub incremental_query: Option<String>,
    /// Record kind of this endpoint; default the source's `kind`.
    #[serde(default)]
    pub kind: Option<String>,
    /// How pages follow each other; default a single page.
    #[serde(default)]
    pub pagination: Option<RestPagination>,
}

/// Pagination of a [`RestEndpoint`], by `style`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "style", rename_all = "snake_case", deny_unknown_fields)]
pub enum RestPagination {
    /// A cursor in the body goes into a query parameter of the next request.
    Cursor {
        /// Query parameter of the next request (`cursor`).
        param: String,
        /// JSON pointer of the next cursor in a page (`/meta/next_cursor`);
        /// empty or missing: last page.
        cursor: String,
    },
    /// RFC 8288 `Link: <…>; rel="next"` headers.
    Link,
    /// Offset and limit query parameters; a short page is the last.
    Offset {
        /// Offset parameter; default `offset`.
        #[serde(default)]
        offset_param: Option<String>,
        /// Limit parameter; default `limit`.
        #[serde(default)]
        limit_param: Option<String>,
        /// Page size; default 100.
        #[serde(default)]
        limit: Option<u64>,
    },
    /// The next page's URL in the body.
    NextUrl {
        /// JSON pointer of the next URL (`/links/next`); null: last page.
        next: String,
        /// JSON pointer of a "more pages" boolean, when the API has one.
        #[serde(default)]
        has_more: Option<String>,
    },
}
