//! Compiles the `.proto` files with `protox`, so a fresh machine needs no `protoc`.

/// The serde attribute that renders an enum field by its name (see
/// `names` in src/lib.rs).
#[allow(non_snake_case)]
fn NAMED(module: &str) -> String {
    format!("#[serde(with = \"crate::names::{module}\")]")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["meta.proto", "blocks.proto", "admin.proto", "raft.proto"];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // openraft's `AppData` bound asks for serde on `Command` and
        // `CommandResult`; the log and the transport encode them with prost.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        // States are enums on the wire and stable lowercase names in JSON
        // (`fsctl status --json`), which scripts read.
        .field_attribute("failsafe.v1.HostStatus.state", NAMED("host_liveness"))
        .field_attribute("failsafe.v1.HostStatus.admin", NAMED("host_admin_state"))
        .field_attribute("failsafe.v1.DeviceStatus.state", NAMED("device_state"))
        .field_attribute("failsafe.v1.StatusReply.mode", NAMED("cluster_mode"))
        .field_attribute("failsafe.v1.SetHostState.state", NAMED("host_admin_state"))
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
