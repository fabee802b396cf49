//! Key objects (`keys/<id>`): a role's secrets wrapped under a passphrase.
//!
//! A key object is plaintext JSON (it must be readable before any key is
//! known) holding its role, Argon2id parameters, a salt and the sealed
//! secret: the master key for `admin`, a key bundle for `backup` and
//! `restore` (FORMAT.md, "Roles"). The
//! parameters are capped when read so a hostile key object cannot make us
//! allocate unbounded memory or spin for hours. The key id is the BLAKE3 of
//! the object's bytes.

use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::{open_with, seal_with, MasterKey, Role};
use crate::error::{Error, Result};
use crate::id::Id;

/// Key object format version.
pub const KEY_VERSION: u32 = 1;
/// Associated data of the wrapped master key (admin keys).
pub const KEY_AD: &[u8] = b"custos/v1/key";

/// Associated data of a wrapped role bundle (`custos/v2/key/<role>`): binds
/// the bundle to its role, so editing the plaintext `role` field fails.
fn role_ad(role: Role) -> Vec<u8> {
    format!("custos/v2/key/{role}").into_bytes()
}

/// What a key object unwraps to.
pub enum Unwrapped {
    /// An admin key: the master key.
    Master(MasterKey),
    /// A backup or restore key: its bundle ([`crate::crypto::Keys::from_bundle`]).
    Bundle(Role, Zeroizing<Vec<u8>>),
}

/// Highest Argon2id memory accepted from a key object (KiB): 1 GiB.
pub const MAX_MEMORY_KIB: u32 = 1 << 20;
/// Highest Argon2id iteration count accepted from a key object.
pub const MAX_ITERATIONS: u32 = 32;
/// Highest Argon2id parallelism accepted from a key object.
pub const MAX_PARALLELISM: u32 = 16;

/// Argon2id parameters.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Iterations (time cost).
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 32 MiB, 4 passes, 2 lanes: above OWASP's Argon2id floor (19 MiB, 2
    /// passes). Every command pays this once to open the repository, and its
    /// memory is the floor of every command's peak RSS, so it is not set
    /// higher by default; `kdf_memory_kib` raises it. Two lanes cost an
    /// attacker the same work as one, and are derived on two threads here
    /// (opening a repository: ~50 → ~30 ms on a 2-core server).
    fn default() -> Self {
        KdfParams {
            memory_kib: 32 * 1024,
            iterations: 4,
            parallelism: 2,
        }
    }
}

impl KdfParams {
    /// Refuse parameters outside the caps (or below Argon2's minimums).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.memory_kib > MAX_MEMORY_KIB
            || self.iterations > MAX_ITERATIONS
            || self.parallelism > MAX_PARALLELISM
        {
            return Err(format!(
                "KDF parameters above the caps (memory {} KiB ≤ {MAX_MEMORY_KIB}, iterations {} ≤ {MAX_ITERATIONS}, parallelism {} ≤ {MAX_PARALLELISM})",
                self.memory_kib, self.iterations, self.parallelism
            ));
        }
        if self.iterations == 0 || self.parallelism == 0 || self.memory_kib < 8 * self.parallelism {
            return Err("KDF parameters below Argon2 minimums".into());
        }
        Ok(())
    }

    fn derive(&self, password: &[u8], salt: &[u8]) -> std::result::Result<[u8; 32], String> {
        self.validate()?;
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| e.to_string())?;
        let mut out = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(password, salt, &mut out)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// The JSON of a key object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Key object format version.
    pub version: u32,
    /// When the key was added (RFC 3339, UTC).
    pub created: chrono::DateTime<chrono::Utc>,
    /// Role of the key: `admin` wraps the master key, `backup` and `restore`
    /// a key bundle (FORMAT.md, "Roles").
    pub role: String,
    /// Always `argon2id` in version 1.
    pub kdf: String,
    /// Argon2id parameters.
    pub params: KdfParams,
    /// Salt, base64.
    pub salt: String,
    /// Sealed master key, base64 (`nonce ‖ ciphertext ‖ tag`).
    pub data: String,
}

impl KeyFile {
    /// Wrap `master` under `password` (an admin key).
    pub fn create(master: &MasterKey, password: &[u8], params: KdfParams) -> Result<KeyFile> {
        Self::wrap(Role::Admin, KEY_AD, &master.0, password, params)
    }

    /// Wrap a backup or restore `bundle` under `password`.
    pub fn create_role(
        role: Role,
        bundle: &[u8],
        password: &[u8],
        params: KdfParams,
    ) -> Result<KeyFile> {
        Self::wrap(role, &role_ad(role), bundle, password, params)
    }

    fn wrap(
        role: Role,
        ad: &[u8],
        secret: &[u8],
        password: &[u8],
        params: KdfParams,
    ) -> Result<KeyFile> {
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let mut kek = params
            .derive(password, &salt)
            .map_err(|e| Error::Config(format!("key derivation: {e}")))?;
        let cipher = crate::crypto::Cipher::new(&kek);
        kek.zeroize();
        let sealed = seal_with(&cipher, ad, secret);
        Ok(KeyFile {
            version: KEY_VERSION,
            created: chrono::Utc::now(),
            role: role.as_str().into(),
            kdf: "argon2id".into(),
            params,
            salt: B64.encode(salt),
            data: B64.encode(sealed),
        })
    }

    /// The role named in the object (checked by [`KeyFile::parse`]).
    pub fn role(&self) -> Role {
        Role::parse(&self.role).unwrap_or(Role::Backup)
    }

    /// Serialize to the stored bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("key file serializes")
    }

    /// Parse stored bytes (`id` names the object in errors).
    pub fn parse(id: &str, bytes: &[u8]) -> Result<KeyFile> {
        let kf: KeyFile = serde_json::from_slice(bytes).map_err(|e| Error::Key {
            id: id.to_string(),
            reason: format!("not a key object: {e}"),
        })?;
        if kf.version != KEY_VERSION {
            return Err(Error::UnsupportedVersion {
                object: format!("key {id}"),
                found: kf.version,
                supported: KEY_VERSION.to_string(),
            });
        }
        if kf.kdf != "argon2id" {
            return Err(Error::Key {
                id: id.to_string(),
                reason: format!("unknown KDF {:?}", kf.kdf),
            });
        }
        if Role::parse(&kf.role).is_none() {
            return Err(Error::Key {
                id: id.to_string(),
                reason: format!("role {:?} is not known to this version", kf.role),
            });
        }
        kf.params.validate().map_err(|reason| Error::Key {
            id: id.to_string(),
            reason,
        })?;
        Ok(kf)
    }

    /// Try to unwrap the key's secret; `Ok(None)` when the password is wrong.
    pub fn open(&self, id: &str, password: &[u8]) -> Result<Option<Unwrapped>> {
        let bad = |reason: &str| Error::Key {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        let salt = B64
            .decode(&self.salt)
            .map_err(|_| bad("salt is not base64"))?;
        let data = B64
            .decode(&self.data)
            .map_err(|_| bad("data is not base64"))?;
        let mut kek = self.params.derive(password, &salt).map_err(|e| bad(&e))?;
        let cipher = crate::crypto::Cipher::new(&kek);
        kek.zeroize();
        let role = Role::parse(&self.role).ok_or_else(|| bad("unknown role"))?;
        let ad = match role {
            Role::Admin => KEY_AD.to_vec(),
            r => role_ad(r),
        };
        let Some(plain) = open_with(&cipher, &ad, &data).map(Zeroizing::new) else {
            return Ok(None);
        };
        if role != Role::Admin {
            return Ok(Some(Unwrapped::Bundle(role, plain)));
        }
        if plain.len() != 32 {
            return Err(bad("wrapped key has the wrong length"));
        }
        let mut k = [0u8; 32];
        k.copy_from_slice(&plain);
        Ok(Some(Unwrapped::Master(MasterKey(k))))
    }

    /// The id (object name) of these bytes.
    pub fn id_of(bytes: &[u8]) -> Id {
        Id::of_object(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> KdfParams {
        KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    /// The key-encryption key is plain Argon2id (RFC 9106, v0x13), pinned to
    /// the reference implementation (libargon2 through argon2-cffi's
    /// `hash_secret_raw`), so a dependency upgrade cannot change it and lock
    /// users out of existing key files.
    #[test]
    fn argon2id_matches_the_reference_implementation() {
        let expected = [
            (
                1,
                "547c725ec0f613b2a18cd2ebfdcbd350c21285fa429c18f53919e5e4b3723792",
            ),
            (
                2,
                "94c0a9068b567b9f658b022e6d75efc60e63c0643be460fd38092afa9d38c1b4",
            ),
        ];
        for (lanes, hex) in expected {
            let params = KdfParams {
                memory_kib: 64,
                iterations: 3,
                parallelism: lanes,
            };
            let kek = params
                .derive(b"custos test password", b"custos-salt-0123")
                .unwrap();
            assert_eq!(hex::encode(kek), hex, "{lanes} lane(s)");
        }
    }

    #[test]
    fn wrap_unwrap_and_wrong_password() {
        let m = MasterKey::generate();
        let kf = KeyFile::create(&m, b"pw", cheap()).unwrap();
        let bytes = kf.to_bytes();
        let kf2 = KeyFile::parse("k", &bytes).unwrap();
        match kf2.open("k", b"pw").unwrap().unwrap() {
            Unwrapped::Master(got) => assert_eq!(got.0, m.0),
            Unwrapped::Bundle(..) => panic!("an admin key unwraps the master key"),
        }
        assert!(kf2.open("k", b"nope").unwrap().is_none());
    }

    #[test]
    fn role_keys_wrap_bundles_bound_to_their_role() {
        let kf = KeyFile::create_role(Role::Backup, b"bundle bytes", b"pw", cheap()).unwrap();
        let parsed = KeyFile::parse("k", &kf.to_bytes()).unwrap();
        assert_eq!(parsed.role(), Role::Backup);
        match parsed.open("k", b"pw").unwrap().unwrap() {
            Unwrapped::Bundle(role, b) => {
                assert_eq!(role, Role::Backup);
                assert_eq!(b.as_slice(), b"bundle bytes");
            }
            Unwrapped::Master(_) => panic!("a backup key wraps a bundle"),
        }
        // Promoting the plaintext role field does not promote the key.
        for role in ["restore", "admin"] {
            let mut promoted = parsed.clone();
            promoted.role = role.into();
            let p = KeyFile::parse("k", &promoted.to_bytes()).unwrap();
            assert!(p.open("k", b"pw").unwrap().is_none(), "{role}");
        }
        let mut unknown = parsed.clone();
        unknown.role = "superuser".into();
        let err = KeyFile::parse("k9", &unknown.to_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("k9") && err.contains("superuser"), "{err}");
    }

    #[test]
    fn hostile_parameters_are_refused_before_any_work() {
        let m = MasterKey::generate();
        let mut kf = KeyFile::create(&m, b"pw", cheap()).unwrap();
        kf.params.memory_kib = u32::MAX;
        let err = KeyFile::parse("k1", &kf.to_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("k1") && err.contains("caps"), "{err}");
        kf.params.memory_kib = 64;
        kf.version = 9;
        let err = KeyFile::parse("k1", &kf.to_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 9"), "{err}");
    }
}
