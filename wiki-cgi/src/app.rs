//! Requests to responses: routing, forms, CSRF, and the HTML pages. Knows
//! nothing of CGI or sockets; `main.rs` adapts both to this.

use std::collections::HashMap;

use crate::render::{escape, render, url_encode};
use crate::store::{valid_name, SaveOutcome, Store, StoreError, MAX_PAGE_BYTES};

/// Largest request body accepted.
pub(crate) const MAX_BODY: usize = 2 * MAX_PAGE_BYTES;
const CSRF_COOKIE: &str = "wikicsrf";

pub(crate) struct Request {
    pub method: String,
    /// Path below the wiki's root, starting with `/`.
    pub path: String,
    pub query: String,
    pub cookies: String,
    pub body: Vec<u8>,
    /// Who is editing: the authenticated user or the client address.
    pub author: String,
    /// Where the wiki is mounted in the site (CGI's SCRIPT_NAME), "" at the root.
    pub base: String,
}

pub(crate) struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    fn html(status: u16, body: String) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), "text/html; charset=utf-8".into())],
            body,
        }
    }

    fn redirect(to: &str) -> Response {
        Response {
            status: 303,
            headers: vec![("Location".into(), to.into())],
            body: String::new(),
        }
    }
}

pub(crate) fn status_text(code: u16) -> &'static str {
    match code {
        200 => "OK",
        303 => "See Other",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn parse_form(s: &str) -> HashMap<String, String> {
    s.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn cookie(cookies: &str, name: &str) -> Option<String> {
    cookies
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn layout(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t} — failsafe wiki</title>\
<style>body{{font-family:sans-serif;max-width:52em;margin:1em auto;padding:0 1em;color:#222}}\
nav a{{margin-right:1em}} a.new{{color:#b00}} textarea{{width:100%;height:24em;font-family:monospace}}\
.del{{background:#fdd}} .ins{{background:#dfd}} pre.diff{{white-space:pre-wrap}} .note{{background:#ffd;padding:.5em}}\
footer{{margin-top:2em;font-size:.85em;color:#555;border-top:1px solid #ddd;padding-top:.5em}}\
.mode{{font-weight:bold;padding:0 .3em}} .mode.ok{{color:#174d17;background:#dff3df}} .mode.limp{{color:#6b3d00;background:#ffe3b3}}\
.host.up::before{{content:\"\\25CF \";color:#2a2}} .host.down{{color:#b00}} .host.down::before{{content:\"\\25CF \";color:#b00}}</style>\
</head><body><nav><a href=\"/page/Start\">Start</a><a href=\"/recent\">Recent changes</a><a href=\"/index\">Index</a>\
<form style=\"display:inline\" action=\"/search\"><input name=\"q\" placeholder=\"search\"></form></nav><hr>{body}</body></html>\n",
        t = escape(title)
    )
}

/// The footer under a page kept on a failsafe mount: the cluster's mode
/// and the hosts that hold the page, from its `failsafe.hosts` attribute
/// (`json`), so a host that went down shows in the wiki itself.
fn where_footer(json: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return String::new();
    };
    let mode = v["mode"].as_str().unwrap_or("unknown");
    let class = match mode {
        "fail-safe" => "ok",
        _ => "limp",
    };
    let hosts: Vec<String> = v["hosts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|h| h["holds"].as_bool() == Some(true))
        .map(|h| {
            let state = h["state"].as_str().unwrap_or("unknown");
            format!(
                "<span class=\"host {}\" title=\"{}\">zone {} {}</span>",
                if state == "up" { "up" } else { "down" },
                escape(h["addr"].as_str().unwrap_or("")),
                escape(h["zone"].as_str().unwrap_or("?")),
                escape(state)
            )
        })
        .collect();
    let held = match hosts.len() {
        0 => String::new(),
        _ => format!(" · this page is on {}", hosts.join(", ")),
    };
    format!(
        "<footer id=\"where\">Stored on failsafe: <span class=\"mode {class}\">{}</span>{held}</footer>",
        escape(mode)
    )
}

fn time_str(secs: u64) -> String {
    // UTC, from days since the epoch (no time-zone database needed).
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

pub(crate) struct App {
    pub store: Store,
}

impl App {
    pub(crate) fn handle(&self, req: &Request) -> Response {
        let mut r = self.handle_at_root(req);
        if !req.base.is_empty() {
            // Our own links are absolute from the wiki's root; user text is
            // escaped, so these patterns only occur in markup we wrote.
            let base = &req.base;
            r.body = r
                .body
                .replace("href=\"/", &format!("href=\"{base}/"))
                .replace("action=\"/", &format!("action=\"{base}/"));
            for (k, v) in &mut r.headers {
                if k == "Location" {
                    *v = format!("{base}{v}");
                } else if k == "Set-Cookie" {
                    *v = v.replace("Path=/", &format!("Path={base}/"));
                }
            }
        }
        r
    }

    fn handle_at_root(&self, req: &Request) -> Response {
        self.route(req).unwrap_or_else(error_page)
    }

    fn route(&self, req: &Request) -> Result<Response, StoreError> {
        let parts: Vec<&str> = req.path.trim_start_matches('/').splitn(3, '/').collect();
        let name = parts.get(1).map(|n| percent_decode(n)).unwrap_or_default();
        let q = parse_form(&req.query);
        match (req.method.as_str(), parts[0]) {
            ("GET" | "HEAD", "") => Ok(Response::redirect("/page/Start")),
            (_, "page" | "edit" | "save" | "history" | "rev" | "diff") if !valid_name(&name) => Ok(Response::html(
                400,
                layout("Bad page name", "<h1>Bad page name</h1><p>Page names are letters, digits, <code>_</code>, <code>-</code> and <code>.</code> (not first).</p>"),
            )),
            ("GET" | "HEAD", "page") => self.view(&name),
            ("GET" | "HEAD", "edit") => self.edit(&name, req, None),
            ("POST", "save") => self.save(&name, req),
            ("GET" | "HEAD", "history") => self.history(&name),
            ("GET" | "HEAD", "rev") => {
                let rev = parts.get(2).and_then(|r| r.parse().ok()).unwrap_or(0);
                self.old_revision(&name, rev)
            }
            ("GET" | "HEAD", "diff") => {
                let a = q.get("from").and_then(|v| v.parse().ok()).unwrap_or(0);
                let b = q.get("to").and_then(|v| v.parse().ok()).unwrap_or(0);
                self.diff(&name, a, b)
            }
            ("GET" | "HEAD", "recent") => self.recent(),
            ("GET" | "HEAD", "index") => self.index(),
            ("GET" | "HEAD", "search") => self.search(q.get("q").map(String::as_str).unwrap_or("")),
            (_, "page" | "edit" | "history" | "rev" | "diff" | "recent" | "index" | "search" | "save") => {
                Ok(Response::html(405, layout("Method not allowed", "<h1>Method not allowed</h1>")))
            }
            _ => Ok(Response::html(404, layout("Not found", "<h1>Not found</h1>"))),
        }
    }

    fn view(&self, name: &str) -> Result<Response, StoreError> {
        let title = escape(name);
        let link = url_encode(name);
        let body = match self.store.read(name)? {
            Some(text) => format!(
                "<h1>{title}</h1>{}<hr><p><a href=\"/edit/{link}\">Edit</a> · <a href=\"/history/{link}\">History</a></p>{}",
                render(&text, |p| self.store.exists(p)),
                self.store.where_kept(name).map(|w| where_footer(&w)).unwrap_or_default()
            ),
            None => format!("<h1>{title}</h1><p>This page does not exist yet. <a class=\"new\" href=\"/edit/{link}\">Create it</a>.</p>"),
        };
        Ok(Response::html(200, layout(name, &body)))
    }

    /// The edit form; after a conflict, with the user's text kept and the
    /// other person's changes shown.
    fn edit(
        &self,
        name: &str,
        req: &Request,
        conflict: Option<(&str, u64)>,
    ) -> Result<Response, StoreError> {
        let (token, set_cookie) = match cookie(&req.cookies, CSRF_COOKIE).filter(|t| t.len() == 32)
        {
            Some(t) => (t, None),
            None => {
                let t = format!("{:032x}", rand::random::<u128>());
                (
                    t.clone(),
                    Some(format!(
                        "{CSRF_COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict"
                    )),
                )
            }
        };
        let (text, base, note) = match conflict {
            Some((mine, current)) => {
                let theirs = self.store.read(name)?.unwrap_or_default();
                let note = format!(
                    "<div class=\"note\"><b>Edit conflict.</b> Someone saved this page while you were editing. \
Your text is below, not saved yet; their changes are shown here. Merge them and save again.</div>{}",
                    diff_html(mine, &theirs)
                );
                (mine.to_string(), current, note)
            }
            None => (
                self.store.read(name)?.unwrap_or_default(),
                self.store.current_rev(name)?,
                String::new(),
            ),
        };
        let body = format!(
            "<h1>Editing {title}</h1>{note}<form method=\"post\" action=\"/save/{link}\">\
<input type=\"hidden\" name=\"base\" value=\"{base}\"><input type=\"hidden\" name=\"csrf\" value=\"{token}\">\
<textarea name=\"text\">{text}</textarea><p>Summary: <input name=\"summary\" size=\"60\"> <button>Save</button></p></form>",
            title = escape(name),
            link = url_encode(name),
            text = escape(&text),
        );
        let mut r = Response::html(
            if conflict.is_some() { 409 } else { 200 },
            layout(&format!("Editing {name}"), &body),
        );
        if let Some(c) = set_cookie {
            r.headers.push(("Set-Cookie".into(), c));
        }
        Ok(r)
    }

    fn save(&self, name: &str, req: &Request) -> Result<Response, StoreError> {
        if req.body.len() > MAX_BODY {
            return Err(StoreError::TooLarge);
        }
        let form = parse_form(&String::from_utf8_lossy(&req.body));
        let expected = cookie(&req.cookies, CSRF_COOKIE);
        if expected.is_none() || form.get("csrf") != expected.as_ref() {
            return Ok(Response::html(403, layout("Forbidden", "<h1>Forbidden</h1><p>The form's security token is missing or stale. Reload the edit page and try again.</p>")));
        }
        let text = form
            .get("text")
            .map(|t| t.replace("\r\n", "\n"))
            .unwrap_or_default();
        let base: u64 = form.get("base").and_then(|b| b.parse().ok()).unwrap_or(0);
        let summary: String = form
            .get("summary")
            .map(|s| s.chars().take(200).collect())
            .unwrap_or_default();
        match self.store.save(name, &text, base, &req.author, &summary)? {
            SaveOutcome::Saved(rev) => {
                let mut r = Response::redirect(&format!("/page/{}", url_encode(name)));
                // Scripts and tests learn which revision their save became.
                r.headers.push(("X-Wiki-Revision".into(), rev.to_string()));
                Ok(r)
            }
            SaveOutcome::Conflict { current } => self.edit(name, req, Some((&text, current))),
        }
    }

    fn history(&self, name: &str) -> Result<Response, StoreError> {
        let link = url_encode(name);
        let mut rows = String::new();
        for r in self.store.history(name)?.iter().rev() {
            let diff = if r.rev > 1 {
                format!(
                    " <a href=\"/diff/{link}?from={}&amp;to={}\">diff</a>",
                    r.rev - 1,
                    r.rev
                )
            } else {
                String::new()
            };
            rows.push_str(&format!(
                "<li><a href=\"/rev/{link}/{rev}\">revision {rev}</a> {time} by {author} — {summary}{diff}</li>",
                rev = r.rev,
                time = time_str(r.time),
                author = escape(&r.author),
                summary = escape(&r.summary)
            ));
        }
        Ok(Response::html(
            200,
            layout(
                &format!("History of {name}"),
                &format!("<h1>History of {}</h1><ul>{rows}</ul>", escape(name)),
            ),
        ))
    }

    fn old_revision(&self, name: &str, rev: u64) -> Result<Response, StoreError> {
        match self.store.revision(name, rev)? {
            Some(text) => Ok(Response::html(
                200,
                layout(
                    name,
                    &format!(
                        "<h1>{} (revision {rev})</h1>{}",
                        escape(name),
                        render(&text, |p| self.store.exists(p))
                    ),
                ),
            )),
            None => Ok(Response::html(
                404,
                layout("Not found", "<h1>No such revision</h1>"),
            )),
        }
    }

    fn diff(&self, name: &str, a: u64, b: u64) -> Result<Response, StoreError> {
        let (Some(old), Some(new)) = (self.store.revision(name, a)?, self.store.revision(name, b)?)
        else {
            return Ok(Response::html(
                404,
                layout("Not found", "<h1>No such revision</h1>"),
            ));
        };
        Ok(Response::html(
            200,
            layout(
                name,
                &format!(
                    "<h1>{}: revision {a} → {b}</h1>{}",
                    escape(name),
                    diff_html(&old, &new)
                ),
            ),
        ))
    }

    fn recent(&self) -> Result<Response, StoreError> {
        let mut rows = String::new();
        for c in self.store.recent(100)? {
            let link = url_encode(&c.page);
            rows.push_str(&format!(
                "<li>{time} <a href=\"/page/{link}\">{page}</a> (<a href=\"/rev/{link}/{rev}\">r{rev}</a>) by {author} — {summary}</li>",
                time = time_str(c.time),
                page = escape(&c.page),
                rev = c.rev,
                author = escape(&c.author),
                summary = escape(&c.summary)
            ));
        }
        Ok(Response::html(
            200,
            layout(
                "Recent changes",
                &format!("<h1>Recent changes</h1><ul>{rows}</ul>"),
            ),
        ))
    }

    fn index(&self) -> Result<Response, StoreError> {
        let items: String = self
            .store
            .pages()?
            .iter()
            .map(|p| {
                format!(
                    "<li><a href=\"/page/{}\">{}</a></li>",
                    url_encode(p),
                    escape(p)
                )
            })
            .collect();
        Ok(Response::html(
            200,
            layout("Index", &format!("<h1>All pages</h1><ul>{items}</ul>")),
        ))
    }

    fn search(&self, query: &str) -> Result<Response, StoreError> {
        let hits = self.store.search(query)?;
        let items: String = hits
            .iter()
            .map(|(p, snip)| {
                format!(
                    "<li><a href=\"/page/{}\">{}</a> — {}</li>",
                    url_encode(p),
                    escape(p),
                    escape(snip)
                )
            })
            .collect();
        Ok(Response::html(
            200,
            layout(
                "Search",
                &format!(
                    "<h1>Search: {}</h1><p>{} pages</p><ul>{items}</ul>",
                    escape(query),
                    hits.len()
                ),
            ),
        ))
    }
}

/// What a user sees when the storage fails: never a crash, and a clear
/// "read-only for now" page when it refuses writes (EROFS, EIO, no space).
fn error_page(e: StoreError) -> Response {
    match e {
        StoreError::Unavailable(e) => Response::html(
                503,
                layout(
                    "Read-only for now",
                    &format!(
                        "<h1>Read-only for now</h1><p class=\"note\">The wiki's storage is not accepting changes at the moment \
({}). Nothing was lost: pages can still be read, and saving works again once the storage recovers. \
Please go back and try your save again in a minute.</p>",
                        escape(&e.to_string())
                    ),
                ),
            ),
        StoreError::Busy => Response::html(503, layout("Busy", "<h1>Busy</h1><p>Someone else is saving this page right now. Please try again.</p>")),
        StoreError::TooLarge => Response::html(413, layout("Too large", "<h1>Too large</h1><p>The page is larger than the wiki accepts.</p>")),
        StoreError::Io(e) => Response::html(500, layout("Error", &format!("<h1>Error</h1><p>{}</p>", escape(&e.to_string())))),
    }
}

/// A line diff of two texts as HTML.
pub(crate) fn diff_html(old: &str, new: &str) -> String {
    let diff = similar::TextDiff::from_lines(old, new);
    let mut out = String::from("<pre class=\"diff\">");
    for change in diff.iter_all_changes() {
        let (class, sign) = match change.tag() {
            similar::ChangeTag::Delete => ("del", "-"),
            similar::ChangeTag::Insert => ("ins", "+"),
            similar::ChangeTag::Equal => ("", " "),
        };
        out.push_str(&format!(
            "<span class=\"{class}\">{sign} {}</span>",
            escape(change.value())
        ));
    }
    out.push_str("</pre>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_footer_names_the_mode_and_the_hosts_that_hold_the_page() {
        let json = r#"{"mode":"limp","copies":3,"held_in":"metadata","hosts":[
            {"host":"01","zone":"a","addr":"10.0.0.1:7000","state":"up","holds":true},
            {"host":"02","zone":"<b>","addr":"10.0.0.2:7000","state":"down","holds":true},
            {"host":"03","zone":"c","addr":"10.0.0.3:7000","state":"up","holds":false}]}"#;
        let f = where_footer(json);
        assert!(f.contains("<span class=\"mode limp\">limp</span>"), "{f}");
        assert!(f.contains("zone a up"), "{f}");
        assert!(
            f.contains(
                "<span class=\"host down\" title=\"10.0.0.2:7000\">zone &lt;b&gt; down</span>"
            ),
            "{f}"
        );
        assert!(!f.contains("zone c"), "{f}");
        assert_eq!(where_footer("not json"), "");
    }

    fn app() -> (tempfile::TempDir, App) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, App { store })
    }

    fn get(app: &App, path: &str) -> Response {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        app.handle(&Request {
            method: "GET".into(),
            path: path.into(),
            query: query.into(),
            cookies: String::new(),
            body: vec![],
            author: "t".into(),
            base: String::new(),
        })
    }

    fn post(app: &App, path: &str, body: &str, cookies: &str) -> Response {
        app.handle(&Request {
            method: "POST".into(),
            path: path.into(),
            query: String::new(),
            cookies: cookies.into(),
            body: body.as_bytes().to_vec(),
            author: "t".into(),
            base: String::new(),
        })
    }

    #[test]
    fn edit_save_view_history_diff() {
        let (_d, app) = app();
        let c = "wikicsrf=0123456789abcdef0123456789abcdef";
        let r = post(&app, "/save/Start", "base=0&csrf=0123456789abcdef0123456789abcdef&text=Hello+%5B%5BOther%5D%5D&summary=first", c);
        assert_eq!(r.status, 303);
        let page = get(&app, "/page/Start").body;
        assert!(
            page.contains("Hello") && page.contains("class=\"wikilink new\""),
            "{page}"
        );
        post(
            &app,
            "/save/Start",
            "base=1&csrf=0123456789abcdef0123456789abcdef&text=Hello+again",
            c,
        );
        let hist = get(&app, "/history/Start").body;
        assert!(hist.contains("revision 1") && hist.contains("revision 2"));
        assert!(get(&app, "/diff/Start?from=1&to=2")
            .body
            .contains("class=\"ins\""));
        assert!(get(&app, "/recent").body.contains("/page/Start"));
        assert!(get(&app, "/index").body.contains("/page/Start"));
        assert!(get(&app, "/search?q=again").body.contains("1 pages"));
    }

    #[test]
    fn csrf_is_required() {
        let (_d, app) = app();
        assert_eq!(post(&app, "/save/Start", "base=0&text=x", "").status, 403);
        assert_eq!(
            post(
                &app,
                "/save/Start",
                "base=0&text=x&csrf=aaaa",
                "wikicsrf=bbbb"
            )
            .status,
            403
        );
        assert!(app.store.read("Start").unwrap().is_none());
    }

    #[test]
    fn conflicting_save_is_shown_not_dropped() {
        let (_d, app) = app();
        let c = "wikicsrf=0123456789abcdef0123456789abcdef";
        let tok = "csrf=0123456789abcdef0123456789abcdef";
        post(&app, "/save/P", &format!("base=0&{tok}&text=one"), c);
        post(&app, "/save/P", &format!("base=1&{tok}&text=alice"), c);
        let r = post(
            &app,
            "/save/P",
            &format!("base=1&{tok}&text=bob%27s+text"),
            c,
        );
        assert_eq!(r.status, 409);
        assert!(
            r.body.contains("Edit conflict") && r.body.contains("bob&#39;s text"),
            "{}",
            r.body
        );
        assert_eq!(app.store.read("P").unwrap().as_deref(), Some("alice"));
    }

    #[test]
    fn traversal_names_are_refused_and_html_is_escaped() {
        let (_d, app) = app();
        for p in [
            "/page/..",
            "/page/%2e%2e%2fetc%2fpasswd",
            "/edit/.secret",
            "/history/a%2fb",
        ] {
            assert_eq!(get(&app, p).status, 400, "{p}");
        }
        let c = "wikicsrf=0123456789abcdef0123456789abcdef";
        post(
            &app,
            "/save/X",
            "base=0&csrf=0123456789abcdef0123456789abcdef&text=%3Cscript%3Ealert(1)%3C%2Fscript%3E",
            c,
        );
        let body = get(&app, "/page/X").body;
        assert!(!body.contains("<script>alert"), "{body}");
        let search = get(&app, "/search?q=%3Cscript%3E").body;
        assert!(!search.contains("<script>"), "{search}");
    }

    #[test]
    fn storage_that_refuses_writes_gets_a_read_only_page() {
        let e = StoreError::from(std::io::Error::from_raw_os_error(libc_erofs()));
        let r = error_page(e);
        assert_eq!(r.status, 503);
        assert!(r.body.contains("Read-only for now"), "{}", r.body);
        let r = error_page(StoreError::from(std::io::Error::from_raw_os_error(5)));
        assert!(r.body.contains("Read-only for now"), "EIO too");
    }

    fn libc_erofs() -> i32 {
        30
    }

    #[test]
    fn times_format() {
        assert_eq!(time_str(0), "1970-01-01 00:00 UTC");
        assert_eq!(time_str(1_700_000_000), "2023-11-14 22:13 UTC");
    }
}
