//! An in-process HTTP/1.1 mock server on 127.0.0.1:0 for the connector
//! tests (hyper 1). The handler sees each request and returns the answer;
//! every request is logged (method, path, query) for request counting; an
//! optional latency delays every answer. The e2e suite includes this file by
//! path (it names only external crates).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// One request as the handler sees it.
#[derive(Debug, Clone, Default)]
pub struct MockRequest {
    pub method: String,
    pub path: String,
    /// Query pairs (the last value of a repeated name wins).
    pub query: BTreeMap<String, String>,
    /// Lower-case header names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl MockRequest {
    pub fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(|s| s.as_str())
    }

    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).map(|s| s.as_str())
    }

    /// The urlencoded form body.
    pub fn form(&self) -> BTreeMap<String, String> {
        reqwest::Url::parse(&format!(
            "http://x/?{}",
            String::from_utf8_lossy(&self.body)
        ))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
    }
}

/// The answer.
#[derive(Debug, Clone)]
pub struct MockResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl MockResponse {
    pub fn json(status: u16, v: &serde_json::Value) -> MockResponse {
        MockResponse::raw(status, "application/json", v.to_string().into_bytes())
    }

    pub fn raw(status: u16, content_type: &str, body: Vec<u8>) -> MockResponse {
        MockResponse {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body,
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> MockResponse {
        self.headers.push((k.into(), v.into()));
        self
    }
}

type Handler = dyn Fn(&MockRequest) -> MockResponse + Send + Sync;

/// The running server; stops when dropped.
pub struct MockServer {
    pub addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<MockRequest>>>,
    /// Microseconds every answer waits before the handler runs.
    latency_us: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockServer {
    pub async fn start(
        handler: impl Fn(&MockRequest) -> MockResponse + Send + Sync + 'static,
    ) -> MockServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Arc<Mutex<Vec<MockRequest>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let log2 = log.clone();
        let latency_us: Arc<AtomicU64> = Arc::default();
        let latency2 = latency_us.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let log = log2.clone();
                let latency = latency2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        let log = log.clone();
                        let latency = latency.clone();
                        async move {
                            let wait = latency.load(Ordering::Relaxed);
                            if wait > 0 {
                                tokio::time::sleep(Duration::from_micros(wait)).await;
                            }
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let query = parts
                                .uri
                                .query()
                                .map(|q| {
                                    reqwest::Url::parse(&format!("http://x/?{q}"))
                                        .map(|u| u.query_pairs().into_owned().collect())
                                        .unwrap_or_default()
                                })
                                .unwrap_or_default();
                            let mr = MockRequest {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_string(),
                                query,
                                headers: parts
                                    .headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.as_str().to_ascii_lowercase(),
                                            v.to_str().unwrap_or_default().to_string(),
                                        )
                                    })
                                    .collect(),
                                body,
                            };
                            let resp = handler(&mr);
                            log.lock().unwrap().push(mr);
                            let mut b = hyper::Response::builder().status(resp.status);
                            for (k, v) in &resp.headers {
                                b = b.header(k, v);
                            }
                            Ok::<_, Infallible>(b.body(Full::new(Bytes::from(resp.body))).unwrap())
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        MockServer {
            addr,
            log,
            latency_us,
            task,
        }
    }

    /// Delay every later answer by `d` (a slow API).
    pub fn set_latency(&self, d: Duration) {
        self.latency_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<MockRequest> {
        self.log.lock().unwrap().clone()
    }

    /// Requests to `path` so far.
    pub fn count(&self, path: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}
