//! The config file as `keyfront serve` reads it: arbitrary bytes give a `ConfigError` naming
//! what is wrong, never a panic.
#![no_main]

use std::collections::HashMap;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keyfront.toml");
    std::fs::write(&path, data).expect("write");
    let env: HashMap<String, String> = HashMap::new();
    let _ = keyfront::config::Config::load(&path, &env);
});
