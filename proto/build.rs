//! Generates the gRPC code and the file descriptor set used by server reflection.
//! protoc comes from `protoc-bin-vendored` unless `PROTOC` is set, so a fresh
//! machine needs no system package to build.
//!
//! The messages of the public API derive `serde::Serialize`, so the CLI prints
//! them as they are for `-o json`. Prost keeps enum fields as `i32` and bytes
//! as `Vec<u8>`; every such field gets a `serialize_with` from `src/text.rs`,
//! found by walking the descriptors, so a field added to a .proto file prints
//! as words without being listed anywhere.

use std::error::Error;
use std::path::PathBuf;

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use tonic_prost_build::{Builder, Config};

/// Files whose messages only travel between nodes and are never printed.
const INTERNAL: &[&str] = &["nodeos/v1/peer.proto"];

/// The package every file declares, and the module `src/lib.rs` includes it as.
const PACKAGE: &str = ".nodeos.v1";
const MODULE: &str = "crate::v1";

fn main() -> Result<(), Box<dyn Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded at this point; nothing else reads the environment.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "nodeos/v1/pool.proto",
        "nodeos/v1/metadata.proto",
        "nodeos/v1/peer.proto",
        "nodeos/v1/vm.proto",
        "nodeos/v1/volume.proto",
        "nodeos/v1/image.proto",
        "nodeos/v1/network.proto",
        "nodeos/v1/node.proto",
        "nodeos/v1/pxe.proto",
        "nodeos/v1/auth.proto",
    ];
    let fds = Config::new()
        .file_descriptor_set_path(out.join("nodeos_descriptor.bin"))
        .load_fds(&protos, &["."])?;
    serializable(tonic_prost_build::configure(), &fds)?.compile_fds(fds)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}

/// Derives `Serialize` for the messages of every public file and gives their
/// enum and bytes fields a serializer.
fn serializable(mut b: Builder, fds: &FileDescriptorSet) -> Result<Builder, String> {
    for file in fds.file.iter().filter(|f| !INTERNAL.contains(&f.name())) {
        if format!(".{}", file.package()) != PACKAGE {
            return Err(format!("{}: package {} is not {PACKAGE}", file.name(), file.package()));
        }
        for m in &file.message_type {
            let path = format!("{PACKAGE}.{}", m.name());
            // Nested messages and oneofs match this path as a prefix, so they
            // get the derive from it; naming them too would derive twice.
            b = b.type_attribute(&path, "#[derive(serde::Serialize)]");
            b = field_serializers(b, &path, m)?;
        }
    }
    Ok(b)
}

/// The `serialize_with` of each enum or bytes field of message `m` (at `path`)
/// and of its nested messages.
fn field_serializers(mut b: Builder, path: &str, m: &DescriptorProto) -> Result<Builder, String> {
    for f in &m.field {
        let helper = match f.r#type() {
            Type::Enum => format!("serialize_enum::<{}, _>", enum_path(f.type_name())?),
            Type::Bytes => "serialize_bytes".to_owned(),
            _ => continue,
        };
        // Repeated, `optional` and oneof members are generated as other Rust
        // types than the helpers take; none exists yet, so refuse rather than
        // print numbers.
        if f.label() == Label::Repeated || f.proto3_optional() || f.oneof_index.is_some() {
            return Err(format!(
                "{path}.{}: only plain enum and bytes fields print as text; add a helper to src/text.rs",
                f.name()
            ));
        }
        b = b.field_attribute(
            format!("{path}.{}", f.name()),
            format!("#[serde(serialize_with = \"crate::text::{helper}\")]"),
        );
    }
    for nested in &m.nested_type {
        let nested_path = format!("{path}.{}", nested.name());
        if nested.options.as_ref().is_some_and(|o| o.map_entry()) {
            // Map values are generated inside a `HashMap`, out of reach of a field's serializer.
            if nested.field.iter().any(|f| matches!(f.r#type(), Type::Enum | Type::Bytes)) {
                return Err(format!("{nested_path}: a map of enum or bytes values cannot print as text"));
            }
            continue;
        }
        b = field_serializers(b, &nested_path, nested)?;
    }
    Ok(b)
}

/// The Rust path of a top-level enum of the package.
fn enum_path(type_name: &str) -> Result<String, String> {
    match type_name.strip_prefix(PACKAGE).and_then(|n| n.strip_prefix('.')) {
        Some(name) if !name.contains('.') => Ok(format!("{MODULE}::{name}")),
        _ => Err(format!("enum {type_name}: only top-level enums of {PACKAGE} print by name")),
    }
}
