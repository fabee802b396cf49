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
//! | `custos v1 content encryption`  | AEAD key: data blobs (format 1 only)        |
//! | `custos v2 content secret key`  | X25519 secret; its public key wraps data keys |
//!
//! Format 2 seals each backup session's content under a fresh random data
//! key stored only wrapped to the content public key (`datakeys/<id>`), so a
//! `backup` role key — which holds every key above except the content secret
//! — can write content it cannot read back ([`Role`]).
//!
//! AEAD is XChaCha20-Poly1305; a sealed box is `nonce (24) ‖ ciphertext ‖ tag (16)`
//! with a fresh random nonce per box (192-bit nonces make random choice safe).
//! [`Cipher`] computes it as the XChaCha draft defines it — HChaCha20 of the
//! key and the nonce's first 16 bytes gives a subkey for RFC 8439
//! ChaCha20-Poly1305 with nonce `0⁴ ‖ nonce[16..24]` — using `ring`'s
//! assembly ChaCha20-Poly1305, 2.3x the throughput of the portable
//! implementation here (bench/README.md, Findings); a test pins every box
//! byte for byte to the `chacha20poly1305` crate's Cipher.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rand::RngCore;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

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

/// What a repository key may do (FORMAT.md, "Roles").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Add data and snapshots; read metadata and trees; never content blobs.
    Backup,
    /// Everything `backup` may, plus read content (restore, export, verify).
    Restore,
    /// Holds the master key: everything, including forget, prune, erase and keys.
    Admin,
}

impl Role {
    /// The name stored in key objects.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Backup => "backup",
            Role::Restore => "restore",
            Role::Admin => "admin",
        }
    }

    /// Parse a stored or configured role name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "backup" => Some(Role::Backup),
            "restore" => Some(Role::Restore),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// "an admin key", "a restore or admin key", "any key": the keys at
    /// least this role, for error messages.
    pub fn key_phrase(self) -> &'static str {
        match self {
            Role::Admin => "an admin key",
            Role::Restore => "a restore or admin key",
            Role::Backup => "any key",
        }
    }

    /// Whether this role may decrypt content (data) blobs.
    pub fn reads_content(self) -> bool {
        self >= Role::Restore
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Id of a data key (format 2): 16 random bytes, the prefix of every data
/// blob sealed under it and the name of its `datakeys/<hex>` object.
pub type DataKeyId = [u8; 16];

/// Length of a data key id.
pub const DATA_KEY_ID_LEN: usize = 16;

/// Bytes of a wrapped data key object: ephemeral public key ‖ sealed key.
pub const WRAPPED_DATA_KEY_LEN: usize = 32 + SEAL_OVERHEAD + 32;

/// The data key a writer seals new content blobs with (format 2): random per
/// backup session, stored only wrapped to the repository's content public key.
pub struct DataKeySession {
    id: DataKeyId,
    cipher: Cipher,
    wrapped: Vec<u8>,
}

impl DataKeySession {
    /// The key id.
    pub fn id(&self) -> &DataKeyId {
        &self.id
    }

    /// Name of the object holding the wrapped key.
    pub fn object_name(&self) -> String {
        data_key_object(&self.id)
    }

    /// The wrapped key object's bytes.
    pub fn wrapped(&self) -> &[u8] {
        &self.wrapped
    }
}

/// Name of the object holding data key `id`.
pub fn data_key_object(id: &DataKeyId) -> String {
    format!("datakeys/{}", hex::encode(id))
}

/// Parse a data key id from an object name (`datakeys/<32 hex>`).
pub fn parse_data_key_object(name: &str) -> Option<DataKeyId> {
    let hex = name.strip_prefix("datakeys/")?;
    let mut id = [0u8; DATA_KEY_ID_LEN];
    hex::decode_to_slice(hex, &mut id).ok()?;
    Some(id)
}

/// How content (data) blobs are sealed.
#[derive(Clone)]
enum Content {
    /// Format 1: one key derived from the master key.
    Derived(Cipher),
    /// Format 2: per-session data keys wrapped to an X25519 public key.
    Wrapped {
        public: PublicKey,
        /// The private half: restore and admin keys only.
        secret: Option<StaticSecret>,
        /// Data keys unwrapped (or created) so far, shared by clones.
        loaded: Arc<RwLock<HashMap<DataKeyId, Cipher>>>,
        /// The key new content is sealed with, when this is a writer.
        session: Option<Arc<DataKeySession>>,
    },
}

/// Why a sealed blob could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Authentication failed (wrong key, altered bytes).
    Auth,
    /// The data key it names is not loaded (see [`Keys::missing_data_key`]).
    DataKeyNotLoaded(String),
    /// This key's role may not read content blobs.
    NoContentAccess(Role),
}

/// The working keys of an opened repository.
#[derive(Clone)]
pub struct Keys {
    role: Role,
    id_key: [u8; 32],
    digest_key: [u8; 32],
    customer_key: [u8; 32],
    meta_key: [u8; 32],
    chunker_seed: u64,
    meta: Cipher,
    content: Content,
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
        self.meta_key.zeroize();
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

/// Bundle layout: K_id ‖ K_digest ‖ K_customer ‖ K_meta ‖ seed (8, LE) ‖
/// content public key ‖ [content secret key, restore only].
const BUNDLE_BACKUP_LEN: usize = 4 * 32 + 8 + 32;
const BUNDLE_RESTORE_LEN: usize = BUNDLE_BACKUP_LEN + 32;

impl Keys {
    /// The common keys, with `content` still to choose.
    fn common(master: &MasterKey, content: Content) -> Self {
        let mut seed_bytes = master.derive("custos v1 chunker seed");
        let chunker_seed = u64::from_le_bytes(seed_bytes[..8].try_into().expect("8 bytes"));
        seed_bytes.zeroize();
        let meta_key = master.derive("custos v1 metadata encryption");
        Keys {
            role: Role::Admin,
            id_key: master.derive("custos v1 blob id"),
            digest_key: master.derive("custos v1 content digest"),
            customer_key: master.derive("custos v1 customer id"),
            // A zero seed would mean "unseeded" to fastcdc; astronomically unlikely, but be exact.
            chunker_seed: if chunker_seed == 0 { 1 } else { chunker_seed },
            meta: Cipher::new(&meta_key),
            meta_key,
            content,
        }
    }

    /// All working keys of a format-2 repository from its master key (admin).
    pub fn derive(master: &MasterKey) -> Self {
        let secret = StaticSecret::from(master.derive("custos v2 content secret key"));
        let public = PublicKey::from(&secret);
        Self::common(
            master,
            Content::Wrapped {
                public,
                secret: Some(secret),
                loaded: Arc::default(),
                session: None,
            },
        )
    }

    /// All working keys of a format-1 repository (one derived content key).
    pub fn derive_v1(master: &MasterKey) -> Self {
        let mut content = master.derive("custos v1 content encryption");
        let cipher = Cipher::new(&content);
        content.zeroize();
        Self::common(master, Content::Derived(cipher))
    }

    /// The bundle a `role` key object wraps (format 2; `None` for admin,
    /// whose key objects wrap the master key, or when these keys cannot
    /// give what the role needs).
    pub fn bundle(&self, role: Role) -> Option<Zeroizing<Vec<u8>>> {
        let Content::Wrapped { public, secret, .. } = &self.content else {
            return None;
        };
        let mut out = Zeroizing::new(Vec::with_capacity(BUNDLE_RESTORE_LEN));
        for k in [
            &self.id_key,
            &self.digest_key,
            &self.customer_key,
            &self.meta_key,
        ] {
            out.extend_from_slice(k);
        }
        out.extend_from_slice(&self.chunker_seed.to_le_bytes());
        out.extend_from_slice(public.as_bytes());
        match role {
            Role::Backup => {}
            Role::Restore => out.extend_from_slice(secret.as_ref()?.as_bytes()),
            Role::Admin => return None,
        }
        Some(out)
    }

    /// Keys of a backup or restore key object from its unwrapped bundle.
    pub fn from_bundle(role: Role, bundle: &[u8]) -> std::result::Result<Keys, String> {
        let want = match role {
            Role::Backup => BUNDLE_BACKUP_LEN,
            Role::Restore => BUNDLE_RESTORE_LEN,
            Role::Admin => return Err("an admin key wraps the master key, not a bundle".into()),
        };
        if bundle.len() != want {
            return Err(format!(
                "{role} key bundle has {} bytes, expected {want}",
                bundle.len()
            ));
        }
        let k = |i: usize| -> [u8; 32] { bundle[i * 32..i * 32 + 32].try_into().expect("32") };
        let meta_key = k(3);
        let chunker_seed = u64::from_le_bytes(bundle[128..136].try_into().expect("8"));
        let public = PublicKey::from(<[u8; 32]>::try_from(&bundle[136..168]).expect("32"));
        let secret = (role == Role::Restore)
            .then(|| StaticSecret::from(<[u8; 32]>::try_from(&bundle[168..200]).expect("32")));
        if let Some(s) = &secret {
            if PublicKey::from(s) != public {
                return Err(format!(
                    "{role} key bundle: secret and public key do not match"
                ));
            }
        }
        if chunker_seed == 0 {
            return Err(format!("{role} key bundle: zero chunker seed"));
        }
        Ok(Keys {
            role,
            id_key: k(0),
            digest_key: k(1),
            customer_key: k(2),
            meta: Cipher::new(&meta_key),
            meta_key,
            chunker_seed,
            content: Content::Wrapped {
                public,
                secret,
                loaded: Arc::default(),
                session: None,
            },
        })
    }

    /// The role these keys were opened with.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether data blobs are sealed with per-session wrapped keys (format 2).
    pub fn wraps_data_keys(&self) -> bool {
        matches!(self.content, Content::Wrapped { .. })
    }

    /// A copy that seals new content under a fresh data key (format 2; format
    /// 1 keys are returned unchanged). Only this copy opens what it seals
    /// (verify-after-encrypt); its wrapped object ([`Keys::session`]) must be
    /// stored on a target before any pack sealed with it.
    pub fn with_new_session(&self) -> Keys {
        let mut keys = self.clone();
        if let Content::Wrapped {
            public, session, ..
        } = &mut keys.content
        {
            let mut id = [0u8; DATA_KEY_ID_LEN];
            rand::rngs::OsRng.fill_bytes(&mut id);
            let mut key = Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(key.as_mut());
            let wrapped = wrap_data_key(public, &id, &key);
            let cipher = Cipher::new(&key);
            // Not added to `loaded` (shared with the repository's other
            // clones): only this writer opens with it unwrapped, so a backup
            // key never reads content, not even what its own process wrote.
            *session = Some(Arc::new(DataKeySession {
                id,
                cipher,
                wrapped,
            }));
        }
        keys
    }

    /// The data key new content is sealed with, if any (format 2 writers).
    pub fn session(&self) -> Option<&DataKeySession> {
        match &self.content {
            Content::Wrapped { session, .. } => session.as_deref(),
            Content::Derived(_) => None,
        }
    }

    /// The data key a sealed content blob names when it is not loaded yet
    /// (format 2); `None` when it is loaded or not needed.
    pub fn missing_data_key(&self, sealed: &[u8]) -> Option<DataKeyId> {
        let Content::Wrapped {
            loaded, session, ..
        } = &self.content
        else {
            return None;
        };
        let id: DataKeyId = sealed.get(..DATA_KEY_ID_LEN)?.try_into().ok()?;
        let own = session.as_ref().is_some_and(|s| s.id == id);
        (!own && !loaded.read().expect("data keys lock").contains_key(&id)).then_some(id)
    }

    /// Unwrap a data key object and keep the key for opening blobs.
    pub fn load_data_key(&self, id: &DataKeyId, object: &[u8]) -> std::result::Result<(), String> {
        let Content::Wrapped { secret, loaded, .. } = &self.content else {
            return Err("format 1 repositories have no data key objects".into());
        };
        let Some(secret) = secret else {
            return Err(format!(
                "a {} key cannot unwrap data keys (content is readable with restore and admin keys only)",
                self.role
            ));
        };
        let key = unwrap_data_key(secret, id, object)?;
        let cipher = Cipher::new(&key);
        loaded.write().expect("data keys lock").insert(*id, cipher);
        Ok(())
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

    /// Seal metadata with a random nonce, binding `ad`.
    pub fn seal(&self, key: KeyUse, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        match key {
            KeyUse::Metadata => seal_with(&self.meta, ad, plaintext),
            KeyUse::Content => self
                .seal_content(ad, plaintext)
                .expect("content sealed only by writers with a data key session"),
        }
    }

    /// Seal content: format 1 under the derived key; format 2 as
    /// `data key id ‖ sealed box` under this writer's session key.
    pub fn seal_content(
        &self,
        ad: &[u8],
        plaintext: &[u8],
    ) -> std::result::Result<Vec<u8>, String> {
        match &self.content {
            Content::Derived(c) => Ok(seal_with(c, ad, plaintext)),
            Content::Wrapped { session, .. } => {
                let s = session
                    .as_ref()
                    .ok_or("no data key session to seal content with")?;
                let mut out = Vec::with_capacity(DATA_KEY_ID_LEN + SEAL_OVERHEAD + plaintext.len());
                out.extend_from_slice(&s.id);
                s.cipher.seal_into(&mut out, ad, plaintext);
                Ok(out)
            }
        }
    }

    /// Bytes a box sealed with `key` holds before its ciphertext: the
    /// nonce, after a data key id for format-2 content.
    pub fn seal_prefix_len(&self, key: KeyUse) -> usize {
        match (key, &self.content) {
            (KeyUse::Content, Content::Wrapped { .. }) => DATA_KEY_ID_LEN + NONCE_LEN,
            _ => NONCE_LEN,
        }
    }

    /// Seal in place: `buf` is [`Keys::seal_prefix_len`] bytes of room
    /// followed by the plaintext, and becomes the same box [`Keys::seal`]
    /// returns, without a copy of the plaintext.
    pub fn seal_in_place(
        &self,
        key: KeyUse,
        ad: &[u8],
        buf: &mut Vec<u8>,
    ) -> std::result::Result<(), String> {
        let start = self.seal_prefix_len(key);
        if buf.len() < start {
            return Err("no room for the nonce before the plaintext".into());
        }
        match (key, &self.content) {
            (KeyUse::Metadata, _) => self.meta.seal_tail(buf, start, ad),
            (KeyUse::Content, Content::Derived(c)) => c.seal_tail(buf, start, ad),
            (KeyUse::Content, Content::Wrapped { session, .. }) => {
                let s = session
                    .as_ref()
                    .ok_or("no data key session to seal content with")?;
                buf[..DATA_KEY_ID_LEN].copy_from_slice(&s.id);
                s.cipher.seal_tail(buf, start, ad);
            }
        }
        Ok(())
    }

    /// Open a sealed box; `None` when authentication fails or the key is
    /// not available (see [`Keys::open_checked`] for the reason).
    pub fn open(&self, key: KeyUse, ad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        self.open_checked(key, ad, sealed).ok()
    }

    /// Open a sealed box, saying why it failed.
    pub fn open_checked(
        &self,
        key: KeyUse,
        ad: &[u8],
        sealed: &[u8],
    ) -> std::result::Result<Vec<u8>, OpenError> {
        match (key, &self.content) {
            (KeyUse::Metadata, _) => open_with(&self.meta, ad, sealed).ok_or(OpenError::Auth),
            (KeyUse::Content, Content::Derived(c)) => {
                open_with(c, ad, sealed).ok_or(OpenError::Auth)
            }
            (KeyUse::Content, Content::Wrapped { secret, loaded, .. }) => {
                if sealed.len() < DATA_KEY_ID_LEN + SEAL_OVERHEAD {
                    return Err(OpenError::Auth);
                }
                let (id, boxed) = sealed.split_at(DATA_KEY_ID_LEN);
                let id: DataKeyId = id.try_into().expect("16 bytes");
                let own = self
                    .session()
                    .filter(|s| s.id == id)
                    .map(|s| s.cipher.clone());
                let cipher =
                    own.or_else(|| loaded.read().expect("data keys lock").get(&id).cloned());
                match cipher {
                    Some(c) => open_with(&c, ad, boxed).ok_or(OpenError::Auth),
                    None if secret.is_none() => Err(OpenError::NoContentAccess(self.role)),
                    None => Err(OpenError::DataKeyNotLoaded(hex::encode(id))),
                }
            }
        }
    }
}

/// Associated data of a wrapped data key: binds it to its id.
fn data_key_ad(id: &DataKeyId) -> Vec<u8> {
    let mut ad = b"custos/v2/datakey/".to_vec();
    ad.extend_from_slice(id);
    ad
}

/// The AEAD key that wraps a data key: BLAKE3 key derivation over the X25519
/// shared secret and both public keys.
fn wrap_cipher(shared: &[u8; 32], eph: &PublicKey, public: &PublicKey) -> Cipher {
    let mut h = blake3::Hasher::new_derive_key("custos v2 data key wrap");
    h.update(shared);
    h.update(eph.as_bytes());
    h.update(public.as_bytes());
    let mut k = *h.finalize().as_bytes();
    let c = Cipher::new(&k);
    k.zeroize();
    c
}

/// `ephemeral public (32) ‖ sealed(W, "custos/v2/datakey/" ‖ id, key)`.
fn wrap_data_key(public: &PublicKey, id: &DataKeyId, key: &[u8; 32]) -> Vec<u8> {
    let eph = StaticSecret::random_from_rng(rand::rngs::OsRng);
    let eph_pub = PublicKey::from(&eph);
    let shared = eph.diffie_hellman(public);
    let cipher = wrap_cipher(shared.as_bytes(), &eph_pub, public);
    let mut out = eph_pub.as_bytes().to_vec();
    out.extend_from_slice(&seal_with(&cipher, &data_key_ad(id), key));
    out
}

fn unwrap_data_key(
    secret: &StaticSecret,
    id: &DataKeyId,
    object: &[u8],
) -> std::result::Result<Zeroizing<[u8; 32]>, String> {
    if object.len() != WRAPPED_DATA_KEY_LEN {
        return Err(format!(
            "wrapped data key has {} bytes, expected {WRAPPED_DATA_KEY_LEN}",
            object.len()
        ));
    }
    let eph_pub = PublicKey::from(<[u8; 32]>::try_from(&object[..32]).expect("32"));
    let shared = secret.diffie_hellman(&eph_pub);
    if !shared.was_contributory() {
        return Err("wrapped data key has a low-order ephemeral key".into());
    }
    let cipher = wrap_cipher(shared.as_bytes(), &eph_pub, &PublicKey::from(secret));
    let plain = Zeroizing::new(
        open_with(&cipher, &data_key_ad(id), &object[32..])
            .ok_or("wrapped data key does not authenticate (altered, or another repository's)")?,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&plain);
    Ok(key)
}

/// An XChaCha20-Poly1305 key (see the module docs for how it is computed).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Cipher {
    key: [u8; 32],
}

impl Cipher {
    /// A cipher for a 256-bit key.
    pub fn new(key: &[u8; 32]) -> Self {
        Self { key: *key }
    }

    /// The RFC 8439 key and nonce for one box's 24-byte nonce.
    fn ietf(&self, nonce: &[u8; NONCE_LEN]) -> (ring::aead::LessSafeKey, ring::aead::Nonce) {
        let mut sub = chacha20::hchacha::<chacha20::cipher::consts::U10>(
            (&self.key).into(),
            (&nonce[..16]).into(),
        );
        let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &sub)
            .expect("a 32-byte ChaCha20-Poly1305 key");
        sub.as_mut_slice().zeroize();
        let mut short = [0u8; 12];
        short[4..].copy_from_slice(&nonce[16..]);
        (
            ring::aead::LessSafeKey::new(key),
            ring::aead::Nonce::assume_unique_for_key(short),
        )
    }

    /// Seal `plaintext` under a fresh random nonce: `nonce ‖ ciphertext ‖ tag`.
    pub fn seal(&self, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.seal_with_nonce(&nonce, ad, plaintext)
    }

    /// Append `nonce ‖ ciphertext ‖ tag` of `plaintext` under a fresh random
    /// nonce to `out`, encrypting in place there (one copy of the plaintext).
    pub fn seal_into(&self, out: &mut Vec<u8>, ad: &[u8], plaintext: &[u8]) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.seal_into_with_nonce(out, &nonce, ad, plaintext);
    }

    fn seal_with_nonce(&self, nonce: &[u8; NONCE_LEN], ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        self.seal_into_with_nonce(&mut out, nonce, ad, plaintext);
        out
    }

    fn seal_into_with_nonce(
        &self,
        out: &mut Vec<u8>,
        nonce: &[u8; NONCE_LEN],
        ad: &[u8],
        plaintext: &[u8],
    ) {
        out.reserve(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        self.seal_tail_with_nonce(out, start, nonce, ad);
    }

    /// Seal in place under a fresh random nonce: `buf[start..]` is the
    /// plaintext and `buf[start - NONCE_LEN..start]` receives the nonce, so
    /// `buf[start - NONCE_LEN..]` becomes `nonce ‖ ciphertext ‖ tag`.
    fn seal_tail(&self, buf: &mut Vec<u8>, start: usize, ad: &[u8]) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.seal_tail_with_nonce(buf, start, &nonce, ad);
    }

    fn seal_tail_with_nonce(
        &self,
        buf: &mut Vec<u8>,
        start: usize,
        nonce: &[u8; NONCE_LEN],
        ad: &[u8],
    ) {
        buf[start - NONCE_LEN..start].copy_from_slice(nonce);
        let (key, n) = self.ietf(nonce);
        let tag = key
            .seal_in_place_separate_tag(n, ring::aead::Aad::from(ad), &mut buf[start..])
            .expect("ChaCha20-Poly1305 seals any in-memory buffer");
        buf.extend_from_slice(tag.as_ref());
    }

    /// Authenticate and decrypt `nonce ‖ ciphertext ‖ tag`; `None` if it does not open.
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SEAL_OVERHEAD {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().expect("24 bytes");
        let (key, n) = self.ietf(nonce);
        let mut buf = ct.to_vec();
        let len = key
            .open_in_place(n, ring::aead::Aad::from(ad), &mut buf)
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    }
}

/// Seal with an explicit cipher (used for key files, whose key comes from Argon2id).
pub fn seal_with(cipher: &Cipher, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    cipher.seal(ad, plaintext)
}

/// Open with an explicit cipher.
pub fn open_with(cipher: &Cipher, ad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    cipher.open(ad, sealed)
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
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        /// `Cipher` (HChaCha20 + ring's ChaCha20-Poly1305) produces exactly the
        /// boxes of the reference XChaCha20-Poly1305 implementation, and each
        /// opens the other's.
        #[test]
        fn cipher_matches_reference_xchacha20poly1305(
            key in any::<[u8; 32]>(),
            nonce in any::<[u8; 24]>(),
            ad in proptest::collection::vec(any::<u8>(), 0..64),
            plain in proptest::collection::vec(any::<u8>(), 0..3000),
            flip in any::<prop::sample::Index>(),
        ) {
            use chacha20poly1305::aead::{Aead, KeyInit, Payload};
            let reference = chacha20poly1305::XChaCha20Poly1305::new((&key).into());
            let mut expected = nonce.to_vec();
            expected.extend(
                reference
                    .encrypt((&nonce).into(), Payload { msg: &plain, aad: &ad })
                    .unwrap(),
            );
            let ours = Cipher::new(&key);
            let sealed = ours.seal_with_nonce(&nonce, &ad, &plain);
            prop_assert_eq!(&sealed, &expected);
            // Appended after a prefix (a data key id), the box is the same.
            let mut appended = ad.clone();
            ours.seal_into_with_nonce(&mut appended, &nonce, &ad, &plain);
            prop_assert_eq!(&appended[..ad.len()], &ad[..]);
            prop_assert_eq!(&appended[ad.len()..], &expected[..]);
            // Sealed in place behind room for the nonce, the box is the same.
            let mut in_place = vec![0u8; NONCE_LEN];
            in_place.extend_from_slice(&plain);
            ours.seal_tail_with_nonce(&mut in_place, NONCE_LEN, &nonce, &ad);
            prop_assert_eq!(&in_place, &expected);
            prop_assert_eq!(ours.open(&ad, &expected), Some(plain.clone()));
            let opened = reference
                .decrypt((&nonce).into(), Payload { msg: &sealed[NONCE_LEN..], aad: &ad })
                .unwrap();
            prop_assert_eq!(opened, plain);
            // Any flipped bit (nonce, ciphertext or tag) fails authentication.
            let mut bad = sealed.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 0x10;
            prop_assert!(ours.open(&ad, &bad).is_none());
        }
    }

    #[test]
    fn sealing_in_place_gives_boxes_that_open_like_sealed_copies() {
        for keys in [
            Keys::derive(&MasterKey::generate()).with_new_session(),
            Keys::derive_v1(&MasterKey::generate()),
        ] {
            for key in [KeyUse::Content, KeyUse::Metadata] {
                let plain = b"framed blob plaintext".to_vec();
                let prefix = keys.seal_prefix_len(key);
                let mut buf = vec![0xAA; prefix];
                buf.extend_from_slice(&plain);
                keys.seal_in_place(key, b"ad", &mut buf).unwrap();
                let copy = keys.seal(key, b"ad", &plain);
                assert_eq!(buf.len(), copy.len(), "{key:?}");
                assert_eq!(buf[..prefix - NONCE_LEN], copy[..prefix - NONCE_LEN]);
                assert_eq!(keys.open(key, b"ad", &buf).unwrap(), plain, "{key:?}");
                assert!(keys.open(key, b"other", &buf).is_none());
                let mut short = vec![0u8; prefix - 1];
                assert!(keys.seal_in_place(key, b"ad", &mut short).is_err());
            }
        }
    }

    #[test]
    fn seal_open_binds_associated_data() {
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        let boxed = keys.seal(KeyUse::Content, b"ad", b"hello");
        assert_eq!(boxed.len(), DATA_KEY_ID_LEN + 5 + SEAL_OVERHEAD);
        assert_eq!(keys.open(KeyUse::Content, b"ad", &boxed).unwrap(), b"hello");
        assert!(keys.open(KeyUse::Content, b"other", &boxed).is_none());
        assert!(keys.open(KeyUse::Metadata, b"ad", &boxed).is_none());
        let mut flipped = boxed.clone();
        flipped[30] ^= 1;
        assert!(keys.open(KeyUse::Content, b"ad", &flipped).is_none());
    }

    #[test]
    fn format_1_content_key_is_derived() {
        let m = MasterKey::generate();
        let keys = Keys::derive_v1(&m);
        let boxed = keys.seal(KeyUse::Content, b"ad", b"hello");
        assert_eq!(boxed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(
            Keys::derive_v1(&m)
                .open(KeyUse::Content, b"ad", &boxed)
                .unwrap(),
            b"hello"
        );
        assert!(keys.session().is_none() && keys.bundle(Role::Backup).is_none());
    }

    #[test]
    fn a_backup_bundle_writes_content_only_restore_and_admin_read() {
        let m = MasterKey::generate();
        let admin = Keys::derive(&m);
        let backup = Keys::from_bundle(Role::Backup, &admin.bundle(Role::Backup).unwrap()).unwrap();
        let restore =
            Keys::from_bundle(Role::Restore, &admin.bundle(Role::Restore).unwrap()).unwrap();
        // Same ids, digests, seeds and metadata key for every role.
        assert_eq!(backup.blob_id(b"x"), admin.blob_id(b"x"));
        assert_eq!(
            restore.customer_key("email:a@b"),
            admin.customer_key("email:a@b")
        );
        assert_eq!(backup.chunker_seed(), admin.chunker_seed());
        let meta = backup.seal(KeyUse::Metadata, b"m", b"tree");
        assert_eq!(admin.open(KeyUse::Metadata, b"m", &meta).unwrap(), b"tree");

        // The backup writer seals content, keeps it readable itself
        // (verify-after-encrypt) but a fresh backup key cannot read it.
        let writer = backup.with_new_session();
        let sealed = writer.seal(KeyUse::Content, b"ad", b"secret body");
        assert_eq!(
            writer.open(KeyUse::Content, b"ad", &sealed).unwrap(),
            b"secret body"
        );
        let other = Keys::from_bundle(Role::Backup, &admin.bundle(Role::Backup).unwrap()).unwrap();
        assert_eq!(
            other.open_checked(KeyUse::Content, b"ad", &sealed),
            Err(OpenError::NoContentAccess(Role::Backup))
        );
        let session = writer.session().unwrap();
        assert!(other
            .load_data_key(session.id(), session.wrapped())
            .is_err());

        // Restore and admin unwrap the data key and read.
        for reader in [&restore, &admin] {
            let id = reader.missing_data_key(&sealed).unwrap();
            assert_eq!(&id, session.id());
            assert!(matches!(
                reader.open_checked(KeyUse::Content, b"ad", &sealed),
                Err(OpenError::DataKeyNotLoaded(_))
            ));
            reader.load_data_key(&id, session.wrapped()).unwrap();
            assert!(reader.missing_data_key(&sealed).is_none());
            assert_eq!(
                reader.open(KeyUse::Content, b"ad", &sealed).unwrap(),
                b"secret body"
            );
        }

        // A wrapped key bound to another id, altered, or of another repository is refused.
        let mut wrong_id = *session.id();
        wrong_id[0] ^= 1;
        assert!(restore.load_data_key(&wrong_id, session.wrapped()).is_err());
        let mut altered = session.wrapped().to_vec();
        altered[40] ^= 1;
        assert!(restore.load_data_key(session.id(), &altered).is_err());
        let stranger = Keys::derive(&MasterKey::generate());
        assert!(stranger
            .load_data_key(session.id(), session.wrapped())
            .is_err());
        // Bundles are checked.
        let mut bad = admin.bundle(Role::Restore).unwrap().to_vec();
        bad[170] ^= 1;
        assert!(Keys::from_bundle(Role::Restore, &bad).is_err());
        assert!(Keys::from_bundle(Role::Backup, &bad).is_err());
    }

    #[test]
    fn data_key_object_names_round_trip() {
        let k = Keys::derive(&MasterKey::generate()).with_new_session();
        let s = k.session().unwrap();
        assert_eq!(parse_data_key_object(&s.object_name()), Some(*s.id()));
        assert_eq!(s.wrapped().len(), WRAPPED_DATA_KEY_LEN);
        assert_eq!(parse_data_key_object("datakeys/zz"), None);
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
