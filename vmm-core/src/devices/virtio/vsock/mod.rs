//! virtio-vsock, implemented in the VMM (no vhost-vsock on these hosts).
//!
//! * [`packet`]: the wire header and its validation;
//! * [`muxer`]: host Unix sockets <-> guest streams, flow control;
//! * [`device`]: the virtio device (queues, config space);
//! * [`event_handler`]: the device's part of the VMM event loop.

pub mod device;
pub mod event_handler;
pub mod muxer;
pub mod packet;

pub use device::Vsock;
pub use event_handler::VsockHandler;

/// virtio device type of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
