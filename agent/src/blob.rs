//! Blobs: the unit of deduplication.
//!
//! A blob is a chunk of file/record content (`data`) or a serialized tree node
//! list (`tree`). On its way to storage it is framed, compressed when that
//! helps, padded (Padmé), sealed with XChaCha20-Poly1305 binding its type and
//! id, and then decrypted again and checked before it may enter a pack
//! (verify-after-encrypt): a bit flip in RAM or a codec bug never reaches a
//! bucket unnoticed.
//!
//! Sealed plaintext layout (FORMAT.md, "Blob encoding"):
//! `flags u8 ‖ payload_len u32 LE ‖ payload ‖ zero padding`, where flags
//! bit 0 = payload is zstd-compressed.

use serde::{Deserialize, Serialize};

use crate::crypto::{padme, KeyUse, Keys, OpenError, TAG_LEN};
use crate::error::{Error, Result};
use crate::id::Id;

/// Kind of blob; also decides which pack family and which AEAD key is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum BlobType {
    /// File or record content.
    Data,
    /// Serialized tree (directory / collection listing).
    Tree,
}

impl BlobType {
    /// Byte used in associated data and pack headers.
    pub fn code(self) -> u8 {
        match self {
            BlobType::Data => b'D',
            BlobType::Tree => b'T',
        }
    }

    /// Inverse of [`BlobType::code`].
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            b'D' => Some(BlobType::Data),
            b'T' => Some(BlobType::Tree),
            _ => None,
        }
    }

    /// Which AEAD key seals blobs of this type.
    pub fn key_use(self) -> KeyUse {
        match self {
            BlobType::Data => KeyUse::Content,
            BlobType::Tree => KeyUse::Metadata,
        }
    }

    /// Object-name prefix of packs holding this type.
    pub fn pack_prefix(self) -> &'static str {
        match self {
            BlobType::Data => "data",
            BlobType::Tree => "tree",
        }
    }
}

const FLAG_ZSTD: u8 = 1;
const FRAME_HEADER: usize = 5;

/// Type code of a group: small data blobs concatenated and sealed as one
/// unit (format 3; FORMAT.md, "Groups"). Used in the associated data and in
/// pack headers; a group lives in data packs and is sealed like data.
pub const GROUP_CODE: u8 = b'G';

/// What a sealed unit is: its type code (bound as associated data) and the
/// key family that seals it.
#[derive(Debug, Clone, Copy)]
struct Kind {
    code: u8,
    key: KeyUse,
}

impl From<BlobType> for Kind {
    fn from(ty: BlobType) -> Kind {
        Kind {
            code: ty.code(),
            key: ty.key_use(),
        }
    }
}

const GROUP: Kind = Kind {
    code: GROUP_CODE,
    key: KeyUse::Content,
};

/// Associated data binding a sealed blob to its type and id.
pub fn blob_ad(ty: BlobType, id: &Id) -> [u8; 34] {
    kind_ad(ty.into(), id)
}

fn kind_ad(kind: Kind, id: &Id) -> [u8; 34] {
    let mut ad = [0u8; 34];
    ad[0] = b'B';
    ad[1] = kind.code;
    ad[2..].copy_from_slice(&id.0);
    ad
}

/// Where a grouped blob lies in its group: the group's id and the blob's
/// offset in the group's plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRef {
    pub id: Id,
    pub inner: u32,
}

/// One blob inside a group: its id, where its plaintext starts in the
/// group's plaintext, and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub id: Id,
    pub inner: u32,
    pub len: u32,
}

/// Settings that shape blob encoding.
#[derive(Debug, Clone, Copy)]
pub struct EncodeSettings {
    /// zstd level; 0 disables compression.
    pub zstd_level: i32,
    /// Pad sealed plaintext to Padmé lengths.
    pub padding: bool,
}

/// An encoded blob (or group) ready for a pack.
#[derive(Debug)]
pub struct EncodedBlob {
    pub ty: BlobType,
    /// The blob's id; for a group, the group's (keyed BLAKE3 of its plaintext).
    pub id: Id,
    /// Length of the plaintext.
    pub raw_len: u32,
    /// The sealed bytes as stored in the pack.
    pub sealed: Vec<u8>,
    /// A group's members in plaintext order; empty for a single blob.
    pub members: Vec<Member>,
}

/// Frame, compress, pad, seal, then decrypt and verify the result.
pub fn encode(
    keys: &Keys,
    settings: EncodeSettings,
    ty: BlobType,
    id: Id,
    plaintext: &[u8],
) -> Result<EncodedBlob> {
    let sealed = encode_kind(keys, settings, ty.into(), id, plaintext)?;
    Ok(EncodedBlob {
        ty,
        id,
        raw_len: plaintext.len() as u32,
        sealed,
        members: Vec::new(),
    })
}

/// Encode a group of data blobs: `plaintext` is the members' plaintexts
/// concatenated in `members` order (each member's `inner` its offset in it).
/// The group is named by the keyed id of that plaintext and sealed like a
/// data blob under the type code [`GROUP_CODE`].
pub fn encode_group(
    keys: &Keys,
    settings: EncodeSettings,
    members: Vec<Member>,
    plaintext: &[u8],
) -> Result<EncodedBlob> {
    debug_assert!(members_tile(&members, plaintext.len()));
    let id = keys.blob_id(plaintext);
    let sealed = encode_kind(keys, settings, GROUP, id, plaintext)?;
    Ok(EncodedBlob {
        ty: BlobType::Data,
        id,
        raw_len: plaintext.len() as u32,
        sealed,
        members,
    })
}

/// Do `members` cover `len` bytes exactly, in order, without gaps?
pub fn members_tile(members: &[Member], len: usize) -> bool {
    let mut at = 0u64;
    for m in members {
        if u64::from(m.inner) != at {
            return false;
        }
        at += u64::from(m.len);
    }
    at == len as u64
}

fn encode_kind(
    keys: &Keys,
    settings: EncodeSettings,
    kind: Kind,
    id: Id,
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    // Built in its final buffer: room for the seal prefix, the frame header,
    // the payload compressed straight in (or copied), padding; then sealed
    // in place. (Compressing into a buffer of its own, framing and sealing
    // copied every blob twice more.)
    let prefix = keys.seal_prefix_len(kind.key);
    let start = prefix + FRAME_HEADER;
    let room = if settings.zstd_level != 0 {
        zstd::zstd_safe::compress_bound(plaintext.len())
    } else {
        plaintext.len()
    };
    let mut sealed = Vec::with_capacity(prefix + padme(FRAME_HEADER + room) + TAG_LEN);
    sealed.resize(start, 0);
    let compressed = settings.zstd_level != 0
        && plaintext.len() > 64
        && compress_into(plaintext, settings.zstd_level, &mut sealed).is_ok()
        && sealed.len() - start < plaintext.len();
    if !compressed {
        sealed.truncate(start);
        sealed.extend_from_slice(plaintext);
    }
    let payload_len = sealed.len() - start;
    sealed[prefix] = if compressed { FLAG_ZSTD } else { 0 };
    sealed[prefix + 1..start].copy_from_slice(&(payload_len as u32).to_le_bytes());
    let framed_len = FRAME_HEADER + payload_len;
    let total = if settings.padding {
        padme(framed_len)
    } else {
        framed_len
    };
    sealed.resize(prefix + total, 0);
    keys.seal_in_place(kind.key, &kind_ad(kind, &id), &mut sealed)
        .map_err(|e| Error::Failed(format!("sealing blob {id}: {e}")))?;
    // Verify-after-encrypt: what we are about to upload must open and
    // decompress to exactly these bytes (whose keyed hash is `id`: the
    // caller hashed them), compared byte for byte rather than hashed again.
    let verified = open_framed(keys, kind, &id, &sealed).and_then(|framed| {
        let (flags, payload) = unframe(&id, &framed)?;
        Ok(match flags {
            0 => payload == plaintext,
            FLAG_ZSTD => decompress_sized(payload, plaintext.len()).is_ok_and(|d| d == plaintext),
            _ => false,
        })
    });
    match verified {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::Failed(format!(
                "verify-after-encrypt of blob {id}: decrypted content differs"
            )))
        }
        Err(e) => {
            return Err(Error::Failed(format!(
                "verify-after-encrypt of blob {id} failed: {e}"
            )))
        }
    }
    Ok(sealed)
}

/// Open (authenticate and decrypt) a sealed blob: its framed bytes.
fn open_framed(keys: &Keys, kind: Kind, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
    keys.open_checked(kind.key, &kind_ad(kind, id), sealed)
        .map_err(|e| match e {
            OpenError::Auth => Error::corrupt(format!("blob {id}"), "authentication failed"),
            OpenError::DataKeyNotLoaded(k) => Error::Failed(format!(
                "blob {id}: data key {k} was not loaded before reading (a bug)"
            )),
            OpenError::NoContentAccess(role) => Error::Role {
                operation: format!("reading content blob {id}"),
                needed: crate::crypto::Role::Restore.key_phrase(),
                have: role,
            },
        })
}

/// (flags, payload) of framed bytes.
fn unframe<'a>(id: &Id, framed: &'a [u8]) -> Result<(u8, &'a [u8])> {
    if framed.len() < FRAME_HEADER {
        return Err(Error::corrupt(format!("blob {id}"), "frame too short"));
    }
    let len = u32::from_le_bytes(framed[1..5].try_into().expect("4 bytes")) as usize;
    let payload = framed
        .get(FRAME_HEADER..FRAME_HEADER + len)
        .ok_or_else(|| Error::corrupt(format!("blob {id}"), "payload length beyond frame"))?;
    Ok((framed[0], payload))
}

/// Largest content size a frame header may announce for a one-shot
/// decompression into a buffer of exactly that size; past it (or when the
/// frame does not say), the streaming decoder grows its buffer as it goes.
const ONE_SHOT_MAX: u64 = 256 << 20;

/// Decompress a zstd frame. Frames written by `encode` announce their
/// content size, so the output is allocated once at its final size instead
/// of grown by doubling (measured: that growth copied each 4 MiB blob about
/// twice and held up to twice its size per decoding thread).
fn decompress(payload: &[u8]) -> std::io::Result<Vec<u8>> {
    match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n <= ONE_SHOT_MAX => decompress_sized(payload, n as usize),
        _ => zstd::stream::decode_all(payload),
    }
}

thread_local! {
    /// One zstd compression context per thread, reused across blobs, with
    /// the level it was set to: creating one per blob allocated and zeroed
    /// its match tables every time (malloc, memset and page faults: ~3 % of
    /// a first backup's CPU in a profile).
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    /// The same for decompression.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd one-shot compression at `level` with this thread's context,
/// appended to `out` (whose spare capacity must hold the compress bound).
/// The frame announces its content size (what [`decompress`] relies on).
fn compress_into(data: &[u8], level: i32, out: &mut Vec<u8>) -> std::io::Result<()> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, c) = slot.as_mut().expect("just set");
        let at = out.len() as u64;
        let mut tail = std::io::Cursor::new(out);
        tail.set_position(at);
        c.compress_to_buffer(data, &mut tail).map(|_| ())
    })
}

/// zstd decompression of a frame of at most `capacity` bytes with this
/// thread's context.
fn decompress_sized(payload: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        slot.as_mut()
            .expect("just set")
            .decompress(payload, capacity)
    })
}

/// Open, unframe, decompress and verify a sealed blob against `id`.
pub fn decode(keys: &Keys, ty: BlobType, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
    decode_kind(keys, ty.into(), id, sealed)
}

/// Open, unframe, decompress and verify a sealed group against its id:
/// the concatenated plaintexts of its members.
pub fn decode_group(keys: &Keys, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
    decode_kind(keys, GROUP, id, sealed).map_err(|e| match e {
        Error::Corrupt { reason, .. } => Error::corrupt(format!("group {id}"), reason),
        other => other,
    })
}

/// A member's plaintext cut from its decoded group, checked against its id
/// (the keyed hash is recomputed: the group's own check covers the group,
/// this one that the index points at the right bytes).
pub fn member<'a>(keys: &Keys, id: &Id, group: &'a [u8], inner: u32, len: u32) -> Result<&'a [u8]> {
    let start = inner as usize;
    let plain = group
        .get(start..start + len as usize)
        .ok_or_else(|| Error::corrupt(format!("blob {id}"), "lies beyond its group"))?;
    if keys.blob_id(plain) != *id {
        return Err(Error::corrupt(
            format!("blob {id}"),
            "content in its group does not hash to its id",
        ));
    }
    Ok(plain)
}

fn decode_kind(keys: &Keys, kind: Kind, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
    let mut framed = open_framed(keys, kind, id, sealed)?;
    let (flags, payload) = unframe(id, &framed)?;
    let plain = match flags {
        0 => {
            // Reuse the opened buffer: no second allocation of the blob.
            let len = payload.len();
            framed.truncate(FRAME_HEADER + len);
            framed.drain(..FRAME_HEADER);
            framed
        }
        FLAG_ZSTD => decompress(payload)
            .map_err(|e| Error::corrupt(format!("blob {id}"), format!("zstd: {e}")))?,
        f => {
            return Err(Error::corrupt(
                format!("blob {id}"),
                format!("unknown flags {f:#x}"),
            ))
        }
    };
    if keys.blob_id(&plain) != *id {
        return Err(Error::corrupt(
            format!("blob {id}"),
            "content does not hash to its id",
        ));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    fn settings() -> EncodeSettings {
        EncodeSettings {
            zstd_level: 3,
            padding: true,
        }
    }

    #[test]
    fn decompress_with_and_without_an_announced_content_size() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 97) as u8).collect();
        let compress = |level: i32| {
            // Appended after what the buffer holds, as encode does.
            let mut out = b"prefix".to_vec();
            out.reserve(zstd::zstd_safe::compress_bound(data.len()));
            compress_into(&data, level, &mut out).unwrap();
            assert_eq!(&out[..6], b"prefix");
            out.split_off(6)
        };
        let announced = compress(3);
        assert_eq!(announced, zstd::bulk::compress(&data, 3).unwrap());
        // A context reused at another level compresses at that level.
        assert_eq!(compress(19), zstd::bulk::compress(&data, 19).unwrap());
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&announced).unwrap(),
            Some(data.len() as u64),
            "encode's frames announce their size (the one-shot path)"
        );
        let streamed = zstd::stream::encode_all(&data[..], 3).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&streamed).unwrap(),
            None
        );
        for frame in [&announced, &streamed] {
            let out = decompress(frame).unwrap();
            assert_eq!(out, data);
            assert_eq!(out.capacity() == data.len(), frame == &announced);
        }
        assert!(decompress(&announced[..announced.len() - 3]).is_err());
    }

    #[test]
    fn round_trip_compressible_and_random() {
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        for data in [
            vec![b'a'; 10_000],
            (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            vec![],
        ] {
            let id = keys.blob_id(&data);
            let enc = encode(&keys, settings(), BlobType::Data, id, &data).unwrap();
            assert_eq!(
                decode(&keys, BlobType::Data, &id, &enc.sealed).unwrap(),
                data
            );
            // Wrong type or id is refused: both are bound as associated data.
            assert!(decode(&keys, BlobType::Tree, &id, &enc.sealed).is_err());
            assert!(decode(&keys, BlobType::Data, &keys.blob_id(b"other"), &enc.sealed).is_err());
        }
    }

    #[test]
    fn compressible_data_is_stored_smaller() {
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        let data = vec![b'x'; 100_000];
        let enc = encode(
            &keys,
            settings(),
            BlobType::Data,
            keys.blob_id(&data),
            &data,
        )
        .unwrap();
        assert!(enc.sealed.len() < 1000, "{}", enc.sealed.len());
    }
}
