//! wiki-cgi: a small file-based wiki engine.
//!
//! As a CGI program (RFC 3875) it is run by the web server once per request
//! (`GATEWAY_INTERFACE` set); its pages live in `WIKI_DATA_DIR` (default
//! `/srv/wiki/data`). `wiki-cgi serve --data DIR --listen ADDR` serves the
//! same wiki over HTTP itself, for the demo. It uses only ordinary file
//! operations, so it runs on any directory, a failsafe mount among them.

mod app;
mod render;
mod store;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use app::{status_text, App, Request, Response, MAX_BODY};

const USAGE: &str = "usage: wiki-cgi serve --data DIR [--listen 127.0.0.1:8080]
       wiki-cgi put --data DIR PAGE [--author NAME] [--summary TEXT] [--unless-edited] < TEXT
       (as a CGI program: WIKI_DATA_DIR=DIR, run by the web server)";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = if std::env::var_os("GATEWAY_INTERFACE").is_some() {
        cgi()
    } else if args.first().map(String::as_str) == Some("serve") {
        serve(&args[1..])
    } else if args.first().map(String::as_str) == Some("put") {
        put(&args[1..])
    } else {
        eprintln!("{USAGE}");
        2
    };
    std::process::exit(code);
}

fn open_app(dir: PathBuf) -> Result<App, String> {
    store::Store::open(&dir)
        .map(|store| App { store })
        .map_err(|e| format!("{}: {e}", dir.display()))
}

fn write_cgi(out: &mut impl Write, r: &Response) -> std::io::Result<()> {
    write!(out, "Status: {} {}\r\n", r.status, status_text(r.status))?;
    for (k, v) in &r.headers {
        write!(out, "{k}: {v}\r\n")?;
    }
    write!(out, "Content-Length: {}\r\n\r\n", r.body.len())?;
    out.write_all(r.body.as_bytes())?;
    out.flush()
}

fn cgi() -> i32 {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let dir = std::env::var_os("WIKI_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/srv/wiki/data"));
    let mut stdout = std::io::stdout().lock();
    let app = match open_app(dir) {
        Ok(a) => a,
        Err(e) => {
            let r = Response {
                status: 503,
                headers: vec![("Content-Type".into(), "text/plain".into())],
                body: format!("wiki storage unavailable: {e}\n"),
            };
            return i32::from(write_cgi(&mut stdout, &r).is_err());
        }
    };
    let len: usize = env("CONTENT_LENGTH").parse().unwrap_or(0);
    if len > MAX_BODY {
        let r = Response {
            status: 413,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: "request too large\n".into(),
        };
        return i32::from(write_cgi(&mut stdout, &r).is_err());
    }
    let mut body = vec![0u8; len];
    if std::io::stdin().read_exact(&mut body).is_err() {
        body.clear();
    }
    let author = match env("REMOTE_USER") {
        u if !u.is_empty() => u,
        _ => env("REMOTE_ADDR"),
    };
    let path = match env("PATH_INFO") {
        p if p.is_empty() => "/".to_string(),
        p => p,
    };
    let req = Request {
        method: env("REQUEST_METHOD"),
        path,
        query: env("QUERY_STRING"),
        cookies: env("HTTP_COOKIE"),
        body,
        author,
        base: env("SCRIPT_NAME").trim_end_matches('/').to_string(),
    };
    let r = app.handle(&req);
    i32::from(write_cgi(&mut stdout, &r).is_err())
}

/// `put`: saves standard input as the next revision of a page, as an edit
/// through the web would (page lock, history, change log). With
/// `--unless-edited` a page someone else saved since `--author` last did
/// is left as it is, and so is one that already holds the text.
fn put(args: &[String]) -> i32 {
    let (mut data, mut page) = (None, None);
    let (mut author, mut summary) = ("wiki-cgi put".to_string(), String::new());
    let mut unless_edited = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--data" => data = it.next().map(PathBuf::from),
            "--author" => author = it.next().cloned().unwrap_or_default(),
            "--summary" => summary = it.next().cloned().unwrap_or_default(),
            "--unless-edited" => unless_edited = true,
            p if !p.starts_with('-') && page.is_none() => page = Some(p.to_string()),
            _ => {
                eprintln!("{USAGE}");
                return 2;
            }
        }
    }
    let (Some(data), Some(page)) = (data, page) else {
        eprintln!("{USAGE}");
        return 2;
    };
    if !store::valid_name(&page) {
        eprintln!("wiki-cgi: {page:?} is not a page name (letters, digits, _ - .)");
        return 2;
    }
    let mut text = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut text) {
        eprintln!("wiki-cgi: reading the page text: {e}");
        return 1;
    }
    let app = match open_app(data) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wiki-cgi: {e}");
            return 1;
        }
    };
    let saved = (|| -> Result<Option<u64>, store::StoreError> {
        let history = app.store.history(&page)?;
        let base = history.last().map_or(0, |r| r.rev);
        if unless_edited {
            let others = history.last().is_some_and(|r| r.author != author);
            if others || app.store.read(&page)?.as_deref() == Some(text.as_str()) {
                return Ok(None);
            }
        }
        match app.store.save(&page, &text, base, &author, &summary)? {
            store::SaveOutcome::Saved(rev) => Ok(Some(rev)),
            // Saved by someone else meanwhile: theirs stands.
            store::SaveOutcome::Conflict { .. } if unless_edited => Ok(None),
            store::SaveOutcome::Conflict { .. } => Err(store::StoreError::Busy),
        }
    })();
    match saved {
        Ok(Some(rev)) => {
            println!("{page}: saved revision {rev}");
            0
        }
        Ok(None) => {
            println!("{page}: left as it is");
            0
        }
        Err(e) => {
            eprintln!("wiki-cgi: saving {page}: {e}");
            1
        }
    }
}

fn serve(args: &[String]) -> i32 {
    let mut data = None;
    let mut listen = "127.0.0.1:8080".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--data" => data = it.next().map(PathBuf::from),
            "--listen" => listen = it.next().cloned().unwrap_or_default(),
            _ => {
                eprintln!("{USAGE}");
                return 2;
            }
        }
    }
    let Some(data) = data else {
        eprintln!("{USAGE}");
        return 2;
    };
    let addr: SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(_) => {
            eprintln!("wiki-cgi: --listen {listen:?} is not host:port");
            return 2;
        }
    };
    let app = match open_app(data) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("wiki-cgi: {e}");
            return 1;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wiki-cgi: {e}");
            return 1;
        }
    };
    match rt.block_on(http_server(app, addr)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wiki-cgi: {e}");
            1
        }
    }
}

async fn http_server(app: Arc<App>, addr: SocketAddr) -> std::io::Result<()> {
    use http_body_util::{BodyExt, Full, Limited};
    use hyper::body::Bytes;

    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("wiki-cgi: serving http://{}", listener.local_addr()?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().path().to_string();
                        let query = req.uri().query().unwrap_or("").to_string();
                        let cookies = req
                            .headers()
                            .get_all("cookie")
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect::<Vec<_>>()
                            .join("; ");
                        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                            Ok(b) => b.to_bytes().to_vec(),
                            Err(_) => {
                                let r = hyper::Response::builder()
                                    .status(413)
                                    .body(Full::new(Bytes::from("request too large\n")));
                                return Ok::<_, std::convert::Infallible>(r.unwrap_or_default());
                            }
                        };
                        let request = Request {
                            method,
                            path,
                            query,
                            cookies,
                            body,
                            author: peer.ip().to_string(),
                            base: String::new(),
                        };
                        // Page files are read and written with blocking calls.
                        let r =
                            match tokio::task::spawn_blocking(move || app.handle(&request)).await {
                                Ok(r) => r,
                                Err(_) => Response {
                                    status: 500,
                                    headers: vec![],
                                    body: "internal error\n".into(),
                                },
                            };
                        let mut b = hyper::Response::builder().status(r.status);
                        for (k, v) in &r.headers {
                            b = b.header(k.as_str(), v.as_str());
                        }
                        Ok(b.body(Full::new(Bytes::from(r.body))).unwrap_or_default())
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
