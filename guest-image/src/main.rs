//! `husk-guest-image`: writes the guest initramfs from a static agent binary.
//!
//! The kernel half of the guest image is built by `build-kernel.sh` (it is a
//! `make` of Debian's kernel source, cached outside the tree); this tool does
//! the other half.

use std::{fs, io::BufWriter, path::PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use husk_guest_image::{write_initramfs, Compression};

#[derive(Debug, Parser)]
#[command(version, about = "Build husk's guest initramfs (agent as /init)")]
struct Args {
    /// The static husk-agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// Where to write the archive (written to a temporary file first).
    #[arg(long)]
    output: PathBuf,
    /// Compression: "none" (fastest to unpack in an emulated guest kernel) or "gzip".
    #[arg(long, default_value = "none")]
    compression: Compression,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let agent =
        fs::read(&args.agent).with_context(|| format!("reading {}", args.agent.display()))?;
    let tmp = args.output.with_extension("tmp");
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let writer = write_initramfs(&agent, args.compression, BufWriter::new(file))
        .with_context(|| format!("writing {}", tmp.display()))?;
    writer
        .into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("flushing {}", tmp.display()))?;
    fs::rename(&tmp, &args.output)
        .with_context(|| format!("renaming to {}", args.output.display()))?;
    let size = fs::metadata(&args.output)?.len();
    eprintln!(
        "husk-guest-image: wrote {} ({} bytes, {:?})",
        args.output.display(),
        size,
        args.compression
    );
    Ok(())
}
