//! virtio-balloon: the guest gives memory back to the host.
//!
//! Guest RAM is a memfd mapped shared (vhost-user daemons map it too), so
//! `madvise(MADV_DONTNEED)` frees nothing: a page leaves the host only when
//! its range is punched out of the memfd (`fallocate(PUNCH_HOLE)`), which
//! drops it from every mapping at once (the VMM's, KVM's, each daemon's).
//! Three ways lead there:
//!
//! * **free page reporting** (`VIRTIO_BALLOON_F_REPORTING`): the guest's
//!   page allocator hands over ranges it has had free for a while (order
//!   `page_reporting_order` and up); the device punches them out and returns
//!   the buffer. This is what keeps an idle pod small without anybody
//!   asking: memory a container freed goes back to the host seconds later.
//! * **inflate/deflate**: the host sets a target (`num_pages`); the driver
//!   takes that many pages from the guest and lists their frame numbers on
//!   the inflate queue (punched), or gives pages back through the deflate
//!   queue. With `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` the guest deflates by
//!   itself before it would OOM-kill.
//! * **statistics** (`VIRTIO_BALLOON_F_STATS_VQ`): the driver keeps one
//!   buffer of `(tag, value)` pairs on the stats queue; the device returns
//!   it at a set interval and the driver refills it.
//!
//! * [`device`]: the device, the queue parsers (every address and length
//!   the guest gives is checked: it is not trusted), hole punching;
//! * [`event_handler`]: the device's part of the VMM event loop (queue
//!   eventfds, the statistics timer).

pub mod device;
pub mod event_handler;

pub use device::{Balloon, BalloonControl, BalloonReport, GuestStats};
pub use event_handler::BalloonHandler;

/// virtio device type of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The balloon's page size (`VIRTIO_BALLOON_PFN_SHIFT`): frame numbers on
/// the inflate and deflate queues count 4 KiB pages whatever the guest's
/// own page size.
pub const PAGE_SIZE: u64 = 4096;
