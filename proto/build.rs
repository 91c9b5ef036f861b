fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=shim.proto");
    prost_build::compile_protos(&["shim.proto"], &["."])?;
    Ok(())
}
