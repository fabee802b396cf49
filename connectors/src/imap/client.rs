//! The IMAP wire side: connection (plaintext or TLS), login, and the few
//! commands the connector needs, with responses read in our own loop so that
//! CONDSTORE/QRESYNC data (MODSEQ, VANISHED) is never dropped.

use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_imap::imap_proto::{
    AttributeValue, MailboxDatum, NameAttribute, RequestId, Response, ResponseCode, Status,
};
use async_imap::{Client, Session};
use base64::Engine as _;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

use super::ImapConfig;
use crate::{ConnectorError, Result};

/// Plain TCP or TLS.
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A folder as LIST shows it.
#[derive(Debug, Clone)]
pub(crate) struct Folder {
    /// Name on the wire (modified UTF-7).
    pub wire: String,
    /// Decoded display name.
    pub name: String,
}

/// What EXAMINE/SELECT reported.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SelectInfo {
    pub uidvalidity: Option<u32>,
    pub uidnext: Option<u32>,
    pub highestmodseq: Option<u64>,
    pub exists: u32,
}

/// One FETCH response, owned.
#[derive(Debug, Default)]
pub(crate) struct FetchItem {
    pub uid: Option<u32>,
    pub flags: Option<Vec<String>>,
    pub internal_date: Option<String>,
    pub modseq: Option<u64>,
    /// RFC822.SIZE.
    pub size: Option<u64>,
    pub body: Option<Vec<u8>>,
}

/// One event of a running command.
#[derive(Debug)]
pub(crate) enum Event {
    Fetch(FetchItem),
    Vanished(Vec<RangeInclusive<u32>>),
    Search(Vec<u32>),
}

/// A logged-in session.
pub(crate) struct Conn {
    pub session: Session<Stream>,
    pub condstore: bool,
    pub qresync: bool,
    pub source: String,
    pub timeout: Duration,
    /// The selected folder (wire name) and whether it was opened read-only.
    pub selected: Option<(String, bool)>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("source", &self.source)
            .field("condstore", &self.condstore)
            .field("qresync", &self.qresync)
            .finish()
    }
}

fn unavailable(source: &str, detail: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::Unavailable {
        source_name: source.to_string(),
        detail: detail.to_string(),
    }
}

fn tls_config() -> std::result::Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(format!(
            "no trusted root certificates found on this system ({} errors)",
            native.errors.len()
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Quote a string as an IMAP quoted string (names are ASCII after mUTF-7).
pub(crate) fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// Connect and log in. Refused credentials → `ConnectorError::Auth`.
pub(crate) async fn connect(cfg: &ImapConfig, password: &str) -> Result<Conn> {
    let source = cfg.name.clone();
    let timeout = Duration::from_secs(cfg.timeout_secs.unwrap_or(120).max(1));
    let addr = format!("{}:{}", cfg.host, cfg.effective_port());
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| unavailable(&source, format!("IMAP {addr}: connect timed out")))?
        .map_err(|e| unavailable(&source, format!("IMAP {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let stream = if cfg.tls {
        let tls = tls_config().map_err(|e| unavailable(&source, format!("TLS: {e}")))?;
        let server_name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
            .map_err(|e| unavailable(&source, format!("TLS server name {}: {e}", cfg.host)))?;
        let s = tokio::time::timeout(
            timeout,
            tokio_rustls::TlsConnector::from(tls).connect(server_name, tcp),
        )
        .await
        .map_err(|_| unavailable(&source, format!("IMAP {addr}: TLS handshake timed out")))?
        .map_err(|e| unavailable(&source, format!("IMAP {addr}: TLS: {e}")))?;
        Stream::Tls(Box::new(s))
    } else {
        Stream::Plain(tcp)
    };
    let mut client = Client::new(stream);
    let greeting = tokio::time::timeout(timeout, client.read_response())
        .await
        .map_err(|_| unavailable(&source, format!("IMAP {addr}: no greeting")))?
        .map_err(|e| unavailable(&source, format!("IMAP {addr}: {e}")))?;
    match greeting.as_ref().map(|g| g.parsed()) {
        Some(Response::Data {
            status: Status::Ok | Status::PreAuth,
            ..
        }) => {}
        other => {
            return Err(unavailable(
                &source,
                format!("IMAP {addr}: unexpected greeting {other:?}"),
            ))
        }
    }
    let session = match tokio::time::timeout(timeout, client.login(&cfg.username, password)).await {
        Err(_) => {
            return Err(unavailable(
                &source,
                format!("IMAP {addr}: login timed out"),
            ))
        }
        Ok(Ok(s)) => s,
        Ok(Err((async_imap::error::Error::No(m) | async_imap::error::Error::Bad(m), _))) => {
            return Err(ConnectorError::Auth {
                source_name: source,
                detail: format!("IMAP {addr} refused user {:?}: {m}", cfg.username),
            })
        }
        Ok(Err((e, _))) => return Err(unavailable(&source, format!("IMAP {addr}: login: {e}"))),
    };
    let mut conn = Conn {
        session,
        condstore: false,
        qresync: false,
        source,
        timeout,
        selected: None,
    };
    let caps = conn
        .with_timeout(async |s: &mut Session<Stream>| s.capabilities().await)
        .await?;
    conn.condstore = caps.has_str("CONDSTORE") || caps.has_str("QRESYNC");
    if caps.has_str("QRESYNC") && caps.has_str("ENABLE") {
        // Only with QRESYNC enabled does UID FETCH … (CHANGEDSINCE m VANISHED) work.
        let tag = conn.command("ENABLE QRESYNC").await?;
        while conn.next(&tag).await?.is_some() {}
        conn.qresync = true;
    }
    tracing::debug!(source = %conn.source, condstore = conn.condstore, qresync = conn.qresync, "imap: logged in");
    Ok(conn)
}

impl Conn {
    fn err(&self, e: impl std::fmt::Display) -> ConnectorError {
        unavailable(&self.source, format!("IMAP: {e}"))
    }

    async fn with_timeout<T, F>(&mut self, f: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut Session<Stream>) -> async_imap::error::Result<T>,
    {
        let t = self.timeout;
        match tokio::time::timeout(t, f(&mut self.session)).await {
            Err(_) => Err(self.err("server did not answer in time")),
            Ok(Err(e)) => Err(self.err(e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Send a tagged command; read its responses with [`Conn::next`].
    pub async fn command(&mut self, cmd: &str) -> Result<RequestId> {
        let t = self.timeout;
        match tokio::time::timeout(t, self.session.run_command(cmd)).await {
            Err(_) => Err(self.err("server did not take the command in time")),
            Ok(Err(e)) => Err(self.err(e)),
            Ok(Ok(id)) => Ok(id),
        }
    }

    /// The next event of command `tag`; `None` once it completed OK.
    pub async fn next(&mut self, tag: &RequestId) -> Result<Option<Event>> {
        loop {
            let t = self.timeout;
            let resp = match tokio::time::timeout(t, self.session.read_response()).await {
                Err(_) => return Err(self.err("server did not answer in time")),
                Ok(Err(e)) => return Err(self.err(e)),
                Ok(Ok(None)) => return Err(self.err("connection closed")),
                Ok(Ok(Some(r))) => r,
            };
            match resp.parsed() {
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if t == tag => {
                    return match status {
                        Status::Ok => Ok(None),
                        _ => Err(self.err(format!(
                            "{status:?}: {}",
                            outcome.information.as_deref().unwrap_or("")
                        ))),
                    };
                }
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => {
                    return Err(self.err(format!(
                        "server closed the session: {}",
                        outcome.information.as_deref().unwrap_or("")
                    )))
                }
                Response::Fetch(_, attrs) => {
                    let mut item = FetchItem::default();
                    for a in attrs {
                        match a {
                            AttributeValue::Uid(u) => item.uid = Some(*u),
                            AttributeValue::Flags(f) => {
                                item.flags = Some(f.iter().map(|s| s.to_string()).collect())
                            }
                            AttributeValue::InternalDate(d) => {
                                item.internal_date = Some(d.to_string())
                            }
                            AttributeValue::ModSeq(m) => item.modseq = Some(*m),
                            AttributeValue::Rfc822Size(n) => item.size = Some(u64::from(*n)),
                            AttributeValue::BodySection {
                                section: None,
                                data,
                                ..
                            } => item.body = Some(data.as_deref().unwrap_or_default().to_vec()),
                            AttributeValue::Rfc822(data) => {
                                item.body = Some(data.as_deref().unwrap_or_default().to_vec())
                            }
                            _ => {}
                        }
                    }
                    return Ok(Some(Event::Fetch(item)));
                }
                Response::Vanished { uids, .. } => return Ok(Some(Event::Vanished(uids.clone()))),
                Response::MailboxData(MailboxDatum::Search(ids)) => {
                    return Ok(Some(Event::Search(ids.clone())))
                }
                _ => {}
            }
        }
    }

    /// Run a command whose responses are not needed.
    pub async fn simple(&mut self, cmd: &str) -> Result<()> {
        let tag = self.command(cmd).await?;
        while self.next(&tag).await?.is_some() {}
        Ok(())
    }

    /// Every folder with its decoded name; `\Noselect`/`\NonExistent` ones left out.
    pub async fn list_folders(&mut self) -> Result<Vec<Folder>> {
        let names: Vec<async_imap::types::Name> = self
            .with_timeout(async |s: &mut Session<Stream>| {
                let stream = s.list(Some(""), Some("*")).await?;
                stream.collect::<Vec<_>>().await.into_iter().collect()
            })
            .await?;
        let mut out: Vec<Folder> = names
            .iter()
            .filter(|n| {
                !n.attributes().iter().any(|a| match a {
                    NameAttribute::NoSelect => true,
                    NameAttribute::Extension(e) => e.eq_ignore_ascii_case("\\NonExistent"),
                    _ => false,
                })
            })
            .map(|n| Folder {
                wire: n.name().to_string(),
                name: mutf7_decode(n.name()),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Open `wire` read-only (EXAMINE, with CONDSTORE when offered).
    pub async fn examine(&mut self, wire: &str) -> Result<SelectInfo> {
        self.open(wire, true).await
    }

    /// Open `wire` read-only or read-write.
    pub async fn open(&mut self, wire: &str, read_only: bool) -> Result<SelectInfo> {
        let verb = if read_only { "EXAMINE" } else { "SELECT" };
        let cmd = if self.condstore {
            format!("{verb} {} (CONDSTORE)", quote(wire))
        } else {
            format!("{verb} {}", quote(wire))
        };
        self.selected = None;
        let tag = self.command(&cmd).await?;
        let mut info = SelectInfo::default();
        loop {
            let t = self.timeout;
            let resp = match tokio::time::timeout(t, self.session.read_response()).await {
                Err(_) => return Err(self.err("server did not answer in time")),
                Ok(Err(e)) => return Err(self.err(e)),
                Ok(Ok(None)) => return Err(self.err("connection closed")),
                Ok(Ok(Some(r))) => r,
            };
            match resp.parsed() {
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if *t == tag => {
                    if *status != Status::Ok {
                        return Err(self.err(format!(
                            "{verb} {wire:?}: {status:?} {}",
                            outcome.information.as_deref().unwrap_or("")
                        )));
                    }
                    if let Some(ResponseCode::HighestModSeq(m)) = &outcome.code {
                        info.highestmodseq = Some(*m);
                    }
                    break;
                }
                Response::Data { outcome, .. } => match &outcome.code {
                    Some(ResponseCode::UidValidity(v)) => info.uidvalidity = Some(*v),
                    Some(ResponseCode::UidNext(v)) => info.uidnext = Some(*v),
                    Some(ResponseCode::HighestModSeq(v)) => info.highestmodseq = Some(*v),
                    _ => {}
                },
                Response::MailboxData(MailboxDatum::Exists(n)) => info.exists = *n,
                _ => {}
            }
        }
        self.selected = Some((wire.to_string(), read_only));
        Ok(info)
    }

    /// `UID SEARCH <query>` in the selected folder.
    pub async fn uid_search(&mut self, query: &str) -> Result<Vec<u32>> {
        let tag = self.command(&format!("UID SEARCH {query}")).await?;
        let mut out = Vec::new();
        while let Some(ev) = self.next(&tag).await? {
            if let Event::Search(ids) = ev {
                out.extend(ids);
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// APPEND a message (folder must exist).
    pub async fn append(
        &mut self,
        wire: &str,
        raw: &[u8],
        flags: &[String],
        internal_date: Option<&str>,
    ) -> Result<()> {
        let flags = if flags.is_empty() {
            None
        } else {
            Some(format!("({})", flags.join(" ")))
        };
        let date = internal_date.map(|d| format!("\"{d}\""));
        let wire = wire.to_string();
        self.with_timeout(async |s: &mut Session<Stream>| {
            s.append(&wire, flags.as_deref(), date.as_deref(), raw)
                .await
        })
        .await
    }

    /// LOGOUT (best effort).
    pub async fn logout(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session.logout()).await;
    }
}

fn mutf7_engine() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::IMAP_MUTF7,
        base64::engine::general_purpose::NO_PAD,
    )
}

/// Decode a modified UTF-7 mailbox name (RFC 3501 5.1.3); invalid input is
/// returned unchanged.
pub(crate) fn mutf7_decode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(j) = after.find('-') else {
            return s.to_string();
        };
        let b64 = &after[..j];
        if b64.is_empty() {
            out.push('&');
        } else {
            let Ok(bytes) = mutf7_engine().decode(b64) else {
                return s.to_string();
            };
            if bytes.len() % 2 != 0 {
                return s.to_string();
            }
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            match String::from_utf16(&units) {
                Ok(t) => out.push_str(&t),
                Err(_) => return s.to_string(),
            }
        }
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    out
}

/// Encode a mailbox name as modified UTF-7.
pub(crate) fn mutf7_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if !pending.is_empty() {
            let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
            out.push('&');
            out.push_str(&mutf7_engine().encode(bytes));
            out.push('-');
            pending.clear();
        }
    };
    for c in s.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modified_utf7() {
        for (plain, wire) in [
            ("INBOX", "INBOX"),
            ("Entwürfe", "Entw&APw-rfe"),
            ("A&B", "A&-B"),
            ("日本語", "&ZeVnLIqe-"),
            ("x😀y", "x&2D3eAA-y"),
        ] {
            assert_eq!(mutf7_encode(plain), wire);
            assert_eq!(mutf7_decode(wire), plain);
        }
        assert_eq!(mutf7_decode("bad&***-"), "bad&***-");
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
