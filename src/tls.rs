//! The TLS server configuration of the TCP listener, built from the
//! `[auth]` files. Config validation builds it once to check the files (so
//! that a bad one exits 64 before anything is bound); the server builds it
//! again when it starts serving, by the same function, so a file that
//! changed in between is reported in the same words.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

use crate::config::{ConfigError, TlsFiles, invalid};

/// The server configuration of `files`: the certificate chain and its key,
/// and, with a client CA, mutual TLS. Every error names the key whose file
/// is wrong (`auth.tls_cert`, `auth.tls_key`, `auth.tls_client_ca`).
pub(crate) fn server_config(files: &TlsFiles) -> Result<ServerConfig, ConfigError> {
    let chain = certificates("auth.tls_cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read("auth.tls_key", &files.key)?)
        .map_err(|e| bad("auth.tls_key", &files.key, &e))?;
    let builder = ServerConfig::builder();
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let key = "auth.tls_client_ca";
            let mut roots = RootCertStore::empty();
            for cert in certificates(key, ca)? {
                roots.add(cert).map_err(|e| bad(key, ca, &e))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| bad(key, ca, &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| bad("auth.tls_cert", &files.cert, &e))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(server)
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

/// The PEM certificates in the file of `key`: at least one.
fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(key, path, &e))?;
    if certs.is_empty() {
        return Err(bad(key, path, &"no PEM certificate in it"));
    }
    Ok(certs)
}

fn bad(key: &str, path: &Path, problem: &dyn std::fmt::Display) -> ConfigError {
    invalid(key, format!("{}: {problem}", path.display()))
}
