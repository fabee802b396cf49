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
}
