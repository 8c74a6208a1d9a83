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
/// Size of the transmit and event queues (the guest fills them only as it
/// sends).
pub const QUEUE_SIZE: u16 = 256;
/// Size of the receive queue. The guest driver keeps it full of 4 KiB
/// buffers for the whole life of the VM, so each entry is 4 KiB of every
/// pod's memory: at 256 it was the guest's biggest slab cache (1 MiB of
/// kmalloc-4k in an idle pod, `/proc/slabinfo`). 64 entries still let
/// 256 KiB of host-to-guest data (stdin, forwarded ports) be in flight.
pub const RX_QUEUE_SIZE: u16 = 64;
