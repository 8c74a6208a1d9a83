//! The vsock TX path's descriptor-chain parsing (`read_tx_packet`) on guest
//! memory the fuzzer writes whole: descriptor table, available ring, packet
//! bytes, indirect tables, loops, addresses past the end. Each popped chain's
//! outcome is compared with a reference built from the chain's readable
//! descriptors: a chain reaching outside guest memory is a `Chain` error; a
//! short one is `Short`; a header that fails its check is refused for that
//! reason; a short payload is `ShortPayload`; otherwise the header and payload
//! are exactly the chain's first bytes.
#![no_main]

use husk_vmm_core::{
    devices::virtio::vsock::{
        device::{read_tx_packet, TxError},
        muxer::HOST_CID,
        packet::{Header, PacketError, HDR_SIZE},
    },
    memory::GuestMemory,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

const MEM: u64 = 0x1_0000;
const GUEST_CID: u64 = 3;

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
    let mut payload = Vec::new();
    for _ in 0..32 {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let reference = expected(&mem, chain.clone());
        let got = read_tx_packet(&mem, chain, GUEST_CID, &mut payload);
        match (reference, got) {
            (Err(Want::Chain), Err(TxError::Chain(_))) => {}
            (Err(Want::Header(w)), Err(TxError::Header(g))) => assert_eq!(w, g),
            (Err(Want::ShortPayload(w)), Err(TxError::ShortPayload(g))) => assert_eq!(w, g),
            (Ok((wh, wp)), Ok(gh)) => {
                assert_eq!(wh, gh);
                assert_eq!(wp, payload, "payload differs from the chain's bytes");
            }
            (w, g) => panic!("expected {w:?}, got {g:?}"),
        }
        let _ = q.add_used(&mem, head, 0);
    }
});

#[derive(Debug)]
enum Want {
    Chain,
    Header(PacketError),
    ShortPayload(u32),
}

/// What `read_tx_packet` must return, from the chain's readable prefix.
fn expected(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> Result<(Header, Vec<u8>), Want> {
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
    let raw: [u8; HDR_SIZE] = bytes
        .get(..HDR_SIZE)
        .and_then(|b| b.try_into().ok())
        .ok_or(Want::Header(PacketError::Short))?;
    let hdr = Header::from_bytes(&raw);
    hdr.check(GUEST_CID, HOST_CID).map_err(Want::Header)?;
    let want = HDR_SIZE + hdr.len as usize;
    let payload = bytes
        .get(HDR_SIZE..want)
        .ok_or(Want::ShortPayload(hdr.len))?;
    Ok((hdr, payload.to_vec()))
}
