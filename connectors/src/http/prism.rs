//! Optional contract checks against a Stoplight Prism mock of a vendor's
//! OpenAPI spec (`scripts/contract-check.sh`). A connector under test talks
//! to [`PrismProxy`], an in-process HTTP/1.1 proxy on 127.0.0.1:0 that
//! forwards every request to Prism and records Prism's verdict: the status
//! and the request violations of its `sl-violations` header (Prism answers
//! 422, or 400/401/404/405, to a request its spec refuses, and lists the
//! violations located in `request`; violations located in `response` are
//! the spec's own examples disagreeing with its schemas and are ignored).
//! Every request is judged, including ones whose failure a connector
//! tolerates (e.g. Slack's `users.list`). An optional rewrite hook adjusts
//! Prism's static answers so a sync walks every endpoint (e.g. ends a
//! cursor walk after its second page, or marks a message as a thread).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// One request and Prism's verdict on it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Query pairs, decoded, in order.
    pub query: Vec<(String, String)>,
    pub status: u16,
    /// `sl-violations` entries located in the request.
    pub violations: Vec<String>,
}

impl Exchange {
    /// Whether Prism refused the request.
    pub fn refused(&self) -> bool {
        !self.violations.is_empty() || matches!(self.status, 400 | 401 | 403 | 404 | 405 | 422)
    }

    pub fn has(&self, k: &str) -> bool {
        self.query.iter().any(|(n, _)| n == k)
    }
}

/// Prism's answer to an accepted request, as the rewrite hook may change it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

/// Adjusts Prism's answer (with a JSON body) to an accepted request before
/// the connector sees it.
pub type Rewrite = dyn Fn(&Exchange, &mut Answer) + Send + Sync;

/// The running proxy; stops when dropped.
pub struct PrismProxy {
    addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<Exchange>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PrismProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    strip: &str,
    rewrite: &Rewrite,
    req: hyper::Request<hyper::body::Incoming>,
) -> (Exchange, hyper::Response<Full<Bytes>>) {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let pq = pq.strip_prefix(strip).unwrap_or(&pq);
    let url = format!("{}{pq}", upstream.trim_end_matches('/'));
    let mut rb = client.request(parts.method.clone(), &url).body(body);
    for (k, v) in &parts.headers {
        if k != hyper::header::HOST {
            rb = rb.header(k, v);
        }
    }
    let query = reqwest::Url::parse(&url)
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default();
    let mut ex = Exchange {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query,
        status: 502,
        violations: Vec::new(),
    };
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => {
            ex.violations.push(format!("Prism unreachable: {e}"));
            let r = hyper::Response::builder()
                .status(502)
                .body(Full::new(Bytes::new()))
                .unwrap();
            return (ex, r);
        }
    };
    ex.status = resp.status().as_u16();
    let mut headers: Vec<(String, String)> = Vec::new();
    for (k, v) in resp.headers() {
        let v = v.to_str().unwrap_or_default().to_string();
        if k == "sl-violations" {
            ex.violations.extend(request_violations(&v));
        }
        if !matches!(
            k.as_str(),
            "content-length" | "transfer-encoding" | "connection" | "keep-alive"
        ) {
            headers.push((k.to_string(), v));
        }
    }
    let mut bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    let mut status = ex.status;
    if let Ok(body) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        if !ex.refused() {
            let mut a = Answer {
                status,
                headers,
                body,
            };
            rewrite(&ex, &mut a);
            (status, headers, bytes) = (a.status, a.headers, a.body.to_string().into_bytes());
        }
    }
    let mut b = hyper::Response::builder().status(status);
    for (k, v) in &headers {
        b = b.header(k, v);
    }
    (ex, b.body(Full::new(Bytes::from(bytes))).unwrap())
}

/// The entries of an `sl-violations` header located in the request. Prism
/// prefixes a long list with `Too many violations! ` and may cut it short,
/// so a list that does not parse is searched for request locations.
fn request_violations(header: &str) -> Vec<String> {
    let list = header.trim_start_matches("Too many violations! ");
    match serde_json::from_str::<Vec<serde_json::Value>>(list) {
        Ok(list) => list
            .into_iter()
            .filter(|x| x.pointer("/location/0").and_then(|l| l.as_str()) != Some("response"))
            .map(|x| x.to_string())
            .collect(),
        Err(_) if header.contains(r#""location":["request""#) => vec![header.to_string()],
        Err(_) => Vec::new(),
    }
}

impl PrismProxy {
    /// A proxy to the Prism mock at `upstream` (`http://127.0.0.1:PORT`).
    pub async fn start(
        upstream: &str,
        rewrite: impl Fn(&Exchange, &mut Answer) + Send + Sync + 'static,
    ) -> PrismProxy {
        PrismProxy::start_under(upstream, "", rewrite).await
    }

    /// Like [`PrismProxy::start`], forwarding paths without the leading
    /// `strip` (a spec whose server URL has a base path Prism ignores, e.g.
    /// Matrix's `/_matrix/client/v3`); [`Exchange::path`] keeps it.
    pub async fn start_under(
        upstream: &str,
        strip: &str,
        rewrite: impl Fn(&Exchange, &mut Answer) + Send + Sync + 'static,
    ) -> PrismProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Arc<Mutex<Vec<Exchange>>> = Arc::default();
        let rewrite: Arc<Rewrite> = Arc::new(rewrite);
        let client = reqwest::Client::new();
        let upstream = upstream.to_string();
        let strip = strip.to_string();
        let log2 = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (rewrite, client, upstream, strip, log) = (
                    rewrite.clone(),
                    client.clone(),
                    upstream.clone(),
                    strip.clone(),
                    log2.clone(),
                );
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (rewrite, client, upstream, strip, log) = (
                            rewrite.clone(),
                            client.clone(),
                            upstream.clone(),
                            strip.clone(),
                            log.clone(),
                        );
                        async move {
                            let (ex, resp) =
                                forward(&client, &upstream, &strip, &*rewrite, req).await;
                            log.lock().unwrap().push(ex);
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        PrismProxy { addr, log, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.log.lock().unwrap().clone()
    }

    /// Panics unless every request passed Prism's validation and each of
    /// `paths` (path suffixes, e.g. `conversations.history`) was requested
    /// at least once with the query names given (`("conversations.history",
    /// &["cursor"])` = some request of it carried a `cursor`).
    pub fn assert_valid(&self, label: &str, paths: &[(&str, &[&str])]) {
        let all = self.exchanges();
        for e in &all {
            println!(
                "prism {label}: {} {} {:?} -> {} {:?}",
                e.method, e.path, e.query, e.status, e.violations
            );
        }
        let refused: Vec<String> = all
            .iter()
            .filter(|e| e.refused())
            .map(|e| {
                format!(
                    "{} {} {:?}: HTTP {} {}",
                    e.method,
                    e.path,
                    e.query,
                    e.status,
                    e.violations.join("; ")
                )
            })
            .collect();
        assert!(
            refused.is_empty(),
            "{label}: Prism refused {} of {} requests:\n{}",
            refused.len(),
            all.len(),
            refused.join("\n")
        );
        for (p, names) in paths {
            assert!(
                all.iter()
                    .any(|e| e.path.ends_with(p) && names.iter().all(|n| e.has(n))),
                "{label}: no request to {p} with {names:?} was made (the check did not cover it)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_violations_are_told_from_response_ones() {
        let resp = r#"[{"location":["response","body"],"severity":"Error","code":"required","message":"x"}]"#;
        assert!(request_violations(resp).is_empty());
        let req = r#"[{"location":["request","query","oldest"],"severity":"Error","code":"type","message":"Request query parameter oldest must be number"},{"location":["response","body"],"severity":"Error"}]"#;
        let v = request_violations(req);
        assert_eq!(v.len(), 1);
        assert!(v[0].contains("oldest must be number"), "{v:?}");
        // Prism's long lists: prefixed and cut short.
        let long = r#"Too many violations! [{"location":["response","body","0"],"severity":"Error"},{"loca"#;
        assert!(request_violations(long).is_empty());
        let long =
            r#"Too many violations! [{"location":["request","path"],"severity":"Error"},{"loca"#;
        assert_eq!(request_violations(long).len(), 1);
        let ex = Exchange {
            method: "GET".into(),
            path: "/x".into(),
            query: vec![],
            status: 422,
            violations: vec![],
        };
        assert!(ex.refused());
        assert!(!Exchange { status: 200, ..ex }.refused());
    }
}
