//! Who may call what: every request's path is checked against the roles
//! its caller's certificate grants, before any handler runs. Finer rules
//! (which metadata operations a client may propose, that a host reports
//! only about itself) sit in the handlers, which see the message.

use std::future::Ready;
use std::task::{Context, Poll};

use futures::future::Either;

use std::sync::{Arc, RwLock};

use failsafe_tls::Role::{self, Admin, Client, Member};
use failsafe_tracker::KeyBook;
use tonic::body::Body;
use tonic::codegen::http;

/// The roles that may call `path` (`/failsafe.v1.Service/Method`, or an
/// HTTP path such as `/metrics`); none for an unknown one.
pub(crate) fn allowed(path: &str) -> &'static [Role] {
    let path = path.trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or(("", path));
    match (service, method) {
        ("failsafe.v1.Admin", "Hello" | "Status") => &[Member, Client, Admin],
        // A host that came back at another address says so itself; a host
        // started with --join adds itself (its credential is the admin's
        // consent). The handlers hold a member to its own host.
        ("failsafe.v1.Admin", "UpdateAddress" | "AddHost") => &[Member, Admin],
        ("failsafe.v1.Admin", _) => &[Admin],
        // Which operations a client may propose: the handler decides. An
        // admin may do what any client may.
        ("failsafe.v1.Metadata", _) => &[Member, Client, Admin],
        ("failsafe.v1.RaftTransport", _) => &[Member],
        // A host's whole listing and deletes are the cluster's own work.
        ("failsafe.v1.Blocks", "Inventory" | "Delete") => &[Member],
        ("failsafe.v1.Blocks", _) => &[Member, Client, Admin],
        ("", "metrics") => &[Member, Admin],
        // Whether this host is live and ready says nothing about the data.
        ("", "healthz" | "readyz") | ("grpc.health.v1.Health", _) => &[Member, Client, Admin],
        // The status page says what Admin.Status says.
        ("", "") => &[Member, Client, Admin],
        _ => &[],
    }
}

/// The keys this member checks callers against, as the `keys` worker
/// last read them from the tracker's state.
pub(crate) type Keys = Arc<RwLock<KeyBook>>;

/// The tower layer that applies `allowed`, and refuses revoked
/// credentials and hosts presenting a key other than their pinned one.
#[derive(Clone)]
pub(crate) struct AuthorizeLayer(pub Keys);

impl<S> tower_layer::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            keys: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Authorize<S> {
    inner: S,
    keys: Keys,
}

impl<S, B> tower_service::Service<http::Request<B>> for Authorize<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match check(&self.keys, req.extensions(), req.uri().path()) {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(status) => Either::Right(std::future::ready(Ok(status.into_http::<Body>()))),
        }
    }
}

fn check(keys: &Keys, ext: &http::Extensions, path: &str) -> Result<(), tonic::Status> {
    let Some(peer) = ext.get::<failsafe_tls::Peer>() else {
        return Err(tonic::Status::permission_denied(
            "a caller without identity",
        ));
    };
    let Some(grant) = &peer.grant else {
        return Ok(()); // --insecure
    };
    let refused = keys
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .refuses(grant, &peer.key_id);
    if let Some(why) = refused {
        tracing::warn!(who = %grant.who(), %path, %why, "refused a call");
        return Err(tonic::Status::permission_denied(why));
    }
    if allowed(path).contains(&grant.role) {
        Ok(())
    } else {
        tracing::warn!(who = %grant.who(), %path, "refused a call its credential does not allow");
        Err(tonic::Status::permission_denied(format!(
            "{path} is not for {} credential ({})",
            grant.role.a(),
            grant.who()
        )))
    }
}

/// The `keys` worker: reads the pinned and revoked keys from the tracker's
/// state every second, so a revocation applies on every member within a
/// second of its commit.
pub(crate) struct KeysWorker {
    pub tracker: Arc<failsafe_tracker::Tracker>,
    pub keys: Keys,
}

impl crate::worker::Worker for KeysWorker {
    fn name(&self) -> &'static str {
        "keys"
    }

    async fn step(&self) -> anyhow::Result<std::time::Duration> {
        let book = self.tracker.key_book().await?;
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if *keys != book {
            *keys = book;
        }
        Ok(std::time::Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_reaches_only_its_services() {
        let may = |path: &str, role: Role| allowed(path).contains(&role);
        assert!(may("/failsafe.v1.Metadata/Mutate", Client));
        assert!(may("/failsafe.v1.Blocks/Get", Client));
        assert!(may("/failsafe.v1.Admin/Status", Client));
        for path in [
            "/failsafe.v1.RaftTransport/AppendEntries",
            "/failsafe.v1.RaftTransport/AppendEntriesStream",
            "/failsafe.v1.RaftTransport/InstallSnapshot",
            "/failsafe.v1.Blocks/Inventory",
            "/failsafe.v1.Blocks/Delete",
            "/failsafe.v1.Admin/AddHost",
            "/failsafe.v1.Admin/RemoveHost",
            "/failsafe.v1.Admin/UpdateAddress",
            "/failsafe.v1.Admin/Init",
            "/failsafe.v1.Admin/Adopt",
            "/failsafe.v1.Admin/Ship",
            "/failsafe.v1.Admin/Drain",
            "/metrics",
        ] {
            assert!(!may(path, Client), "{path}");
        }
        assert!(may("/failsafe.v1.Admin/AddHost", Admin));
        assert!(may("/metrics", Admin) && may("/metrics", Member));
        for path in ["/healthz", "/readyz", "/grpc.health.v1.Health/Check"] {
            assert!(
                may(path, Client) && may(path, Member) && may(path, Admin),
                "{path}"
            );
        }
        assert!(may("/failsafe.v1.Metadata/Mutate", Admin));
        assert!(!may("/failsafe.v1.Admin/RemoveHost", Member));
        assert!(!may("/failsafe.v1.RaftTransport/Vote", Admin));
        assert!(!may("/failsafe.v1.Nothing/Here", Admin));
    }
}
