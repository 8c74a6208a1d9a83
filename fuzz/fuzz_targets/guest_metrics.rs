//! The shim turns the container statistics the agent sends (protobuf,
//! guest-controlled) into containerd's metrics: any values must map and
//! encode without a panic (no overflow in unit conversions or sums).
#![no_main]

use husk_protocols::agent::StatsContainerResponse;
use husk_shim::metrics::v1_metrics;
use libfuzzer_sys::fuzz_target;
use protobuf::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = StatsContainerResponse::parse_from_bytes(data) {
        let m = v1_metrics(&s);
        assert_eq!(m.pids.current, s.pids.current);
        assert_eq!(m.memory.usage.usage, s.memory.usage);
        assert!(m.write_to_bytes().is_ok());
    }
});
