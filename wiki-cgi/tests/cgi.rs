//! wiki-cgi as a web server runs it: one CGI process per request.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Runs one CGI request; returns (status, headers+body).
fn cgi(data: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wiki-cgi"))
        .env_clear()
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("WIKI_DATA_DIR", data)
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path)
        .env("SCRIPT_NAME", "/wiki.cgi")
        .env("QUERY_STRING", "")
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_COOKIE", format!("wikicsrf={TOKEN}"))
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run wiki-cgi");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .strip_prefix("Status: ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn save_form(base: u64, text: &str) -> String {
    format!(
        "base={base}&csrf={TOKEN}&summary=s&text={}",
        text.replace(' ', "+")
    )
}

#[test]
fn two_processes_saving_the_same_page_never_lose_an_edit_silently() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    assert_eq!(
        cgi(data, "POST", "/save/Race", &save_form(0, "first")).0,
        303
    );
    for round in 1..=10u64 {
        // Two editors who both started from the current revision.
        let handles: Vec<_> = (0..2)
            .map(|who| {
                let data = data.to_path_buf();
                std::thread::spawn(move || {
                    cgi(
                        &data,
                        "POST",
                        "/save/Race",
                        &save_form(round, &format!("round {round} by {who}")),
                    )
                    .0
                })
            })
            .collect();
        let mut statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        statuses.sort();
        assert_eq!(
            statuses,
            vec![303, 409],
            "round {round}: one saved, one told of the conflict"
        );
    }
    let (_, history) = cgi(data, "GET", "/history/Race", "");
    assert_eq!(
        history.matches("revision ").count(),
        11,
        "every acknowledged save is a revision"
    );
    assert!(
        history.contains("href=\"/wiki.cgi/rev/Race/11\""),
        "links carry the script name"
    );
}

#[test]
fn cgi_protocol_basics() {
    let dir = tempfile::tempdir().unwrap();
    let (status, out) = cgi(dir.path(), "GET", "/", "");
    assert_eq!(status, 303);
    assert!(out.contains("Location: /wiki.cgi/page/Start"), "{out}");
    let (status, out) = cgi(dir.path(), "GET", "/page/..%2F..%2Fetc%2Fpasswd", "");
    assert_eq!(status, 400, "{out}");
    let (status, out) = cgi(dir.path(), "GET", "/edit/Start", "");
    assert_eq!(status, 200);
    assert!(out.contains("Content-Type: text/html"));
    assert!(out.contains("action=\"/wiki.cgi/save/Start\""));
    let (status, _) = cgi(dir.path(), "POST", "/save/Start", "base=0&text=x");
    assert_eq!(status, 403, "no CSRF token, no save");
}
