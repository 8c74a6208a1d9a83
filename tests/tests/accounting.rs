//! A pod VM is accounted where Kubernetes looks: its host processes
//! (`husk-vmm`, `husk-virtiofsd`) run in the sandbox's cgroup (below the
//! pod's `cgroup_parent`, as kubelet names it), limited by the pod's CPU
//! limit and by its guest RAM plus the host overhead, charged for the
//! guest's memory, with the `oom_score_adj` its containers ask for; the
//! cgroup goes with the pod. Over CRI on a private containerd.

use std::time::{Duration, Instant};

use husk_e2e::{
    containerd::IMAGE,
    cri::{setup, Setup},
    hostcgroup, require_kvm,
};

/// Removes the test's cgroup tree when the test ends, however it ends.
struct CgroupTree(String);

impl Drop for CgroupTree {
    fn drop(&mut self) {
        if let Err(e) = hostcgroup::remove_tree(&self.0) {
            eprintln!("{e:#}");
        }
    }
}

#[test]
fn pod_vm_is_accounted_in_the_pods_cgroup() {
    require_kvm();
    let top = format!("/husk-e2e-{}", std::process::id());
    // Dropped after the pods (declared before them).
    let _tree = CgroupTree(top.clone());
    let s: Setup = setup("acct");
    let parent = format!("{top}/podacct-uid");

    let mut spec = s.pod_spec("acct");
    spec.cgroup_parent = parent.clone();
    // Half a CPU, 256 MiB: kubelet's sums of the containers' limits.
    spec.resources = Some(k8s_cri::v1::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpu_shares: 512,
        memory_limit_in_bytes: 256 << 20,
        ..Default::default()
    });
    let pod = s.cri.run_pod(&spec, "husk").expect("pod");
    let cgroup = format!("{parent}/{}", pod.id);
    let vmm = s.c.pod_pid(&pod.id, "vmm").expect("vmm pid");
    let daemon = s.c.pod_pid(&pod.id, "virtiofsd").expect("virtiofsd pid");

    // Both processes in the sandbox's cgroup, in every hierarchy that
    // accounts them.
    for (who, pid) in [("husk-vmm", vmm), ("husk-virtiofsd", daemon)] {
        let groups = hostcgroup::of_process(pid).expect("cgroups");
        for controller in ["cpu", "cpuacct", "memory", "pids"] {
            assert_eq!(
                groups.get(controller).map(String::as_str),
                Some(cgroup.as_str()),
                "{who}'s {controller} cgroup: {groups:?}"
            );
        }
        // No container yet: a neutral score, not the shim's (containerd's).
        assert_eq!(oom_score_adj(pid), 0, "{who} before any container");
    }
    // husk-vmm runs its VM with no capabilities at all (the daemon's
    // serving child keeps the file server's: virtiofs.rs).
    for field in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        let pid = u32::try_from(vmm).expect("pid");
        assert_eq!(
            husk_e2e::proc_caps(pid, field),
            Some(0),
            "husk-vmm's {field}"
        );
    }
    // The pod's CPU limit, and its guest RAM (256 + 64 MiB of guest
    // overhead) plus husk.toml's host_overhead_mib (64).
    assert_eq!(
        hostcgroup::cpu_max(&cgroup).expect("cpu"),
        (Some(50_000), 100_000)
    );
    assert_eq!(
        hostcgroup::memory_max(&cgroup).expect("memory"),
        Some((256 + 64 + 64) << 20)
    );

    // A container that holds 64 MiB, then spins: kubelet gives a
    // Burstable container an oom_score_adj of its own.
    let baseline = hostcgroup::memory_usage(&cgroup).expect("usage");
    let hog = s
        .cri
        .create_container_with(
            &pod,
            "hog",
            IMAGE,
            &[
                "sh",
                "-c",
                "husk-testprog alloc 64 | (read line; echo \"$line\"; while :; do :; done)",
            ],
            |c| {
                c.linux.get_or_insert_default().resources =
                    Some(k8s_cri::v1::LinuxContainerResources {
                        oom_score_adj: 777,
                        ..Default::default()
                    });
            },
        )
        .expect("create");
    // (containerd makes the task, and husk the container, at start.)
    s.cri.start_container(&hog).expect("start");
    for (who, pid) in [("husk-vmm", vmm), ("husk-virtiofsd", daemon)] {
        assert_eq!(oom_score_adj(pid), 777, "{who} after the container");
    }

    // The guest's memory is charged to the pod: once the container holds
    // its 64 MiB (page faults are guest kernel work, slow where it is
    // emulated: minutes here), the cgroup holds them too, within its limit.
    wait_for_log(&spec.log_dir.join("hog.log"), "allocated 64 MiB");
    let usage = hostcgroup::memory_usage(&cgroup).expect("usage");
    assert!(
        usage >= baseline + (48 << 20),
        "the guest's 64 MiB are not charged to the pod's cgroup \
         ({baseline} bytes before the container, {usage} after)"
    );
    let limit = (256 + 64 + 64) << 20;
    let peak = hostcgroup::memory_peak(&cgroup).expect("peak");
    assert!(peak <= limit, "peak {peak} over the limit {limit}");

    // The spinning vCPU gets half a core: measured over 20 s.
    let before = hostcgroup::cpu_usage_ns(&cgroup).expect("usage");
    let since = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let used = hostcgroup::cpu_usage_ns(&cgroup).expect("usage") - before;
    let share = used as f64 / since.elapsed().as_nanos() as f64;
    eprintln!("pod VM used {share:.3} of a core over 20 s");
    assert!(
        (0.35..=0.55).contains(&share),
        "a pod limited to 500m used {share:.3} of a core"
    );

    s.cri.stop_pod(&pod.id).expect("stop");
    s.cri.remove_pod(&pod.id).expect("remove");
    assert!(
        !hostcgroup::exists(&cgroup),
        "the pod's cgroup {cgroup} is left"
    );
    s.c.assert_nothing_left_within(Duration::from_secs(60));
}

/// Waits until the CRI log file `log` holds `text`.
fn wait_for_log(log: &std::path::Path, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(text)
    {
        assert!(
            Instant::now() < deadline,
            "{} never said {text:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn oom_score_adj(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .expect("oom_score_adj")
        .trim()
        .parse()
        .expect("a number")
}
