//! The parts of the husk shim that others need too, as a library: what
//! handles what the guest sends (`metrics`, driven directly by the fuzz
//! targets in `fuzz/`) and where a pod's files live (`poddir`, which the
//! end-to-end tests share), and the per-step timing lines the shim logs
//! and the benchmarks read back (`steps`). The shim binary (`main.rs`) uses them from here.

pub mod jail;
pub mod metrics;
pub mod poddir;
pub mod steps;
