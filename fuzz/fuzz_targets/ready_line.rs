//! The host parses the readiness line the guest sends: guest-controlled text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some((version, api)) = husk_protocols::parse_ready_line(s) {
            assert!(!version.is_empty());
            assert_eq!(
                husk_protocols::parse_ready_line(&format!(
                    "husk-agent ready {version} api {api}\n"
                )),
                Some((version, api))
            );
        }
    }
});
