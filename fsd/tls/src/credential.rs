//! A credential: one certificate (with its grant), the cluster's CA
//! certificate it chains to, and the private key, in one PEM file only its
//! owner reads. What fsd (`--cred`), a mount (`-o cred=`) and fsctl
//! (`--cred`) present.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::authority::write_private;
use crate::grant::Grant;
use crate::{parse_cert, provider};

/// Where a host keeps the key it made itself (`request_host_credential`).
pub const HOST_KEY: &str = "host.key";

/// A host's first credential requested from the host itself, its key never
/// leaving it: makes `dir/host.key` (once, 0600) and writes a certificate
/// signing request for it to `dir/host.csr`, which `fsctl host cert --csr`
/// signs. Returns the request's path.
pub fn request_host_credential(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let key_path = dir.join(HOST_KEY);
    let key = if key_path.exists() {
        let pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        rcgen::KeyPair::from_pem(&pem)
            .with_context(|| format!("{} holds no key", key_path.display()))?
    } else {
        let key = rcgen::KeyPair::generate().context("generating a key")?;
        write_private(&key_path, &key.serialize_pem())?;
        key
    };
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "a new failsafe host");
    let csr = params.serialize_request(&key)?.pem()?;
    let path = dir.join("host.csr");
    std::fs::write(&path, csr).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

pub struct Credential {
    cert: CertificateDer<'static>,
    ca: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    pub grant: Grant,
    /// The hash of the certificate's public key: a host's identity.
    key_id: [u8; 32],
    expires: SystemTime,
}

impl Clone for Credential {
    fn clone(&self) -> Self {
        Credential {
            cert: self.cert.clone(),
            ca: self.ca.clone(),
            key: self.key.clone_key(),
            grant: self.grant.clone(),
            key_id: self.key_id,
            expires: self.expires,
        }
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("grant", &self.grant)
            .field("expires", &self.expires_text())
            .finish_non_exhaustive()
    }
}

impl Credential {
    pub(crate) fn from_parts(
        cert: CertificateDer<'static>,
        ca: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> anyhow::Result<Credential> {
        let parsed = parse_cert(&cert)?;
        Ok(Credential {
            cert,
            ca,
            key,
            grant: parsed.grant,
            key_id: parsed.key_id,
            expires: parsed.expires,
        })
    }

    /// Reads a credential file (certificate, CA certificate, key).
    pub fn load(path: &Path) -> anyhow::Result<Credential> {
        use std::os::unix::fs::MetadataExt;
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading credential {}", path.display()))?;
        let what = || format!("credential {}", path.display());
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .with_context(what)?;
        let [cert, ca] = <[_; 2]>::try_from(certs).map_err(|certs| {
            anyhow::anyhow!(
                "{} holds {} certificates, not two (its own and the cluster's CA)",
                what(),
                certs.len()
            )
        })?;
        // A credential signed from this host's own request holds no key:
        // the key stayed beside it, in host.key.
        let key = match PrivateKeyDer::from_pem_slice(&bytes) {
            Ok(k) => k,
            Err(_) => {
                let beside = path.with_file_name(HOST_KEY);
                let b = std::fs::read(&beside).with_context(|| {
                    format!(
                        "{} holds no private key, and {} none",
                        what(),
                        beside.display()
                    )
                })?;
                PrivateKeyDer::from_pem_slice(&b)
                    .with_context(|| format!("{} holds no private key", beside.display()))?
            }
        };
        let cred = Credential::from_parts(cert, ca, key).with_context(what)?;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "a credential readable by others than its owner: chmod 600 it"
                );
            }
        }
        Ok(cred)
    }

    /// Writes the credential to `path`, readable by its owner only.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let pem = |label: &str, der: &[u8]| pem::encode(&pem::Pem::new(label, der));
        let text = format!(
            "# failsafe credential: {} (expires {})\n{}{}{}",
            self.grant.who(),
            self.expires_text(),
            pem("CERTIFICATE", &self.cert),
            pem("CERTIFICATE", &self.ca),
            pem("PRIVATE KEY", self.key.secret_der()),
        );
        write_private(path, &text)
    }

    pub fn key_id(&self) -> [u8; 32] {
        self.key_id
    }

    pub fn expires(&self) -> SystemTime {
        self.expires
    }

    pub fn expires_text(&self) -> String {
        date(self.expires)
    }

    /// A certificate signing request for this credential's key (PEM): what
    /// a renewal signs, the key never leaving its host.
    pub fn csr(&self) -> anyhow::Result<String> {
        let key = rcgen::KeyPair::try_from(&self.key).context("the credential's key")?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, self.grant.who());
        Ok(params.serialize_request(&key)?.pem()?)
    }

    /// This credential with `cert_pem` (a renewal) as its certificate:
    /// refused unless it is for the same key and grant, and chains to the
    /// same CA.
    pub fn renewed(&self, cert_pem: &str) -> anyhow::Result<Credential> {
        let cert =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("not a certificate")?;
        let new = Credential::from_parts(cert, self.ca.clone(), self.key.clone_key())?;
        anyhow::ensure!(
            new.key_id == self.key_id,
            "the certificate is for another key than this credential's"
        );
        anyhow::ensure!(
            new.grant == self.grant,
            "the certificate grants {} what this one grants {}",
            new.grant.who(),
            self.grant.who()
        );
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .context("a verifier")?;
        verifier
            .verify_client_cert(&new.cert, &[], rustls::pki_types::UnixTime::now())
            .map_err(|e| {
                anyhow::anyhow!("the certificate does not check out against the CA: {e}")
            })?;
        Ok(new)
    }

    /// Refuses a credential that has run out (with how to get a new one).
    pub fn check_current(&self) -> anyhow::Result<()> {
        if self.expires < SystemTime::now() {
            anyhow::bail!(
                "the credential of {} expired on {}; issue a new one with fsctl",
                self.grant.who(),
                self.expires_text()
            );
        }
        if self.expires < SystemTime::now() + Duration::from_secs(30 * 86_400) {
            tracing::warn!(
                who = %self.grant.who(),
                expires = %self.expires_text(),
                "this credential expires within 30 days; issue a new one with fsctl"
            );
        }
        Ok(())
    }

    fn roots(&self) -> anyhow::Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .context("the credential's CA certificate")?;
        Ok(Arc::new(roots))
    }

    /// TLS for calling members: their certificate must chain to our CA.
    pub fn client_config(&self) -> anyhow::Result<Arc<ClientConfig>> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())
            .context("the credential's key does not match its certificate")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// TLS for a member's server: every caller presents a certificate of our CA.
    pub fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .context("a verifier of callers")?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .context("the credential's key does not match its certificate")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A time as its date (UTC), for messages and `issued.log`.
pub(crate) fn date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| format!("{secs} s after 1970"))
}
