//! The guest profiler, end to end: a pod VM started by the shim with
//! `profile_dir` set in husk.toml runs a container that does nothing but
//! system calls; when the VM ends, its profile names the kernel's system
//! call path among the busiest functions, symbolized from the guest
//! kernel's `System.map`, and the flame graph is drawn.

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
    let mut toml = std::fs::read_to_string(&c.husk_toml).expect("husk.toml");
    toml.push_str(&format!(
        "profile_dir = \"{}\"\nprofile_hz = 250\n",
        profiles.path().display()
    ));
    std::fs::write(&c.husk_toml, toml).expect("husk.toml");

    let mut args = c.run_args();
    args.extend(["--rm", IMAGE, "prof1", "husk-testprog", "syscalls", "8"].map(String::from));
    let o = c.ctr_ok(&args).expect("ctr run");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("getppid calls"), "{out}");

    // The profile is written when husk-vmm ends, just after the task goes.
    let deadline = Instant::now() + Duration::from_secs(120);
    let top = loop {
        let found = std::fs::read_dir(profiles.path())
            .expect("profiles")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "top"));
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
    let busiest: Vec<&str> = table
        .lines()
        .skip(2)
        .take(12)
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let syscall_path = |f: &&str| {
        f.contains("getppid")
            || f.starts_with("entry_SYSCALL")
            || f.contains("syscall_64")
            || f.contains("syscall_exit")
            || f.contains("syscall_enter")
            || f.contains("pid_nr")
    };
    assert!(
        busiest.iter().any(syscall_path),
        "the system call path is not among the busiest: {busiest:?}\n{table}"
    );
    assert!(
        !busiest.iter().any(|f| f.starts_with("0x")),
        "kernel addresses without names among the busiest: {table}"
    );
    let svg = std::fs::read_to_string(&svg).expect("svg");
    assert!(
        svg.starts_with("<?xml") && svg.contains("<svg"),
        "not an SVG"
    );
    let folded = std::fs::read_to_string(&folded).expect("folded");
    assert!(folded.lines().all(|l| l
        .rsplit_once(' ')
        .is_some_and(|(_, n)| n.parse::<u64>().is_ok())));
    c.assert_nothing_left_within(Duration::from_secs(30));
}
