//! Cities on one machine: a TCP relay that delays every byte of a link by
//! that link's one-way time, in both directions, keeping the order.
//!
//! The kernel here has no `tc netem`, so latency lives in userspace. A relay
//! sits in front of one host (`latency-relay`, started inside the host's
//! network namespace): it listens on the address the host advertises and
//! forwards to the `fsd` behind it on another port. Every connection to a
//! host goes through that host's relay, so every link is covered once: the
//! relay looks up the one-way delay by the *source address* of the accepted
//! connection (which host or client namespace it came from, hence which
//! city), and holds each chunk it reads until `read time + delay` before it
//! writes it on. A round trip through a link therefore costs at least twice
//! its one-way time, as on a WAN; bandwidth is not limited.
//!
//! Both sockets run with `TCP_NODELAY` (gRPC is latency-sensitive). Delays
//! are kept per chunk read, not per byte; at most [`QUEUE_CHUNKS`] chunks of
//! up to [`CHUNK`] bytes wait in each direction, after which the relay stops
//! reading and TCP's own flow control pushes back on the sender.
//!
//! What it does not model: the TCP handshake itself is not delayed (the
//! relay's kernel accepts at once), so a new connection costs one round trip
//! less than on a real WAN; and a host that is down still accepts the
//! connection, which the relay then resets, instead of refusing it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Largest chunk read (and delayed) at once.
pub const CHUNK: usize = 256 * 1024;
/// Chunks in flight per direction of a connection before reading pauses.
pub const QUEUE_CHUNKS: usize = 256;

/// One-way delays by source address, and the delay of any other source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links {
    pub default: Duration,
    pub by_ip: HashMap<IpAddr, Duration>,
}

impl Links {
    /// Every source gets `one_way`.
    pub fn uniform(one_way: Duration) -> Links {
        Links {
            default: one_way,
            by_ip: HashMap::new(),
        }
    }

    /// The one-way delay of a connection from `ip`.
    pub fn delay(&self, ip: IpAddr) -> Duration {
        // An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.by_ip.get(&ip).copied().unwrap_or(self.default)
    }

    /// Parses the links file: one `SOURCE-IP ONE-WAY-MS` per line, and
    /// optionally `default ONE-WAY-MS` for every other source (else 0);
    /// `#` starts a comment. Milliseconds may have a fraction.
    pub fn parse(text: &str) -> anyhow::Result<Links> {
        let mut links = Links::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(who), Some(ms), None) = (words.next(), words.next(), words.next()) else {
                bail!("line {}: want `IP MS` or `default MS`: {line:?}", n + 1);
            };
            let ms: f64 = ms
                .parse()
                .ok()
                .filter(|m: &f64| m.is_finite() && *m >= 0.0)
                .with_context(|| format!("line {}: {ms:?} is not a delay in ms", n + 1))?;
            let d = Duration::from_secs_f64(ms / 1000.0);
            if who == "default" {
                links.default = d;
            } else {
                let ip: IpAddr = who
                    .parse()
                    .with_context(|| format!("line {}: {who:?} is not an IP address", n + 1))?;
                links.by_ip.insert(ip, d);
            }
        }
        Ok(links)
    }

    /// The links file's text (what [`Links::parse`] reads), sorted.
    pub fn render(&self) -> String {
        let mut lines: Vec<(IpAddr, Duration)> =
            self.by_ip.iter().map(|(ip, d)| (*ip, *d)).collect();
        lines.sort();
        let mut s = format!("default {}\n", ms(self.default));
        for (ip, d) in lines {
            s.push_str(&format!("{ip} {}\n", ms(d)));
        }
        s
    }

    /// Writes the links file atomically (a relay may be reading it).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

fn ms(d: Duration) -> String {
    format!("{}", d.as_secs_f64() * 1000.0)
}

/// Where a relay gets its links: fixed, or a file re-read whenever it
/// changes (so a host that moves to a new address, or a new host, gets its
/// delay without restarting the relays; checked on each new connection).
#[derive(Clone)]
pub enum LinkSource {
    Fixed(Arc<Links>),
    File(Arc<LinkFile>),
}

pub struct LinkFile {
    path: PathBuf,
    cached: Mutex<(Option<(SystemTime, u64)>, Links)>,
}

impl LinkSource {
    pub fn file(path: &Path) -> anyhow::Result<LinkSource> {
        let f = LinkFile {
            path: path.to_path_buf(),
            cached: Mutex::new((None, Links::default())),
        };
        f.current()?;
        Ok(LinkSource::File(Arc::new(f)))
    }

    /// The delay for a connection from `ip` now.
    pub fn delay(&self, ip: IpAddr) -> Duration {
        match self {
            LinkSource::Fixed(l) => l.delay(ip),
            LinkSource::File(f) => match f.current() {
                Ok(l) => l.delay(ip),
                Err(e) => {
                    eprintln!("latency-relay: {e:#}; keeping the last good links");
                    f.cached
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .1
                        .delay(ip)
                }
            },
        }
    }
}

impl LinkFile {
    fn current(&self) -> anyhow::Result<Links> {
        let md = std::fs::metadata(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let stamp = (md.modified()?, md.len());
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if c.0 != Some(stamp) {
            let text = std::fs::read_to_string(&self.path)
                .with_context(|| format!("reading {}", self.path.display()))?;
            c.1 = Links::parse(&text).with_context(|| format!("in {}", self.path.display()))?;
            c.0 = Some(stamp);
        }
        Ok(c.1.clone())
    }
}

/// A running relay: accepts on `local_addr`, forwards to its upstream.
/// Dropping it stops it too (without waiting).
pub struct Relay {
    local: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying connections accepted on `listener` to `upstream`,
    /// each delayed by `links` by its source address.
    pub fn start(
        listener: TcpListener,
        upstream: SocketAddr,
        links: LinkSource,
    ) -> std::io::Result<Relay> {
        let local = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    accepted = listener.accept() => match accepted {
                        Ok((down, peer)) => {
                            let delay = links.delay(peer.ip());
                            conns.spawn(relay_one(down, upstream, delay));
                        }
                        Err(e) => {
                            // EMFILE and the like: back off, keep serving.
                            eprintln!("latency-relay: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
            drop(listener);
            conns.shutdown().await;
        });
        Ok(Relay {
            local,
            stop,
            task: Some(task),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting, drops every connection, and waits until all is gone.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// One connection: dial upstream, then pump both directions until both
/// have ended (EOF passed on as a half-close) or either fails.
async fn relay_one(down: TcpStream, upstream: SocketAddr, delay: Duration) {
    let _ = down.set_nodelay(true);
    let up = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(_) => {
            // Nobody behind us: reset, as close to "refused" as we can get.
            let _ = down.set_zero_linger();
            return;
        }
    };
    let _ = up.set_nodelay(true);
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    let _ = tokio::try_join!(pump(dr, uw, delay), pump(ur, dw, delay));
}

/// Copies `r` to `w`, each chunk written no sooner than `delay` after it was read.
async fn pump<R, W>(mut r: R, mut w: W, delay: Duration) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    if delay.is_zero() {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return w.shutdown().await;
            }
            w.write_all(&buf[..n]).await?;
        }
    }
    // None is the end of the stream.
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(QUEUE_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r.read(&mut buf).await?;
            let due = Instant::now() + delay;
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            if tx.send((due, chunk)).await.is_err() || n == 0 {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match chunk {
                Some(c) => w.write_all(&c).await?,
                None => return w.shutdown().await,
            }
        }
        Ok(())
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// The `latency-relay` command (found next to the running binary) that
/// listens on `listen`, forwards to `to` and takes its delays from `links`
/// (a file it re-reads when it changes).
pub fn command(listen: &str, to: &str, links: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new(crate::local::sibling_binary("latency-relay")?);
    cmd.args(["--listen", listen, "--to", to, "--links"])
        .arg(links);
    Ok(cmd)
}

/// Starts `latency-relay` (see [`command`]) in the network namespace `ns`
/// (`/run/netns/NAME`), killed when the calling thread exits, logging to
/// `log`; returns once a connection to `probe` (an address of the relay as
/// the caller reaches it) is accepted. Stop it with `local::terminate`.
pub fn spawn_in_netns(
    ns: &Path,
    listen: &str,
    to: &str,
    links: &Path,
    log: &Path,
    probe: &str,
) -> anyhow::Result<std::process::Child> {
    let log = std::fs::File::create(log)?;
    let mut cmd = command(listen, to, links)?;
    crate::local::in_netns(&mut cmd, ns)?;
    crate::local::die_with_parent(&mut cmd);
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting latency-relay")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(probe).is_err() {
        if std::time::Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            crate::local::terminate(&mut child);
            bail!(
                "latency-relay in {} did not listen at {probe}",
                ns.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;

    /// An upstream that echoes everything back, then half-closes.
    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    async fn relay_to(upstream: SocketAddr, one_way_ms: u64) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Relay::start(
            l,
            upstream,
            LinkSource::Fixed(Arc::new(Links::uniform(Duration::from_millis(one_way_ms)))),
        )
        .unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
            .collect()
    }

    #[test]
    fn links_parse_render_and_look_up() {
        let l =
            Links::parse("# city b\ndefault 2\n10.199.1.2 10\n10.199.2.1  0.5 # c0\n\n").unwrap();
        assert_eq!(l.default, Duration::from_millis(2));
        assert_eq!(
            l.delay("10.199.1.2".parse().unwrap()),
            Duration::from_millis(10)
        );
        assert_eq!(
            l.delay("::ffff:10.199.1.2".parse().unwrap()),
            Duration::from_millis(10)
        );
        assert_eq!(
            l.delay("10.199.2.1".parse().unwrap()),
            Duration::from_micros(500)
        );
        assert_eq!(
            l.delay("10.199.9.9".parse().unwrap()),
            Duration::from_millis(2)
        );
        assert_eq!(Links::parse(&l.render()).unwrap(), l);
        assert!(Links::parse("10.1.1.1").is_err());
        assert!(Links::parse("nothost 5").is_err());
        assert!(Links::parse("10.1.1.1 -5").is_err());
    }

    #[tokio::test]
    async fn a_link_file_is_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("links");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        Links::uniform(Duration::from_millis(3))
            .write(&path)
            .unwrap();
        let src = LinkSource::file(&path).unwrap();
        assert_eq!(src.delay(ip), Duration::from_millis(3));
        let mut l = Links::default();
        l.by_ip.insert(ip, Duration::from_millis(40));
        l.write(&path).unwrap();
        assert_eq!(src.delay(ip), Duration::from_millis(40));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_arrive_intact_in_order_and_late_both_ways() {
        let up = echo_server().await;
        let relay = relay_to(up, 30).await;
        let mut s = TcpStream::connect(relay.local_addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        // A small message: one round trip is at least two one-way times.
        let t = StdInstant::now();
        s.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        let rtt = t.elapsed();
        assert_eq!(&got, b"ping");
        assert!(rtt >= Duration::from_millis(60), "round trip {rtt:?}");
        assert!(rtt < Duration::from_millis(500), "round trip {rtt:?}");
        // 8 MiB in many writes while reading back concurrently: intact, in order.
        let data = pattern(8 << 20, 7);
        let (mut r, mut w) = s.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(10_007) {
                w.write_all(piece).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "bytes changed or reordered");
        relay.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_source_gets_its_own_delay() {
        let up = echo_server().await;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut links = Links::uniform(Duration::ZERO);
        links
            .by_ip
            .insert("127.0.0.1".parse().unwrap(), Duration::from_millis(25));
        let relay = Relay::start(l, up, LinkSource::Fixed(Arc::new(links))).unwrap();
        let mut s = TcpStream::connect(relay.local_addr()).await.unwrap();
        let t = StdInstant::now();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );
        // Another source address on loopback gets the default (0).
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        if sock.bind("127.0.0.2:0".parse().unwrap()).is_ok() {
            let mut s2 = sock.connect(relay.local_addr()).await.unwrap();
            let t = StdInstant::now();
            s2.write_all(b"y").await.unwrap();
            s2.read_exact(&mut b).await.unwrap();
            assert!(t.elapsed() < Duration::from_millis(40), "{:?}", t.elapsed());
        }
        relay.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_connections_at_once_each_get_their_own_bytes() {
        let up = echo_server().await;
        let relay = relay_to(up, 10).await;
        let addr = relay.local_addr();
        let t = StdInstant::now();
        let mut tasks = Vec::new();
        for i in 0..64u8 {
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let data = pattern(100_000 + i as usize * 1000, i);
                let (mut r, mut w) = s.split();
                let send = async {
                    w.write_all(&data).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let mut back = Vec::new();
                let recv = r.read_to_end(&mut back);
                let (_, n) = tokio::join!(send, recv);
                n.unwrap();
                assert!(back == data, "connection {i} got other bytes");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(t.elapsed() >= Duration::from_millis(20));
        relay.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_closes_the_port_and_every_connection() {
        let up = echo_server().await;
        let relay = relay_to(up, 5).await;
        let addr = relay.local_addr();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"a").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), relay.shutdown())
            .await
            .expect("shutdown in time");
        // The open connection ends (EOF or reset), and nobody listens any more.
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("connection closed");
        assert!(r.is_err() || rest.is_empty());
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn nobody_upstream_resets_the_connection() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let relay = relay_to(dead, 5).await;
        let mut s = TcpStream::connect(relay.local_addr()).await.unwrap();
        let mut b = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut b))
            .await
            .expect("the relay gives up at once");
        assert!(r.is_err() || b.is_empty());
        relay.shutdown().await;
    }
}
