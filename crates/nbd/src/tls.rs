//! TLS credentials for `NBD_OPT_STARTTLS`, loaded from PEM files.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

fn pem_error(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

fn load_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no certificate in file"));
    }
    Ok(certs)
}

/// A rustls server configuration (ring crypto, TLS 1.2 and 1.3) from a PEM
/// certificate chain and private key. With `client_ca`, clients must present a
/// certificate signed by one of the CA certificates in that PEM file.
pub fn load_tls_config(
    cert_chain: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> io::Result<Arc<rustls::ServerConfig>> {
    let certs = load_certs(cert_chain)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| pem_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| pem_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| pem_error(cert_chain, e))?;
    Ok(Arc::new(config))
}

/// Credentials from a directory laid out as qemu and libnbd expect theirs:
/// `server-cert.pem` and `server-key.pem`, and with `verify_clients`, `ca-cert.pem`
/// to check client certificates against.
pub fn load_tls_dir(dir: &Path, verify_clients: bool) -> io::Result<Arc<rustls::ServerConfig>> {
    let ca = dir.join("ca-cert.pem");
    load_tls_config(
        &dir.join("server-cert.pem"),
        &dir.join("server-key.pem"),
        verify_clients.then_some(ca.as_path()),
    )
}
