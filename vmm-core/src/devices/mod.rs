//! Emulated devices: the legacy PC pieces a Linux guest needs (serial
//! console, the i8042 reset line) and the virtio-mmio devices.

pub mod legacy;
pub mod virtio;
