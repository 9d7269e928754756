//! Debian's unmodified DokuWiki, served by lighttpd and php-cgi with all its
//! writable state in a directory of the caller's choice (a local directory
//! or a failsafe mount), and a browser-like client for its forms. The
//! DokuWiki test (`fsd/daemon/tests/dokuwiki.rs`) and `failsafe-bench` use it.
//!
//! The package stays as installed. DokuWiki keeps its pages, attic, meta,
//! locks, cache and index under `/var/lib/dokuwiki/data` and its ACL under
//! `/var/lib/dokuwiki/acl`; [`install_state`] copies both into the chosen
//! directory and [`Server::start`] bind-mounts them back over those paths
//! in a mount namespace of the web server's own. The machine's
//! `/var/lib/dokuwiki` is never touched, so runs side by side do not see
//! each other's state.
//!
//! Nothing outlives a [`Server`], even when the caller is killed: lighttpd
//! runs in a PID namespace of its own (util-linux `unshare --pid --fork
//! --kill-child`) whose first process is a second `unshare --fork`, its
//! parent. That one gets SIGKILL when the outer `unshare` dies, which gets
//! SIGKILL when the thread that started it exits; when the first process of
//! a PID namespace dies, the kernel kills the rest (lighttpd, every php-cgi),
//! and the bind mounts go with the namespace's last process. (lighttpd
//! itself cannot be that first process: dropping to www-data clears a
//! process's parent-death signal.)

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use crate::httpc::{self, Reply};
use crate::local::die_with_parent;

/// What must be installed (scripts/test.sh installs Debian's `dokuwiki`,
/// `php-cgi` and `lighttpd`; `unshare` is util-linux, always there).
pub const PACKAGES: [&str; 4] = [
    "/usr/share/dokuwiki/doku.php",
    "/usr/bin/php-cgi",
    "/usr/sbin/lighttpd",
    "/usr/bin/unshare",
];

/// The package's state directories, as DokuWiki's configuration names them.
const DATA: &str = "/var/lib/dokuwiki/data";
const ACL: &str = "/var/lib/dokuwiki/acl";

/// The first of [`PACKAGES`] that is missing.
pub fn missing() -> Option<&'static str> {
    PACKAGES.iter().copied().find(|p| !Path::new(p).exists())
}

fn run(cmd: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    ensure!(
        out.status.success(),
        "{cmd} {}: {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Copies the package's fresh state (`data/` and `acl/`) into `dest`, lets
/// anyone edit (the sysadmin's choice for this wiki, in `acl/acl.auth.php`)
/// and gives it all to www-data, as the package does.
pub fn install_state(dest: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest)?;
    for (from, name) in [(DATA, "data"), (ACL, "acl")] {
        let to = dest.join(name);
        ensure!(!to.exists(), "{} exists already", to.display());
        run("cp", &["-a".as_ref(), from.as_ref(), to.as_os_str()])?;
    }
    std::fs::write(
        dest.join("acl/acl.auth.php"),
        "# acl\n*               @ALL          8\n",
    )
    .context("writing acl.auth.php")?;
    run(
        "chown",
        &[
            "-R".as_ref(),
            "www-data:www-data".as_ref(),
            dest.join("data").as_os_str(),
            dest.join("acl").as_os_str(),
        ],
    )
}

/// lighttpd with php-cgi serving DokuWiki on a loopback port, its state
/// bind-mounted from a directory [`install_state`] filled. Stopped on drop.
pub struct Server {
    pub port: u16,
    /// The state directory (holding `data/` and `acl/`).
    pub state: PathBuf,
    run: PathBuf,
    /// `unshare`, lighttpd's parent.
    child: Option<Child>,
}

/// How the web server is set up; the benchmark runs every target with the
/// same.
#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    /// php-cgi workers (PHP_FCGI_CHILDREN): requests served at once.
    pub php_children: u32,
    /// The loopback port to listen on; 0: a free one. (DokuWiki's render
    /// cache is keyed by host and port: two servers on one state share it
    /// only on the same port.)
    pub port: u16,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            php_children: 2,
            port: 0,
        }
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The lighttpd configuration: DokuWiki's directory as the document root,
/// one php-cgi master with `php_children` workers on a socket in `run`.
fn lighttpd_conf(port: u16, run: &Path, cfg: &ServerConfig) -> String {
    format!(
        r#"server.document-root = "/usr/share/dokuwiki"
server.bind = "127.0.0.1"
server.port = {port}
server.username = "www-data"
server.groupname = "www-data"
server.errorlog = "{run}/lighttpd-error.log"
server.modules = ("mod_access", "mod_fastcgi")
index-file.names = ("doku.php")
url.access-deny = ("~", ".inc")
$HTTP["url"] =~ "^/(bin|data|inc|conf)/" {{
    url.access-deny = ("")
}}
fastcgi.server = (".php" => ((
    "bin-path" => "/usr/bin/php-cgi",
    "socket" => "{run}/php.socket",
    "max-procs" => 1,
    "bin-environment" => ("PHP_FCGI_CHILDREN" => "{children}", "PHP_FCGI_MAX_REQUESTS" => "1000000"),
)))
"#,
        run = run.display(),
        children = cfg.php_children,
    )
}

/// Fails unless www-data can reach `dir` (every directory above it
/// searchable by others).
fn check_reachable(dir: &Path) -> anyhow::Result<()> {
    for a in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(a)
            .with_context(|| format!("{}", a.display()))?
            .permissions()
            .mode();
        ensure!(
            mode & 0o001 != 0,
            "{} (mode {:o}) is not searchable by others, so lighttpd and php-cgi (www-data) \
             cannot reach {}",
            a.display(),
            mode & 0o777,
            dir.display()
        );
    }
    Ok(())
}

fn cstring(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("{} has a NUL", p.display()))
}

impl Server {
    /// Starts lighttpd on a free loopback port with `state`'s `data/` and
    /// `acl/` in place of the package's; its socket and error log go to
    /// `run` (created, given to www-data). Returns once it answers.
    pub fn start(state: &Path, run: &Path, cfg: &ServerConfig) -> anyhow::Result<Server> {
        if let Some(m) = missing() {
            bail!("{m} is missing (apt-get install dokuwiki php-cgi lighttpd)");
        }
        for d in ["data", "acl"] {
            ensure!(
                state.join(d).is_dir(),
                "{} is missing (install_state fills it)",
                state.join(d).display()
            );
        }
        std::fs::create_dir_all(run)?;
        run_chown(run)?;
        check_reachable(run)?;
        let port = match cfg.port {
            0 => free_port()?,
            p => p,
        };
        let conf = run.join("lighttpd.conf");
        std::fs::write(&conf, lighttpd_conf(port, run, cfg))?;
        let binds = [
            (cstring(&state.join("data"))?, cstring(Path::new(DATA))?),
            (cstring(&state.join("acl"))?, cstring(Path::new(ACL))?),
        ];
        let mut cmd = Command::new("/usr/bin/unshare");
        cmd.args(["--pid", "--fork", "--kill-child", "--"])
            .args(["/usr/bin/unshare", "--fork", "--", "/usr/sbin/lighttpd"])
            .args(["-D", "-f"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(run.join("lighttpd.out"))?);
        die_with_parent(&mut cmd);
        private_binds(&mut cmd, binds);
        let child = cmd.spawn().context("starting unshare … lighttpd")?;
        let mut s = Server {
            port,
            state: state.to_path_buf(),
            run: run.to_path_buf(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(Ok(Some(st))) = s.child.as_mut().map(Child::try_wait) {
                bail!("lighttpd exited with {st}: {}", s.logs());
            }
            ensure!(
                Instant::now() < deadline,
                "lighttpd did not listen on port {port} within 30 s: {}",
                s.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }

    /// The outer `unshare` process, above lighttpd (and so php-cgi).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// lighttpd's error log (PHP's warnings and errors land there too) and
    /// what it printed.
    pub fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.run.join(n)).unwrap_or_default();
        format!("{}{}", read("lighttpd.out"), read("lighttpd-error.log"))
    }

    /// The lines of lighttpd's error log that say something went wrong
    /// (php-cgi's warnings and errors, a backend that died); the start and
    /// stop notices are not.
    pub fn error_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.run.join("lighttpd-error.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains("server started") && !l.contains("server stopped"))
            .filter(|l| !l.contains("graceful shutdown") && !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Lines of DokuWiki's own error log (`data/log/error/*.log`).
    pub fn dokuwiki_errors(&self) -> Vec<String> {
        let dir = self.state.join("data/log/error");
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            out.extend(
                text.lines()
                    .filter(|l| !l.starts_with(' ') && !l.trim().is_empty())
                    .map(str::to_string),
            );
        }
        out
    }

    /// Stops lighttpd (SIGTERM; it stops php-cgi) and waits until every
    /// process of its namespace is gone, so the state directory is free;
    /// SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // `unshare --fork` ignores SIGTERM while it waits: lighttpd is told.
        let lighttpd = descendants(child.id()).into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "lighttpd")
        });
        if let Some(p) = lighttpd {
            // SAFETY: kill(2) on a process below our unreaped child, found
            // just now; its parent (the namespace's first process) reaps it
            // only once it has exited.
            unsafe { libc::kill(p as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                // --kill-child: lighttpd gets SIGKILL, then the namespace's rest.
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `pid` and every process below it, parents first.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten();
        for t in tasks.flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    out
}

fn run_chown(dir: &Path) -> anyhow::Result<()> {
    run("chown", &["www-data:www-data".as_ref(), dir.as_os_str()])?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Makes `cmd` run in a mount namespace of its own, private (nothing
/// propagates back), with each `(source, target)` bind-mounted.
fn private_binds(cmd: &mut Command, binds: [(CString, CString); 2]) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure calls only unshare(2) and
    // mount(2), which are async-signal-safe, on strings made before the fork;
    // it allocates nothing (`last_os_error` does not).
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let none = std::ptr::null();
            if libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            for (src, dst) in &binds {
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A browser: one cookie jar (DokuWiki's session), one request per
/// connection.
pub struct Browser {
    pub port: u16,
    jar: Vec<String>,
}

/// `/doku.php?id=ID`: a page view.
pub fn view_path(id: &str) -> String {
    format!("/doku.php?id={id}")
}

/// `/doku.php?id=ID&do=edit`: the edit form.
pub fn edit_path(id: &str) -> String {
    format!("/doku.php?id={id}&do=edit")
}

impl Browser {
    pub fn new(port: u16) -> Browser {
        Browser {
            port,
            jar: Vec::new(),
        }
    }

    /// One request with the jar's cookies; the reply's cookies go into the jar.
    pub fn request(&mut self, method: &str, path: &str, body: &str) -> std::io::Result<Reply> {
        let r = httpc::request(self.port, method, path, body, &self.jar.join("; "))?;
        for line in r.headers.lines() {
            if let Some(v) = line.strip_prefix("set-cookie: ") {
                let kv = v.split(';').next().unwrap_or("").to_string();
                let name = kv.split('=').next().unwrap_or("").to_string();
                self.jar.retain(|c| !c.starts_with(&format!("{name}=")));
                if !kv.ends_with("=deleted") {
                    self.jar.push(kv);
                }
            }
        }
        Ok(r)
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<Reply> {
        self.request("GET", path, "")
    }

    /// Saves `text` as page `id` the way a browser does: the edit form, then
    /// the form posted back with its `sectok` and hidden fields. Returns the
    /// save's reply (a redirect to the page when it worked).
    pub fn edit(&mut self, id: &str, text: &str, summary: &str) -> anyhow::Result<Reply> {
        let form = self.get(&edit_path(id)).context("edit form")?;
        ensure!(
            form.status == 200,
            "edit form: HTTP {}: {}",
            form.status,
            &form.body[..form.body.len().min(500)]
        );
        let body =
            save_body(&form.body, id, text, summary).context("no sectok in the edit form")?;
        let saved = self.request("POST", "/doku.php", &body).context("save")?;
        ensure!(
            matches!(saved.status, 200 | 302 | 303),
            "save: HTTP {}",
            saved.status
        );
        Ok(saved)
    }
}

/// The `value` of the input named `name` in `html` (attributes in any
/// order), HTML entities left as they are.
pub fn input<'a>(html: &'a str, name: &str) -> Option<&'a str> {
    let at = html.find(&format!("name=\"{name}\""))?;
    let tag_start = html[..at].rfind('<')?;
    let tag = &html[tag_start..tag_start + html[tag_start..].find('>')?];
    let v = tag.find("value=\"")? + 7;
    tag[v..].split('"').next()
}

/// `s` as a form field (application/x-www-form-urlencoded).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn html_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#039;", "'")
        .replace("&amp;", "&")
}

/// The body of the POST that saves `text` from the edit form `form_html`:
/// its `sectok` and hidden fields (the page's date, `changecheck`…) as the
/// form has them. None when the form has no `sectok` (no edit form).
pub fn save_body(form_html: &str, id: &str, text: &str, summary: &str) -> Option<String> {
    let sectok = input(form_html, "sectok")?;
    let mut fields = vec![
        ("sectok".to_string(), sectok.to_string()),
        ("id".to_string(), id.to_string()),
        ("do[save]".to_string(), "1".to_string()),
        ("wikitext".to_string(), text.to_string()),
        ("summary".to_string(), summary.to_string()),
    ];
    for name in ["changecheck", "date", "prefix", "suffix", "target", "rev"] {
        if let Some(v) = input(form_html, name) {
            fields.push((name.to_string(), html_unescape(v)));
        }
    }
    Some(
        fields
            .iter()
            .map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v)))
            .collect::<Vec<_>>()
            .join("&"),
    )
}

/// The path (and query) a redirect points to: DokuWiki sends an absolute
/// URL built from the Host header.
pub fn location_path(reply: &Reply) -> Option<String> {
    let loc = reply
        .headers
        .lines()
        .find_map(|l| l.strip_prefix("location: "))?
        .trim();
    let path = match loc.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/').unwrap_or(rest.len())..],
        None => loc,
    };
    Some(if path.is_empty() { "/" } else { path }.to_string())
}

/// DokuWiki's error messages in a page: it shows each `msg(…, -1)` as
/// `<div class="error">…</div>` (info, success and notify boxes are not
/// errors).
pub fn error_messages(html: &str) -> Vec<String> {
    let open = "<div class=\"error\">";
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find(open) {
        rest = &rest[at + open.len()..];
        let end = rest.find("</div>").unwrap_or(rest.len());
        out.push(rest[..end].chars().take(300).collect());
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edit_form_becomes_a_save() {
        let form = r#"<form id="dw__editform" method="post" action="/doku.php">
<input type="hidden" name="sectok" value="abc123" />
<input type="hidden" name="id" value="bench:p01" />
<input name="date" type="hidden" value="1700000000" />
<input type="hidden" name="changecheck" value="d41d8cd98f00b204e9800998ecf8427e" />
<input type="hidden" name="prefix" value="" /><input type="hidden" name="suffix" value="" />
<input type="hidden" name="target" value="section" />
<textarea name="wikitext"></textarea></form>"#;
        let body = save_body(form, "bench:p01", "a & b\n", "s 1").unwrap();
        assert!(body.starts_with("sectok=abc123&id=bench%3Ap01&do%5Bsave%5D=1"));
        assert!(body.contains("&wikitext=a%20%26%20b%0A&summary=s%201"));
        assert!(body.contains("&date=1700000000&"));
        assert!(body.contains("&target=section"));
        assert!(save_body("<p>no form</p>", "x", "", "").is_none());
    }

    #[test]
    fn redirects_and_errors_are_read_from_the_reply() {
        let r = Reply {
            status: 302,
            headers: "http/1.1 302 found\r\nlocation: http://localhost:8080/doku.php?id=bench:p01"
                .into(),
            body: String::new(),
        };
        assert_eq!(location_path(&r).as_deref(), Some("/doku.php?id=bench:p01"));
        let html = r#"<div class="info">fine</div><div class="error">Permission Denied</div>
<div class="error">There was an error saving</div>"#;
        assert_eq!(
            error_messages(html),
            vec!["Permission Denied", "There was an error saving"]
        );
        assert!(error_messages("<div class=\"success\">saved</div>").is_empty());
    }
}
