//! The virtio-vsock packet header (virtio 1.2, 5.10.6).
//!
//! Every field comes from the guest and is checked before use: the muxer
//! only sees headers that passed [`Header::check`].

/// Size of the header on the wire.
pub const HDR_SIZE: usize = 44;
/// Largest payload husk accepts or sends in one packet.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// Stream socket type (the only one husk implements).
pub const TYPE_STREAM: u16 = 1;

/// Operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused or aborted).
    pub const RST: u16 = 3;
    /// The sender will not receive and/or send any more.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Unsolicited credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for credit information.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The header of a vsock packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation-specific flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever.
    pub fwd_cnt: u32,
}

/// Why a guest packet was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The descriptor chain is shorter than a header.
    #[error("descriptor chain shorter than a vsock header")]
    Short,
    /// The source CID is not the guest's.
    #[error("source CID {0} is not the guest's")]
    SrcCid(u64),
    /// The destination is not the host.
    #[error("destination CID {0} is not the host")]
    DstCid(u64),
    /// Not a stream packet.
    #[error("unsupported socket type {0}")]
    Type(u16),
    /// Payload larger than husk accepts.
    #[error("payload of {0} bytes is too large")]
    TooLong(u32),
    /// Payload on an operation that carries none.
    #[error("operation {0} carries a payload")]
    UnexpectedPayload(u16),
    /// Unknown operation.
    #[error("unknown operation {0}")]
    Op(u16),
}

impl Header {
    /// Decodes a header (little-endian).
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |i: usize| {
            u64::from_le_bytes([
                b[i],
                b[i + 1],
                b[i + 2],
                b[i + 3],
                b[i + 4],
                b[i + 5],
                b[i + 6],
                b[i + 7],
            ])
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header (little-endian).
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a header the guest sent for the guest `guest_cid`.
    pub fn check(&self, guest_cid: u64, host_cid: u64) -> Result<(), PacketError> {
        if self.src_cid != guest_cid {
            return Err(PacketError::SrcCid(self.src_cid));
        }
        if self.dst_cid != host_cid {
            return Err(PacketError::DstCid(self.dst_cid));
        }
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::Type(self.type_));
        }
        if self.len > MAX_PAYLOAD {
            return Err(PacketError::TooLong(self.len));
        }
        match self.op {
            op::RW => Ok(()),
            op::REQUEST
            | op::RESPONSE
            | op::RST
            | op::SHUTDOWN
            | op::CREDIT_UPDATE
            | op::CREDIT_REQUEST => {
                if self.len == 0 {
                    Ok(())
                } else {
                    Err(PacketError::UnexpectedPayload(self.op))
                }
            }
            other => Err(PacketError::Op(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 1025,
            len: 10,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 77,
        }
    }

    #[test]
    fn round_trips() {
        let h = hdr();
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
        // Field offsets as the spec lays them out.
        let b = h.to_bytes();
        assert_eq!(u32::from_le_bytes([b[24], b[25], b[26], b[27]]), 10);
        assert_eq!(u16::from_le_bytes([b[30], b[31]]), op::RW);
    }

    #[test]
    fn checks_guest_headers() {
        assert_eq!(hdr().check(3, 2), Ok(()));
        assert_eq!(
            Header {
                src_cid: 4,
                ..hdr()
            }
            .check(3, 2),
            Err(PacketError::SrcCid(4))
        );
        assert_eq!(
            Header {
                dst_cid: 7,
                ..hdr()
            }
            .check(3, 2),
            Err(PacketError::DstCid(7))
        );
        assert_eq!(
            Header { type_: 2, ..hdr() }.check(3, 2),
            Err(PacketError::Type(2))
        );
        assert_eq!(
            Header {
                len: MAX_PAYLOAD + 1,
                ..hdr()
            }
            .check(3, 2),
            Err(PacketError::TooLong(MAX_PAYLOAD + 1))
        );
        assert_eq!(
            Header {
                op: op::REQUEST,
                ..hdr()
            }
            .check(3, 2),
            Err(PacketError::UnexpectedPayload(op::REQUEST))
        );
        assert_eq!(
            Header {
                op: 99,
                len: 0,
                ..hdr()
            }
            .check(3, 2),
            Err(PacketError::Op(99))
        );
        assert_eq!(
            Header {
                op: op::REQUEST,
                len: 0,
                ..hdr()
            }
            .check(3, 2),
            Ok(())
        );
    }
}
