//! failsafe-bench in --quick mode on a local directory and a failsafe mount
//! (and bindfs when it is installed): it runs every workload and writes the
//! JSON and the report. No timing is asserted.

use std::process::Command;

const WORKLOADS: [&str; 10] = [
    "page_save_1",
    "page_save_n",
    "page_read_warm",
    "page_read_cold",
    "create",
    "ls_cold",
    "ls_warm",
    "delete",
    "stream_write",
    "stream_read",
];

fn bindfs_installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("bindfs").is_file()))
}

#[test]
fn t95_bench_quick_writes_every_workload_to_json_and_report() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the bench mounts with FUSE and needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("out/results.json");
    let report = tmp.path().join("out/BENCHMARKS.md");
    let mut targets = vec!["local", "failsafe"];
    if bindfs_installed() {
        targets.insert(1, "bindfs");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_failsafe-bench"))
        .arg("--quick")
        .args(["--targets", &targets.join(",")])
        .arg("--no-install")
        .arg("--dir")
        .arg(tmp.path().join("data"))
        .arg("--json")
        .arg(&json)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "failsafe-bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stdout.contains("page save, 1 writer"), "{stdout}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in [
        "cpu_model",
        "cores",
        "kernel",
        "filesystem",
        "date",
        "git_commit",
    ] {
        assert!(!v["machine"][key].is_null(), "machine.{key} missing: {v}");
    }
    let workloads = v["workloads"].as_array().unwrap();
    for id in WORKLOADS {
        let w = workloads
            .iter()
            .find(|w| w["id"] == id)
            .unwrap_or_else(|| panic!("workload {id} missing"));
        for t in &targets {
            let value = w["results"][t]["value"].as_f64();
            assert!(
                value.is_some_and(|x| x.is_finite() && x > 0.0),
                "{id} on {t}: {}",
                w["results"][t]
            );
        }
        assert!(w["failsafe_over_local"].as_f64().is_some(), "{id}: {w}");
        // Without the mount's stats option, no round trips are invented.
        if v["round_trips"]["enabled"] == false {
            assert!(w["results"]["failsafe"]["round_trips"].is_null(), "{w}");
        }
    }
    assert_eq!(v["cities"]["status"], "not yet measured");

    let md = std::fs::read_to_string(&report).unwrap();
    assert!(md.starts_with("# Benchmarks"), "{md}");
    for needle in [
        "failsafe / bindfs",
        "failsafe / local",
        "round trips",
        "NOT YET MEASURED",
        "failsafe-bench",
    ] {
        assert!(md.contains(needle), "report lacks {needle:?}:\n{md}");
    }
}
