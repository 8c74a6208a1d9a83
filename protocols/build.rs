//! Generates the protobuf messages and ttrpc client/server code for the agent
//! API from `protos/agent.proto` into `OUT_DIR`.

use std::{env, fs, io, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() -> io::Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR").map_err(io::Error::other)?).join("agent");
    fs::create_dir_all(&out)?;
    println!("cargo:rerun-if-changed=protos/agent.proto");

    Codegen::new()
        .input("protos/agent.proto")
        .include("protos")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().generate_accessors(true))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out)
        .run()?;

    // `include!` cannot take inner attributes (`#![...]`) or inner doc
    // comments (`//!`), which the generators emit at the top of each file.
    for entry in fs::read_dir(&out)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path)?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
                .collect();
            fs::write(&path, kept.join("\n"))?;
        }
    }
    Ok(())
}
