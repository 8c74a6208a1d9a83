//! Template start: one boot makes a template snapshot; every later microVM
//! restores from it with a fresh virtio-fs daemon of its own, gets its own
//! identity (fresh entropy, hostname), answers, and reads and writes its
//! host directory through the new daemon — one after another and several at
//! once.

use std::{collections::HashSet, io::Read, time::Duration};

use husk_e2e::{
    make_template, processes_mentioning, require_kvm, shared_directory_round_trip, Artifacts,
    FsDaemon, TestDir, VmOptions, VmProcess,
};
use husk_protocols::{
    agent::{HealthRequest, PersonalizeRequest, ShutdownRequest},
    connect_agent,
};

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

fn host_entropy() -> Vec<u8> {
    let mut b = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("host entropy");
    b
}

/// Restores one VM from `template` with a fresh virtio-fs daemon,
/// personalizes it, uses its shared directory, shuts it down; returns the
/// guest's random sample and the time to its first answer.
async fn restore_one(
    artifacts: &Artifacts,
    template: &std::path::Path,
    name: &str,
) -> (Vec<u8>, Duration) {
    let dir = TestDir::new(name).expect("dir");
    let mut fs = FsDaemon::spawn(artifacts, dir.path())
        .await
        .expect("husk-virtiofsd");
    let mut opts = VmOptions::restored_from(template);
    opts.vmm_args.extend(fs.vmm_args());
    let mut vm = VmProcess::spawn(artifacts, dir.path(), &opts).expect("spawn");
    let client = match connect_agent(&vm.vsock, Duration::from_secs(60)).await {
        Ok(c) => c,
        Err(e) => panic!("{name}: agent after restore: {e}\n{}", vm.log_text()),
    };
    let mut req = PersonalizeRequest::new();
    req.entropy = host_entropy();
    req.hostname = name.to_string();
    req.sandbox_id = name.to_string();
    let sample = client
        .personalize(ctx(), &req)
        .await
        .expect("Personalize")
        .random_sample;
    let answered = vm.started.elapsed();
    assert_eq!(sample.len(), 16);
    client
        .health(ctx(), &HealthRequest::new())
        .await
        .expect("Health");
    // The template never mounted virtio-fs; this guest does, through its
    // own daemon.
    if let Err(e) = shared_directory_round_trip(&client, &vm.vsock, &fs.shared).await {
        panic!("{name}: shared directory: {e:#}\n{}", vm.log_text());
    }
    client
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .expect("Shutdown");
    let status = vm.wait_exit(Duration::from_secs(60)).await.expect("exit");
    assert!(status.success(), "{name}: {status}\n{}", vm.log_text());
    let daemon = fs.wait_exit(Duration::from_secs(10)).await;
    assert!(
        daemon.as_ref().is_ok_and(|s| s.success()),
        "{name}: virtio-fs daemon {daemon:?}"
    );
    std::fs::remove_dir(&fs.shared).expect("the shared directory is empty again");
    let mut left = dir.entries();
    left.retain(|e| e != "vmm.log");
    assert!(left.is_empty(), "{name}: left behind {left:?}");
    (sample, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_restores_sequentially_and_concurrently_with_distinct_identities() {
    require_kvm();
    let artifacts = Artifacts::locate().expect("artifacts");
    let store = TestDir::new("template-store").expect("dir");

    // One boot makes the template; husk-vmm exits 0 once it is written.
    let template = make_template(&artifacts, store.path(), 128)
        .await
        .expect("template");
    assert!(template.exists());
    assert_eq!(
        store.entries(),
        vec!["template.snap".to_string()],
        "only the template is left"
    );

    let mut samples = Vec::new();
    for i in 0..5 {
        let (sample, answered) = restore_one(&artifacts, &template, &format!("seq{i}")).await;
        eprintln!("restore seq{i}: agent personalized after {answered:?}");
        samples.push(sample);
    }
    let (a, b, c) = tokio::join!(
        restore_one(&artifacts, &template, "par0"),
        restore_one(&artifacts, &template, "par1"),
        restore_one(&artifacts, &template, "par2"),
    );
    for (i, (sample, answered)) in [a, b, c].into_iter().enumerate() {
        eprintln!("restore par{i}: agent personalized after {answered:?}");
        samples.push(sample);
    }
    let distinct: HashSet<_> = samples.iter().collect();
    assert_eq!(
        distinct.len(),
        samples.len(),
        "every restored guest has its own randomness"
    );
}

/// `--template-dir`: the first start makes the template (one boot), later
/// starts restore from it, and a broken template is dropped for a cold boot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_dir_makes_the_template_once_then_restores() {
    require_kvm();
    let artifacts = Artifacts::locate().expect("artifacts");
    let store = TestDir::new("template-dir").expect("dir");
    let templates = store.path().join("templates");
    let opts = |fs: &FsDaemon| {
        let mut vmm_args = vec!["--template-dir".into(), templates.display().to_string()];
        vmm_args.extend(fs.vmm_args());
        VmOptions {
            vmm_args,
            await_ready: false,
            ..Default::default()
        }
    };
    let snaps = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&templates)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };

    let mut seen = Vec::new();
    for round in 0..3 {
        if round == 2 {
            // Break the template: the next start must not use it.
            let t = templates.join(&snaps()[0]);
            let mut bytes = std::fs::read(&t).expect("read");
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(&t, bytes).expect("write");
        }
        let dir = TestDir::new(&format!("tdir{round}")).expect("dir");
        let mut fs = FsDaemon::spawn(&artifacts, dir.path())
            .await
            .expect("husk-virtiofsd");
        let mut vm = VmProcess::spawn(&artifacts, dir.path(), &opts(&fs)).expect("spawn");
        let client = match connect_agent(&vm.vsock, Duration::from_secs(300)).await {
            Ok(c) => c,
            Err(e) => panic!("round {round}: {e}\n{}", vm.log_text()),
        };
        let mut req = PersonalizeRequest::new();
        req.entropy = host_entropy();
        client.personalize(ctx(), &req).await.expect("Personalize");
        if let Err(e) = shared_directory_round_trip(&client, &vm.vsock, &fs.shared).await {
            panic!("round {round}: shared directory: {e:#}\n{}", vm.log_text());
        }
        client
            .shutdown(ctx(), &ShutdownRequest::new())
            .await
            .expect("Shutdown");
        let status = vm.wait_exit(Duration::from_secs(60)).await.expect("exit");
        let log = vm.log_text();
        assert!(status.success(), "round {round}: {status}\n{log}");
        let daemon = fs.wait_exit(Duration::from_secs(10)).await;
        assert!(
            daemon.as_ref().is_ok_and(|s| s.success()),
            "round {round}: virtio-fs daemon {daemon:?}"
        );
        // Nothing of the VM or of the template's making is left running:
        // the template VM and its virtio-fs daemon both mention the store.
        for place in [
            templates.display().to_string(),
            dir.path().display().to_string(),
        ] {
            let left = processes_mentioning(&place);
            assert!(
                left.is_empty(),
                "round {round}: processes left on {place}: {left:?}"
            );
        }
        seen.push((snaps(), log));
    }
    // Round 0 made exactly one template and restored from it; round 1 reused it.
    assert_eq!(
        seen[0].0.len(),
        1,
        "one template, no lock left: {:?}",
        seen[0].0
    );
    assert!(seen[0].0[0].ends_with(".snap"));
    assert!(
        seen[0].1.contains("booting once to make it"),
        "{}",
        seen[0].1
    );
    assert!(seen[0].1.contains("restored from"), "{}", seen[0].1);
    assert_eq!(seen[1].0, seen[0].0);
    assert!(
        !seen[1].1.contains("booting once to make it"),
        "{}",
        seen[1].1
    );
    assert!(seen[1].1.contains("restored from"), "{}", seen[1].1);
    // Round 2 refused the broken template, booted cold and removed it.
    assert!(
        seen[2].1.contains("snapshot refused, booting cold instead"),
        "{}",
        seen[2].1
    );
    assert!(seen[2].1.contains("checksum mismatch"), "{}", seen[2].1);
    assert!(
        seen[2].0.is_empty(),
        "the broken template is gone: {:?}",
        seen[2].0
    );
}
