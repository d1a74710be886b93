//! Compiles proto/ with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/tether/v1/client.proto",
        "proto/tether/v1/upstream.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    let mut config = prost_build::Config::new();
    // Payloads decode into `Bytes`, so they are shared, never copied, on fan-out.
    config.bytes(["."]);
    config.compile_fds(fds)?;
    Ok(())
}
