//! Pagination: a [`Pager`] walks the pages of one listing, in one of four
//! styles ([`PageStyle`]). Each page is fetched through the client (retries,
//! rate limit, auth); a style that would fetch the same page twice (a server
//! repeating its cursor) stops with a `Malformed` error instead of looping.

use reqwest::header::HeaderMap;
use reqwest::Url;
use serde_json::Value;

use super::{json_path, HttpClient, HttpError, JsonResponse, RequestSpec};

/// How a listing says where the next page is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageStyle {
    /// A cursor in the body (`response_metadata.next_cursor`) goes into the
    /// query parameter `param` of the next request; empty or missing: done.
    CursorField {
        /// Query parameter (`cursor`).
        param: String,
        /// Dotted JSON path of the next cursor.
        path: String,
    },
    /// RFC 8288 `Link: <https://…>; rel="next"` header; none: done.
    LinkHeader,
    /// `offset`/`limit` parameters; a page with fewer than `limit` items
    /// (at the dotted path `items`) is the last.
    Offset {
        /// Offset query parameter (`offset`).
        offset_param: String,
        /// Limit query parameter (`limit`).
        limit_param: String,
        /// Page size.
        limit: u64,
        /// Dotted JSON path of the page's item array (empty: the body).
        items: String,
    },
    /// The next page's full URL in the body (`links.next`, `next_page`);
    /// null or missing: done. With `has_more`, a false value there ends
    /// the listing too (Zendesk cursor pagination).
    NextUrl {
        /// Dotted JSON path of the next URL.
        path: String,
        /// Dotted JSON path of a "more pages" boolean.
        has_more: Option<String>,
    },
}

/// Walks one listing.
#[derive(Debug)]
pub struct Pager {
    style: PageStyle,
    next: Option<RequestSpec>,
    offset: u64,
    seen: std::collections::HashSet<String>,
    /// Pages fetched so far.
    pub pages: usize,
}

impl Pager {
    /// Start with `first` (carrying the first page's parameters).
    pub fn new(style: PageStyle, first: RequestSpec) -> Pager {
        let mut first = first;
        let mut offset = 0;
        if let PageStyle::Offset {
            offset_param,
            limit_param,
            limit,
            ..
        } = &style
        {
            offset = first
                .query
                .iter()
                .find(|(k, _)| k == offset_param)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            first.set_query(offset_param, offset.to_string());
            first.set_query(limit_param, limit.to_string());
        }
        Pager {
            style,
            next: Some(first),
            offset,
            seen: Default::default(),
            pages: 0,
        }
    }

    /// The next page, or `None` when the listing is done.
    pub async fn next_page(
        &mut self,
        http: &HttpClient,
    ) -> Result<Option<JsonResponse>, HttpError> {
        let Some(spec) = self.next.take() else {
            return Ok(None);
        };
        let key = format!("{}?{:?}", spec.url, spec.query);
        if !self.seen.insert(key) {
            return Err(HttpError::Malformed {
                endpoint: spec.endpoint(),
                path: "$".into(),
                detail: format!(
                    "the server sent the same next page again after {} pages",
                    self.pages
                ),
            });
        }
        let page = http.json(&spec).await?;
        self.pages += 1;
        self.next = self.follow(http, &spec, &page)?;
        Ok(Some(page))
    }

    fn follow(
        &mut self,
        http: &HttpClient,
        spec: &RequestSpec,
        page: &JsonResponse,
    ) -> Result<Option<RequestSpec>, HttpError> {
        let str_at = |p: &str| -> Option<String> {
            json_path(&page.value, p)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(|s| s.to_string())
        };
        Ok(match &self.style {
            PageStyle::CursorField { param, path } => str_at(path).map(|c| {
                let mut n = spec.clone();
                n.set_query(param, c);
                n
            }),
            PageStyle::LinkHeader => match next_link(&page.headers) {
                Some(u) => Some(same_request(spec, resolve(http, &spec.url, &u)?)),
                None => None,
            },
            PageStyle::Offset {
                offset_param,
                limit,
                items,
                ..
            } => {
                let n = match json_path(&page.value, items) {
                    Some(Value::Array(a)) => a.len() as u64,
                    _ => {
                        return Err(HttpError::Malformed {
                            endpoint: spec.endpoint(),
                            path: format!("$.{items}"),
                            detail: "missing or not an array".into(),
                        })
                    }
                };
                if n < *limit || n == 0 {
                    None
                } else {
                    self.offset += n;
                    let mut s = spec.clone();
                    s.set_query(offset_param, self.offset.to_string());
                    Some(s)
                }
            }
            PageStyle::NextUrl { path, has_more } => {
                let more = has_more
                    .as_deref()
                    .map(|h| json_path(&page.value, h).and_then(|v| v.as_bool()) == Some(true))
                    .unwrap_or(true);
                match str_at(path).filter(|_| more) {
                    Some(u) => Some(same_request(spec, resolve(http, &spec.url, &u)?)),
                    None => None,
                }
            }
        })
    }
}

fn resolve(http: &HttpClient, current: &Url, next: &str) -> Result<Url, HttpError> {
    if next.starts_with("http://") || next.starts_with("https://") {
        return http.url(next);
    }
    current.join(next).map_err(|e| HttpError::Malformed {
        endpoint: format!("GET {}", current.path()),
        path: "next page link".into(),
        detail: e.to_string(),
    })
}

/// The next page's request: the new URL carries every parameter.
fn same_request(spec: &RequestSpec, url: Url) -> RequestSpec {
    let mut n = spec.clone();
    n.url = url;
    n.query.clear();
    n
}

/// The `rel="next"` target of `Link` headers.
pub fn next_link(headers: &HeaderMap) -> Option<String> {
    rel_link(headers, "next")
}

/// The target of the `Link` header entry with relation `rel` (`next`,
/// `prev`; Mastodon pages newer items through `rel="prev"`).
pub fn rel_link(headers: &HeaderMap, rel: &str) -> Option<String> {
    for v in headers.get_all(reqwest::header::LINK) {
        let Ok(s) = v.to_str() else { continue };
        for part in s.split(',') {
            let mut segs = part.split(';');
            let target = segs.next()?.trim();
            let Some(url) = target.strip_prefix('<').and_then(|t| t.strip_suffix('>')) else {
                continue;
            };
            let is_next = segs.any(|p| {
                let p = p.trim();
                p.strip_prefix("rel=")
                    .map(|r| {
                        r.trim_matches('"')
                            .split_ascii_whitespace()
                            .any(|r| r.eq_ignore_ascii_case(rel))
                    })
                    .unwrap_or(false)
            });
            if is_next {
                return Some(url.to_string());
            }
        }
    }
    None
}
