//! Identifier encodings shared by the connectors.
//!
//! - [`record_id`]: any string → a record id that uses only
//!   `[A-Za-z0-9._@+=-]` (the [`crate::Record::id`] alphabet). Bytes outside
//!   `[A-Za-z0-9._@+-]` become `=HH` (upper-case hex, like quoted-printable),
//!   so the encoding is reversible ([`decode_record_id`]) and injective.
//! - [`collection_id`]: a display name (mail folder, channel, file stem) → a
//!   collection id: percent-encoding of every byte outside `[A-Za-z0-9._-]`.
//!
//! Both also escape a leading `.` so that no id is `.`, `..` or a hidden file
//! name, and map the empty string to a visible placeholder (`=` / `%`).

use std::fmt::Write as _;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Bytes percent-encoded in collection ids: everything but `[A-Za-z0-9._-]`.
const COLLECTION_SET: &AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'_').remove(b'-');

/// Encode `s` as a record id (`[A-Za-z0-9._@+=-]` only, reversible).
pub fn record_id(s: &str) -> String {
    if s.is_empty() {
        return "=".to_string();
    }
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || matches!(b, b'_' | b'@' | b'+' | b'-' | b'.');
        if keep && !(i == 0 && b == b'.') {
            out.push(b as char);
        } else {
            let _ = write!(out, "={b:02X}");
        }
    }
    out
}

/// Inverse of [`record_id`]; `None` when `id` is not a valid encoding.
pub fn decode_record_id(id: &str) -> Option<String> {
    if id == "=" {
        return Some(String::new());
    }
    let b = id.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            let hex = id.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Encode a display name as a collection id (percent-encoding outside
/// `[A-Za-z0-9._-]`, leading `.` escaped, empty → `%`).
pub fn collection_id(name: &str) -> String {
    if name.is_empty() {
        return "%".to_string();
    }
    let enc = utf8_percent_encode(name, COLLECTION_SET).to_string();
    match enc.strip_prefix('.') {
        Some(rest) => format!("%2E{rest}"),
        None => enc,
    }
}

/// Inverse of [`collection_id`].
pub fn decode_collection_id(id: &str) -> Option<String> {
    if id == "%" {
        return Some(String::new());
    }
    percent_decode_str(id)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// True when `id` uses only the record id alphabet and is not `.`/`..`.
pub fn is_valid_record_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+=-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_round_trip_and_stay_in_alphabet() {
        for s in [
            "",
            ".",
            "..",
            "1700000000.M1P2.host,S=123,W=456",
            "a/b c.eml",
            "ünï=cødé",
            "1612345678.000200",
            "ticket-42@x+y",
        ] {
            let id = record_id(s);
            assert!(is_valid_record_id(&id), "{s:?} -> {id:?}");
            assert_eq!(decode_record_id(&id).as_deref(), Some(s));
        }
        assert_eq!(record_id("1612345678.000200"), "1612345678.000200");
        assert_eq!(record_id("a/b"), "a=2Fb");
        assert_ne!(record_id("a=2Fb"), record_id("a/b"));
    }

    #[test]
    fn collection_ids_round_trip() {
        for s in [
            "INBOX",
            "Sent Items",
            "Archiv/2023",
            ".hidden",
            "Ünïcode",
            "",
            "a%b",
        ] {
            let id = collection_id(s);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b)),
                "{id}"
            );
            assert!(!id.starts_with('.'));
            assert_eq!(decode_collection_id(&id).as_deref(), Some(s));
        }
        assert_eq!(collection_id("Sent Items"), "Sent%20Items");
    }
}
