//! The node installer: `deploy/install.sh --root` puts everything in place
//! under a scratch root, keeps an edited husk.toml, adds the `husk` CRI
//! runtime to containerd's config.toml without losing the node's own CRI
//! settings or the runc runtime (containerd itself reads the result), and
//! uninstalls.

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

/// The cargo target directory the built artifacts are in
/// (target/<profile>/husk-vmm -> target).
fn target_dir() -> std::path::PathBuf {
    let artifacts = Artifacts::locate().expect("artifacts (make build)");
    artifacts
        .vmm
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

#[test]
fn installer_places_and_removes_everything() {
    let target = &target_dir();
    let dir = TestDir::new("deploy").expect("dir");
    let root = dir.path().join("root");
    let o = install(&root, target, &[]);
    assert!(o.status.success(), "{o:?}");
    for f in [
        "usr/local/bin/containerd-shim-husk-v2",
        "usr/local/bin/husk-vmm",
        "usr/local/bin/husk-virtiofsd",
        "usr/local/bin/husk-jailer",
        "var/lib/husk/guest/vmlinux",
        "var/lib/husk/guest/initramfs.cpio",
        "etc/husk/husk.toml",
        "etc/containerd/config.toml",
    ] {
        assert!(root.join(f).exists(), "{f} installed");
    }

    // An edited husk.toml survives a reinstall.
    std::fs::write(root.join("etc/husk/husk.toml"), "mem_mib = 256\n").expect("edit");
    assert!(install(&root, target, &[]).status.success());
    assert_eq!(
        std::fs::read_to_string(root.join("etc/husk/husk.toml")).expect("read"),
        "mem_mib = 256\n"
    );

    // On a fresh node containerd gets both runtimes: naming husk's alone
    // would drop its built-in runc and leave CRI unable to start.
    let main = root.join("etc/containerd/config.toml");
    let dump = config_dump(&main);
    husk_runtime(&dump);
    assert!(dump.contains("containerd.runtimes.runc]"), "{dump}");

    // On a node with its own CRI settings they are all kept (a drop-in under
    // `imports` would have replaced the whole CRI section), reinstalling
    // keeps one block, and uninstalling restores the file as it was.
    let own = format!(
        "version = 2\nroot = \"{r}/var/lib/containerd\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"example.test/pause:9\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n",
        r = root.display()
    );
    std::fs::write(&main, &own).expect("node config");
    assert!(install(&root, target, &[]).status.success());
    let o = install(&root, target, &[]);
    assert!(o.status.success(), "{o:?}");
    let text = std::fs::read_to_string(&main).expect("config");
    assert_eq!(text.matches("# BEGIN husk").count(), 1, "{text}");
    let dump = config_dump(&main);
    husk_runtime(&dump);
    assert!(
        dump.contains("sandbox_image = \"example.test/pause:9\""),
        "{dump}"
    );
    assert!(dump.contains("containerd.runtimes.runc]"), "{dump}");

    // Uninstall removes what it installed.
    let o = install(&root, target, &["--uninstall"]);
    assert!(o.status.success(), "{o:?}");
    assert!(!root.join("usr/local/bin/husk-vmm").exists());
    assert!(!root.join("var/lib/husk/guest/vmlinux").exists());
    let text = std::fs::read_to_string(&main).expect("config");
    assert_eq!(text.trim_end(), own.trim_end());
}

/// containerd's view of config file `main` (`containerd config dump`).
fn config_dump(main: &Path) -> String {
    let o = Command::new("containerd")
        .arg("--config")
        .arg(main)
        .args(["config", "dump"])
        .output()
        .expect("containerd config dump (package containerd)");
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Checks that `dump` has the husk runtime with husk's shim and settings.
fn husk_runtime(dump: &str) {
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
    // Until the next table: the husk runtime's own settings.
    let own = section.split("\n[").next().unwrap_or_default();
    assert!(
        own.contains("privileged_without_host_devices = true"),
        "{own}"
    );
}

#[test]
fn installer_refuses_a_second_husk_runtime() {
    let target = &target_dir();
    let dir = TestDir::new("deploy-dup").expect("dir");
    let root = dir.path().join("root");
    let main = root.join("etc/containerd/config.toml");
    std::fs::create_dir_all(main.parent().expect("parent")).expect("dir");
    let own = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.husk]\n  runtime_type = \"io.containerd.husk.v2\"\n";
    std::fs::write(&main, own).expect("config");
    let o = install(&root, target, &[]);
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already defines a husk runtime"),
        "{o:?}"
    );
    assert_eq!(std::fs::read_to_string(&main).expect("config"), own);
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

/// What the RuntimeClass adds to the measured cost of an idle pod: room for
/// the guest kernel's own slab and page tables and the host processes'
/// buffers under load, which the idle measurement does not see.
const OVERHEAD_MARGIN_MIB: u64 = 16;

/// The RuntimeClass's pod overhead is derived from a measurement, not
/// guessed: `make bench-density` records its report in
/// `bench/results/density.json`; the overhead's memory is what an idle husk
/// pod costs beyond the same pod under runc (each counted once, 20 pods),
/// in whole MiB, plus [`OVERHEAD_MARGIN_MIB`].
#[test]
fn runtimeclass_overhead_is_the_measured_one() {
    let report = std::fs::read_to_string(repo().join("bench/results/density.json"))
        .expect("bench/results/density.json (make bench-density RECORD=1)");
    let report: serde_json::Value = serde_json::from_str(&report).expect("JSON");
    let kib = |key: &str| {
        report[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in the density report"))
    };
    let pods = kib("pods");
    assert!(
        pods >= 20,
        "measured with {pods} pods; the overhead wants 20 or more"
    );
    let husk = kib("husk_per_pod_kib");
    let runc = kib("runc_per_pod_kib");
    let want = format!(
        "{}Mi",
        husk.saturating_sub(runc).div_ceil(1024) + OVERHEAD_MARGIN_MIB
    );

    let yaml = std::fs::read_to_string(repo().join("deploy/runtimeclass.yaml"))
        .expect("runtimeclass.yaml");
    let memory: Vec<&str> = yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("memory:"))
        .map(|v| v.trim().trim_matches('"'))
        .collect();
    assert_eq!(
        memory,
        vec![want.as_str()],
        "deploy/runtimeclass.yaml's overhead: husk {husk} KiB - runc {runc} KiB per idle pod, + {OVERHEAD_MARGIN_MIB} MiB"
    );
    assert!(
        yaml.contains(&format!("{husk} KiB")) && yaml.contains(&format!("{runc} KiB")),
        "the comment in deploy/runtimeclass.yaml quotes the measurement"
    );
}
