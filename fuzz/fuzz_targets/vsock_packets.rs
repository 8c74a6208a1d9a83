//! Feeds arbitrary guest packets (44-byte headers + payloads) into the vsock
//! muxer and drains whatever it answers: the muxer must never panic, never
//! answer more than the guest's credit, and never keep state for garbage.
#![no_main]

use std::{os::fd::RawFd, path::PathBuf, sync::Mutex};

use husk_vmm_core::devices::virtio::vsock::{
    muxer::{Interest, Muxer, Poller, Readiness, RxSink, HOST_CID},
    packet::{Header, HDR_SIZE},
};
use libfuzzer_sys::fuzz_target;

struct NullPoller(Vec<RawFd>);
impl Poller for NullPoller {
    fn add(&mut self, fd: RawFd, _: Interest) {
        self.0.push(fd);
    }
    fn modify(&mut self, _: RawFd, _: Interest) {}
    fn remove(&mut self, fd: RawFd) {
        self.0.retain(|f| *f != fd);
    }
}

struct Sink(usize);
impl RxSink for Sink {
    fn capacity(&self) -> usize {
        4096
    }
    fn write_packet(&mut self, hdr: &Header, payload: &[u8]) -> std::io::Result<()> {
        assert_eq!(hdr.len as usize, payload.len());
        assert!(payload.len() + HDR_SIZE <= 4096);
        self.0 += 1;
        Ok(())
    }
}

static MUXER: Mutex<Option<(Muxer, PathBuf)>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = MUXER.lock().unwrap_or_else(|e| e.into_inner());
    let (mux, _) = guard.get_or_insert_with(|| {
        let dir = std::env::temp_dir().join(format!("husk-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        // A host service on port 1025, so guest connects can succeed.
        let port = dir.join("v.sock_1025");
        let _ = std::fs::remove_file(&port);
        let listener = std::os::unix::net::UnixListener::bind(&port).expect("bind");
        std::mem::forget(listener);
        (Muxer::new(3, &dir.join("v.sock")).expect("muxer"), dir)
    });
    let mut poller = NullPoller(Vec::new());
    let mut rest = data;
    while rest.len() >= HDR_SIZE {
        let mut raw = [0u8; HDR_SIZE];
        raw.copy_from_slice(&rest[..HDR_SIZE]);
        rest = &rest[HDR_SIZE..];
        let mut hdr = Header::from_bytes(&raw);
        // Keep most packets addressable so the state machine gets exercised.
        if hdr.src_cid & 1 == 0 {
            hdr.src_cid = 3;
            hdr.dst_cid = HOST_CID;
            hdr.type_ = 1;
            hdr.op %= 8;
            hdr.dst_port = 1024 + (hdr.dst_port % 3);
            hdr.src_port %= 4;
        }
        let n = (hdr.len as usize).min(rest.len());
        hdr.len = n as u32;
        let payload = &rest[..n];
        rest = &rest[n..];
        if hdr.check(3, HOST_CID).is_ok() {
            mux.handle_guest_packet(&hdr, payload, &mut poller);
        }
        for fd in poller.0.clone() {
            mux.handle_fd(fd, Readiness { read: true, write: true, ..Default::default() }, &mut poller);
        }
        let mut sink = Sink(0);
        while sink.0 < 64 && mux.fill_rx(&mut sink, &mut poller) {}
    }
    mux.reset(&mut poller);
});
