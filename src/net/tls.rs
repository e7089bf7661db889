//! Mutual TLS 1.3 with pinned device IDs. Each side presents its self-signed certificate; the
//! other side accepts it only if the SHA-256 of the certificate is a pinned device ID, and rustls
//! checks the handshake signature made with that certificate's key (so holding the certificate
//! alone is not enough). Nothing here accepts an unknown certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{DeviceId, Identity};

/// Who may connect: asked during every handshake so a peer added while running is honoured.
pub trait PeerSet: Send + Sync + std::fmt::Debug {
    fn is_pinned(&self, id: &DeviceId) -> bool;
}

/// A fixed set (the client side pins exactly the peer it dials).
#[derive(Debug, Clone)]
pub struct FixedPeers(pub Vec<DeviceId>);

impl PeerSet for FixedPeers {
    fn is_pinned(&self, id: &DeviceId) -> bool {
        self.0.contains(id)
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM first: the fastest suite on CPUs with AES-NI, which is what bulk data needs.
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(p)
}

fn check_pinned(
    peers: &dyn PeerSet,
    cert: &CertificateDer<'_>,
    role: &str,
) -> Result<DeviceId, rustls::Error> {
    let id = DeviceId::from_cert_der(cert.as_ref());
    if peers.is_pinned(&id) {
        Ok(id)
    } else {
        tracing::warn!("refused {role} {id}: device is not paired with this box (mybox peer add)");
        Err(rustls::Error::General(format!(
            "device {id} is not paired with this box"
        )))
    }
}

#[derive(Debug)]
struct PinnedServerVerifier {
    peers: Arc<dyn PeerSet>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_pinned(self.peers.as_ref(), end_entity, "server")
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug)]
struct PinnedClientVerifier {
    peers: Arc<dyn PeerSet>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_pinned(self.peers.as_ref(), end_entity, "client")
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

fn key_and_chain(ident: &Identity) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        vec![CertificateDer::from(ident.cert_der.clone())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ident.key_der.clone())),
    )
}

pub fn server_config(
    ident: &Identity,
    peers: Arc<dyn PeerSet>,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = provider();
    let verifier = Arc::new(PinnedClientVerifier {
        peers,
        provider: provider.clone(),
    });
    let (chain, key) = key_and_chain(ident);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"mybox/1".to_vec()];
    // No resumption: every connection proves its identity with a full handshake.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

pub fn client_config(
    ident: &Identity,
    peers: Arc<dyn PeerSet>,
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(PinnedServerVerifier {
        peers,
        provider: provider.clone(),
    });
    let (chain, key) = key_and_chain(ident);
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"mybox/1".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The device ID behind a finished handshake.
pub fn peer_id_of(certs: Option<&[CertificateDer<'_>]>) -> Option<DeviceId> {
    certs
        .and_then(|c| c.first())
        .map(|c| DeviceId::from_cert_der(c.as_ref()))
}
