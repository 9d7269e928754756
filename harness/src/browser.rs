//! A real browser for the tests that check what a person sees: Debian's
//! chromium, headless (scripts/test.sh installs it). Each call starts it
//! with a profile of its own and waits for it, at most `WAIT`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const WAIT: Duration = Duration::from_secs(60);

/// The chromium binary, when installed.
pub fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn run(extra: &[String], url: &str) -> anyhow::Result<Vec<u8>> {
    let Some(bin) = chromium() else {
        bail!("chromium is not installed (apt-get install chromium)");
    };
    let profile = tempfile::tempdir()?;
    let mut child = Command::new(&bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut out = child.stdout.take().context("chromium's stdout")?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("chromium did not finish with {url} within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("chromium on {url}: {status}");
    }
    Ok(out)
}

/// The page at `url` as the browser built it (its DOM, serialized).
pub fn dom(url: &str) -> anyhow::Result<String> {
    let out = run(&["--dump-dom".to_string()], url)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A screenshot of `url`, `width` × `height`, written to `to` (PNG).
pub fn screenshot(url: &str, to: &Path, width: u32, height: u32) -> anyhow::Result<()> {
    run(
        &[
            format!("--window-size={width},{height}"),
            format!("--screenshot={}", to.display()),
        ],
        url,
    )?;
    if !to.exists() {
        bail!("chromium wrote no screenshot of {url}");
    }
    Ok(())
}
