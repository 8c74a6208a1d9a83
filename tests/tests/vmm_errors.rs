//! husk-vmm refuses bad input with a clear error and leaves nothing behind.
//! None of these boot a guest, so they are quick.

use std::{path::Path, process::Command};

use husk_e2e::{require_kvm, Artifacts, TestDir};

fn run_vmm(args: &[&str], dir: &Path) -> (i32, String) {
    let a = Artifacts::locate().expect("artifacts");
    let vsock = dir.join("v.sock");
    let api = dir.join("api.sock");
    let out = Command::new(&a.vmm)
        .args([
            "--vsock-uds",
            vsock.to_str().unwrap_or_default(),
            "--api-socket",
            api.to_str().unwrap_or_default(),
        ])
        .args(args)
        .output()
        .expect("run husk-vmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(args: &[&str], expect: &str) {
    let dir = TestDir::new("vmm-err").expect("dir");
    let (code, stderr) = run_vmm(args, dir.path());
    assert_eq!(code, 2, "exit status for {args:?}; stderr:\n{stderr}");
    assert!(
        stderr.contains(expect),
        "stderr for {args:?} should mention {expect:?}:\n{stderr}"
    );
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}

#[test]
fn garbage_kernel_is_refused() {
    require_kvm();
    let dir = TestDir::new("bad-kernel").expect("dir");
    let k = dir.path().join("vmlinux");
    std::fs::write(
        &k,
        b"not a kernel, just some text that is long enough to look like a header",
    )
    .expect("write");
    assert_refused(
        &["--kernel", k.to_str().unwrap_or_default()],
        "is not a loadable uncompressed ELF vmlinux",
    );
}

#[test]
fn truncated_kernel_is_refused() {
    require_kvm();
    let a = Artifacts::locate().expect("artifacts");
    let dir = TestDir::new("trunc-kernel").expect("dir");
    let full = std::fs::read(&a.kernel).expect("read kernel");
    let k = dir.path().join("vmlinux");
    std::fs::write(&k, &full[..full.len() / 3]).expect("write");
    assert_refused(
        &["--kernel", k.to_str().unwrap_or_default()],
        "is not a loadable uncompressed ELF vmlinux",
    );
}

#[test]
fn garbage_initramfs_is_refused() {
    require_kvm();
    let dir = TestDir::new("bad-initrd").expect("dir");
    let i = dir.path().join("initrd");
    std::fs::write(&i, vec![0x55u8; 4096]).expect("write");
    assert_refused(
        &["--initramfs", i.to_str().unwrap_or_default()],
        "is not a cpio archive",
    );
}

#[test]
fn missing_files_and_bad_values_are_refused() {
    require_kvm();
    assert_refused(
        &["--kernel", "/nonexistent/vmlinux"],
        "kernel /nonexistent/vmlinux does not exist",
    );
    assert_refused(&["--mem-mib", "4"], "memory must be between");
    assert_refused(&["--vcpus", "0"], "vcpus must be between");
    assert_refused(&["--vsock-cid", "1"], "guest CID must be between");
    assert_refused(
        &["--fs-socket", "/nonexistent/fs.sock"],
        "virtio-fs socket /nonexistent/fs.sock does not exist",
    );
}

#[test]
fn missing_kvm_device_is_a_clear_error() {
    assert_refused(
        &["--kvm-device", "/nonexistent/kvm"],
        "cannot open /nonexistent/kvm",
    );
}
