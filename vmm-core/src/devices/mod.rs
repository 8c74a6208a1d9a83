//! Emulated devices: the legacy PC pieces a Linux guest needs (serial
//! console, the i8042 reset line) and the virtio-mmio devices.
//!
//! A guest drives everything here, so nothing here logs except through
//! `logger.rs`'s rate-limited macros (a test in `logger.rs` reads these
//! sources and refuses the plain `tracing` macros).

pub mod legacy;
pub mod virtio;
