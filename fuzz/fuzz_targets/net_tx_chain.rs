//! The virtio-net TX path's descriptor-chain parsing (`read_tx_frame`) on
//! guest memory the fuzzer writes whole: descriptor table, available ring,
//! frame bytes, indirect tables, loops, addresses past the end. Each popped
//! chain's outcome is compared with a reference built from the chain's
//! readable descriptors: a chain reaching outside guest memory is a `Chain`
//! error; fewer than a header and an Ethernet header is `Short`; more than a
//! header and the largest frame is `Long`; a header with offload flags or a
//! GSO type is `Offload`; otherwise the frame is exactly the bytes after the
//! header.
#![no_main]

use husk_vmm_core::{
    devices::virtio::net::device::{read_tx_frame, TxError, MAX_FRAME, NET_HDR_SIZE},
    memory::GuestMemory,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

const MEM: u64 = 0x1_0000;

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]) else {
        return;
    };
    let n = data.len().min(MEM as usize);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    // Descriptor table at 0, available ring at 0x100, used ring at 0x200,
    // as a driver would place them; all contents are the fuzzer's.
    let Ok(mut q) = Queue::new(16) else { return };
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    let mut frame = Vec::new();
    for _ in 0..32 {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let reference = expected(&mem, chain.clone());
        let got = read_tx_frame(&mem, chain, &mut frame);
        match (reference, got) {
            (Err(Want::Chain), Err(TxError::Chain(_))) => {}
            (Err(Want::Other(w)), Err(g)) => assert_eq!(w, g),
            (Ok(w), Ok(())) => assert_eq!(w, frame, "frame differs from the chain's bytes"),
            (w, g) => panic!("expected {w:?}, got {g:?}"),
        }
        let _ = q.add_used(&mem, head, 0);
    }
});

#[derive(Debug)]
enum Want {
    Chain,
    Other(TxError),
}

/// What `read_tx_frame` must return, from the chain's readable bytes.
fn expected(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> Result<Vec<u8>, Want> {
    let mut bytes = Vec::new();
    for d in chain.readable() {
        let (addr, len) = (d.addr(), u64::from(d.len()));
        let end = addr.0.checked_add(len).ok_or(Want::Chain)?;
        if !mem.address_in_range(addr) || end > MEM {
            return Err(Want::Chain);
        }
        let start = bytes.len();
        bytes.resize(start + len as usize, 0);
        mem.read_slice(&mut bytes[start..], addr)
            .map_err(|_| Want::Chain)?;
    }
    if bytes.len() < NET_HDR_SIZE + 14 {
        return Err(Want::Other(TxError::Short(bytes.len())));
    }
    if bytes.len() > NET_HDR_SIZE + MAX_FRAME {
        return Err(Want::Other(TxError::Long(bytes.len())));
    }
    let (flags, gso_type) = (bytes[0], bytes[1]);
    if flags != 0 || gso_type != 0 {
        return Err(Want::Other(TxError::Offload { flags, gso_type }));
    }
    Ok(bytes[NET_HDR_SIZE..].to_vec())
}
