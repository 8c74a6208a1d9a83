//! Drives the virtio-mmio register file of a vsock device with arbitrary
//! reads and writes (what a hostile guest driver can do): no panic, no
//! activation with invalid queues.
#![no_main]

use std::sync::Arc;

use husk_vmm_core::{
    bus::BusDevice,
    devices::virtio::{
        mmio::MmioTransport,
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

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("husk-fuzz-mmio-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
    let muxer = Muxer::new(3, &dir.join("v.sock")).expect("muxer");
    let dev = Vsock::new(3, muxer).expect("vsock");
    let mut t = MmioTransport::new(mem, Box::new(dev), Interrupt::new(Box::new(NoIrq))).expect("transport");
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
    }
});
