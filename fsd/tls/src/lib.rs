//! Who may talk to a failsafe cluster. Every channel between hosts, mounts
//! and fsctl is TLS with certificates on both ends, issued by the cluster's
//! own CA (`Authority`); each certificate carries a `Grant` (member, client
//! or admin, and for a client its subtree and whether it may write), so a
//! member checks every caller from the certificate alone. rustls with ring;
//! no OpenSSL.

mod authority;
mod credential;
mod grant;
mod net;

use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::pki_types::CertificateDer;

pub use authority::{Authority, DEFAULT_DAYS};
pub use credential::{request_host_credential, Credential, HOST_KEY};
pub use grant::{valid_name, valid_subdir, BadGrant, Grant, Role};
pub use net::{explain_refusal, grant_of, incoming, Accepted, Expect, Io, Peer, Tls};

/// The certificate extension that holds a grant: an arc of ours under
/// 2.25 (the arc anyone may use without registration).
pub(crate) const GRANT_OID: &[u64] = &[2, 25, 0x6661_696c_7361_6665];

/// Every member's certificate holds this name: what a client checks when
/// any member will do.
pub(crate) const MEMBER_NAME: &str = "member.failsafe";

/// The name only host `id`'s certificate holds: what a caller checks when
/// it means one host (a Raft peer, a host being added).
pub(crate) fn host_name(id: u64) -> String {
    format!("h{id:016x}.{MEMBER_NAME}")
}

pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// What a certificate says, once parsed.
pub(crate) struct Parsed {
    pub grant: Grant,
    pub key_id: [u8; 32],
    pub expires: SystemTime,
}

pub(crate) fn parse_cert(der: &CertificateDer<'_>) -> anyhow::Result<Parsed> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    let ext = cert
        .extensions()
        .iter()
        .find(|e| {
            e.oid
                .iter()
                .is_some_and(|arcs| arcs.eq(GRANT_OID.iter().copied()))
        })
        .context("a certificate without a failsafe grant (not issued by fsctl)")?;
    let text = yasna::parse_der(ext.value, |r| r.read_utf8string())
        .map_err(|e| anyhow::anyhow!("the certificate's grant is not text: {e}"))?;
    let grant = Grant::decode(&text)?;
    let secs = cert.validity().not_after.timestamp().max(0) as u64;
    Ok(Parsed {
        grant,
        // The hash of the public key (the DER of its SubjectPublicKeyInfo):
        // how a host is known across certificates.
        key_id: *blake3::hash(cert.public_key().raw).as_bytes(),
        expires: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
    })
}

#[cfg(test)]
mod tests;
