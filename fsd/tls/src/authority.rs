//! The cluster's certificate authority: a key pair kept by the admin (in a
//! directory only root reads), which issues every member, client and admin
//! credential. Whoever holds `ca.key` can let anyone in: it never travels.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::credential::Credential;
use crate::grant::{Grant, Role};
use crate::{host_name, GRANT_OID, MEMBER_NAME};

/// How long a CA is valid: ten years.
const CA_DAYS: u32 = 3650;
/// How long a credential is valid unless told otherwise: two years.
pub const DEFAULT_DAYS: u32 = 730;

pub struct Authority {
    dir: PathBuf,
    cert_pem: String,
    key: KeyPair,
}

/// Writes `text` to `path` readable by its owner only, durably.
pub(crate) fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

impl Authority {
    /// Creates a new CA in `dir` (refuses if one is there).
    pub fn create(dir: &Path) -> anyhow::Result<Authority> {
        use std::os::unix::fs::DirBuilderExt;
        anyhow::ensure!(
            !dir.join("ca.key").exists(),
            "{} already holds a CA",
            dir.display()
        );
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate().context("generating the CA's key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("failsafe cluster CA {:08x}", rand::random::<u32>()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (not_before, not_after) = validity(CA_DAYS);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key).context("signing the CA")?;
        write_private(&dir.join("ca.key"), &key.serialize_pem())?;
        write_private(&dir.join("ca.crt"), &cert.pem())?;
        Ok(Authority {
            dir: dir.to_path_buf(),
            cert_pem: cert.pem(),
            key,
        })
    }

    pub fn open(dir: &Path) -> anyhow::Result<Authority> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let key = KeyPair::from_pem(&read("ca.key")?).context("ca.key holds no key")?;
        Ok(Authority {
            dir: dir.to_path_buf(),
            cert_pem: read("ca.crt")?,
            key,
        })
    }

    /// The CA in `dir`, created when there is none yet (said on stderr).
    pub fn open_or_create(dir: &Path) -> anyhow::Result<Authority> {
        if dir.join("ca.key").exists() {
            Authority::open(dir)
        } else {
            let ca = Authority::create(dir)?;
            eprintln!(
                "created the cluster's CA in {} (ca.key: keep it safe, it lets anyone in)",
                dir.display()
            );
            Ok(ca)
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cert(&self) -> anyhow::Result<CertificateDer<'static>> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .context("ca.crt holds no certificate")
    }

    /// A new credential for `grant`, valid for `days` from now.
    pub fn issue(&self, grant: &Grant, days: u32) -> anyhow::Result<Credential> {
        let (from, until) = validity(days);
        self.issue_between(grant, from, until)
    }

    /// A new credential valid between two times: tests make expired ones.
    pub fn issue_between(
        &self,
        grant: &Grant,
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> anyhow::Result<Credential> {
        let key = KeyPair::generate().context("generating a key")?;
        let params = leaf_params(grant, not_before, not_after)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .context("ca.crt is not a certificate")?;
        let cert = params.signed_by(&key, &issuer).context("signing")?;
        let cred = Credential::from_parts(
            cert.der().clone(),
            self.cert()?,
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                .context("reading back a new key")?,
        )?;
        self.record(&cred)?;
        Ok(cred)
    }

    /// A new certificate for `grant` over the key a certificate signing
    /// request (PEM) proves its sender holds: a renewal, the key staying
    /// where it is. Its PEM.
    pub fn renew(&self, csr_pem: &str, grant: &Grant, days: u32) -> anyhow::Result<String> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .context("not a valid certificate signing request")?;
        let (from, until) = validity(days);
        let params = leaf_params(grant, from, until)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .context("ca.crt is not a certificate")?;
        let cert = params
            .signed_by(&csr.public_key, &issuer)
            .context("signing")?;
        let parsed = crate::parse_cert(cert.der())?;
        self.note(&parsed.key_id, grant, parsed.expires)?;
        Ok(cert.pem())
    }

    /// The certificate part of a credential signed from a host's request
    /// (`renew`'s certificate, then the CA's), for the host to keep beside
    /// its own key.
    pub fn sign_request(&self, csr_pem: &str, grant: &Grant, days: u32) -> anyhow::Result<String> {
        let cert = self.renew(csr_pem, grant, days)?;
        Ok(format!(
            "# failsafe credential: {} (its key is host.key beside it)\n{cert}{}",
            grant.who(),
            self.cert_pem
        ))
    }

    /// Appends one line about an issued credential to `issued.log`, so an
    /// admin can find what to revoke by name.
    fn record(&self, cred: &Credential) -> anyhow::Result<()> {
        self.note(&cred.key_id(), &cred.grant, cred.expires())
    }

    fn note(
        &self,
        key_id: &[u8; 32],
        grant: &Grant,
        expires: std::time::SystemTime,
    ) -> anyhow::Result<()> {
        let path = self.dir.join("issued.log");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(
            f,
            "{}\t{}\t{}\texpires {}",
            hex::encode(key_id),
            grant.who(),
            grant.encode(),
            crate::credential::date(expires)
        )?;
        Ok(())
    }
}

/// What every certificate of `grant` says.
fn leaf_params(
    grant: &Grant,
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, grant.who());
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if grant.role == Role::Member {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        params.subject_alt_names = vec![
            SanType::DnsName(MEMBER_NAME.try_into()?),
            SanType::DnsName(host_name(grant.host_id).try_into()?),
        ];
    }
    let text = grant.encode();
    let content = yasna::construct_der(|w| w.write_utf8_string(&text));
    params
        .custom_extensions
        .push(CustomExtension::from_oid_content(GRANT_OID, content));
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&b)
}

/// From an hour ago (clocks disagree a little) to `days` from now.
fn validity(days: u32) -> (std::time::SystemTime, std::time::SystemTime) {
    let now = std::time::SystemTime::now();
    (
        now - Duration::from_secs(3600),
        now + Duration::from_secs(u64::from(days) * 86_400),
    )
}
