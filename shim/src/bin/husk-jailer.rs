//! `husk-jailer`: the step between the shim and a pod VM's host processes
//! (`husk-vmm`, `husk-virtiofsd`). It joins the pod's cgroup, applies its
//! limits and `oom_score_adj`, then executes the program, which inherits
//! all of it (`husk_shim::jail` says why a separate program does this).
//! On failure it prints why to stderr (the program's log file) and exits
//! with status 125, which the shim reports with that log.

use std::ffi::OsString;

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let err = match husk_shim::jail::Jail::parse(&args) {
        Ok(jail) => jail.enter(),
        Err(e) => e,
    };
    eprintln!("husk-jailer: {err}");
    std::process::exit(125);
}
