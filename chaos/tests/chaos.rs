//! failsafe-chaos against real clusters: the CI scenario set passes, the
//! checker fails runs that break a guarantee on purpose, and nothing a run
//! creates outlives it — also when it is interrupted or killed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Runs share the machine's two cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn chaos() -> Command {
    Command::new(env!("CARGO_BIN_EXE_failsafe-chaos"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn show(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn report(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
    serde_json::from_str(&text).expect("report.json parses")
}

/// What a run with pid `pid` could have left behind.
fn leftovers(pid: u32) -> Vec<String> {
    let mut left = Vec::new();
    let prefix = format!("fschaos{pid}-");
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        left.extend(
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&prefix)),
        );
    }
    let work = format!("{}/failsafe-chaos-{pid}", std::env::temp_dir().display());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&work))
            .map(str::to_string),
    );
    if Path::new(&work).exists() {
        left.push(work.clone());
    }
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&work) {
            left.push(format!("process {}", p.file_name().to_string_lossy()));
        }
    }
    left
}

#[test]
fn the_ci_scenarios_lose_nothing_and_nobody_notices() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out_dir = tempfile::tempdir().unwrap();
    let mut scenarios: Vec<PathBuf> = std::fs::read_dir(repo().join("scenarios/ci"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    scenarios.sort();
    let out = chaos()
        .arg("run")
        .args(&scenarios)
        .arg("--report")
        .arg(out_dir.path())
        .output()
        .unwrap();
    let text = show(&out);
    eprintln!("{text}");
    assert!(out.status.success(), "a CI scenario failed:\n{text}");
    for s in &scenarios {
        let name = s.file_stem().unwrap().to_string_lossy().to_string();
        let dir = out_dir.path().join(&name);
        let r = report(&dir);
        assert_eq!(r["violations"].as_array().map(Vec::len), Some(0), "{name}");
        // Unless the scenario expects operations to fail (`[check]
        // no_failures = false`: every tracker disk full, say), none did.
        let expects_failures = std::fs::read_to_string(s)
            .unwrap()
            .parse::<toml::Table>()
            .unwrap()
            .get("check")
            .and_then(|c| c.get("no_failures"))
            .and_then(toml::Value::as_bool)
            == Some(false);
        if !expects_failures {
            assert_eq!(r["failed_operations"], 0, "{name}");
        }
        assert!(
            r["operations"].as_u64().unwrap() > 100,
            "{name}: the workload ran"
        );
        assert!(
            !r["faults"].as_array().unwrap().is_empty(),
            "{name}: its faults were injected"
        );
        assert!(dir.join("latency.svg").exists() && dir.join("history.jsonl").exists());
    }
}

#[test]
fn the_checker_fails_a_run_whose_files_change_behind_the_mounts_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for (file, rules) in [
        ("write-behind-mount.toml", &["log_line_never_written"][..]),
        ("delete-behind-mount.toml", &["lost_write"][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = chaos()
            .arg("run")
            .arg(repo().join("scenarios/checker").join(file))
            .arg("--report")
            .arg(dir.path())
            .output()
            .unwrap();
        let text = show(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{file}: the checker must fail the run:\n{text}"
        );
        let r = report(dir.path());
        let found: Vec<&str> = r["violations"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["rule"].as_str())
            .collect();
        for rule in rules {
            assert!(
                found.contains(rule),
                "{file}: expected a {rule} violation, got {found:?}"
            );
        }
        assert!(text.contains("VIOLATION"), "{text}");
    }
}

#[test]
fn an_interrupted_or_killed_run_leaves_nothing_behind() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scenario = repo().join("scenarios/ci/kill9.toml");
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = chaos()
            .arg("run")
            .arg(&scenario)
            .arg("--report")
            .arg(dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Wait until the run has built its world (mounts are up).
        let work = std::env::temp_dir().join(format!("failsafe-chaos-{pid}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .contains(&work.display().to_string())
        {
            assert!(Instant::now() < deadline, "the run never mounted");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(3));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
        let status = child.wait().unwrap();
        assert!(!status.success());
        if signal == libc::SIGKILL {
            // Its children die with it; what stays is removed by `cleanup`.
            std::thread::sleep(Duration::from_millis(500));
            let out = chaos().arg("cleanup").output().unwrap();
            assert!(out.status.success(), "{}", show(&out));
        }
        let left = leftovers(pid);
        assert!(
            left.is_empty(),
            "after signal {signal}: left behind {left:#?}"
        );
    }
}
