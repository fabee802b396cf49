//! Sealed blobs from hostile bytes: decode must fail cleanly (authentication)
//! and never panic, whatever the framing inside claims.
#![no_main]
use custos::blob::{decode, BlobType};
use custos::crypto::{Keys, MasterKey};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| Keys::derive(&MasterKey::generate()))
}

fuzz_target!(|data: &[u8]| {
    let id = keys().blob_id(data);
    assert!(decode(keys(), BlobType::Data, &id, data).is_err());
    let _ = decode(keys(), BlobType::Tree, &id, data);
});
