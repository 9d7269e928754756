//! The status page: the cluster at a glance, in HTML, at `/` of each fsd's
//! HTTP addresses (the plain `metrics_listen` one is for browsers), as
//! MooseFS's monitor is. It reloads itself every few seconds. Only the
//! leader judges which hosts are up and whether the cluster is fail-safe, so
//! a follower shows the cluster as its leader sees it, and says so; with no
//! leader reachable, its own view, which is limp.

use std::fmt::Write;
use std::time::Duration;

use failsafe_proto::pb;

use crate::admin::AdminService;
use crate::status_text::{bytes, device_state, duration, host_state, kept_line, mode_line, work};

/// How often the page reloads itself.
const REFRESH_S: u64 = 3;
/// How long a follower waits for its leader's view before showing its own.
const LEADER_WAIT: Duration = Duration::from_secs(2);

pub(crate) struct StatusPage {
    pub admin: AdminService,
}

impl StatusPage {
    pub(crate) async fn page(&self) -> (axum::http::StatusCode, axum::response::Html<String>) {
        match self.admin.full_status().await {
            Ok(own) => {
                let (shown, via) = self.leaders_view(own).await;
                let code = match shown.mode() {
                    pb::ClusterMode::FailSafe => axum::http::StatusCode::OK,
                    // Still a page to show; a monitor fetching it learns
                    // the cluster is not fail-safe from the code too.
                    _ => axum::http::StatusCode::SERVICE_UNAVAILABLE,
                };
                (code, axum::response::Html(render(&shown, via.as_deref())))
            }
            Err(e) => (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                axum::response::Html(page(
                    "failsafe: status unknown",
                    &format!(
                        "<p class=\"limp banner\">This host cannot tell the cluster's status: {}</p>",
                        esc(e.message())
                    ),
                )),
            ),
        }
    }

    /// The leader's status when this member is not the leader and the
    /// leader answers in time, with this host's own address as the one
    /// that served it; else `own`.
    async fn leaders_view(&self, own: pb::StatusReply) -> (pb::StatusReply, Option<String>) {
        if own.leader_id == 0 || own.leader_id == own.host_id || own.leader_addr.is_empty() {
            return (own, None);
        }
        let Ok(client) = self.admin.cluster.client().await else {
            return (own, None);
        };
        match tokio::time::timeout(LEADER_WAIT, client.status_of(&own.leader_addr)).await {
            Ok(Ok(l)) if l.leader_id == l.host_id => (l, Some(self.admin.advertise.clone())),
            _ => (own, None),
        }
    }
}

/// HTML-escapes text for an element or a quoted attribute.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    // Writing to a String cannot fail.
    let _ = pulldown_cmark_escape::escape_html(&mut out, s);
    out
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\"><title>{t}</title><style>\
body{{font-family:sans-serif;margin:1em 2em;color:#222}} h1{{font-size:1.3em}} h2{{font-size:1.05em;margin-top:1.5em}}\
table{{border-collapse:collapse}} td,th{{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}}\
th{{background:#f4f4f4}} td.n{{text-align:right}} .mono{{font-family:monospace}}\
.banner{{font-size:1.2em;font-weight:bold;padding:.6em 1em;border-radius:4px}}\
.failsafe{{background:#dff3df;color:#174d17}} .limp{{background:#ffe3b3;color:#6b3d00}} .unknown{{background:#eee}}\
.up{{color:#174d17}} .down{{color:#b00;font-weight:bold}} .warn{{background:#fff3cd;padding:.4em .8em;margin:.3em 0}}\
.bar{{display:inline-block;width:8em;height:.7em;background:#eee;vertical-align:middle}} .bar i{{display:block;height:100%;background:#69c}}\
small{{color:#666}}</style></head><body>{body}</body></html>\n",
        t = esc(title)
    )
}

/// The page for status `s`; `via`: the follower that served the leader's view.
fn render(s: &pb::StatusReply, via: Option<&str>) -> String {
    let mut b = String::new();
    let class = match s.mode() {
        pb::ClusterMode::FailSafe => "failsafe",
        pb::ClusterMode::Limp => "limp",
        pb::ClusterMode::Unknown => "unknown",
    };
    let short = s.cluster_id.get(..8).unwrap_or(&s.cluster_id);
    let _ = write!(
        b,
        "<h1>failsafe cluster <span class=\"mono\">{}</span></h1>",
        esc(short)
    );
    let _ = write!(
        b,
        "<p id=\"mode\" class=\"{class} banner\">{}</p>",
        esc(&mode_line(s))
    );
    for w in &s.warnings {
        let _ = write!(b, "<p class=\"warn\">&#9888; {}</p>", esc(w));
    }
    let leader = match s.hosts.iter().find(|h| h.host_id == s.leader_id) {
        Some(h) if s.leader_id != 0 => {
            format!("zone {} ({})", esc(&h.zone), esc(&h.addr))
        }
        _ if s.leader_id != 0 => esc(&s.leader_addr),
        _ => "none".into(),
    };
    let _ = write!(
        b,
        "<p>Tracker leader: {leader}, term {} &middot; log {} &middot; {} files &middot; {} blocks, {} copies each &middot; {}",
        s.term, s.last_log_index, s.files, s.blocks, s.copies, esc(&kept_line(s))
    );
    if s.under_replicated > 0 || s.unavailable > 0 {
        let _ = write!(
            b,
            " &middot; <b>{} below {} copies, {} unavailable</b>",
            s.under_replicated, s.copies, s.unavailable
        );
    }
    b.push_str("</p>");

    b.push_str("<h2>Hosts</h2><table id=\"hosts\"><tr><th>zone</th><th>host</th><th>address</th><th>role</th><th>state</th><th>log</th></tr>");
    for h in &s.hosts {
        let state = host_state(h);
        let cls = if h.state() == pb::HostLiveness::Down {
            "down"
        } else {
            "up"
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td class=\"mono\">{:016x}</td><td class=\"mono\">{}</td><td>{}{}</td><td class=\"{cls}\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&h.zone),
            h.host_id,
            esc(&h.addr),
            esc(&h.role),
            if h.voter { "" } else { " (not voting)" },
            esc(&state),
            h.matched_index
        );
    }
    b.push_str("</table>");

    b.push_str("<h2>Devices</h2><table id=\"devices\"><tr><th>zone</th><th>host</th><th>path</th><th>state</th><th>used</th><th></th><th>free</th><th>blocks</th></tr>");
    for d in &s.devices {
        let zone = s
            .hosts
            .iter()
            .find(|h| h.host_id == d.host_id)
            .map_or("?", |h| h.zone.as_str());
        let pct = (d.used_bytes * 100)
            .checked_div(d.capacity_bytes)
            .unwrap_or(0)
            .min(100);
        let _ = write!(
            b,
            "<tr><td>{}</td><td class=\"mono\">{:016x}</td><td class=\"mono\">{}</td><td>{}</td><td class=\"n\">{}</td>\
<td><span class=\"bar\" title=\"{pct}%\"><i style=\"width:{pct}%\"></i></span></td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(zone),
            d.host_id,
            esc(&d.path),
            esc(&device_state(d)),
            bytes(d.used_bytes),
            bytes(d.free_bytes),
            d.blocks
        );
    }
    b.push_str("</table>");

    b.push_str("<h2>Work</h2><table id=\"work\">");
    for (worker, state, did) in work(s) {
        let _ = write!(
            b,
            "<tr><th>{worker}</th><td>{}</td><td>{}</td></tr>",
            esc(&state),
            esc(&did)
        );
    }
    if let Some(p) = &s.leader_placement {
        let _ = write!(
            b,
            "<tr><th>leader placement</th><td>{}</td><td>window {}</td></tr>",
            esc(&p.state),
            duration(p.window_ms)
        );
    }
    b.push_str("</table>");

    let _ = write!(b, "<h2>Web hosts connected ({})</h2>", s.clients.len());
    if !s.clients.is_empty() {
        b.push_str("<table id=\"clients\"><tr><th>mount</th><th>clock</th></tr>");
        for c in &s.clients {
            let clock = if !c.clock_known {
                "?".to_string()
            } else if c.clock_offset_ms.abs() < 1000 {
                "in step".to_string()
            } else {
                format!(
                    "{:.1} s {}",
                    c.clock_offset_ms.abs() as f64 / 1000.0,
                    if c.clock_offset_ms > 0 {
                        "ahead"
                    } else {
                        "behind"
                    }
                )
            };
            let _ = write!(
                b,
                "<tr><td class=\"mono\">{}</td><td>{}</td></tr>",
                esc(&c.name),
                esc(&clock)
            );
        }
        b.push_str("</table>");
    }
    let served = match via {
        Some(me) => format!("served by {} (a follower) with the leader's view", esc(me)),
        None => format!("served by host {:016x} ({})", s.host_id, esc(&s.role)),
    };
    let _ = write!(
        b,
        "<p><small>Cluster {} &middot; {served} &middot; reloads every {REFRESH_S} s &middot; \
<a href=\"/metrics\">metrics</a> &middot; <a href=\"/readyz\">readyz</a></small></p>",
        esc(&s.cluster_id)
    );
    let title = match s.mode() {
        pb::ClusterMode::FailSafe => "failsafe: fail-safe",
        pb::ClusterMode::Limp => "failsafe: LIMP",
        pb::ClusterMode::Unknown => "failsafe: status",
    };
    page(title, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_down_host_and_limp_mode_show_and_names_are_escaped() {
        let mut s = pb::StatusReply {
            cluster_id: "c1a2b3c4d5".into(),
            host_id: 1,
            leader_id: 1,
            leader_addr: "10.0.0.1:7000".into(),
            copies: 3,
            under_replicated: 4,
            hosts: vec![
                pb::HostStatus {
                    host_id: 1,
                    zone: "a".into(),
                    addr: "10.0.0.1:7000".into(),
                    role: "leader".into(),
                    voter: true,
                    ..Default::default()
                },
                pb::HostStatus {
                    host_id: 2,
                    zone: "<b>".into(),
                    addr: "10.0.0.2:7000".into(),
                    role: "follower".into(),
                    down_ms: 12_000,
                    ..Default::default()
                },
            ],
            warnings: vec!["clock <off>".into()],
            ..Default::default()
        };
        s.set_mode(pb::ClusterMode::Limp);
        s.hosts[0].set_state(pb::HostLiveness::Up);
        s.hosts[1].set_state(pb::HostLiveness::Down);
        let html = render(&s, None);
        assert!(html.contains("class=\"limp banner\">LIMP: 4 blocks below 3 copies"));
        assert!(html.contains("<td class=\"down\">DOWN 12s</td>"));
        assert!(html.contains("&lt;b&gt;") && !html.contains("<td><b></td>"));
        assert!(html.contains("clock &lt;off&gt;"));
        assert!(html.contains("http-equiv=\"refresh\""));
    }
}
