//! Pack trailers and headers from hostile bytes: never panic, and a header
//! that parses must describe exactly the bytes before it — every blob and
//! group inside them, in order, and each group's members tiling its
//! plaintext from offset 0.
#![no_main]
use custos::crypto::{Keys, MasterKey};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| Keys::derive(&MasterKey::generate()))
}

fuzz_target!(|data: &[u8]| {
    // Sealed: hostile bytes never authenticate, but must not panic.
    let _ = custos::pack::read_header(keys(), "fuzz", data);
    let _ = custos::pack::parse_pack_name(&String::from_utf8_lossy(data));
    // Opened: the parser itself, with the body length from the first bytes.
    let Some((len, header)) = data.split_first_chunk::<4>() else {
        return;
    };
    let body_len = u64::from(u32::from_le_bytes(*len));
    let Ok(entries) = custos::pack::parse_header("fuzz", body_len, header) else {
        return;
    };
    let (mut end, mut inner) = (0u64, 0u64);
    let mut group = None;
    for e in &entries {
        let start = u64::from(e.offset);
        let same_group = e.group.is_some_and(|g| Some((g.id, e.offset)) == group);
        if !same_group {
            assert_eq!(start, end, "units are contiguous");
            end = start + u64::from(e.length);
            inner = 0;
            group = e.group.map(|g| (g.id, e.offset));
        }
        if let Some(g) = e.group {
            assert_eq!(u64::from(g.inner), inner, "members tile their group");
            inner += u64::from(e.raw_length);
        }
    }
    assert_eq!(end, body_len, "units add up to the body");
});
