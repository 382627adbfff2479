//! TLS for the NBD server: `NBD_OPT_STARTTLS` with X.509 certificates, by rustls.
//!
//! [`TlsSetup::load`] reads a certificate directory in the layout nbdkit and qemu use
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`) into a rustls server
//! configuration; [`TlsMode`] says whether TLS is offered or required. The
//! connection side (the STARTTLS upgrade in the middle of option haggling, records on a
//! non-blocking socket) is in `transport.rs`; the option rules (the spec's FORCEDTLS
//! mode for [`TlsMode::Require`]) are in the handshake.
//!
//! Only the ring crypto provider is built (no C toolchain beyond what ring needs);
//! TLS 1.2 and 1.3 are offered, as the NBD spec asks (1.2 is a MUST).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The CA certificate file in a certificate directory (checks client certificates).
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate (chain) file in a certificate directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key file in a certificate directory.
pub const SERVER_KEY: &str = "server-key.pem";

/// Whether clients may, must, or cannot use TLS (nbdkit's `--tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// TLS on request: a client that sends STARTTLS gets it, others are served in
    /// plain text.
    On,
    /// TLS is required: before STARTTLS every option but STARTTLS and ABORT gets
    /// `NBD_REP_ERR_TLS_REQD`, and EXPORT_NAME closes the connection.
    Require,
}

/// What is wrong with a TLS certificate directory.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file the configuration needs is not there.
    #[error("{path}: missing (a TLS certificate directory holds {SERVER_CERT}, {SERVER_KEY} and, to check client certificates, {CA_CERT})")]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// A file could not be read or holds no valid PEM of the expected kind.
    #[error("{path}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        detail: String,
    },
    /// rustls refused the certificate and key (a key that does not belong to the
    /// certificate, say).
    #[error("{cert} with {key}: {source}")]
    Certificate {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The CA file cannot be used to check client certificates.
    #[error("{path}: cannot check client certificates with it: {detail}")]
    ClientVerifier {
        /// The CA file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

/// The server's TLS settings: the mode, and the rustls configuration.
#[derive(Clone)]
pub struct TlsSetup {
    mode: TlsMode,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup").field("mode", &self.mode).finish_non_exhaustive()
    }
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    use rustls::pki_types::pem::Error as E;
    let detail = match e {
        E::Io(io) => io.to_string(),
        E::NoItemsFound => "no PEM section of the expected kind".to_string(),
        other => format!("bad PEM: {other:?}"),
    };
    TlsError::Pem { path: path.to_path_buf(), detail }
}

fn need(path: PathBuf) -> Result<PathBuf, TlsError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(TlsError::Missing { path })
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, rustls::pki_types::pem::Error::NoItemsFound));
    }
    Ok(certs)
}

impl TlsSetup {
    /// Read `dir` (`server-cert.pem`, `server-key.pem`, and with `verify_peer`
    /// `ca-cert.pem`, whose CA must have signed every client's certificate).
    pub fn load(dir: &Path, mode: TlsMode, verify_peer: bool) -> Result<TlsSetup, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_path = need(dir.join(SERVER_CERT))?;
        let key_path = need(dir.join(SERVER_KEY))?;
        let chain = certificates(&cert_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| pem_error(&key_path, e))?;
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Certificate { cert: cert_path.clone(), key: key_path.clone(), source })?;
        let builder = if verify_peer {
            let ca_path = need(dir.join(CA_CERT))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(&ca_path)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::ClientVerifier { path: ca_path.clone(), detail: e.to_string() })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::ClientVerifier { path: ca_path.clone(), detail: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(chain, key).map_err(|source| TlsError::Certificate {
            cert: cert_path,
            key: key_path,
            source,
        })?;
        Ok(TlsSetup { mode, config: Arc::new(config) })
    }

    /// Whether TLS is offered or required.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The rustls configuration for a new connection.
    pub(super) fn config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_without_the_server_certificate_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let e = TlsSetup::load(dir.path(), TlsMode::Require, false).expect_err("no files");
        assert!(matches!(&e, TlsError::Missing { path } if path.ends_with(SERVER_CERT)), "{e}");
        std::fs::write(dir.path().join(SERVER_CERT), "not pem").expect("write");
        std::fs::write(dir.path().join(SERVER_KEY), "not pem").expect("write");
        let e = TlsSetup::load(dir.path(), TlsMode::Require, false).expect_err("bad files");
        assert!(matches!(&e, TlsError::Pem { path, .. } if path.ends_with(SERVER_CERT)), "{e}");
    }
}
