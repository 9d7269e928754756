//! failsafe-bench in --quick mode on a local directory and a failsafe mount
//! (and bindfs when it is installed): it runs every workload and writes the
//! JSON and the report; and a few saves and reads in cities (network
//! namespaces, latency relays) when root with iproute2. No timing is
//! asserted.

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
    assert_eq!(v["cities"]["status"], "not measured");

    let md = std::fs::read_to_string(&report).unwrap();
    assert!(md.starts_with("# Benchmarks"), "{md}");
    for needle in [
        "failsafe / bindfs",
        "failsafe / local",
        "round trips",
        "NOT MEASURED",
        "failsafe-bench",
    ] {
        assert!(md.contains(needle), "report lacks {needle:?}:\n{md}");
    }
}

#[test]
fn t96_bench_cities_smoke_measures_both_mounts() {
    if let Err(why) = failsafe_harness::netns::available() {
        eprintln!("skipped: the cities need network namespaces: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("results.json");
    let out = Command::new(env!("CARGO_BIN_EXE_failsafe-bench"))
        .args(["--quick", "--targets", "local", "--cities"])
        .args([
            "--city-saves",
            "2",
            "--city-reads",
            "3",
            "--api-seconds",
            "0",
        ])
        .arg("--dir")
        .arg(tmp.path().join("data"))
        .arg("--json")
        .arg(&json)
        .arg("--report")
        .arg(tmp.path().join("BENCHMARKS.md"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "failsafe-bench --cities failed:\n{stderr}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let c = &v["cities"];
    assert_eq!(c["status"], "measured", "{c}");
    assert_eq!(c["rtt_ms"], 20, "{c}");
    let rows = c["rows"].as_array().unwrap();
    // Three operations from each mount, and mount B's read of a page
    // mount A just changed.
    assert_eq!(rows.len(), 7, "{c}");
    assert!(
        rows.iter().any(|r| r["city"] == "a city without the leader"
            && r["op"] == "open+read after a change elsewhere"
            && r["median_ms"].as_f64().is_some_and(|x| x > 0.0)),
        "{c}"
    );
    for city in ["the leader's city", "a city without the leader"] {
        for op in ["page save", "stat", "open+read"] {
            let r = rows
                .iter()
                .find(|r| r["city"] == city && r["op"] == op)
                .unwrap_or_else(|| panic!("{op} from {city} missing: {c}"));
            assert!(r["median_ms"].as_f64().is_some_and(|x| x > 0.0), "{r}");
            if v["round_trips"]["enabled"] == true {
                assert!(r["round_trips_per_op"].as_f64().is_some(), "{r}");
            }
        }
    }
    // Nothing of the run is left: no namespace of this tool.
    let left: Vec<_> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("fsbench"))
                .collect()
        })
        .unwrap_or_default();
    let own: Vec<_> = left
        .iter()
        .filter(|n| {
            let pid: String = n["fsbench".len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            pid.parse::<u32>()
                .is_ok_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        })
        .collect();
    assert!(own.is_empty(), "namespaces left behind: {own:?}");
}
