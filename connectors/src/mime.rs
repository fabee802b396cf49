//! Email metadata from a raw RFC 822 message (shared by IMAP, mbox, Maildir
//! and `.eml` folders). The raw bytes stay the record's payload; this only
//! reads them. Parsing never fails: what cannot be understood becomes a named
//! warning.

use chrono::{DateTime, TimeZone, Utc};
use mail_parser::{Address, MessageParser, MimeHeaders};

use crate::record::{Attachment, Payload};

/// Longest plain-text body kept in [`crate::Record::text`] (the payload keeps all).
const MAX_TEXT: usize = 1 << 20;

/// What custos indexes of an email.
#[derive(Debug, Default)]
pub(crate) struct EmailInfo {
    pub subject: Option<String>,
    pub participants: Vec<String>,
    pub customer_ids: Vec<String>,
    pub created: Option<DateTime<Utc>>,
    pub text: Option<String>,
    pub attachments: Vec<Attachment>,
    pub message_id: Option<String>,
    /// Named warnings (`invalid_utf8_header`, `unparseable_mime` …).
    pub warnings: Vec<String>,
}

/// Bytes at the start of a large (streamed) message that are parsed for its
/// metadata: headers, the text body as far as it lies in them, and the
/// attachments whose part starts in them.
pub(crate) const PARSE_PREFIX: usize = 1 << 20;

/// Default `stream_threshold_mib`: messages larger than this are streamed.
pub(crate) const DEFAULT_STREAM_THRESHOLD_MIB: u64 = 8;

/// A `stream_threshold_mib` setting in bytes.
pub(crate) fn stream_threshold(mib: Option<u64>) -> u64 {
    mib.unwrap_or(DEFAULT_STREAM_THRESHOLD_MIB)
        .saturating_mul(1 << 20)
}

/// A message's raw bytes: in memory, or (large) spooled in a file that is
/// streamed as the payload and never read into memory whole.
pub(crate) enum Content {
    /// The whole message.
    Bytes(Vec<u8>),
    /// The file (positioned at its start), its first bytes for parsing
    /// ([`PARSE_PREFIX`]), its size and BLAKE3.
    File {
        file: std::fs::File,
        prefix: Vec<u8>,
        size: u64,
        blake3: String,
    },
}

impl Content {
    /// Hash `file` from its current position to its end in one streaming
    /// pass, keeping its first [`PARSE_PREFIX`] bytes, then rewind it.
    pub(crate) fn spool(mut file: std::fs::File) -> std::io::Result<Content> {
        use std::io::{Read, Seek};
        let mut prefix = Vec::with_capacity(PARSE_PREFIX);
        (&mut file)
            .take(PARSE_PREFIX as u64)
            .read_to_end(&mut prefix)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&prefix);
        let mut size = prefix.len() as u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        file.rewind()?;
        Ok(Content::File {
            file,
            prefix,
            size,
            blake3: hasher.finalize().to_hex().to_string(),
        })
    }

    /// Parse the metadata (of the prefix only for a file), record `size`,
    /// `blake3` and, when only a prefix was parsed, `parsed_bytes` in `meta`;
    /// give the payload (`Payload::Reader` of the file, with its size).
    pub(crate) fn into_payload(
        self,
        meta: &mut std::collections::BTreeMap<String, String>,
    ) -> (EmailInfo, Payload) {
        match self {
            Content::Bytes(bytes) => {
                meta.insert("size".into(), bytes.len().to_string());
                meta.insert("blake3".into(), blake3::hash(&bytes).to_hex().to_string());
                (parse_email(&bytes), Payload::Bytes(bytes))
            }
            Content::File {
                file,
                prefix,
                size,
                blake3,
            } => {
                use std::io::Read;
                meta.insert("size".into(), size.to_string());
                meta.insert("blake3".into(), blake3);
                if (prefix.len() as u64) < size {
                    meta.insert("parsed_bytes".into(), prefix.len().to_string());
                }
                let info = parse_email_prefix(&prefix, size);
                // `take`: a file that grew since the hashing pass still yields
                // exactly the bytes that were hashed (unless rewritten).
                let reader = Box::new(file.take(size));
                (
                    info,
                    Payload::Reader {
                        reader,
                        size: Some(size),
                    },
                )
            }
        }
    }
}

/// Parse `raw`; never panics (a panic inside the parser becomes a warning).
pub(crate) fn parse_email(raw: &[u8]) -> EmailInfo {
    parse_guarded(raw, true)
}

/// Parse the first bytes of a message of `total` bytes that is streamed, not
/// held in memory (see [`PARSE_PREFIX`]). What lies beyond the prefix is not
/// seen: the text body is cut there, an attachment cut by it is described
/// with an unknown size (`None`), and parts starting after it are not
/// described at all. With the whole message in `prefix` this is
/// [`parse_email`].
pub(crate) fn parse_email_prefix(prefix: &[u8], total: u64) -> EmailInfo {
    parse_guarded(prefix, prefix.len() as u64 >= total)
}

fn parse_guarded(raw: &[u8], complete: bool) -> EmailInfo {
    match std::panic::catch_unwind(|| parse_inner(raw, complete)) {
        Ok(info) => info,
        Err(_) => EmailInfo {
            warnings: vec!["unparseable_mime: the MIME parser failed".into()],
            ..EmailInfo::default()
        },
    }
}

fn header_block(raw: &[u8]) -> &[u8] {
    let end = memfind(raw, b"\r\n\r\n")
        .or_else(|| memfind(raw, b"\n\n"))
        .unwrap_or(raw.len());
    &raw[..end]
}

fn memfind(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn parse_inner(raw: &[u8], complete: bool) -> EmailInfo {
    let mut info = EmailInfo::default();
    if raw.is_empty() {
        info.warnings.push("empty_message".into());
        return info;
    }
    let headers = header_block(raw);
    if std::str::from_utf8(headers).is_err() {
        info.warnings
            .push("invalid_utf8_header: header bytes are not UTF-8 (decoded lossily)".into());
    }
    if headers.len() == raw.len() && complete {
        info.warnings
            .push("no_body_separator: no blank line after the headers".into());
    }
    let Some(msg) = MessageParser::default().parse(raw) else {
        info.warnings
            .push("unparseable_mime: no header could be parsed".into());
        return info;
    };
    info.subject = msg.subject().map(str::to_string);
    info.message_id = msg.message_id().map(str::to_string);
    let mut seen = std::collections::BTreeSet::new();
    let lists: [Option<&Address>; 4] = [msg.from(), msg.to(), msg.cc(), msg.reply_to()];
    for addr in lists.into_iter().flatten() {
        for a in addr.iter() {
            if let Some(email) = a.address() {
                let e = email.trim().to_lowercase();
                if !e.is_empty() && seen.insert(e.clone()) {
                    info.customer_ids.push(format!("email:{e}"));
                    info.participants.push(e);
                }
            }
        }
    }
    info.created = msg
        .date()
        .and_then(|d| Utc.timestamp_opt(d.to_timestamp(), 0).single());
    if let Some(text) = msg.body_text(0) {
        let mut t = text.into_owned();
        if t.len() > MAX_TEXT {
            let mut cut = MAX_TEXT;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
            info.warnings
                .push("text_truncated: text body over 1 MiB".into());
        }
        info.text = Some(t);
    }
    for part in msg.attachments() {
        let media_type = match part.content_type() {
            Some(ct) => match ct.subtype() {
                Some(sub) => format!("{}/{}", ct.ctype(), sub).to_lowercase(),
                None => ct.ctype().to_lowercase(),
            },
            None => "application/octet-stream".to_string(),
        };
        // A part running to the end of a prefix was cut: its size is unknown.
        let cut = !complete && part.offset_end as usize + 4 >= raw.len();
        info.attachments.push(Attachment {
            name: part.attachment_name().unwrap_or_default().to_string(),
            media_type,
            size: (!cut).then_some(part.len() as u64),
            content: None,
        });
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_subject_and_attachments() {
        let raw = b"From: Ana <ANA@Example.org>\r\nTo: bo@example.com, ana@example.org\r\nCc: c@x.io\r\nSubject: =?utf-8?q?Ol=C3=A1?=\r\nDate: Tue, 1 Jul 2003 10:52:37 +0200\r\nMessage-ID: <m1@x>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: application/pdf; name=a.pdf\r\nContent-Disposition: attachment; filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--b--\r\n";
        let i = parse_email(raw);
        assert_eq!(i.subject.as_deref(), Some("Olá"));
        assert_eq!(
            i.participants,
            ["ana@example.org", "bo@example.com", "c@x.io"]
        );
        assert_eq!(i.customer_ids[0], "email:ana@example.org");
        assert_eq!(i.message_id.as_deref(), Some("m1@x"));
        assert_eq!(i.created.unwrap().to_rfc3339(), "2003-07-01T08:52:37+00:00");
        assert_eq!(i.text.as_deref().map(str::trim), Some("hello"));
        assert_eq!(i.attachments.len(), 1);
        assert_eq!(i.attachments[0].name, "a.pdf");
        assert_eq!(i.attachments[0].media_type, "application/pdf");
        assert_eq!(i.attachments[0].size, Some(3));
        assert!(i.warnings.is_empty(), "{:?}", i.warnings);
    }

    #[test]
    fn malformed_input_gives_warnings_not_panics() {
        assert!(!parse_email(b"").warnings.is_empty());
        let bad = b"Subject: \xff\xfe bad\r\nFrom: \xc3\x28@x\r\n\r\nbody";
        let i = parse_email(bad);
        assert!(i
            .warnings
            .iter()
            .any(|w| w.starts_with("invalid_utf8_header")));
        let i = parse_email(b"just some bytes without headers");
        assert!(!i.warnings.is_empty());
        let broken = b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\nContent-Type: text/plain\r\n\r\nunterminated";
        let _ = parse_email(broken);
    }
}
