//! Processes in a pod VM keep their own CPU register state.
//!
//! On KVM PVM hosts guest user code runs natively with the host's XCR0
//! (AVX, AVX-512), while the host's emulator of guest kernel code lacks
//! XSAVE/XRSTOR: husk-vmm executes those two for the guest kernel
//! (`vmm-core/src/arch/xsave.rs`), so that it switches every vector
//! register between processes (docs/security.md, "Guest register state").
//! On hardware KVM the CPU runs them and the test checks the same thing.
//!
//! Two containers of one pod each run `husk-testprog vector-check` (a
//! pattern in xmm, ymm, zmm and opmask registers held across a yield of
//! the one vCPU, read back) beside `husk-testprog avx-sum` (64 KiB buffers
//! summed by an AVX-512 or AVX2 accumulator held across yields, checked
//! against a scalar sum): four processes switching all the time, across
//! containers. None may lose a register or compute a wrong sum.

use std::time::Duration;

use husk_e2e::{containerd::IMAGE, cri::setup, require_kvm};

/// How long the AVX sums run beside the register checks.
const SUM_SECONDS: u64 = 60;
/// Rounds each register check makes at least (3 yields each: SSE, AVX,
/// AVX-512): about 55 a second with four processes sharing the vCPU
/// here, twice that once the sums are done.
const ROUNDS: u64 = 10_000;

#[test]
fn vector_registers_stay_with_their_process() {
    require_kvm();
    let s = setup("guest-cpu");
    let pod = s.cri.run_pod(&s.pod_spec("vectors"), "husk").expect("pod");
    let mut ids = Vec::new();
    for (name, seed) in [("left", 1), ("right", 2)] {
        let script = format!(
            "echo \"tunables=[$GLIBC_TUNABLES]\"; \
             husk-testprog avx-sum {SUM_SECONDS} {} & \
             husk-testprog vector-check 0 {seed} {ROUNDS}; v=$?; wait $!; echo \"exit $v $?\"",
            seed + 10
        );
        let id = s
            .cri
            .create_container_with(&pod, name, IMAGE, &["sh", "-c", &script], |c| {
                // The container's own glibc tunables reach it untouched:
                // husk adds nothing to a process's environment.
                c.envs.push(k8s_cri::v1::KeyValue {
                    key: "GLIBC_TUNABLES".into(),
                    value: "glibc.malloc.arena_max=2".into(),
                });
            })
            .expect("create");
        ids.push(id);
    }
    for id in &ids {
        s.cri.start_container(id).expect("start");
    }
    for id in &ids {
        let st = s
            .cri
            .wait_exited(id, Duration::from_secs(480))
            .expect("exited");
        assert_eq!(st.exit_code, 0, "{st:?}");
    }
    for name in ["left", "right"] {
        let log = std::fs::read_to_string(
            s.dir
                .path()
                .join("logs/vectors")
                .join(format!("{name}.log")),
        )
        .expect("log");
        let lines: Vec<&str> = log
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .collect();
        eprintln!("{name}: {lines:?}");
        assert!(
            lines.contains(&"tunables=[glibc.malloc.arena_max=2]"),
            "{name}: {lines:?}"
        );
        let report = |prefix: &str| {
            *lines
                .iter()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{name}: no {prefix} report in {lines:?}"))
        };
        let v = report("vector-check: ");
        assert!(v.ends_with(", 0 lost"), "{name}: registers lost: {v}");
        let rounds: u64 = v
            .split(": ")
            .nth(2)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no round count in {v}"));
        assert!(rounds >= ROUNDS, "{name}: only {rounds} rounds: {v}");
        // The host's vector registers are in use (the point of the test).
        assert!(v.contains("avx true"), "{name}: {v}");
        let a = report("avx-sum: ");
        assert!(a.ends_with(" 0 wrong"), "{name}: wrong sums: {a}");
        assert!(lines.contains(&"exit 0 0"), "{name}: {lines:?}");
    }
    s.cri.stop_pod(&pod.id).expect("stop");
    s.cri.remove_pod(&pod.id).expect("remove");
    s.c.assert_nothing_left_within(Duration::from_secs(60));
}
