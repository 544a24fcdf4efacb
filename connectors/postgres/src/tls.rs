//! TLS for both connections (replication and SQL), with libpq's `sslmode` meanings.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::{ConnectionConfig, SslMode};
use crate::error::{Error, Result};

/// The rustls configuration for `sslmode`; `None` when TLS is off.
pub(crate) fn client_config(config: &ConnectionConfig) -> Result<Option<Arc<ClientConfig>>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls_error = |reason: String| Error::Tls { addr: config.addr(), reason };
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?;
    // As with libpq, a Unix-domain socket never carries TLS: it does not leave the host.
    if config.unix_socket().is_some() {
        return Ok(None);
    }
    let client_config = match config.sslmode {
        SslMode::Disable => return Ok(None),
        SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth(),
        SslMode::VerifyFull => {
            let mut roots = RootCertStore::empty();
            match &config.sslrootcert {
                Some(path) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| tls_error(format!("cannot read sslrootcert {}: {e}", path.display())))?;
                    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                        let cert =
                            cert.map_err(|e| tls_error(format!("sslrootcert {}: {e}", path.display())))?;
                        roots
                            .add(cert)
                            .map_err(|e| tls_error(format!("sslrootcert {}: {e}", path.display())))?;
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(client_config)))
}

pub(crate) fn server_name(config: &ConnectionConfig) -> Result<ServerName<'static>> {
    ServerName::try_from(config.host.clone()).map_err(|e| Error::Tls {
        addr: config.addr(),
        reason: format!("host {:?} is not a valid TLS server name: {e}", config.host),
    })
}

/// `sslmode = "require"`: encrypted, but any certificate is accepted (as libpq does).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
