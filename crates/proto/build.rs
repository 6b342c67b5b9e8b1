//! Generates the Rust types from `proto/p2pvm_api.proto` with a pure-Rust
//! protobuf compiler, so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let schema = "proto/p2pvm_api.proto";
    println!("cargo:rerun-if-changed={schema}");
    let descriptors = protox::compile([schema], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        // `<&str>::from(&op)`: the operation's name, without formatting the
        // request (which may carry megabytes).
        .type_attribute(
            ".p2pvm.api.v1.Request.op",
            "#[derive(strum::IntoStaticStr)]",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
