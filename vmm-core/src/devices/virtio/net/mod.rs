//! virtio-net in userspace, on a tap (no `/dev/vhost-net` on these hosts;
//! a frame costs a read and a write in the VMM either way).
//!
//! * [`tap`]: the tap backend (and the trait tests replace it with);
//! * [`device`]: the virtio device (queues, config space, frame checks);
//! * [`event_handler`]: the device's part of the VMM event loop.
//!
//! The device offers no offloads (checksum, segmentation): frames cross
//! whole and plain, which keeps the guest-facing parser to one header
//! that must be all zeros but for `num_buffers`.

pub mod device;
pub mod event_handler;
pub mod tap;

pub use device::Net;
pub use event_handler::NetHandler;

/// virtio device type of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Queue size of the RX and TX queues.
pub const QUEUE_SIZE: u16 = 256;
