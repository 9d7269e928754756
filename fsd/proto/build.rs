//! Compiles the `.proto` files with `protox`, so a fresh machine needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["meta.proto", "blocks.proto", "admin.proto", "raft.proto"];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Raft log entries are metadata commands; openraft moves them with serde.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
