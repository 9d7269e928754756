//! Page text to HTML: CommonMark (pulldown-cmark) with `[[WikiLinks]]`.
//! Raw HTML in a page is shown as text, never passed through, and link
//! targets other than http(s), mailto and relative ones are dropped, so a
//! page cannot carry script.

use pulldown_cmark::{html, CowStr, Event, LinkType, Options, Parser, Tag, TagEnd};

use crate::store::valid_name;

/// HTML-escapes text for an element or a quoted attribute.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    // Writing to a String cannot fail.
    let _ = pulldown_cmark_escape::escape_html(&mut out, s);
    out
}

/// Percent-encodes a path segment or query value.
pub(crate) fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const WIKI_SCHEME: &str = "wiki:";

/// `[[Name]]` and `[[Name|label]]` become ordinary Markdown links with a
/// private scheme, turned into page links while rendering.
fn expand_wikilinks(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("[[") {
        let Some(len) = rest[start + 2..].find("]]") else {
            break;
        };
        let inner = &rest[start + 2..start + 2 + len];
        out.push_str(&rest[..start]);
        let (target, label) = inner.split_once('|').unwrap_or((inner, inner));
        let target = target.trim().replace(' ', "_");
        if valid_name(&target) && !inner.contains('\n') {
            let label = label.trim().replace(['[', ']'], "");
            out.push_str(&format!("[{label}](<{WIKI_SCHEME}{target}>)"));
        } else {
            out.push_str(&rest[start..start + 4 + len]);
        }
        rest = &rest[start + 4 + len..];
    }
    out.push_str(rest);
    out
}

fn safe_url(url: &str) -> bool {
    let lower = url.trim().to_ascii_lowercase();
    match lower.split_once(':') {
        Some((scheme, _))
            if !scheme.contains('/') && !scheme.contains('?') && !scheme.contains('#') =>
        {
            matches!(scheme, "http" | "https" | "mailto")
        }
        _ => true,
    }
}

/// Renders page text; `exists` tells whether a linked page has been written.
pub(crate) fn render(text: &str, exists: impl Fn(&str) -> bool) -> String {
    let source = expand_wikilinks(text);
    let mut opts = Options::empty();
    opts.insert(Options::ENABLE_TABLES);
    opts.insert(Options::ENABLE_STRIKETHROUGH);
    let mut wiki_link_open = Vec::new();
    let events = Parser::new_ext(&source, opts).map(|ev| match ev {
        // Raw HTML is shown, not run.
        Event::Html(s) | Event::InlineHtml(s) => Event::Text(s),
        Event::Start(Tag::Link {
            link_type,
            dest_url,
            title,
            id,
        }) => {
            if let Some(page) = dest_url.strip_prefix(WIKI_SCHEME) {
                let class = if exists(page) {
                    "wikilink"
                } else {
                    "wikilink new"
                };
                wiki_link_open.push(true);
                Event::Html(CowStr::from(format!(
                    "<a class=\"{class}\" href=\"/page/{}\">",
                    url_encode(page)
                )))
            } else {
                wiki_link_open.push(false);
                let dest = if safe_url(&dest_url) {
                    dest_url
                } else {
                    CowStr::from("#")
                };
                Event::Start(Tag::Link {
                    link_type,
                    dest_url: dest,
                    title,
                    id,
                })
            }
        }
        Event::End(TagEnd::Link) => {
            if wiki_link_open.pop().unwrap_or(false) {
                Event::Html(CowStr::from("</a>"))
            } else {
                Event::End(TagEnd::Link)
            }
        }
        Event::Start(Tag::Image {
            link_type,
            dest_url,
            title,
            id,
        }) => {
            let dest = if safe_url(&dest_url) && !dest_url.starts_with(WIKI_SCHEME) {
                dest_url
            } else {
                CowStr::from("#")
            };
            Event::Start(Tag::Image {
                link_type: if link_type == LinkType::Email {
                    LinkType::Inline
                } else {
                    link_type
                },
                dest_url: dest,
                title,
                id,
            })
        }
        other => other,
    });
    let mut out = String::new();
    html::push_html(&mut out, events);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_is_inert() {
        let html = render(
            "<script>alert(1)</script>\n\nhi <img src=x onerror=alert(1)>",
            |_| true,
        );
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        let html = render("[x](javascript:alert(1)) [y](JaVaScRiPt:alert(1))", |_| {
            true
        });
        assert!(!html.to_lowercase().contains("javascript:"), "{html}");
    }

    #[test]
    fn wikilinks_and_missing_pages() {
        let html = render("See [[Start]] and [[New Page|the new one]].", |p| {
            p == "Start"
        });
        assert!(
            html.contains(r#"<a class="wikilink" href="/page/Start">Start</a>"#),
            "{html}"
        );
        assert!(
            html.contains(r#"<a class="wikilink new" href="/page/New_Page">the new one</a>"#),
            "{html}"
        );
        let html = render("[[../etc/passwd]]", |_| true);
        assert!(!html.contains("href=\"/page/.."), "{html}");
    }

    #[test]
    fn commonmark_renders() {
        let html = render(
            "# Title\n\n*em* and `code`\n\n| a | b |\n|---|---|\n| 1 | 2 |",
            |_| true,
        );
        assert!(
            html.contains("<h1>Title</h1>")
                && html.contains("<em>em</em>")
                && html.contains("<table>"),
            "{html}"
        );
    }
}
