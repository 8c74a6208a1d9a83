//! The balloon's queue parsers on guest memory the fuzzer writes whole
//! (descriptor table, available ring, buffers, indirect tables, loops,
//! addresses past the end): the first input byte picks the queue (free page
//! reports, inflate/deflate page lists, statistics), the rest is guest
//! memory. Each popped chain's outcome is compared with a reference built
//! from the chain's descriptors, and every range a report or an inflate
//! list yields is punched out of the guest's memfd, which must succeed
//! (every range was checked to be guest RAM).
#![no_main]

use std::sync::OnceLock;

use husk_vmm_core::{
    devices::virtio::balloon::{
        device::{
            discard, parse_stats, pfn_ranges, read_pfns, reported_ranges, MAX_PFNS, MAX_STATS,
        },
        PAGE_SIZE,
    },
    memory::{create_guest_memory, GuestMemory},
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 0x1_0000;

/// One memfd-backed guest memory for the whole run (as husk-vmm's).
fn memory() -> &'static GuestMemory {
    static MEMORY: OnceLock<GuestMemory> = OnceLock::new();
    MEMORY.get_or_init(|| {
        let (mem, file) = create_guest_memory(MEM).expect("guest memory");
        // The mapping keeps its own reference to the file.
        drop(file);
        mem
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let mem = memory();
    let mut image = vec![0u8; MEM as usize];
    let n = rest.len().min(image.len());
    image[..n].copy_from_slice(&rest[..n]);
    if mem.write_slice(&image, GuestAddress(0)).is_err() {
        return;
    }
    let Ok(mut q) = Queue::new(16) else { return };
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    for _ in 0..32 {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        match which % 3 {
            0 => {
                let want = expected_report(chain.clone());
                let got = reported_ranges(mem, chain);
                assert_eq!(want, got.as_ref().ok().cloned(), "report: {got:?}");
                for (addr, len) in got.unwrap_or_default() {
                    discard(mem, addr, len).expect("a checked range punches");
                }
            }
            1 => {
                let want = expected_bytes(chain.clone(), MAX_PFNS * 4, 4).map(|b| {
                    b.chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect::<Vec<u32>>()
                });
                let want = want.filter(|p| {
                    p.iter()
                        .all(|&pfn| u64::from(pfn) * PAGE_SIZE + PAGE_SIZE <= MEM)
                });
                let got = read_pfns(mem, chain);
                assert_eq!(want, got.as_ref().ok().cloned(), "pfns: {got:?}");
                for (addr, len) in pfn_ranges(&got.unwrap_or_default()) {
                    discard(mem, addr, len).expect("a checked page punches");
                }
            }
            _ => {
                let want = expected_bytes(chain.clone(), MAX_STATS * 10, 10);
                let got = parse_stats(mem, chain);
                assert_eq!(want.map(|b| b.len() / 10), got.as_ref().ok().map(Vec::len));
            }
        }
        let _ = q.add_used(mem, head, 0);
    }
});

/// The ranges a report must yield: every descriptor device-writable,
/// page-aligned, non-empty, inside guest memory; at least one.
fn expected_report(chain: DescriptorChain<&GuestMemory>) -> Option<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for d in chain {
        let (addr, len) = (d.addr().0, u64::from(d.len()));
        if !d.is_write_only()
            || len == 0
            || addr % PAGE_SIZE != 0
            || len % PAGE_SIZE != 0
            || addr.checked_add(len)? > MEM
        {
            return None;
        }
        out.push((addr, len));
    }
    (!out.is_empty()).then_some(out)
}

/// The bytes a device-readable buffer must yield: every descriptor
/// device-readable and inside guest memory, at most `max` bytes in all, a
/// whole number of `entry`-byte entries, at least one byte.
fn expected_bytes(
    chain: DescriptorChain<&GuestMemory>,
    max: usize,
    entry: usize,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for d in chain {
        let (addr, len) = (d.addr().0, d.len() as usize);
        if d.is_write_only() || out.len() + len > max {
            return None;
        }
        if len == 0 {
            continue;
        }
        if addr.checked_add(len as u64)? > MEM {
            return None;
        }
        let start = out.len();
        out.resize(start + len, 0);
        memory()
            .read_slice(&mut out[start..], GuestAddress(addr))
            .ok()?;
    }
    (!out.is_empty() && out.len() % entry == 0).then_some(out)
}
