//! The node installer and the containerd drop-in: `deploy/install.sh
//! --root` puts everything in place under a scratch root, keeps an edited
//! husk.toml, and uninstalls; containerd itself reads the drop-in and shows
//! the `husk` CRI runtime with husk's shim type and settings path.

use std::{path::Path, process::Command};

use husk_e2e::{Artifacts, TestDir};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn install(root: &Path, target: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(repo().join("deploy/install.sh"))
        .arg("--root")
        .arg(root)
        .args(extra)
        .env("CARGO_TARGET_DIR", target)
        .output()
        .expect("running install.sh")
}

#[test]
fn installer_places_and_removes_everything() {
    let artifacts = Artifacts::locate().expect("artifacts (make build)");
    // target/<profile>/husk-vmm -> target
    let target = artifacts
        .vmm
        .parent()
        .and_then(Path::parent)
        .expect("target dir");
    let dir = TestDir::new("deploy").expect("dir");
    let root = dir.path().join("root");
    let o = install(&root, target, &[]);
    assert!(o.status.success(), "{o:?}");
    for f in [
        "usr/local/bin/containerd-shim-husk-v2",
        "usr/local/bin/husk-vmm",
        "usr/local/bin/husk-virtiofsd",
        "var/lib/husk/guest/vmlinux",
        "var/lib/husk/guest/initramfs.cpio",
        "etc/husk/husk.toml",
        "etc/containerd/conf.d/husk.toml",
    ] {
        assert!(root.join(f).exists(), "{f} installed");
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("imports = [\"/etc/containerd/conf.d/*.toml\"]"),
        "{stdout}"
    );

    // An edited husk.toml survives a reinstall.
    std::fs::write(root.join("etc/husk/husk.toml"), "mem_mib = 256\n").expect("edit");
    assert!(install(&root, target, &[]).status.success());
    assert_eq!(
        std::fs::read_to_string(root.join("etc/husk/husk.toml")).expect("read"),
        "mem_mib = 256\n"
    );

    // containerd reads the drop-in through `imports`.
    let main = root.join("etc/containerd/config.toml");
    std::fs::write(
        &main,
        format!(
            "version = 2\nroot = \"{r}/var/lib/containerd\"\nstate = \"{r}/run/containerd\"\nimports = [\"{r}/etc/containerd/conf.d/*.toml\"]\n",
            r = root.display()
        ),
    )
    .expect("main config");
    let o = Command::new("containerd")
        .arg("--config")
        .arg(&main)
        .args(["config", "dump"])
        .output()
        .expect("containerd config dump (package containerd)");
    assert!(o.status.success(), "{o:?}");
    let dump = String::from_utf8_lossy(&o.stdout);
    let section = dump
        .split("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.husk]")
        .nth(1)
        .unwrap_or_else(|| panic!("no husk runtime in:\n{dump}"));
    assert!(
        section.contains("runtime_type = \"io.containerd.husk.v2\""),
        "{section}"
    );
    assert!(
        section.contains("ConfigPath = \"/etc/husk/husk.toml\""),
        "{section}"
    );

    // Uninstall removes what it installed.
    let o = install(&root, target, &["--uninstall"]);
    assert!(o.status.success(), "{o:?}");
    assert!(!root.join("usr/local/bin/husk-vmm").exists());
    assert!(!root.join("etc/containerd/conf.d/husk.toml").exists());
    assert!(!root.join("var/lib/husk/guest/vmlinux").exists());
}

#[test]
fn installer_refuses_unknown_arguments() {
    let o = Command::new(repo().join("deploy/install.sh"))
        .arg("--frobnicate")
        .output()
        .expect("install.sh");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown argument: --frobnicate"));
}
