//! TLS for the `wss-*` scenarios: the certificate every proxy serves, and the one client
//! configuration the load generator uses against all of them.
//!
//! **The certificate** is made at run time by rcgen and written to the run's temp directory: a
//! self-signed ECDSA P-256 certificate for `localhost` and `127.0.0.1` (the key type most
//! deployments use today, and what rcgen makes by default). switchyard and nginx read the
//! chain and the key from two files; HAProxy wants both in one PEM (`crt`), written beside them.
//! No key is committed, and no two runs share one.
//!
//! **The client** (rustls with aws-lc-rs, through tokio-rustls) offers exactly one choice at each
//! step, so that all three proxies do the same cryptographic work and only their own
//! implementation differs:
//!
//! * TLS 1.3 only; every proxy here also speaks 1.2, none prefers it;
//! * one cipher suite, `TLS13_AES_128_GCM_SHA256` (OpenSSL servers would otherwise pick
//!   AES-256-GCM by their own order while rustls follows the client's AES-128-GCM: a third more
//!   bulk cipher work for nginx and HAProxy in the stream scenario);
//! * one key exchange group, X25519 (rustls servers, switchyard included, prefer the hybrid
//!   X25519MLKEM768 that the OpenSSL 3.0 of nginx and HAProxy here does not have);
//! * ALPN `http/1.1` (checked on every connection: a proxy that did not answer it is an error);
//! * **no session resumption**: every handshake is a full one (certificate, signature, key
//!   exchange), which is the expensive case a proxy must absorb in a reconnect storm. Servers
//!   still issue their usual session tickets (each proxy's default), the client ignores them.
//!
//! The server certificate **is verified** (webpki, against the generated certificate as the only
//! trust anchor, for the name `localhost`), as a browser would. Verifying costs the load side
//! two ECDSA verifications per handshake, not the proxy; it also proves each proxy serves the
//! certificate it was given.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rustls::crypto::aws_lc_rs::{self, cipher_suite, kx_group};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

/// The name the load generator asks for (SNI) and verifies.
pub const SERVER_NAME: &str = "localhost";

/// ALPN: the only protocol the client offers, and the one every proxy must pick.
pub const ALPN: &[u8] = b"http/1.1";

/// The client settings in one line, for the report.
pub const CLIENT_SUMMARY: &str = "self-signed ECDSA P-256 certificate for localhost/127.0.0.1, \
     generated for this run and served by every proxy; backend plain ws; client rustls \
     (aws-lc-rs) offering only TLS 1.3, TLS13_AES_128_GCM_SHA256, X25519 and ALPN http/1.1, \
     certificate verified, session resumption off (every handshake full)";

/// The certificate files of a run.
#[derive(Debug, Clone)]
pub struct Files {
    /// The certificate (PEM), for switchyard, nginx, and as the client's trust anchor.
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM), for switchyard and nginx.
    pub key: PathBuf,
    /// Certificate then key in one PEM, for HAProxy's `crt`.
    pub combined: PathBuf,
}

/// Makes a fresh self-signed certificate and writes it to `dir`.
pub fn generate(dir: &Path) -> anyhow::Result<Files> {
    let mut params =
        rcgen::CertificateParams::new(vec![SERVER_NAME.to_string(), "127.0.0.1".to_string()])
            .context("certificate parameters")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, SERVER_NAME);
    // ECDSA P-256 (rcgen's default algorithm).
    let key = rcgen::KeyPair::generate().context("generating the key")?;
    let cert = params
        .self_signed(&key)
        .context("signing the certificate")?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    let files = Files {
        cert: dir.join("tls-cert.pem"),
        key: dir.join("tls-key.pem"),
        combined: dir.join("tls-haproxy.pem"),
    };
    for (path, text) in [
        (&files.cert, cert_pem.clone()),
        (&files.key, key_pem.clone()),
        (&files.combined, format!("{cert_pem}{key_pem}")),
    ] {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(files)
}

/// The load generator's client configuration, trusting only the certificate(s) in `ca` (see
/// the module docs for every choice).
pub fn client_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read {}", ca.display()))?
    {
        let cert = cert.with_context(|| format!("cannot parse {}", ca.display()))?;
        roots.add(cert).context("trust anchor")?;
    }
    anyhow::ensure!(!roots.is_empty(), "no certificate in {}", ca.display());
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider.kx_groups = vec![kx_group::X25519];
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with AES-128-GCM and X25519")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The name to connect to.
pub fn server_name() -> anyhow::Result<ServerName<'static>> {
    ServerName::try_from(SERVER_NAME).context("server name")
}

/// What a finished handshake negotiated, e.g. `TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519`.
pub fn negotiated(conn: &rustls::CommonState) -> String {
    let version = conn
        .protocol_version()
        .map_or_else(|| "?".into(), |v| format!("{v:?}"));
    let suite = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "?".into(), |s| format!("{:?}", s.suite()));
    let group = conn
        .negotiated_key_exchange_group()
        .map_or_else(|| "?".into(), |g| format!("{:?}", g.name()));
    format!("{version} {suite} {group}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::PrivateKeyDer;

    /// A scratch directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("compare-tls-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("scratch dir");
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Runs a handshake between `client` and `server` in memory; the first TLS error either
    /// side raises.
    fn handshake(
        client: &mut rustls::ClientConnection,
        server: &mut rustls::ServerConnection,
    ) -> Result<(), rustls::Error> {
        let mut wire = Vec::new();
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
            wire.clear();
            while client.wants_write() {
                client.write_tls(&mut wire).expect("client writes");
            }
            let mut read = &wire[..];
            while !read.is_empty() {
                server.read_tls(&mut read).expect("server reads");
            }
            server.process_new_packets()?;
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire).expect("server writes");
            }
            let mut read = &wire[..];
            while !read.is_empty() {
                client.read_tls(&mut read).expect("client reads");
            }
            client.process_new_packets()?;
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn the_generated_certificate_satisfies_the_client_as_every_proxy_loads_it() {
        let dir = Scratch::new("ok");
        let files = generate(&dir.0).expect("certificate");
        let client_config = client_config(&files.cert).expect("client config");
        // Loaded from the two files (switchyard, nginx) and from the combined one (HAProxy).
        for (cert_file, key_file) in [
            (&files.cert, &files.key),
            (&files.combined, &files.combined),
        ] {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
                .expect("chain file")
                .collect::<Result<_, _>>()
                .expect("chain parses");
            assert_eq!(chain.len(), 1);
            let key = PrivateKeyDer::from_pem_file(key_file).expect("key parses");
            let mut server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
                aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
            server_config.alpn_protocols = vec![b"h2".to_vec(), ALPN.to_vec()];
            let mut server =
                rustls::ServerConnection::new(Arc::new(server_config)).expect("server");
            let mut client = rustls::ClientConnection::new(
                Arc::clone(&client_config),
                server_name().expect("name"),
            )
            .expect("client");
            handshake(&mut client, &mut server).expect("handshake");
            assert_eq!(client.alpn_protocol(), Some(ALPN));
            assert_eq!(
                negotiated(&client),
                "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519"
            );
        }
    }

    #[test]
    fn a_certificate_from_another_run_is_refused() {
        let (a, b) = (Scratch::new("a"), Scratch::new("b"));
        let ours = generate(&a.0).expect("certificate");
        let theirs = generate(&b.0).expect("certificate");
        let client_config = client_config(&ours.cert).expect("client config");
        let chain = CertificateDer::pem_file_iter(&theirs.cert)
            .expect("chain file")
            .collect::<Result<Vec<_>, _>>()
            .expect("chain parses");
        let key = PrivateKeyDer::from_pem_file(&theirs.key).expect("key parses");
        let server_config =
            rustls::ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("server config");
        let mut server = rustls::ServerConnection::new(Arc::new(server_config)).expect("server");
        let mut client = rustls::ClientConnection::new(client_config, server_name().expect("name"))
            .expect("client");
        let refused = handshake(&mut client, &mut server);
        assert!(
            matches!(refused, Err(rustls::Error::InvalidCertificate(_))),
            "an unknown certificate must be refused: {refused:?}"
        );
    }
}
