//! Compiles the `.proto` files with `protox`, so a fresh machine needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["meta.proto", "blocks.proto", "admin.proto", "raft.proto"];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // openraft's `AppData` bound asks for serde on `Command` and
        // `CommandResult`; the log and the transport encode them with prost.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
