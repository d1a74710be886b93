//! Compiles proto/ with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // Parking idle connections (transport/park.rs) needs epoll, and packs a
    // parker id and a descriptor into a 64-bit waker word.
    println!("cargo:rustc-check-cfg=cfg(parking)");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let width = std::env::var("CARGO_CFG_TARGET_POINTER_WIDTH").unwrap_or_default();
    if os == "linux" && width == "64" {
        println!("cargo:rustc-cfg=parking");
    }
    let files = [
        "proto/tether/v1/client.proto",
        "proto/tether/v1/upstream.proto",
        "proto/tether/v1/cluster.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    let mut config = prost_build::Config::new();
    // Payloads decode into `Bytes`, so they are shared, never copied, on fan-out.
    config.bytes(["."]);
    config.compile_fds(fds)?;
    Ok(())
}
