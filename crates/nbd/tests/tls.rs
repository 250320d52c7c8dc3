//! NBD_OPT_STARTTLS with certificates made for the test: qemu-img (GnuTLS) and
//! nbdinfo, with TLS required and optional, with and without client certificates.

mod common;

use std::path::Path;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use strata_nbd::proto::*;
use strata_nbd::{load_tls_dir, ServerConfig};

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, laid
/// out as qemu and libnbd expect: `server/` for the server, `client/` with the CA and
/// the client's certificate, `anon/` with the CA alone.
fn make_pki(root: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "strata test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut sp =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "localhost");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = sp.signed_by(&server_key, &ca_cert, &ca_key).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name
        .push(DnType::CommonName, "strata test client");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = cp.signed_by(&client_key, &ca_cert, &ca_key).unwrap();

    for d in ["server", "client", "anon"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
        std::fs::write(root.join(d).join("ca-cert.pem"), ca_cert.pem()).unwrap();
    }
    std::fs::write(root.join("server/server-cert.pem"), server_cert.pem()).unwrap();
    std::fs::write(
        root.join("server/server-key.pem"),
        server_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(root.join("client/client-cert.pem"), client_cert.pem()).unwrap();
    std::fs::write(
        root.join("client/client-key.pem"),
        client_key.serialize_pem(),
    )
    .unwrap();
}

fn qemu_tls_args(creds_dir: &Path, port: u16, export: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds_dir.display()
        ),
        "--image-opts".into(),
        format!("driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0"),
    ]
}

fn qemu_img(args: &[&str], extra: &[String]) -> std::process::Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(extra.iter().map(|s| s.as_str()));
    run("qemu-img", &all)
}

#[test]
fn tls_required_with_qemu_and_nbdinfo() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let disk = sample_disk();
    let config = ServerConfig {
        tls: Some(load_tls_dir(&pki.path().join("server"), false).unwrap()),
        tls_required: true,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(exports_of(&[("vm", disk.clone())]), config);
    let anon = pki.path().join("anon");

    let o = qemu_img(
        &["info", "--output=json"],
        &qemu_tls_args(&anon, srv.port, "vm"),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("\"virtual-size\": 8388608"), "{out}");

    // Data goes through TLS intact, both ways.
    let file = srv.dir.path().join("copy.raw");
    let f = file.to_str().unwrap();
    let o = qemu_img(&["convert", "-O", "raw"], &{
        let mut a = qemu_tls_args(&anon, srv.port, "vm");
        a.push(f.to_string());
        a
    });
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&file).unwrap(), disk.contents());
    let qemu_io_args = [
        "--object".to_string(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            anon.display()
        ),
        "--image-opts".to_string(),
        "-c".to_string(),
        "write -P 0x3c 4096 8192".to_string(),
        format!(
            "driver=nbd,host=127.0.0.1,port={},export=vm,tls-creds=tls0",
            srv.port
        ),
    ];
    let o = run(
        "qemu-io",
        &qemu_io_args.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    );
    let (ok, out) = (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    );
    assert!(ok, "{out}");
    assert!(disk.contents()[4096..12288].iter().all(|&b| b == 0x3c));

    // Without TLS, qemu is refused.
    let o = run("qemu-img", &["info", &srv.tcp_uri("vm")]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.to_lowercase().contains("tls"), "{err}");

    let uri = format!(
        "nbds://127.0.0.1:{}/vm?tls-certificates={}",
        srv.port,
        anon.display()
    );
    let v: serde_json::Value = serde_json::from_str(&run_ok("nbdinfo", &["--json", &uri])).unwrap();
    assert_eq!(v["TLS"], true);
    assert_eq!(v["exports"][0]["export-size"], 8 << 20);
    let map = run_ok("nbdinfo", &["--map", &uri]);
    assert!(map.contains("hole,zero"), "{map}");
    // A plain nbd:// URI is refused.
    let o = run("nbdinfo", &[&srv.tcp_uri("vm")]);
    assert!(!o.status.success());
}

#[test]
fn tls_required_refuses_options_before_starttls() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let config = ServerConfig {
        tls: Some(load_tls_dir(&pki.path().join("server"), false).unwrap()),
        tls_required: true,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(exports_of(&[("vm", sample_disk())]), config);
    let mut c = RawClient::handshake(srv.port);
    for (opt, data) in [
        (OPT_LIST, vec![]),
        (OPT_GO, RawClient::go_payload("vm", &[])),
        (OPT_INFO, RawClient::go_payload("vm", &[])),
        (OPT_STRUCTURED_REPLY, vec![]),
        (0x4242, vec![1, 2, 3]),
    ] {
        c.option(opt, &data);
        let (o, ty, _) = c.reply();
        assert_eq!((o, ty), (opt, REP_ERR_TLS_REQD));
    }
    c.option(OPT_STARTTLS, b"junk");
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    // EXPORT_NAME cannot be refused with an error: the server hangs up.
    c.option(OPT_EXPORT_NAME, b"vm");
    assert!(c.is_closed());
    // STARTTLS then a TLS handshake the client never does: closed on its own time.
    let mut c = RawClient::handshake(srv.port);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    c.send(b"this is not a TLS client hello");
    assert!(c.is_closed());
}

#[test]
fn tls_optional_and_client_certificates() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let disk = sample_disk();
    // Optional TLS: plain clients and TLS clients both work.
    let config = ServerConfig {
        tls: Some(load_tls_dir(&pki.path().join("server"), false).unwrap()),
        ..ServerConfig::default()
    };
    let srv = TestServer::start(exports_of(&[("vm", disk.clone())]), config);
    run_ok("qemu-img", &["info", &srv.tcp_uri("vm")]);
    let o = qemu_img(
        &["info"],
        &qemu_tls_args(&pki.path().join("anon"), srv.port, "vm"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(srv);

    // Client certificates required: only a client that has one gets in.
    let config = ServerConfig {
        tls: Some(load_tls_dir(&pki.path().join("server"), true).unwrap()),
        tls_required: true,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(exports_of(&[("vm", disk)]), config);
    let o = qemu_img(
        &["info"],
        &qemu_tls_args(&pki.path().join("client"), srv.port, "vm"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = qemu_img(
        &["info"],
        &qemu_tls_args(&pki.path().join("anon"), srv.port, "vm"),
    );
    assert!(!o.status.success(), "a client without a certificate got in");
}
