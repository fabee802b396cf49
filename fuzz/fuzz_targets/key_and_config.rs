//! Key objects, the config header and the TOML config file from hostile
//! bytes: parse errors, never panics, and KDF caps always enforced.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(kf) = custos::keyfile::KeyFile::parse("fuzz", data) {
        assert!(kf.params.memory_kib <= custos::keyfile::MAX_MEMORY_KIB);
        assert!(kf.params.iterations <= custos::keyfile::MAX_ITERATIONS);
    }
    let _ = custos::repo::config_version("fuzz", data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = custos::settings::Settings::parse(text);
    }
});
