//! TLS as one more stream type of the drive loop.
//!
//! rustls's `Connection` is itself sans-IO: it takes ciphertext with `read_tls`, gives it with
//! `write_tls`, and holds plaintext in between. So a TLS connection is driven by the same
//! syscalls, readiness and budgets as a plain one, on every runtime — there is no async TLS
//! wrapper and no second copy of the loop. The ciphertext goes straight between the socket and
//! rustls's own buffers; the plaintext read leaves through the thread's read buffer as `Bytes`,
//! like a plain read.
//!
//! What the core sees: a client reached over `https` and the name it asked for (SNI). Bytes it
//! is told were sent are on the wire: plaintext taken by rustls is reported only once rustls
//! has written all its ciphertext, so a close that follows never cuts a response short.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ClientConnection, Connection, DigitallySignedStruct, ServerConfig};
use socket2::SockRef;

use crate::link::Outbox;
use crate::runtime::{Direction, Socket};
use crate::sys::ReadOutcome;

/// Why a TLS setting could not be used. Each names the file it came from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        source: io::Error,
    },
    /// A certificate file held no PEM certificate.
    #[error("{path}: expected PEM certificates (-----BEGIN CERTIFICATE-----), found none")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file held no PEM private key.
    #[error("{path}: expected a PEM private key (PKCS#8, PKCS#1 or SEC1), found none")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key does not belong to the certificate, or rustls refused it.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file (the key's, for a key that does not fit its certificate).
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// No certificate was given to a TLS listener.
    #[error("a TLS listener needs at least one certificate")]
    Empty,
}

/// The crypto provider every TLS setting uses: rustls's default (aws-lc-rs), named so that no
/// other crate in the process can change it by installing a process-wide default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate chain and its private key, as a listener serves them.
#[derive(Clone)]
pub struct TlsCertificate {
    key: Arc<CertifiedKey>,
}

impl fmt::Debug for TlsCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCertificate")
            .field("chain", &self.key.cert.len())
            .finish_non_exhaustive()
    }
}

impl TlsCertificate {
    /// Reads a PEM certificate chain (leaf first) and its PEM private key.
    ///
    /// # Errors
    ///
    /// A file that cannot be read, holds no certificate or key, or a key that does not fit the
    /// certificate; the error names the file.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Self::from_pem(&read(cert)?, &read(key)?, cert, key)
    }

    /// The same from PEM text already read; `cert_path` and `key_path` only name the sources
    /// in errors.
    ///
    /// # Errors
    ///
    /// As [`from_pem_files`](Self::from_pem_files).
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .filter_map(Result::ok)
            .collect();
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert_path.to_owned(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::NoKey {
            path: key_path.to_owned(),
        })?;
        let invalid = |e: rustls::Error| TlsError::Invalid {
            path: key_path.to_owned(),
            reason: e.to_string(),
        };
        let key = CertifiedKey::from_der(chain, key, &provider()).map_err(invalid)?;
        Ok(TlsCertificate { key: Arc::new(key) })
    }
}

/// Picks the certificate for a handshake: the first whose certificate is valid for the name
/// the client asked for (SNI), else the first one. A listener has a handful, so trying each is
/// cheaper than the handshake's signature by orders of magnitude, and needs no name table that
/// could disagree with the certificates.
#[derive(Debug)]
struct ByServerName {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ByServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let wanted = hello
            .server_name()
            .and_then(|n| ServerName::try_from(n).ok());
        if let Some(name) = wanted {
            for key in &self.keys {
                let Some(leaf) = key.cert.first() else {
                    continue;
                };
                let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
                    continue;
                };
                if cert.verify_is_valid_for_subject_name(&name).is_ok() {
                    return Some(Arc::clone(key));
                }
            }
        }
        self.keys.first().cloned()
    }
}

/// A TLS listener's settings: its certificates (chosen by SNI), ALPN `http/1.1`, TLS 1.2 and
/// 1.3 with rustls's default ciphers.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Serves `certificates`; the first is the default for a client that sends no name or one
    /// that none of them is valid for.
    ///
    /// # Errors
    ///
    /// [`TlsError::Empty`] without a certificate.
    pub fn new(certificates: Vec<TlsCertificate>) -> Result<Self, TlsError> {
        if certificates.is_empty() {
            return Err(TlsError::Empty);
        }
        let keys = certificates.into_iter().map(|c| c.key).collect();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid {
                path: PathBuf::new(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(ByServerName { keys }));
        // Never h2 until switchyard speaks it: a client offering only h2 is refused.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }
}

/// How switchyard verifies an upstream's certificate.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Verify {
    /// Against the Mozilla roots (webpki-roots) and any extra CA certificates: the default.
    #[default]
    Roots,
    /// Not at all (`insecure_skip_verify`): for a test bench only.
    Skip,
}

/// TLS settings for connections to one upstream group.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Verifies upstream certificates as `verify` says, trusting the certificates in
    /// `ca_files` (PEM) besides the Mozilla roots. Offers ALPN `http/1.1`.
    ///
    /// # Errors
    ///
    /// A CA file that cannot be read or holds no certificate.
    pub fn new(verify: Verify, ca_files: &[PathBuf]) -> Result<Self, TlsError> {
        let mut extra = Vec::new();
        for path in ca_files {
            let pem = std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.clone(),
                source,
            })?;
            let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
                .filter_map(Result::ok)
                .collect();
            if certs.is_empty() {
                return Err(TlsError::NoCertificate { path: path.clone() });
            }
            extra.extend(certs.into_iter().map(|c| (path.clone(), c)));
        }
        Self::with_ca(verify, extra)
    }

    /// The rustls configuration, for a client of one's own (`switchyard probe`) that should
    /// trust exactly what the proxy trusts.
    pub fn rustls_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.config)
    }

    /// The same with CA certificates already read (DER), each with the file it came from.
    ///
    /// # Errors
    ///
    /// A CA certificate rustls cannot use as a trust anchor.
    pub fn with_ca(
        verify: Verify,
        ca: Vec<(PathBuf, CertificateDer<'static>)>,
    ) -> Result<Self, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid {
                path: PathBuf::new(),
                reason: e.to_string(),
            })?;
        let mut config = match verify {
            Verify::Roots => {
                let mut roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                for (path, cert) in ca {
                    roots.add(cert).map_err(|e| TlsError::Invalid {
                        path,
                        reason: e.to_string(),
                    })?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Verify::Skip => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
                .with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }
}

/// `insecure_skip_verify`: any certificate is accepted, but the handshake's signatures are
/// still checked (so the session keys belong to whoever holds the certificate's key).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS settings a server uses, shared with whoever changes them: the listeners that
/// terminate TLS (by bound address) and the client settings for upstreams (by profile name, see
/// [`proxy_core::TlsTarget`]). Replacing an entry affects new connections only; open ones keep
/// the settings they started with. Cloning gives another handle to the same settings.
#[derive(Clone, Default)]
pub struct TlsSettings {
    inner: Arc<TlsInner>,
}

#[derive(Default)]
struct TlsInner {
    /// Set once any listener has TLS: plain-only servers never take the lock.
    any_listener: AtomicBool,
    listeners: RwLock<HashMap<SocketAddr, ServerTls>>,
    clients: RwLock<HashMap<Arc<str>, ClientTls>>,
    /// Bumped whenever client settings change: a pooled upstream connection made under an
    /// earlier generation (another CA, verification since turned on) is not reused.
    client_generation: AtomicU64,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let listeners = self.inner.listeners.read().map(|m| m.len()).unwrap_or(0);
        let clients = self.inner.clients.read().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("TlsSettings")
            .field("listeners", &listeners)
            .field("clients", &clients)
            .finish()
    }
}

impl TlsSettings {
    /// No TLS anywhere.
    pub fn new() -> Self {
        Self::default()
    }

    /// Terminates TLS on the listener bound to `local` with `tls` (replacing its settings, for
    /// connections accepted from now on).
    pub fn set_listener(&self, local: SocketAddr, tls: ServerTls) {
        let mut map = match self.inner.listeners.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.insert(local, tls);
        self.inner.any_listener.store(true, Ordering::Release);
    }

    /// The listener bound to `local` speaks plain TCP from now on.
    pub fn remove_listener(&self, local: SocketAddr) {
        if let Ok(mut map) = self.inner.listeners.write() {
            map.remove(&local);
        }
    }

    /// Uses `tls` for upstream peers whose [`proxy_core::TlsTarget`] names `profile`.
    pub fn set_client(&self, profile: &str, tls: ClientTls) {
        let mut map = match self.inner.clients.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.insert(Arc::from(profile), tls);
        self.inner.client_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets every upstream profile not in `keep` (after a reload).
    pub fn retain_clients(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut map) = self.inner.clients.write() {
            map.retain(|k, _| keep(k));
        }
        self.inner.client_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The current generation of the client settings.
    pub(crate) fn client_generation(&self) -> u64 {
        self.inner.client_generation.load(Ordering::Acquire)
    }

    pub(crate) fn listener(&self, local: Option<SocketAddr>) -> Option<Arc<ServerConfig>> {
        if !self.inner.any_listener.load(Ordering::Acquire) {
            return None;
        }
        let map = self.inner.listeners.read().ok()?;
        map.get(&local?).map(|t| Arc::clone(&t.config))
    }

    pub(crate) fn client(&self, profile: &str) -> Option<Arc<ClientConfig>> {
        let map = self.inner.clients.read().ok()?;
        map.get(profile).map(|t| Arc::clone(&t.config))
    }
}

/// A connection of the drive loop: plain TCP, or TLS over it.
pub(crate) enum Stream<S: Socket> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

impl<S: Socket> fmt::Debug for Stream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stream::Plain(_) => f.write_str("Plain"),
            Stream::Tls(_) => f.write_str("Tls"),
        }
    }
}

impl<S: Socket> Stream<S> {
    pub(crate) fn socket(&self) -> &S {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.socket,
        }
    }

    /// Whether a read may find bytes without the socket being readable: plaintext rustls
    /// decrypted earlier (with the handshake's last flight, say) and has not handed out.
    pub(crate) fn has_buffered_input(&self) -> bool {
        matches!(self, Stream::Tls(t) if t.buffered)
    }

    /// Whether ciphertext waits to be written even though no plaintext is queued (handshake
    /// messages, session tickets, a close_notify, records not yet on the wire).
    pub(crate) fn has_pending_output(&self) -> bool {
        matches!(self, Stream::Tls(t) if t.unreported > 0 || t.conn.wants_write() || t.shut_pending)
    }

    /// One read: a plain one, or TLS records read and decrypted.
    pub(crate) fn read(&mut self) -> io::Result<ReadOutcome> {
        match self {
            Stream::Plain(s) => crate::sys::read(s),
            Stream::Tls(t) => t.read(),
        }
    }

    /// Ends the write half: FIN, or close_notify then FIN once the records before it are out.
    pub(crate) fn shutdown_write(&mut self) {
        match self {
            Stream::Plain(s) => crate::sys::shutdown_write(s),
            Stream::Tls(t) => {
                t.conn.send_close_notify();
                t.shut_pending = true;
                // Best effort now; the flush finishes it if the socket is full.
                let _ = t.write_tls();
                t.finish_shutdown();
            }
        }
    }
}

/// What a TLS flush step did: plaintext taken from the queue (drop it from the queue),
/// plaintext now on the wire (tell the session), and whether the socket is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TlsFlush {
    pub(crate) taken: usize,
    pub(crate) sent: usize,
    pub(crate) full: bool,
}

/// What one read of ciphertext found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ciphertext {
    /// TCP EOF.
    Eof,
    /// Bytes; `short` when the socket gave less than asked (it is drained).
    Read { short: bool },
}

/// rustls over a socket of the loop.
pub(crate) struct TlsStream<S: Socket> {
    socket: S,
    conn: Connection,
    /// Plaintext taken by rustls whose records are not all written yet.
    unreported: usize,
    /// Decrypted plaintext is waiting in rustls.
    buffered: bool,
    /// A close_notify was queued; FIN follows once everything is written.
    shut_pending: bool,
    /// What was sent is cut short: no close_notify when dropped.
    aborted: bool,
    /// For an upstream connection, the generation of the client settings it was verified
    /// under (see [`TlsSettings`]).
    generation: u64,
}

/// The rustls send buffer: how much plaintext a TLS connection takes beyond what the socket
/// took. rustls's own default; a tunnel's backpressure comes on top of the session's bounds.
const TLS_SEND_BUFFER: usize = 64 * 1024;

impl<S: Socket> TlsStream<S> {
    /// A server-side connection on an accepted socket.
    pub(crate) fn accept(socket: S, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        Ok(Self::new(socket, Connection::Server(conn)))
    }

    /// A client-side connection to `name` on a connected socket.
    pub(crate) fn connect(socket: S, config: Arc<ClientConfig>, name: &str) -> io::Result<Self> {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        Ok(Self::new(socket, Connection::Client(conn)))
    }

    fn new(socket: S, mut conn: Connection) -> Self {
        conn.set_buffer_limit(Some(TLS_SEND_BUFFER));
        TlsStream {
            socket,
            conn,
            unreported: 0,
            buffered: false,
            shut_pending: false,
            aborted: false,
            generation: 0,
        }
    }

    /// Records the client-settings generation this upstream connection is made under.
    pub(crate) fn made_under(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// The name the client asked for (server side).
    pub(crate) fn sni(&self) -> Option<&str> {
        match &self.conn {
            Connection::Server(c) => c.server_name(),
            Connection::Client(_) => None,
        }
    }

    pub(crate) fn into_stream(self) -> Stream<S> {
        Stream::Tls(Box::new(self))
    }

    /// Advances the handshake: `Ready(Ok)` once it is complete and its last flight written,
    /// `Pending` with the waker registered for what it waits on.
    pub(crate) fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Each round writes what is pending and, while handshaking, reads what has come: a
        // blocked write never stops the read (a peer's byte must not stay unread while we wait
        // to write, or its readiness would wake us forever). A bounded number of rounds before
        // yielding to other tasks; the waker is registered only for what actually blocked.
        for _ in 0..32 {
            let mut progress = false;
            let mut write_blocked = false;
            let mut read_blocked = false;
            if self.conn.wants_write() {
                match self.write_tls() {
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => write_blocked = true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if !self.conn.is_handshaking() {
                if !self.conn.wants_write() {
                    return Poll::Ready(Ok(()));
                }
            } else {
                match self.read_tls() {
                    Ok(Ciphertext::Eof) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed during the TLS handshake",
                        )))
                    }
                    Ok(Ciphertext::Read { .. }) => progress = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => read_blocked = true,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if !progress {
                let mut ready = false;
                if write_blocked {
                    ready |= self.socket.poll_write_ready(cx).is_ready();
                }
                if read_blocked {
                    ready |= self.socket.poll_read_ready(cx).is_ready();
                }
                if !ready {
                    return Poll::Pending;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Reads ciphertext once and decrypts it; `WouldBlock` when the socket had nothing. A
    /// protocol error sends rustls's alert before it is returned.
    fn read_tls(&mut self) -> io::Result<Ciphertext> {
        let mut io = SocketIo::new(&self.socket);
        let n = loop {
            match self.conn.read_tls(&mut io) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        let short = io.short;
        match self.conn.process_new_packets() {
            Ok(state) => {
                self.buffered = state.plaintext_bytes_to_read() > 0 || state.peer_has_closed();
                Ok(if n == 0 {
                    Ciphertext::Eof
                } else {
                    Ciphertext::Read { short }
                })
            }
            Err(e) => {
                // Tell the peer why (rustls queued an alert), then give up.
                let _ = self.write_tls();
                Err(io::Error::new(io::ErrorKind::InvalidData, e))
            }
        }
    }

    /// Writes rustls's ciphertext once: `Ok(true)` when the socket took less than offered.
    fn write_tls(&mut self) -> io::Result<bool> {
        let mut io = SocketIo::new(&self.socket);
        match self.conn.write_tls(&mut io) {
            Ok(_) => Ok(io.short),
            Err(e) => Err(e),
        }
    }

    /// After a close_notify: FIN once nothing is left to write.
    fn finish_shutdown(&mut self) {
        if self.shut_pending && !self.conn.wants_write() {
            self.shut_pending = false;
            let _ = SockRef::from(&self.socket).shutdown(std::net::Shutdown::Write);
        }
    }

    /// One read for the loop: plaintext that rustls holds or decrypts from what the socket has,
    /// into the thread's read buffer, handed out without a further copy.
    fn read(&mut self) -> io::Result<ReadOutcome> {
        crate::sys::with_read_buffer(|buf| {
            let mut filled = 0;
            let mut drained = false;
            let mut eof = false;
            // Bounded: each round either fills the buffer, ends, or reads the socket once.
            for _ in 0..64 {
                if filled == buf.len() {
                    break;
                }
                match self.conn.reader().read(&mut buf[filled..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        filled += n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // A TCP close without close_notify. From a client, an end like any other
                    // (many never send one; HTTP framing or the WebSocket closing handshake tells
                    // a cut from a finish). From an upstream, a cut: a body that ends at the
                    // close must not be taken as complete when an attacker could have cut it.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        if matches!(self.conn, Connection::Client(_)) && filled == 0 {
                            return Err(e);
                        }
                        eof = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
                self.buffered = false;
                if drained {
                    break;
                }
                match self.read_tls() {
                    // The reader reports the end (clean or not) next round.
                    Ok(Ciphertext::Eof) => {}
                    Ok(Ciphertext::Read { short }) => drained = short,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => drained = true,
                    Err(e) => return Err(e),
                }
            }
            // A full buffer leaves plaintext behind; otherwise the flag says what the last step
            // saw (rustls decrypted more than was read, or had nothing left).
            if filled == buf.len() {
                self.buffered = true;
            }
            if filled > 0 {
                // After bytes, an end is reported by the next read (rustls remembers it).
                let drained = drained && !eof && !self.buffered;
                return Ok(Some((filled, drained)));
            }
            if eof {
                return Ok(None);
            }
            Err(io::ErrorKind::WouldBlock.into())
        })
    }

    /// Moves queued plaintext into rustls (as much as its buffer takes) and writes ciphertext
    /// once.
    pub(crate) fn flush(&mut self, queue: &Outbox) -> io::Result<TlsFlush> {
        let mut taken = 0;
        if !queue.is_empty() && !self.shut_pending {
            let mut slices = [IoSlice::new(&[]); 16];
            let mut n = 0;
            for (slot, bytes) in slices.iter_mut().zip(queue.iter()) {
                *slot = IoSlice::new(bytes);
                n += 1;
            }
            taken = self.conn.writer().write_vectored(&slices[..n])?;
            self.unreported += taken;
        }
        let mut full = false;
        if self.conn.wants_write() {
            match self.write_tls() {
                Ok(short) => full = short,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => full = true,
                // Retried by the next flush; what was taken stays taken (never handed to rustls
                // twice).
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The connection is broken: the caller fails the side and drops its queue.
                Err(e) => return Err(e),
            }
        }
        let mut sent = 0;
        if !self.conn.wants_write() {
            sent = std::mem::take(&mut self.unreported);
            self.finish_shutdown();
        } else if self.unreported > 0 {
            // The socket is full. Part of what was taken is out already: at most
            // `tls_bytes_to_write` plaintext bytes can still be inside, each record being its
            // plaintext and some overhead. Reporting the rest keeps a slow peer's stream moving
            // instead of stopping until rustls is empty.
            let state = self
                .conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            self.buffered |= state.plaintext_bytes_to_read() > 0 || state.peer_has_closed();
            sent = self.unreported.saturating_sub(state.tls_bytes_to_write());
            self.unreported -= sent;
        }
        Ok(TlsFlush { taken, sent, full })
    }
}

impl<S: Socket> Drop for TlsStream<S> {
    fn drop(&mut self) {
        // Closing without a word would look like a truncation to a strict peer: send the
        // close_notify if the socket takes it at once (it is never waited for). Once one was
        // sent (a half-close), rustls queues nothing more and nothing is written. A cut-short
        // stream ends without one, so the peer's TLS reports the truncation.
        if !self.conn.is_handshaking() && !self.aborted {
            self.conn.send_close_notify();
            if self.conn.wants_write() {
                let _ = self.write_tls();
            }
        }
    }
}

/// The socket as rustls reads and writes it: the loop's syscalls, through the runtime's
/// readiness, with the same short-read and short-write rules as plain reads and writes.
struct SocketIo<'a, S> {
    socket: &'a S,
    short: bool,
}

impl<'a, S: Socket> SocketIo<'a, S> {
    fn new(socket: &'a S) -> Self {
        SocketIo {
            socket,
            short: false,
        }
    }
}

impl<S: Socket> Read for SocketIo<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len();
        let mut short = None;
        let result = self.socket.try_io(Direction::Read, || {
            let n = (&*SockRef::from(self.socket)).read(buf)?;
            if n > 0 && n < want {
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (result, short) {
            (_, Some(n)) => {
                self.short = true;
                Ok(n)
            }
            (r, None) => r,
        }
    }
}

impl<S: Socket> Write for SocketIo<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let crate::sys::WriteOutcome::Wrote { n, full } = crate::sys::write(self.socket, slices)?;
        self.short |= full;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// The loop's readiness and syscalls address the socket under the TLS (the pool watches it,
// connects and probes go through it): a stream is a `Socket` of its runtime.
#[cfg(unix)]
impl<S: Socket> std::os::fd::AsFd for Stream<S> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket().as_fd()
    }
}

#[cfg(windows)]
impl<S: Socket> std::os::windows::io::AsSocket for Stream<S> {
    fn as_socket(&self) -> std::os::windows::io::BorrowedSocket<'_> {
        self.socket().as_socket()
    }
}

impl<S: Socket> crate::link::Abort for Stream<S> {
    fn abort(&mut self) {
        if let Stream::Tls(t) = self {
            t.aborted = true;
        }
    }
}

impl<S: Socket> Socket for Stream<S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.socket().poll_read_ready(cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.socket().poll_write_ready(cx)
    }

    fn try_io<T>(&self, dir: Direction, op: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.socket().try_io(dir, op)
    }
}

impl<S: Socket> Stream<S> {
    /// The pool's liveness probe: an idle connection has nothing to say, in plaintext held by
    /// rustls or on the socket.
    pub(crate) fn idle_and_open(&self) -> bool {
        !self.has_buffered_input() && crate::sys::idle_and_open(self.socket())
    }

    /// Whether a pooled connection may serve a new request under `tls`: a TLS one only if it
    /// was verified under the client settings in force now.
    pub(crate) fn reusable_under(&self, tls: &TlsSettings) -> bool {
        match self {
            Stream::Plain(_) => true,
            Stream::Tls(t) => t.generation == tls.client_generation(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::net::{TcpListener, TcpStream};
    use std::task::Waker;

    /// A non-blocking std socket that is always "ready": every syscall is simply tried.
    struct Plain(TcpStream);

    impl std::os::fd::AsFd for Plain {
        fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
            self.0.as_fd()
        }
    }

    impl Socket for Plain {
        fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<()> {
            Poll::Ready(())
        }
        fn poll_write_ready(&self, _: &mut Context<'_>) -> Poll<()> {
            Poll::Ready(())
        }
        fn try_io<T>(&self, _: Direction, op: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
            op()
        }
    }

    /// A connected server/client pair over loopback, handshake done.
    fn pair() -> (TlsStream<Plain>, TlsStream<Plain>) {
        let key = rcgen_free_certificate();
        let server = ServerTls::new(vec![key.0]).expect("server settings");
        let client = ClientTls::with_ca(Verify::Roots, vec![(PathBuf::from("ca"), key.1)])
            .expect("client settings");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (b, _) = listener.accept().expect("accept");
        for s in [&a, &b] {
            s.set_nonblocking(true).expect("non-blocking");
            s.set_nodelay(true).expect("no Nagle");
        }
        let mut c = TlsStream::connect(Plain(a), client.config, "flush.test").expect("client");
        let mut s = TlsStream::accept(Plain(b), server.config).expect("server");
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..1000 {
            let done_c = c.poll_handshake(&mut cx).is_ready();
            let done_s = s.poll_handshake(&mut cx).is_ready();
            if done_c && done_s && !c.conn.is_handshaking() && !s.conn.is_handshaking() {
                return (s, c);
            }
        }
        panic!("handshake did not complete");
    }

    /// A self-signed certificate for `flush.test`, made now.
    fn rcgen_free_certificate() -> (TlsCertificate, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["flush.test".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let pem = cert.pem();
        let c = TlsCertificate::from_pem(
            pem.as_bytes(),
            key.serialize_pem().as_bytes(),
            "c".as_ref(),
            "k".as_ref(),
        )
        .expect("certificate loads");
        (c, cert.der().clone())
    }

    /// Plaintext taken by rustls is reported as sent only once all its records are written: a
    /// close that follows a report never cuts records still waiting in the TLS layer.
    #[test]
    fn flush_reports_sends_only_when_the_records_are_on_the_wire() {
        let (mut server, mut client) = pair();
        let _ = SockRef::from(&server.socket.0).set_send_buffer_size(4096);
        let mut queue = Outbox::default();
        // More than the kernel holds between the two sockets (the client's receive buffer
        // starts near 128 KiB), so the server's socket does fill.
        let total = 4 << 20;
        queue.push(Bytes::from(vec![7u8; total]));
        let (mut taken, mut sent) = (0, 0);
        // The client does not read: the socket fills, rustls holds records, nothing is "sent"
        // that is still inside the TLS layer.
        for _ in 0..1000 {
            let step = server.flush(&queue).expect("flush");
            queue.consume(step.taken);
            taken += step.taken;
            sent += step.sent;
            if step.full && step.taken == 0 {
                break;
            }
        }
        assert!(taken > 0, "rustls took plaintext");
        assert!(server.conn.wants_write(), "records wait in the TLS layer");
        let inside = server
            .conn
            .process_new_packets()
            .expect("state")
            .tls_bytes_to_write();
        assert!(server.unreported > 0 && sent + server.unreported == taken);
        assert!(
            server.unreported <= inside,
            "never more reported than is out: {} unreported, {inside} bytes of records inside",
            server.unreported
        );
        // The client reads everything; the server writes the rest and reports exactly it all.
        let mut got = 0;
        for _ in 0..1_000_000 {
            match client.read() {
                Ok(ReadOutcome::Data { bytes, .. }) => {
                    assert!(bytes.iter().all(|b| *b == 7));
                    got += bytes.len();
                }
                Ok(ReadOutcome::Eof) => panic!("early end"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("client read: {e}"),
            }
            let step = server.flush(&queue).expect("flush");
            queue.consume(step.taken);
            taken += step.taken;
            sent += step.sent;
            if got == total {
                break;
            }
        }
        assert_eq!(got, total, "every byte arrived");
        assert_eq!(taken, total);
        assert_eq!(sent, total, "and every byte was reported sent, once");
        assert!(!server.conn.wants_write() && server.unreported == 0);
    }

    /// A read that fills the thread's buffer leaves the rest in rustls and says so, so the loop
    /// reads again without waiting for the socket (which may have nothing more to say).
    #[test]
    fn plaintext_left_in_rustls_is_read_without_the_socket() {
        let (mut server, mut client) = pair();
        let total = 3 * crate::sys::READ_CHUNK;
        let mut queue = Outbox::default();
        queue.push(Bytes::from(vec![1u8; total]));
        for _ in 0..10_000 {
            let step = client.flush(&queue).expect("client writes");
            queue.consume(step.taken);
            if queue.is_empty() && !client.conn.wants_write() {
                break;
            }
        }
        assert!(queue.is_empty(), "the client wrote it all");
        let mut got = 0;
        let mut saw_buffered = false;
        for _ in 0..10_000 {
            match server.read() {
                Ok(ReadOutcome::Data { bytes, drained }) => {
                    got += bytes.len();
                    if server.buffered {
                        saw_buffered = true;
                        assert!(!drained, "plaintext inside rustls is not a drained socket");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => panic!("server read: {other:?}"),
            }
            if got == total {
                break;
            }
        }
        assert_eq!(got, total);
        assert!(
            saw_buffered,
            "some read stopped with plaintext still in rustls"
        );
    }
}
