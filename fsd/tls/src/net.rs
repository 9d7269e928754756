//! TLS on the wire: a connector for tonic channels and the stream of
//! accepted connections a server serves, each with the caller's grant.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::Uri;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::credential::Credential;
use crate::grant::Grant;
use crate::{host_name, parse_cert, MEMBER_NAME};

/// How long a caller has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a process talks to the cluster: mutual TLS with its credential, or
/// (only when asked for with `--insecure`) plaintext.
#[derive(Clone)]
pub enum Tls {
    Insecure,
    Mutual(Arc<Mutual>),
}

/// The credential in use, replaceable while connections come and go (a
/// renewed certificate): each new connection takes the current one.
pub struct Mutual(std::sync::RwLock<Arc<Current>>);

struct Current {
    cred: Credential,
    client: Arc<ClientConfig>,
    server: Option<Arc<rustls::ServerConfig>>,
}

impl Current {
    fn new(cred: Credential) -> anyhow::Result<Current> {
        let server = match cred.grant.role {
            crate::Role::Member => Some(cred.server_config()?),
            _ => None,
        };
        Ok(Current {
            client: cred.client_config()?,
            server,
            cred,
        })
    }
}

impl Mutual {
    fn current(&self) -> Arc<Current> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tls::Insecure => f.write_str("Tls::Insecure"),
            Tls::Mutual(m) => write!(f, "Tls::Mutual({})", m.current().cred.grant.who()),
        }
    }
}

/// Which member a caller means to reach.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// Any member of the cluster.
    AnyMember,
    /// This host and no other (its certificate names it).
    Host(u64),
}

impl Tls {
    /// TLS with `cred`, as it is: a program checks its own credential with
    /// `Credential::check_current` first (an expired one is refused by
    /// every member anyway).
    pub fn new(cred: Credential) -> anyhow::Result<Tls> {
        Ok(Tls::Mutual(Arc::new(Mutual(std::sync::RwLock::new(
            Arc::new(Current::new(cred)?),
        )))))
    }

    /// The credential in use (none when insecure).
    pub fn credential(&self) -> Option<Credential> {
        match self {
            Tls::Insecure => None,
            Tls::Mutual(m) => Some(m.current().cred.clone()),
        }
    }

    /// The credential's grant (none when insecure).
    pub fn grant(&self) -> Option<Grant> {
        self.credential().map(|c| c.grant)
    }

    /// Puts `cred` (a renewed certificate of the same grant) in use for
    /// every connection made from now on, here and through every channel
    /// made from this `Tls`.
    pub fn replace(&self, cred: Credential) -> anyhow::Result<()> {
        let Tls::Mutual(m) = self else {
            anyhow::bail!("running --insecure: no credential to replace");
        };
        let current = Arc::new(Current::new(cred)?);
        *m.0.write().unwrap_or_else(|e| e.into_inner()) = current;
        Ok(())
    }

    /// A channel over `endpoint` (its address, the caller's timeouts),
    /// connected when first used.
    fn channel(&self, endpoint: Endpoint, expect: Expect) -> Channel {
        match self {
            Tls::Insecure => endpoint.connect_lazy(),
            Tls::Mutual(m) => {
                let name = match expect {
                    Expect::AnyMember => MEMBER_NAME.to_string(),
                    Expect::Host(id) => host_name(id),
                };
                // Both names are valid DNS names by construction.
                let name = ServerName::try_from(name).unwrap_or_else(|_| {
                    ServerName::try_from(MEMBER_NAME).expect("a constant DNS name")
                });
                endpoint.connect_with_connector_lazy(Connector {
                    tls: m.clone(),
                    name,
                })
            }
        }
    }

    /// An endpoint for `addr` (`host:port`) and a channel over it.
    pub fn channel_to(
        &self,
        addr: &str,
        expect: Expect,
        configure: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<Channel, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
        Ok(self.channel(configure(endpoint), expect))
    }
}

/// A byte stream to a member, TLS or not.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Tls {
    /// A connection to the member at `addr` for HTTP/1 (no ALPN), such as
    /// a GET of /metrics.
    pub async fn connect_http1(&self, addr: &str, expect: Expect) -> io::Result<Box<dyn Io>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let Tls::Mutual(m) = self else {
            return Ok(Box::new(tcp));
        };
        let mut config = (*m.current().client).clone();
        config.alpn_protocols.clear();
        let name = match expect {
            Expect::AnyMember => MEMBER_NAME.to_string(),
            Expect::Host(id) => host_name(id),
        };
        let name = ServerName::try_from(name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        Ok(Box::new(tls))
    }
}

#[derive(Clone)]
struct Connector {
    tls: Arc<Mutual>,
    name: ServerName<'static>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (config, name) = (self.tls.current().client.clone(), self.name.clone());
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?
                .to_string();
            let tcp = TcpStream::connect(&authority).await?;
            // Small requests must not wait for the peer's delayed ACK.
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// What the caller's certificate grants; `None` only on a server
    /// running `--insecure`, where every caller may do everything.
    pub grant: Option<Arc<Grant>>,
    /// The hash of the caller's public key (zero when insecure).
    pub key_id: [u8; 32],
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection, handshake done.
pub struct Accepted {
    conn: Conn,
    peer: Peer,
}

impl Connected for Accepted {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().conn {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().conn {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().conn {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.conn {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().conn {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().conn {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections `listener` accepts, each after its TLS handshake (done
/// concurrently, within `HANDSHAKE_TIMEOUT`, so a slow caller holds up no
/// other). A caller refused by TLS is logged and never reaches the server.
pub fn incoming(listener: TcpListener, tls: Tls) -> ReceiverStream<io::Result<Accepted>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mutual = match &tls {
        Tls::Mutual(m) => Some(m.clone()),
        Tls::Insecure => None,
    };
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: wait, don't spin.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(mutual) = &mutual else {
                let peer = Peer {
                    addr: Some(addr),
                    grant: None,
                    key_id: [0; 32],
                };
                let conn = Conn::Plain(tcp);
                if tx.send(Ok(Accepted { conn, peer })).await.is_err() {
                    return;
                }
                continue;
            };
            // The credential in use now (it may have been renewed).
            let Some(config) = mutual.current().server.clone() else {
                tracing::error!("this credential is not a member's: it cannot serve");
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match handshake(config, tcp, addr).await {
                    Ok(a) => {
                        let _ = tx.send(Ok(a)).await;
                    }
                    Err(e) => tracing::warn!(%addr, error = %e, "refused a connection"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    addr: SocketAddr,
) -> anyhow::Result<Accepted> {
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(config).accept(tcp),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))??;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow::anyhow!("no certificate"))?;
    let parsed = parse_cert(cert)?;
    Ok(Accepted {
        conn: Conn::Tls(Box::new(tls)),
        peer: Peer {
            addr: Some(addr),
            grant: Some(Arc::new(parsed.grant)),
            key_id: parsed.key_id,
        },
    })
}

/// What the caller of a request may do: `None` when the server runs
/// `--insecure` (everything), else its certificate's grant. A request that
/// came without connection info (never from our own server) is refused.
pub fn grant_of<T>(req: &tonic::Request<T>) -> Result<Option<Arc<Grant>>, tonic::Status> {
    req.extensions()
        .get::<Peer>()
        .map(|p| p.grant.clone())
        .ok_or_else(|| tonic::Status::permission_denied("a caller without identity"))
}

/// Why a call failed at the TLS layer, in words an operator can act on; `None`
/// when it failed for another reason (a member down, a refusal of the
/// request itself).
pub fn explain_refusal(status: &tonic::Status, tls: &Tls) -> Option<String> {
    use std::error::Error;
    if let Tls::Mutual(m) = tls {
        // Members close the connection of an expired credential, which
        // the caller sees only as a cancelled call.
        let cred = &m.current().cred;
        if cred.expires() < std::time::SystemTime::now() {
            return Some(format!(
                "this credential ({}) expired on {}; issue a new one with fsctl",
                cred.grant.who(),
                cred.expires_text()
            ));
        }
    }
    let mut e: Option<&(dyn Error + 'static)> = Some(status);
    while let Some(err) = e {
        let found = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(r) = found {
            return Some(match r {
                rustls::Error::AlertReceived(alert) => format!(
                    "the member refused this credential (TLS alert {alert:?}): has it \
                     expired, been revoked, or come from another cluster's CA?"
                ),
                rustls::Error::InvalidCertificate(why) => format!(
                    "the member's certificate does not check out against this credential's \
                     CA ({why:?}): a host of another cluster, or not a member at all"
                ),
                other => format!("TLS failed: {other}"),
            });
        }
        e = err.source();
    }
    None
}
