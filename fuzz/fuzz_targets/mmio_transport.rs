//! Drives the virtio-mmio register file of a vsock device with arbitrary
//! reads and writes (what a hostile guest driver can do). Asserts after every
//! access: no panic; a device is activated only with FEATURES_OK and
//! DRIVER_OK set and neither FAILED nor DEVICE_NEEDS_RESET; and each of its
//! queues, for as long as it is active, is
//! ready with a power-of-two size no larger than offered, its rings aligned
//! and inside guest memory (virtio 1.2, 2.7), checked from the transport's
//! saved state against the spec's rules rather than through virtio-queue.
#![no_main]

use husk_vmm_core::{
    bus::BusDevice,
    devices::virtio::{
        mmio::{MmioTransport, QueueSnapshot},
        vsock::{muxer::Muxer, Vsock},
        Interrupt, InterruptLine,
    },
    memory::GuestMemory,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

#[derive(Debug)]
struct NoIrq;
impl InterruptLine for NoIrq {
    fn raise(&self) -> std::io::Result<()> {
        Ok(())
    }
}

const MEM: u64 = 0x10_0000;
const FEATURES_OK: u32 = 8;
const DRIVER_OK: u32 = 4;
const FAILED: u32 = 128;
const NEEDS_RESET: u32 = 64;

fn ring_ok(addr: u64, align: u64, len: u64) -> bool {
    addr % align == 0 && addr.checked_add(len).is_some_and(|end| end <= MEM)
}

fn queue_ok(q: &QueueSnapshot) -> bool {
    let n = u64::from(q.size);
    q.ready
        && q.size.is_power_of_two()
        && q.size <= q.max_size
        && ring_ok(q.desc_table, 16, 16 * n)
        && ring_ok(q.avail_ring, 2, 6 + 2 * n)
        && ring_ok(q.used_ring, 4, 6 + 8 * n)
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("husk-fuzz-mmio-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("mem");
    let muxer = Muxer::new(3, &dir.join("v.sock")).expect("muxer");
    let dev = Vsock::new(3, muxer).expect("vsock");
    let mut t =
        MmioTransport::new(mem, Box::new(dev), Interrupt::new(Box::new(NoIrq))).expect("transport");
    let mut was_activated = false;
    for op in data.chunks(7) {
        if op.len() < 7 {
            break;
        }
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0x1ff);
        let value = [op[3], op[4], op[5], op[6]];
        let len = [1usize, 2, 4, 8][usize::from(op[0] >> 6)].min(4);
        if op[0] & 1 == 0 {
            let mut buf = [0u8; 4];
            t.read(offset, &mut buf[..len]);
        } else {
            t.write(offset, &value[..len]);
        }
        if t.is_activated() {
            let s = t.save_state();
            assert!(s.activated);
            if !was_activated {
                // At activation: the driver finished feature negotiation and
                // said DRIVER_OK, and nothing had failed. (The driver may
                // set FAILED later; the device stays active until reset.)
                assert_eq!(
                    s.status & (FEATURES_OK | DRIVER_OK),
                    FEATURES_OK | DRIVER_OK,
                    "status {:#x}",
                    s.status
                );
                assert_eq!(
                    s.status & (FAILED | NEEDS_RESET),
                    0,
                    "status {:#x}",
                    s.status
                );
            }
            for (i, q) in s.queues.iter().enumerate() {
                assert!(queue_ok(q), "activated with queue {i} invalid: {q:?}");
            }
        }
        was_activated = t.is_activated();
    }
});
