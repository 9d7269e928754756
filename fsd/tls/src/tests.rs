use super::*;

#[test]
fn an_issued_credential_reads_back_with_its_grant() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::create(&dir.path().join("ca")).unwrap();
    let grant = Grant::client("web1", "/wiki", true).unwrap();
    let cred = ca.issue(&grant, 30).unwrap();
    let path = dir.path().join("web1.cred");
    cred.save(&path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let back = Credential::load(&path).unwrap();
    assert_eq!(back.grant, grant);
    assert_eq!(back.key_id(), cred.key_id());
    back.check_current().unwrap();
    // A second CA in the same place is refused; opening it works.
    assert!(Authority::create(&dir.path().join("ca")).is_err());
    let again = Authority::open(&dir.path().join("ca")).unwrap();
    let member = again.issue(&Grant::member(7), 30).unwrap();
    assert_eq!(member.grant, Grant::member(7));
    assert_ne!(member.key_id(), cred.key_id());
}

#[test]
fn an_expired_credential_is_refused_before_it_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::create(dir.path()).unwrap();
    let now = std::time::SystemTime::now();
    let cred = ca
        .issue_between(
            &Grant::member(1),
            now - std::time::Duration::from_secs(7200),
            now - std::time::Duration::from_secs(3600),
        )
        .unwrap();
    let err = cred.check_current().unwrap_err().to_string();
    assert!(err.contains("expired"), "{err}");
}

#[test]
fn a_renewal_keeps_the_key_and_the_grant() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::create(&dir.path().join("ca")).unwrap();
    let cred = ca.issue(&Grant::member(5), 1).unwrap();
    let pem = ca
        .renew(&cred.csr().unwrap(), &Grant::member(5), 90)
        .unwrap();
    let renewed = cred.renewed(&pem).unwrap();
    assert_eq!(renewed.key_id(), cred.key_id());
    assert_eq!(renewed.grant, cred.grant);
    assert!(renewed.expires() > cred.expires());
    // Another host's grant, another CA's signature: refused.
    let other = ca
        .renew(&cred.csr().unwrap(), &Grant::member(6), 90)
        .unwrap();
    assert!(cred.renewed(&other).is_err());
    let elsewhere = Authority::create(&dir.path().join("other")).unwrap();
    let foreign = elsewhere
        .renew(&cred.csr().unwrap(), &Grant::member(5), 90)
        .unwrap();
    assert!(cred.renewed(&foreign).is_err());
    // A request not signed by its key is no request.
    assert!(ca.renew("garbage", &Grant::member(5), 90).is_err());
}
