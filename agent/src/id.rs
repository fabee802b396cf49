//! 256-bit identifiers: blob ids (keyed BLAKE3 of plaintext) and object ids
//! (plain BLAKE3 of the stored bytes), both printed as 64 lowercase hex digits.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A 32-byte identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Id> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Id(out))
    }

    /// Full lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex digits, as shown in listings.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// Plain (unkeyed) BLAKE3 of `data`: the name of a stored object.
    pub fn of_object(data: &[u8]) -> Id {
        Id(*blake3::hash(data).as_bytes())
    }
}

/// The one id among `ids` that starts with `spec` (4 to 64 hex digits, any
/// case); errors name `what` and the prefix, and say whether none or several match.
pub fn resolve_prefix(
    what: &str,
    spec: &str,
    ids: impl IntoIterator<Item = Id>,
) -> crate::error::Result<Id> {
    use crate::error::Error;
    if spec.len() < 4 || spec.len() > 64 || !spec.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::Invalid(format!(
            "{what} {spec:?}: give at least 4 hex digits of an id"
        )));
    }
    let spec_l = spec.to_ascii_lowercase();
    let hits: Vec<Id> = ids
        .into_iter()
        .filter(|id| id.to_hex().starts_with(&spec_l))
        .collect();
    match hits.as_slice() {
        [one] => Ok(*one),
        [] => Err(Error::Invalid(format!("{what} {spec}: no such id"))),
        many => Err(Error::Invalid(format!(
            "{what} {spec}: ambiguous, {} ids start with it: give more digits",
            many.len()
        ))),
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Id::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects_bad_input() {
        let id = Id::of_object(b"abc");
        assert_eq!(Id::from_hex(&id.to_hex()), Some(id));
        assert_eq!(id.short().len(), 8);
        assert!(Id::from_hex("zz").is_none());
        assert!(Id::from_hex(&"a".repeat(63)).is_none());
    }

    #[test]
    fn prefixes_resolve_when_unique_and_errors_say_why_not() {
        let id = |h: &str| Id::from_hex(&format!("{h:0<64}")).unwrap();
        let ids = [id("abcd12"), id("abcd34"), id("ef01")];
        let find = |spec: &str| resolve_prefix("cat index", spec, ids);
        assert_eq!(find("abcd1").unwrap(), ids[0]);
        assert_eq!(find("EF01").unwrap(), ids[2]);
        assert_eq!(find(&ids[1].to_hex()).unwrap(), ids[1]);
        for (spec, needle) in [
            ("abcd", "ambiguous, 2 ids"),
            ("1234", "no such id"),
            ("abc", "at least 4 hex digits"),
            ("abcz", "at least 4 hex digits"),
        ] {
            let e = find(spec).unwrap_err().to_string();
            assert!(
                e.contains("cat index") && e.contains(spec) && e.contains(needle),
                "{spec}: {e}"
            );
        }
    }
}
