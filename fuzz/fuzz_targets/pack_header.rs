//! Pack trailers and sealed headers from hostile bytes: never panic, and a
//! header that authenticates must describe exactly the bytes before it.
#![no_main]
use custos::crypto::{Keys, MasterKey};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| Keys::derive(&MasterKey::generate()))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = custos::pack::read_header(keys(), "fuzz", data) {
        let total: u64 = entries.iter().map(|e| u64::from(e.length)).sum();
        assert!(total <= data.len() as u64);
    }
    let _ = custos::pack::parse_pack_name(&String::from_utf8_lossy(data));
});
