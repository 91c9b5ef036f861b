// berth's native API (`proto/api.proto`): its tonic server (berthd) and client
// (berthctl) live in this crate, so that the shim, which shares `berth-proto`, links
// no gRPC.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/api.proto");
    // serde for berthctl's `-o json`.
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(&["../proto/api.proto"], &["../proto"])?;
    Ok(())
}
