//! Compiles `sluice/v1/*.proto` with protox (pure Rust, no system `protoc`) and
//! generates prost messages, tonic clients and servers, and pbjson serde impls
//! (proto3 JSON mapping, used by the dashboard's JSON API).

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "sluice/v1/resources.proto",
    "sluice/v1/admin.proto",
    "sluice/v1/stats.proto",
    "sluice/v1/data_plane.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTOS, ["."])?;
    let descriptor_path = out_dir.join("sluice_descriptor.bin");
    fs::write(&descriptor_path, descriptors.encode_to_vec())?;
    fs::write(out_dir.join("sluice.v1.sides.rs"), sides(&descriptors)?)?;

    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        // prost's codec, decoding each message from one slice (src/codec.rs).
        .codec_path("crate::codec::SliceCodec")
        .compile_fds(descriptors)?;

    let descriptor_bytes = fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .build(&[".sluice.v1"])?;
    Ok(())
}

/// `impl crate::codec::Side` for every message a method of the package takes or returns:
/// whether it is a request, which a server decodes (src/codec.rs: a request that does not
/// decode is the client's mistake). A message both taken and returned is an error here.
fn sides(
    descriptors: &prost_types::FileDescriptorSet,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut sides = std::collections::BTreeMap::new();
    let methods = descriptors
        .file
        .iter()
        .filter(|file| file.package() == "sluice.v1")
        .flat_map(|file| &file.service)
        .flat_map(|service| &service.method);
    for method in methods {
        for (name, request) in [(method.input_type(), true), (method.output_type(), false)] {
            let name = name
                .strip_prefix(".sluice.v1.")
                .ok_or_else(|| format!("{name}: a method's message outside sluice.v1"))?;
            if *sides.entry(name.to_owned()).or_insert(request) != request {
                return Err(format!("{name} is both a request and a response").into());
            }
        }
    }
    Ok(sides
        .iter()
        .map(|(name, request)| {
            format!("impl crate::codec::Side for {name} {{ const REQUEST: bool = {request}; }}\n")
        })
        .collect())
}
