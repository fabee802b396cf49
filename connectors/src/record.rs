//! The normalized record: what every connector produces and custos stores.
//!
//! Record identity: `id` is stable for the lifetime of the record at its
//! source and unique within (source, collection). Each connector documents how
//! it builds it (IMAP: `<UIDVALIDITY>-<UID>` inside the folder's collection,
//! with Message-ID and the content digest as metadata). The original payload
//! is stored untouched; restore gives it back byte for byte.

use std::collections::BTreeMap;
use std::io::Read;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What kind of communication a record is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// An email message (RFC 822).
    Email,
    /// A chat message (Slack, Teams …).
    ChatMessage,
    /// A public social-media post.
    SocialPost,
    /// A private social-media / messenger message.
    DirectMessage,
    /// A support ticket.
    Ticket,
    /// A CRM activity (call, note, meeting).
    CrmActivity,
    /// A contact record.
    Contact,
    /// Anything else, named (`call_log`, `sms` …).
    Other(String),
}

impl RecordKind {
    /// Stable lowercase name (`email`, `chat_message`, or the `Other` name).
    pub fn as_str(&self) -> &str {
        match self {
            RecordKind::Email => "email",
            RecordKind::ChatMessage => "chat_message",
            RecordKind::SocialPost => "social_post",
            RecordKind::DirectMessage => "direct_message",
            RecordKind::Ticket => "ticket",
            RecordKind::CrmActivity => "crm_activity",
            RecordKind::Contact => "contact",
            RecordKind::Other(s) => s,
        }
    }

    /// Inverse of [`RecordKind::as_str`].
    pub fn parse(s: &str) -> RecordKind {
        match s {
            "email" => RecordKind::Email,
            "chat_message" => RecordKind::ChatMessage,
            "social_post" => RecordKind::SocialPost,
            "direct_message" => RecordKind::DirectMessage,
            "ticket" => RecordKind::Ticket,
            "crm_activity" => RecordKind::CrmActivity,
            "contact" => RecordKind::Contact,
            other => RecordKind::Other(other.to_string()),
        }
    }
}

/// Content bytes: in memory, or a reader streamed once (never all in RAM).
pub enum Payload {
    /// Bytes already in memory (small payloads, IMAP literals).
    Bytes(Vec<u8>),
    /// A reader yielding the content once; `size` when known in advance.
    Reader {
        /// The content, read once.
        reader: Box<dyn Read + Send>,
        /// Its size, when known in advance.
        size: Option<u64>,
    },
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Payload::Bytes(b) => write!(f, "Payload::Bytes({} bytes)", b.len()),
            Payload::Reader { size, .. } => write!(f, "Payload::Reader(size {size:?})"),
        }
    }
}

impl Payload {
    /// Read the whole payload into memory (tests, small payloads).
    pub fn into_bytes(self) -> std::io::Result<Vec<u8>> {
        match self {
            Payload::Bytes(b) => Ok(b),
            Payload::Reader { mut reader, size } => {
                let mut v = Vec::with_capacity(size.unwrap_or(0).min(1 << 24) as usize);
                reader.read_to_end(&mut v)?;
                Ok(v)
            }
        }
    }
}

/// An attachment of a record.
#[derive(Debug)]
pub struct Attachment {
    /// File name as the source gives it (may be empty).
    pub name: String,
    /// Media type (`application/pdf`).
    pub media_type: String,
    /// Size in bytes, when known.
    pub size: Option<u64>,
    /// The content; `None` when it is contained in the record's payload (an
    /// email's MIME part: the raw message is stored once, byte-exact, and the
    /// attachment is extracted from it on export).
    pub content: Option<Payload>,
}

/// One communication record, normalized.
#[derive(Debug)]
pub struct Record {
    /// Stable id, unique within (source, collection). Safe as a file name
    /// component: connectors use only `[A-Za-z0-9._@+=-]`.
    pub id: String,
    /// Collection id (mail folder, channel, room, object type).
    pub collection: String,
    /// What it is.
    pub kind: RecordKind,
    /// When it was created at the source (sent, posted, opened).
    pub created: Option<DateTime<Utc>>,
    /// When it last changed at the source.
    pub updated: Option<DateTime<Utc>>,
    /// Participants as the source names them (normalized addresses, handles).
    pub participants: Vec<String>,
    /// Customer identifiers, typed: `email:ana@example.org`,
    /// `phone:+351912345678` (E.164), `crm:hubspot:123`.
    pub customer_ids: Vec<String>,
    /// ISO 3166 country / jurisdiction code when known.
    pub jurisdiction: Option<String>,
    /// Subject or title.
    pub subject: Option<String>,
    /// Plain-text body (for search and export; the payload stays authoritative).
    pub text: Option<String>,
    /// Attachments.
    pub attachments: Vec<Attachment>,
    /// The original payload (raw RFC 822 message, original JSON, CSV line…).
    pub payload: Payload,
    /// File extension for the payload on restore: `eml`, `json`, `csv`, `txt`.
    pub payload_ext: String,
    /// Deleted at the source (tombstone; archive mode keeps the record).
    pub deleted: bool,
    /// Source-specific metadata (message_id, flags, internal_date, thread …).
    pub meta: BTreeMap<String, String>,
}

/// One step of a collection's change stream.
// Upsert is by far the most frequent variant and is moved straight into the
// sink: boxing it would add an allocation per record for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Change {
    /// A new or changed record (body fetched).
    Upsert(Record),
    /// Only metadata changed (IMAP flags): the stored body stays.
    ///
    /// `meta` holds the keys that changed (IMAP: `flags`, `modseq`); they
    /// replace those keys of the stored record's meta, other keys stay.
    UpdateMeta {
        /// The record.
        id: String,
        /// The changed metadata entries.
        meta: BTreeMap<String, String>,
    },
    /// The record is gone at the source.
    Delete {
        /// The record.
        id: String,
    },
    /// The record still exists unchanged (full reconciliation listings).
    Keep {
        /// The record.
        id: String,
    },
    /// The collection is being listed from scratch (invalid cursor,
    /// UIDVALIDITY change, periodic reconciliation): every record not sent as
    /// `Upsert` or `Keep` after this point is gone.
    Reset,
}
