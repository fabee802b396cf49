//! Keys and authenticated encryption.
//!
//! One random 256-bit master key per repository. Every working key is derived
//! from it with BLAKE3's key-derivation mode and a context string that names
//! its purpose, so each purpose can later be handed to a role on its own
//! (FORMAT.md, "Key hierarchy"):
//!
//! | context                         | use                                         |
//! |---------------------------------|---------------------------------------------|
//! | `custos v1 blob id`             | keyed BLAKE3 of blob plaintext → blob id    |
//! | `custos v1 content digest`      | keyed BLAKE3 of a whole file/record         |
//! | `custos v1 chunker seed`        | first 8 bytes, LE → FastCDC gear seed       |
//! | `custos v1 metadata encryption` | AEAD key: tree blobs, index, snapshots, …   |
//! | `custos v1 content encryption`  | AEAD key: data blobs                        |
//!
//! AEAD is XChaCha20-Poly1305; a sealed box is `nonce (24) ‖ ciphertext ‖ tag (16)`
//! with a fresh random nonce per box (192-bit nonces make random choice safe).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::id::Id;

/// Length of the XChaCha20 nonce prefix of every sealed box.
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag suffix of every sealed box.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed box adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// The repository master key. Never logged, never written unwrapped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey(pub(crate) [u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// A fresh random master key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        MasterKey(k)
    }

    fn derive(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.0)
    }
}

/// The working keys derived from a master key.
#[derive(Clone)]
pub struct Keys {
    id_key: [u8; 32],
    digest_key: [u8; 32],
    customer_key: [u8; 32],
    chunker_seed: u64,
    meta: XChaCha20Poly1305,
    content: XChaCha20Poly1305,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.id_key.zeroize();
        self.digest_key.zeroize();
        self.customer_key.zeroize();
        self.chunker_seed.zeroize();
    }
}

/// Which AEAD key seals an object or blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    /// Tree blobs, pack headers, index, snapshots, config and other metadata.
    Metadata,
    /// Data (content) blobs.
    Content,
}

impl Keys {
    /// Derive all working keys from `master`.
    pub fn derive(master: &MasterKey) -> Self {
        let mut seed_bytes = master.derive("custos v1 chunker seed");
        let chunker_seed = u64::from_le_bytes(seed_bytes[..8].try_into().expect("8 bytes"));
        seed_bytes.zeroize();
        let mut meta = master.derive("custos v1 metadata encryption");
        let mut content = master.derive("custos v1 content encryption");
        let keys = Keys {
            id_key: master.derive("custos v1 blob id"),
            digest_key: master.derive("custos v1 content digest"),
            customer_key: master.derive("custos v1 customer id"),
            // A zero seed would mean "unseeded" to fastcdc; astronomically unlikely, but be exact.
            chunker_seed: if chunker_seed == 0 { 1 } else { chunker_seed },
            meta: XChaCha20Poly1305::new((&meta).into()),
            content: XChaCha20Poly1305::new((&content).into()),
        };
        meta.zeroize();
        content.zeroize();
        keys
    }

    /// Blob id: keyed BLAKE3 of the plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> Id {
        Id(*blake3::keyed_hash(&self.id_key, plaintext).as_bytes())
    }

    /// A streaming hasher for whole-content digests (files, records).
    pub fn digest_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.digest_key)
    }

    /// Keyed hash of a short string (tree-split boundaries); reveals nothing about it.
    pub fn name_hash(&self, name: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id_key, name).as_bytes()
    }

    /// The key of a normalized customer identifier (`email:ana@example.org`):
    /// keyed BLAKE3, first 16 bytes as hex. The customer index and the
    /// suppression ledger store only these, never the identifier.
    pub fn customer_key(&self, normalized: &str) -> String {
        hex::encode(&blake3::keyed_hash(&self.customer_key, normalized.as_bytes()).as_bytes()[..16])
    }

    /// The FastCDC gear seed.
    pub fn chunker_seed(&self) -> u64 {
        self.chunker_seed
    }

    fn cipher(&self, key: KeyUse) -> &XChaCha20Poly1305 {
        match key {
            KeyUse::Metadata => &self.meta,
            KeyUse::Content => &self.content,
        }
    }

    /// Seal `plaintext` with a random nonce, binding `ad`.
    pub fn seal(&self, key: KeyUse, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        seal_with(self.cipher(key), ad, plaintext)
    }

    /// Open a sealed box; `None` when authentication fails.
    pub fn open(&self, key: KeyUse, ad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        open_with(self.cipher(key), ad, sealed)
    }
}

/// Seal with an explicit cipher (used for key files, whose key comes from Argon2id).
pub fn seal_with(cipher: &XChaCha20Poly1305, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: ad,
            },
        )
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Open with an explicit cipher.
pub fn open_with(cipher: &XChaCha20Poly1305, ad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < SEAL_OVERHEAD {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: ad })
        .ok()
}

/// Padmé padding (Nikitin et al., PETS 2019): the padded length of `len`.
///
/// Leaks O(log log n) bits of the length instead of O(log n), at most ~12 %
/// overhead (and under 2 % from 1 MiB up). Used for blob plaintext framing.
pub fn padme(len: usize) -> usize {
    if len < 2 {
        return len;
    }
    let l = len as u64;
    let e = 63 - l.leading_zeros() as u64; // floor(log2 len)
    let s = 64 - e.leading_zeros() as u64; // floor(log2 e) + 1
    let last_bits = e - s;
    let mask = (1u64 << last_bits) - 1;
    ((l + mask) & !mask) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_binds_associated_data() {
        let keys = Keys::derive(&MasterKey::generate());
        let boxed = keys.seal(KeyUse::Content, b"ad", b"hello");
        assert_eq!(boxed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(keys.open(KeyUse::Content, b"ad", &boxed).unwrap(), b"hello");
        assert!(keys.open(KeyUse::Content, b"other", &boxed).is_none());
        assert!(keys.open(KeyUse::Metadata, b"ad", &boxed).is_none());
        let mut flipped = boxed.clone();
        flipped[30] ^= 1;
        assert!(keys.open(KeyUse::Content, b"ad", &flipped).is_none());
    }

    #[test]
    fn derived_keys_differ_per_master_and_purpose() {
        let a = Keys::derive(&MasterKey::generate());
        let b = Keys::derive(&MasterKey::generate());
        assert_ne!(a.blob_id(b"x"), b.blob_id(b"x"));
        assert_ne!(a.chunker_seed(), b.chunker_seed());
        assert_ne!(
            a.blob_id(b"x").0,
            *a.digest_hasher().update(b"x").finalize().as_bytes()
        );
    }

    #[test]
    fn padme_is_monotone_bounded_and_matches_reference_values() {
        assert_eq!(padme(0), 0);
        assert_eq!(padme(1), 1);
        assert_eq!(padme(9), 10);
        assert_eq!(padme(1000), 1024);
        let mut prev = 0;
        for len in 1..100_000 {
            let p = padme(len);
            assert!(p >= len && p >= prev);
            assert!(
                (p - len) as f64 <= len as f64 * 0.12 + 1.0,
                "len {len} -> {p}"
            );
            prev = p;
        }
    }
}
