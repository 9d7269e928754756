//! The HTTP workload: wiki-cgi served from each mount (two web hosts over
//! one wiki), editors saving through its edit form, readers viewing pages.
//! Every page's text carries its revision and a checksum of its body, so a
//! view shows which save it is.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use failsafe_harness::httpc::{form_value, request};
use failsafe_harness::local::{self, die_with_parent, sibling_binary, Stopped};
use rand::{Rng, SeedableRng};

use crate::check::Seen;
use crate::workload::{Ctx, Kind};

/// The logical path of a wiki page in the history.
pub(crate) fn page_path(name: &str) -> String {
    format!("wiki/{name}")
}

pub(crate) fn page_name(c: usize, w: usize, p: usize) -> String {
    format!("C{c}W{w}P{p}")
}

/// Starts `wiki-cgi serve` on `data` at a free loopback port, its clock
/// `clock_s` seconds off (its web host's).
pub(crate) fn start_wiki(data: &Path, clock_s: f64) -> anyhow::Result<(Stopped, u16)> {
    let mut cmd = Command::new(sibling_binary("wiki-cgi")?);
    die_with_parent(&mut cmd);
    crate::world::skew_clock(&mut cmd, clock_s)?;
    local::start_wiki(cmd, data)
}

/// A page's text and the checksum its view will show.
fn page_text(name: &str, rev: u64, size: usize) -> (String, String) {
    let line = format!("{name} revision {rev} line of text for the wiki\n");
    let target = size / 2 + (rev as usize * 997) % size.max(1);
    let mut body = String::new();
    while body.len() < target {
        body.push_str(&line);
    }
    let sum = crate::workload::hash(body.as_bytes())[..16].to_string();
    (
        format!("page {name} rev {rev}\n\nchecksum {sum}\n\n{body}"),
        sum,
    )
}

/// What a page view shows: its revision and checksum (None: no such page).
pub(crate) fn parse_view(name: &str, html: &str) -> Option<Seen> {
    if html.contains("does not exist yet") {
        return None;
    }
    let rev = html
        .split(&format!("page {name} rev "))
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok());
    let hash = html
        .split("checksum ")
        .nth(1)
        .map(|r| r.chars().take(16).collect())
        .unwrap_or_default();
    Some(Seen { rev, hash })
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn http_err(what: &str, status: u16) -> std::io::Error {
    std::io::Error::other(format!("{what}: HTTP {status}"))
}

/// The name of shared page `p` (`shared_pages`: every editor saves it).
pub(crate) fn shared_name(p: usize) -> String {
    format!("Shared{p}")
}

/// What a save through the edit form came to.
enum Saved {
    Yes,
    /// Refused as an edit conflict: someone saved since the form was shown.
    Conflict,
}

/// One editor: opens the edit form and saves, like a person with a browser.
/// Its own pages, each save numbered by the editor; or with `shared_pages`
/// the pages every editor saves, each save the revision after the one its
/// form showed (what the wiki will number it, if nobody saved meanwhile).
/// After each save it stats the page's file on its mount (the mtime seen).
pub(crate) fn editor(ctx: Ctx, w: usize, port: u16) {
    let me = format!("c{}w{w}", ctx.client);
    let cookie = format!(
        "wikicsrf={:032x}",
        0xc4a0_0000u128 + (ctx.client * 64 + w) as u128
    );
    let mut k = 0u64;
    while !ctx.stop.load(Ordering::Relaxed) {
        k += 1;
        let name = if ctx.cfg.shared_pages {
            shared_name((ctx.client * ctx.cfg.writers + w + k as usize) % ctx.cfg.pages)
        } else {
            page_name(ctx.client, w, k as usize % ctx.cfg.pages)
        };
        // The revision and checksum the save would write, once known.
        let first = if ctx.cfg.shared_pages { 0 } else { k };
        let attempt = std::cell::RefCell::new((first, String::new()));
        ctx.record_as(
            &me,
            &page_path(&name),
            || {
                let form = request(port, "GET", &format!("/edit/{name}"), "", &cookie)?;
                if form.status != 200 {
                    return Err(http_err("edit form", form.status));
                }
                let field = |f| {
                    form_value(&form.body, f)
                        .map(str::to_string)
                        .ok_or_else(|| std::io::Error::other(format!("edit form without {f}")))
                };
                let (base, csrf) = (field("base")?, field("csrf")?);
                let rev = if ctx.cfg.shared_pages {
                    base.parse::<u64>()
                        .map_err(|_| std::io::Error::other(format!("edit form base {base:?}")))?
                        + 1
                } else {
                    k
                };
                let (text, sum) = page_text(&name, rev, ctx.cfg.page_bytes);
                *attempt.borrow_mut() = (rev, sum);
                let body = format!(
                    "base={base}&csrf={csrf}&summary=chaos&text={}",
                    form_encode(&text)
                );
                let r = request(port, "POST", &format!("/save/{name}"), &body, &cookie)?;
                match r.status {
                    303 => Ok(Saved::Yes),
                    409 if ctx.cfg.shared_pages => Ok(Saved::Conflict),
                    s => Err(http_err("save", s)),
                }
            },
            |saved| {
                let (rev, sum) = attempt.borrow().clone();
                match saved {
                    Some(Saved::Conflict) => (Kind::Conflict, rev, String::new(), String::new()),
                    _ => (Kind::Save, rev, sum, String::new()),
                }
            },
        );
        stat_page(&ctx, &me, &name);
        std::thread::sleep(Duration::from_millis(ctx.cfg.think_ms));
    }
}

/// Stats `name`'s file on this editor's or reader's mount and records the
/// mtime it shows.
fn stat_page(ctx: &Ctx, me: &str, name: &str) {
    let file = ctx.root.join("wiki/pages").join(format!("{name}.md"));
    ctx.record(
        me,
        Kind::Stat,
        &page_path(name),
        || match std::fs::metadata(&file) {
            Ok(m) => Ok(Some(m.modified()?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        },
        |t| {
            let ns = t
                .copied()
                .flatten()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as u64);
            (ns, String::new(), String::new())
        },
    );
}

/// One reader: views pages of the editors on the other web host (with
/// `shared_pages`, the shared pages), and stats each on its own mount.
pub(crate) fn reader(ctx: Ctx, r: usize, clients: usize, port: u16, seed: u64) {
    let me = format!("c{}r{r}", ctx.client);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while !ctx.stop.load(Ordering::Relaxed) {
        let c = if clients == 1 {
            0
        } else {
            (ctx.client + 1 + rng.random_range(0..clients - 1)) % clients
        };
        let name = if ctx.cfg.shared_pages {
            shared_name(rng.random_range(0..ctx.cfg.pages))
        } else {
            page_name(
                c,
                rng.random_range(0..ctx.cfg.writers),
                rng.random_range(0..ctx.cfg.pages),
            )
        };
        ctx.record(
            &me,
            Kind::Read,
            &page_path(&name),
            || {
                let page = request(port, "GET", &format!("/page/{name}"), "", "")?;
                if page.status != 200 {
                    return Err(http_err("view", page.status));
                }
                Ok(parse_view(&name, &page.body))
            },
            |seen| match seen.and_then(Option::as_ref) {
                None => (0, String::new(), String::new()),
                Some(Seen {
                    rev: Some(rev),
                    hash,
                }) => (*rev, hash.clone(), String::new()),
                Some(Seen { rev: None, hash }) => (
                    u64::MAX,
                    hash.clone(),
                    "a view without a page header".into(),
                ),
            },
        );
        stat_page(&ctx, &me, &name);
        std::thread::sleep(Duration::from_millis(
            rng.random_range(0..=2 * ctx.cfg.read_pause_ms),
        ));
    }
}

/// Every page the history saved, as the wiki at `port` shows it now.
pub(crate) fn final_pages(
    port: u16,
    ops: &[crate::workload::Op],
) -> std::collections::BTreeMap<String, Option<Seen>> {
    let mut out = std::collections::BTreeMap::new();
    for op in ops.iter().filter(|o| o.kind == Kind::Save) {
        let Some(name) = op.path.strip_prefix("wiki/") else {
            continue;
        };
        if out.contains_key(&op.path) {
            continue;
        }
        let seen = match request(port, "GET", &format!("/page/{name}"), "", "") {
            Ok(p) if p.status == 200 => parse_view(name, &p.body),
            Ok(p) => Some(Seen {
                rev: None,
                hash: format!("HTTP {}", p.status),
            }),
            Err(e) => Some(Seen {
                rev: None,
                hash: format!("unreachable: {e}"),
            }),
        };
        out.insert(op.path.clone(), seen);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_shows_revision_and_checksum() {
        let (text, sum) = page_text("C0W0P1", 12, 300);
        let html = format!("<h1>C0W0P1</h1><p>{}</p>", text.replace("\n\n", "</p><p>"));
        let seen = parse_view("C0W0P1", &html).unwrap();
        assert_eq!(seen.rev, Some(12));
        assert_eq!(seen.hash, sum);
        assert!(parse_view("X", "<p>This page does not exist yet.</p>").is_none());
        assert_eq!(form_encode("a b\n&"), "a+b%0A%26");
    }
}
