//! A minimal HTTP/1.1 client for the benchmark and tests that drive a wiki
//! over loopback: one request per connection, no TLS, no redirects.

use std::io::{Read, Write};
use std::time::Duration;

pub struct Reply {
    pub status: u16,
    /// The response head, lower-cased.
    pub headers: String,
    pub body: String,
}

pub fn request(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
    cookie: &str,
) -> std::io::Result<Reply> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nCookie: {cookie}\r\n\
Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(Reply {
        status,
        headers: head.to_lowercase(),
        body: body.to_string(),
    })
}

/// The `value` of the form input named `name` in a page we generated.
pub fn form_value<'a>(html: &'a str, name: &str) -> Option<&'a str> {
    let at = html.find(&format!("name=\"{name}\" value=\""))? + name.len() + 15;
    html[at..].split('"').next()
}
