//! The Intel MultiProcessor Specification table (v1.4).
//!
//! Without ACPI, this is how the guest kernel learns its CPUs, the IOAPIC and
//! how ISA interrupts are wired. It lives in the last KiB of base memory,
//! where Linux scans for it.

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPC_SPEC: u8 = 4;
const MPC_OEM: &[u8; 8] = b"HUSK    ";
const MPC_PRODUCT: &[u8; 12] = b"000000000000";
const APIC_VERSION: u8 = 0x14;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MPC_APIC_USABLE: u8 = 1;
const BUS_ID_ISA: u8 = 0;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    /// More CPUs than fit in the space Linux scans.
    #[error("too many vCPUs for the MP table: {0}")]
    TooManyCpus(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

// Every length here is bounded by the 1 KiB check; addresses are below 4 GiB.
#[allow(clippy::cast_possible_truncation)]
/// Builds the MP floating pointer and configuration table for `cpus` vCPUs.
/// Returns the guest address to write it to and its bytes.
pub fn build(cpus: u8) -> Result<(u64, Vec<u8>), MptableError> {
    // The IOAPIC gets the APIC id after the last CPU.
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    for cpu in 0..cpus {
        entries.push(MP_PROCESSOR);
        entries.push(cpu); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&u32::try_from(IOAPIC_START).unwrap_or(0).to_le_bytes());
    // ISA IRQ n -> IOAPIC pin n, for every pin.
    for irq in 0..=IRQ_MAX {
        let irq = irq as u8;
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, BUS_ID_ISA, irq, ioapic_id, irq]);
    }
    // LINT0 is ExtINT, LINT1 is NMI, on every local APIC.
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, BUS_ID_ISA, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);

    let entry_count = u16::from(cpus) + 2 + (IRQ_MAX as u16 + 1) + 2;
    let table_len = 44 + entries.len();
    let total = 16 + table_len;
    if total > 1024 {
        return Err(MptableError::TooManyCpus(cpus));
    }

    let table_addr = EBDA_START + 16;
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, below
    table.extend_from_slice(MPC_OEM);
    table.extend_from_slice(MPC_PRODUCT);
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&u32::try_from(APIC_START).unwrap_or(0).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = 0u8.wrapping_sub(checksum(&table));

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MPC_SPEC);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0u8; 5]); // feature bytes: config table present
    mpf[10] = 0u8.wrapping_sub(checksum(&mpf));

    let mut out = mpf;
    out.extend_from_slice(&table);
    Ok((EBDA_START, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_signatures() {
        for cpus in [1u8, 2, 16] {
            let (addr, bytes) = build(cpus).expect("table");
            assert_eq!(addr, EBDA_START);
            assert_eq!(&bytes[..4], MPF_SIGNATURE);
            assert_eq!(checksum(&bytes[..16]), 0);
            let table = &bytes[16..];
            assert_eq!(&table[..4], MPC_SIGNATURE);
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(checksum(table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + 24 + 2);
            // The floating pointer points at the table right after it.
            let ptr = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
            assert_eq!(u64::from(ptr), EBDA_START + 16);
        }
    }

    #[test]
    fn fits_in_the_scanned_kilobyte() {
        assert!(build(16).expect("table").1.len() <= 1024);
    }
}
