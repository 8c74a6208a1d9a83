//! The parts of the husk shim that handle what the guest sends, as a
//! library so that the fuzz targets (`fuzz/`) can drive them directly. The
//! shim binary (`main.rs`) uses them from here.

pub mod metrics;
