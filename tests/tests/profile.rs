//! The guest profiler, end to end: a pod VM started by the shim with
//! `profile_dir` set in husk.toml, on the profiling flavour of the guest
//! kernel (frame pointers), runs a container that does nothing but system
//! calls; when the VM ends, its profile has walked the guest kernel's
//! stacks, names the
//! kernel's system call path among the busiest, finds `getppid` under it,
//! symbolized from the guest kernel's `System.map`, and the flame graph is
//! drawn.

use std::time::{Duration, Instant};

use husk_e2e::{
    containerd::{Containerd, IMAGE},
    require_kvm, Artifacts, TestDir,
};

#[test]
fn a_syscall_loop_shows_the_kernels_syscall_path() {
    require_kvm();
    let artifacts = Artifacts::locate().expect("artifacts");
    let dir = TestDir::new("profile").expect("dir");
    let templates = TestDir::new("profile-templates").expect("dir");
    let profiles = TestDir::new("profile-out").expect("dir");
    let c = Containerd::start(&artifacts, dir.path(), templates.path()).expect("containerd");
    c.import_test_image().expect("image");
    let toml = std::fs::read_to_string(&c.husk_toml).expect("husk.toml");
    let kernel = artifacts.profiling_kernel().expect("profiling kernel");
    let default_line = format!("kernel = \"{}\"", artifacts.kernel.display());
    assert!(toml.contains(&default_line), "{toml}");
    let quoted = |p: &std::path::Path| format!("{:?}", p.display().to_string());
    c.set_husk("kernel", &quoted(&kernel)).expect("husk.toml");
    c.set_husk("profile_dir", &quoted(profiles.path()))
        .expect("husk.toml");
    c.set_husk("profile_hz", "250").expect("husk.toml");

    let mut args = c.run_args();
    args.extend(["--rm", IMAGE, "prof1", "husk-testprog", "syscalls", "8"].map(String::from));
    let o = c.ctr_ok(&args).expect("ctr run");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("getppid calls"), "{out}");

    // The whole run's profile (`<pod>.folded`) is written when husk-vmm
    // ends, just after the task goes; the slices (`<pod>.folded.NN-step`)
    // come earlier, one per step.
    let deadline = Instant::now() + Duration::from_secs(120);
    let top = loop {
        let found = std::fs::read_dir(profiles.path())
            .expect("profiles")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".folded.top"));
        if let Some(p) = found {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no profile written; containerd log:\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let table = std::fs::read_to_string(&top).expect("table");
    let svg = top.with_extension("svg");
    let folded = top.with_extension("");
    eprintln!("{table}");
    // The second table ranks functions by the samples with them on the
    // stack: the system call entry must be among the busiest paths.
    let paths = table
        .split_once("busiest paths")
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no paths table:\n{table}"));
    let busiest: Vec<&str> = paths
        .lines()
        .skip(2)
        .take(12)
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert!(
        busiest
            .iter()
            .any(|f| f.starts_with("entry_SYSCALL_64") || *f == "do_syscall_64"),
        "the system call path is not among the busiest: {busiest:?}\n{table}"
    );
    assert!(
        !busiest.iter().any(|f| f.starts_with("0x")),
        "kernel addresses without names among the busiest: {table}"
    );
    let folded = std::fs::read_to_string(&folded).expect("folded");
    let stacks: Vec<(Vec<&str>, u64)> = folded
        .lines()
        .map(|l| {
            let (stack, n) = l.rsplit_once(' ').expect("count");
            (stack.split(';').collect(), n.parse().expect("a number"))
        })
        .collect();
    let kernel: u64 = stacks
        .iter()
        .filter(|(s, _)| s[0] == "[kernel]")
        .map(|(_, n)| n)
        .sum();
    let walked: u64 = stacks
        .iter()
        .filter(|(s, _)| s[0] == "[kernel]" && s.len() > 3)
        .map(|(_, n)| n)
        .sum();
    assert!(
        walked * 2 > kernel,
        "kernel stacks were not walked: {walked} of {kernel} samples deeper than two frames"
    );
    // getppid, called through the system call path: the loop's own work.
    // The path starts at entry_SYSCALL_64 on hardware virtualization and at
    // the page fault handler where the host's emulator leaves SYSCALL half
    // done (guest kernel patch 0001); do_syscall_64 is on it either way.
    let getppid: u64 = stacks
        .iter()
        .filter(|(s, _)| s.contains(&"do_syscall_64") && s.iter().any(|f| f.contains("getppid")))
        .map(|(_, n)| n)
        .sum();
    assert!(
        getppid >= 20,
        "only {getppid} samples of getppid under do_syscall_64"
    );
    let svg = std::fs::read_to_string(&svg).expect("svg");
    assert!(
        svg.starts_with("<?xml") && svg.contains("<svg"),
        "not an SVG"
    );
    // The shim logged each step of prof1's life, and cut a slice for it.
    let logged: Vec<String> = husk_shim::steps::parse(&c.log())
        .into_iter()
        .filter(|t| t.container == "prof1")
        .map(|t| t.step)
        .collect();
    for step in ["vm_start", "create", "start", "exit", "delete"] {
        assert!(
            logged.iter().any(|s| s == step),
            "no {step} step logged for prof1: {logged:?}"
        );
    }
    // One slice per step of the container's life, each with its samples.
    let names: Vec<String> = std::fs::read_dir(profiles.path())
        .expect("profiles")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for step in ["vm_start", "create", "start", "exit", "delete", "rest"] {
        let slice = names
            .iter()
            .find(|n| n.ends_with(&format!("-{step}")))
            .unwrap_or_else(|| panic!("no {step} slice among {names:?}"));
        let text = std::fs::read_to_string(profiles.path().join(slice)).expect("slice");
        assert!(
            step == "rest" || !text.trim().is_empty(),
            "the {step} slice is empty"
        );
    }
    c.assert_nothing_left_within(Duration::from_secs(30));
}
