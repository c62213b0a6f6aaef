//! Config parsing (TOML, `${VAR}` interpolation, validation) on arbitrary text: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn env(name: &str) -> Option<String> {
    match name {
        "A" => Some("x".into()),
        "B" => Some("${A}$${".into()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = tollgate::Config::from_toml(text, env) {
            assert!(config.max_body_bytes > 0);
            for m in config.catalog.models.values() {
                assert!(config.providers.iter().any(|p| p.name == m.provider));
            }
        }
    }
});
