//! The PHC string a caller hands VerifyPassword: parsed or refused, never a panic, and never
//! costs beyond the server's bounds (a crafted hash must not make it allocate gigabytes or
//! spin for minutes).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(costs) = keyfront::kms::password_hash_costs(text) {
        assert!((8..=1 << 20).contains(&costs.memory_kib));
        assert!((1..=16).contains(&costs.iterations));
        assert!((1..=16).contains(&costs.parallelism));
    }
});
