//! A tenant cannot reach the node through husk (`docs/security.md`): a pod
//! whose containers attack the host side the way a hostile tenant would,
//! over CRI as kubelet drives it, on a private containerd.
//!
//! Each attack was seen to work on husk before the host side was made
//! tenant-safe (the note of that change says how each one failed); here
//! each must get nothing, and the pod must keep working.

use std::{
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use husk_e2e::{
    containerd::IMAGE,
    cri::{setup, Setup},
    require_kvm,
};
use k8s_cri::v1::{Capability, ContainerConfig, Mount};

/// What no container may read: a directory of the node's.
const SECRET: &str = "node-secret-6f1c9b";

fn mount(host: &Path, path: &str, readonly: bool) -> Mount {
    Mount {
        container_path: path.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

fn privileged(c: &mut ContainerConfig) {
    c.linux
        .get_or_insert_default()
        .security_context
        .get_or_insert_default()
        .privileged = true;
}

/// Runs `script` in container `id`; its output, after checking it ran.
fn sh(s: &Setup, id: &str, script: &str) -> String {
    let out = s
        .cri
        .exec_sync(id, &["sh", "-c", script], 180)
        .expect("exec");
    format!("{}{}", out.stdout, out.stderr)
}

/// Writes `files` as a payload of the ConfigMap-style volume at `host`, as
/// kubelet's atomic writer does.
fn kubelet_write(host: &Path, ts: &str, files: &[(&str, &[u8])]) {
    use std::os::unix::fs::symlink;
    let old = std::fs::read_link(host.join("..data")).ok();
    let dir = host.join(ts);
    std::fs::create_dir_all(&dir).expect("payload dir");
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("payload file");
        if std::fs::symlink_metadata(host.join(name)).is_err() {
            symlink(Path::new("..data").join(name), host.join(name)).expect("link");
        }
    }
    symlink(ts, host.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(host.join("..data_tmp"), host.join("..data")).expect("switch");
    if let Some(old) = old {
        std::fs::remove_dir_all(host.join(old)).expect("old payload");
    }
}

/// Mount points below `dir`, with their per-mount options.
fn mounts_below(dir: &Path) -> Vec<(String, String)> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 5 && f[4].starts_with(&prefix)).then(|| (f[4].to_string(), f[5].to_string()))
        })
        .collect()
}

/// Bytes in use on the file system holding `path`.
fn used_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
    (st.blocks() - st.blocks_free()) * st.fragment_size()
}

/// Runs `argv` as the unprivileged user 65534; its exit status and output.
fn as_nobody(argv: &[&str]) -> (bool, String) {
    let out = match std::process::Command::new(argv[0])
        .args(&argv[1..])
        .uid(65534)
        .gid(65534)
        .output()
    {
        Ok(out) => out,
        // Not even started (its path cannot be reached).
        Err(e) => return (false, e.to_string()),
    };
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every attack of issue "A tenant cannot reach the node through husk",
/// in one pod that shares its PID namespace and may run privileged
/// containers:
/// 1. an unprivileged container plants `..data -> ..x -> <host dir>` in a
///    writable emptyDir and in a hostPath; a second container mounting
///    them reads nothing of the host's;
/// 2. a privileged container mounts the pod's virtio-fs share and tries to
///    plant a symlink at every name the shim uses (a container's
///    directory, its pack, root file system, mount point, spec): each is
///    refused, and the shim goes on creating containers and updating a
///    ConfigMap without writing or mounting anything outside the pod;
/// 3. a set-uid copy of a shell and a block device node, made in a root
///    file system and in a volume, are inert on the host (nosuid, nodev,
///    0700 directories);
/// 4. a container with `CAP_SYS_PTRACE` can neither attach to nor read
///    the PID namespace's holder, which has no capabilities, no_new_privs
///    and a seccomp filter (and can trace its neighbour: the capability
///    works);
/// 5. a "ConfigMap" holding a 4 GiB sparse file is refused with an error
///    that names it, and the node's disk does not grow.
///
/// (A privileged container's host devices: `isolation.rs`, through `ctr`;
/// husk's CRI runtime sets `privileged_without_host_devices`.)
#[test]
fn a_tenant_cannot_reach_the_node_through_its_pod() {
    require_kvm();
    let s = setup("cri-tenant");
    let vols = s.kubelet_root().join("pods/tenant-uid/volumes");
    let scratch = vols.join("kubernetes.io~empty-dir/scratch");
    let cfg = vols.join("kubernetes.io~configmap/cfg");
    let big = vols.join("kubernetes.io~configmap/big");
    let host_path = s.dir.path().join("hostpath");
    let secret = s.dir.path().join("node-secret");
    let victim = s.dir.path().join("victim");
    for d in [&scratch, &cfg, &big, &host_path, &secret] {
        std::fs::create_dir_all(d).expect("dir");
    }
    std::fs::write(secret.join("token"), SECRET).expect("secret");
    std::fs::write(&victim, "untouched\n").expect("victim");
    kubelet_write(
        &cfg,
        "..2026_12_07_09_00_00.1",
        &[("app.conf", b"version=1\n")],
    );
    kubelet_write(&big, "..2026_12_07_09_00_00.1", &[("small", b"x\n")]);
    let sparse = std::fs::File::create(big.join("..2026_12_07_09_00_00.1/huge")).expect("file");
    sparse.set_len(4 << 30).expect("a 4 GiB sparse file");
    std::os::unix::fs::symlink("..data/huge", big.join("huge")).expect("link");

    let mut spec = s.pod_spec("tenant");
    spec.share_processes = true;
    spec.privileged = true;
    let pod = s.cri.run_pod(&spec, "husk").expect("pod");
    let pod_dir = husk_shim::poddir::pod_dir(&s.c.pods, "k8s.io", &pod.id);

    // 1. The planted symlink chain, in an emptyDir and in a hostPath.
    let planter = s
        .cri
        .create_container_with(&pod, "planter", IMAGE, &["sleep", "3601"], |c| {
            c.mounts
                .extend([mount(&scratch, "/e", false), mount(&host_path, "/h", false)]);
        })
        .expect("create");
    s.cri.start_container(&planter).expect("start");
    let out = sh(
        &s,
        &planter,
        &format!(
            "for d in /e /h; do ln -s ..x $d/..data && ln -s {} $d/..x || exit 1; done; echo planted",
            secret.display()
        ),
    );
    assert!(out.contains("planted"), "{out}");
    let reader = s
        .cri
        .create_container_with(&pod, "reader", IMAGE, &["sleep", "3600"], |c| {
            c.mounts
                .extend([mount(&scratch, "/e", false), mount(&host_path, "/h", false)]);
        })
        .expect("create: the planted volumes are plain volumes");
    s.cri.start_container(&reader).expect("start");
    let out = sh(
        &s,
        &reader,
        "cat /e/..data/token /h/..data/token /e/token /h/token 2>&1; ls -a /e /h",
    );
    assert!(
        !out.contains(SECRET),
        "the node's secret reached the pod: {out}"
    );
    assert!(
        out.matches("No such file or directory").count() >= 4,
        "the links resolve in the guest, where there is nothing: {out}"
    );
    assert!(out.contains("..data") && out.contains("..x"), "{out}");
    assert!(!s.c.log().contains(SECRET));

    // 2. A privileged container plants symlinks on the share itself.
    let root = s
        .cri
        .create_container_with(&pod, "root", IMAGE, &["sleep", "3602"], |c| {
            privileged(c);
            c.mounts.push(mount(&scratch, "/e", false));
        })
        .expect("create");
    s.cri.start_container(&root).expect("start");
    let mounts_outside = |s: &Setup| -> Vec<(String, String)> {
        mounts_below(s.dir.path())
            .into_iter()
            .filter(|(p, _)| !p.starts_with(&s.c.pods.display().to_string()))
            .collect()
    };
    let outside_before = mounts_outside(&s);
    let v = victim.display();
    let script = format!(
        "mkdir -p /mnt/share && mount -t virtiofs husk /mnt/share || exit 9; cd /mnt/share; \
         for t in next-container {reader}/packs {reader}/new; do \
           if ln -s {v} \"$t\"; then echo \"planted $t\"; else echo \"refused $t\"; fi; \
         done; \
         for t in {reader}/rootfs {reader}/config.json {reader}/mounts; do \
           if mv \"$t\" \"$t.old\"; then echo \"moved $t\"; else echo \"refused $t\"; fi; \
         done; \
         echo '{{}}' > {reader}/config.json && echo overwrote || echo kept-spec; \
         rmdir {reader}/rootfs && echo removed || echo kept-rootfs"
    );
    let out = sh(&s, &root, &script);
    eprintln!("planting on the share:\n{out}");
    assert!(
        !out.contains("planted ") && !out.contains("moved "),
        "{out}"
    );
    assert_eq!(out.matches("refused ").count(), 6, "{out}");
    for kept in ["kept-rootfs", "kept-spec"] {
        assert!(out.contains(kept), "{kept}: {out}");
    }
    assert!(out.contains("Read-only file system"), "{out}");
    // The shim goes on: a new container with a copied ConfigMap, and an
    // update of it, each written through the share.
    let after = s
        .cri
        .create_container_with(&pod, "after", IMAGE, &["sleep", "3603"], |c| {
            c.mounts.push(mount(&cfg, "/etc/cfg", true))
        })
        .expect("create after the planting");
    s.cri.start_container(&after).expect("start");
    kubelet_write(
        &cfg,
        "..2026_12_07_09_01_00.2",
        &[("app.conf", b"version=2\n")],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let out = sh(&s, &after, "cat /etc/cfg/app.conf");
        if out.contains("version=2") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "update: {out}");
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "untouched\n"
    );
    assert_eq!(mounts_outside(&s), outside_before, "mounts outside the pod");

    // 3. Set-uid programs and device nodes are inert on the host.
    let out = sh(
        &s,
        &root,
        "cp /bin/busybox /suid-sh && chmod 4755 /suid-sh && mknod /blk b 7 0 && \
         cp /bin/busybox /e/suid-sh && chmod 4755 /e/suid-sh && mknod /e/blk b 7 0 && echo made",
    );
    assert!(out.contains("made"), "{out}");
    let mounts = mounts_below(&pod_dir);
    assert!(mounts.len() >= 6, "{mounts:?}");
    for (point, options) in &mounts {
        let o: Vec<&str> = options.split(',').collect();
        assert!(
            o.contains(&"nosuid") && o.contains(&"nodev"),
            "{point}: {options}"
        );
    }
    let root_dir = pod_dir.join("work").join(&root);
    let suid = root_dir.join("rootfs/suid-sh");
    assert_eq!(
        std::fs::metadata(&suid).expect("the set-uid copy").mode() & 0o7777,
        0o4755
    );
    let volume_copy = std::fs::read_dir(root_dir.join("mounts"))
        .expect("mounts")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join("blk").exists())
        .expect("the emptyDir on the share");
    for node in [root_dir.join("rootfs/blk"), volume_copy.join("blk")] {
        let e = std::fs::File::open(&node).expect_err("a device node on a nodev mount");
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{}", node.display());
    }
    let ns_dir = pod_dir.parent().expect("namespace dir");
    for d in [
        s.c.pods.as_path(),
        ns_dir,
        &pod_dir,
        &pod_dir.join("work"),
        &pod_dir.join("shared"),
        &root_dir,
        &root_dir.join("mounts"),
    ] {
        let mode = std::fs::metadata(d).expect("dir").mode() & 0o7777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", d.display());
    }
    for sock in ["fs.sock", "vsock.sock", "api.sock"] {
        let mode = std::fs::symlink_metadata(pod_dir.join(sock))
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{sock} is {mode:o}");
    }
    let (ok, out) = as_nobody(&["/bin/ls", &pod_dir.display().to_string()]);
    assert!(!ok && out.contains("Permission denied"), "{out}");
    let (ok, out) = as_nobody(&[&suid.display().to_string(), "id", "-u"]);
    assert!(!ok, "nobody ran the set-uid copy: {out}");

    // 4. The shared PID namespace's holder, against CAP_SYS_PTRACE.
    let tracer = s
        .cri
        .create_container_with(&pod, "tracer", IMAGE, &["sleep", "3604"], |c| {
            c.linux
                .get_or_insert_default()
                .security_context
                .get_or_insert_default()
                .capabilities = Some(Capability {
                add_capabilities: vec!["SYS_PTRACE".into()],
                ..Default::default()
            });
        })
        .expect("create");
    s.cri.start_container(&tracer).expect("start");
    let out = sh(&s, &tracer, "husk-testprog ptrace-probe 1");
    eprintln!("ptrace of the holder:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    for line in &lines {
        assert!(!line.ends_with(" ok"), "{line}: {out}");
    }
    let out = sh(
        &s,
        &tracer,
        "grep -E '^(Name|Cap|NoNewPrivs|Seccomp)' /proc/1/status",
    );
    for want in [
        "Name:\tpause",
        "CapPrm:\t0000000000000000",
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    // The capability works: the planter's sleep is open to it.
    let out = sh(
        &s,
        &tracer,
        "for p in /proc/[0-9]*; do \
           [ \"$(cat $p/comm 2>/dev/null)\" = sleep ] && grep -q 3601 $p/cmdline 2>/dev/null && \
           husk-testprog ptrace-probe ${p#/proc/} && break; \
         done",
    );
    assert!(out.contains("attach ok"), "{out}");

    // 5. A "ConfigMap" with a 4 GiB sparse file.
    let used = used_bytes(&s.c.pods);
    // CRI creates the task (and the shim its files) at StartContainer.
    let big_ctr = s
        .cri
        .create_container_with(&pod, "big", IMAGE, &["sleep", "3605"], |c| {
            c.mounts.push(mount(&big, "/big", true))
        })
        .expect("create");
    let err = s.cri.start_container(&big_ctr).expect_err("a 4 GiB volume");
    let text = format!("{err:#}");
    assert!(
        text.contains("kubernetes.io~configmap/big")
            && text.contains("huge")
            && text.contains("more than"),
        "{text}"
    );
    let grew = used_bytes(&s.c.pods).saturating_sub(used);
    assert!(grew < 256 << 20, "the node's disk grew by {grew} bytes");
    let packs: Vec<PathBuf> = std::fs::read_dir(pod_dir.join("work"))
        .expect("work")
        .filter_map(|e| e.ok().map(|e| e.path().join("packs")))
        .filter_map(|p| std::fs::read_dir(p).ok())
        .flat_map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())))
        .collect();
    assert!(packs.is_empty(), "packs left: {packs:?}");

    s.cri.stop_pod(&pod.id).expect("stop");
    s.cri.remove_pod(&pod.id).expect("remove");
    s.c.assert_nothing_left_within(Duration::from_secs(60));
}
