//! Tree blob JSON and snapshot lookup specs from hostile bytes.
#![no_main]
use custos::id::Id;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(custos::tree::TreeDoc::Leaf { nodes }) = custos::tree::parse_tree(&Id::default(), data) {
        for n in nodes {
            let _ = n.name_bytes();
            let _ = n.link_target_bytes();
        }
    }
    let _ = custos::snapshot::find(&[], &String::from_utf8_lossy(data));
});
