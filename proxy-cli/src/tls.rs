//! The configured TLS, read from its files into the proxy's [`proxy_tokio::TlsSettings`]: at
//! start, on SIGHUP (new connections get the new certificates, open ones keep theirs; a file
//! that does not load refuses the reload and the old certificates stay), and by `check-config`.

use std::net::SocketAddr;

use proxy_tokio::{ClientTls, ServerTls, TlsCertificate, TlsSettings, Verify};

use crate::settings::{Settings, SettingsError};

/// The TLS a configuration needs, loaded and checked.
#[derive(Debug)]
pub struct Loaded {
    /// Bound listener address → its certificates.
    listeners: Vec<(SocketAddr, ServerTls)>,
    /// Bound listener addresses that speak plain TCP.
    plain: Vec<SocketAddr>,
    clients: Vec<(String, ClientTls)>,
}

/// Reads every certificate, key and CA file `settings` names. `bound` pairs each configured
/// listen address with the address it is bound to (they differ for port 0).
///
/// # Errors
///
/// A file that cannot be read or used, named with the setting that gave it.
pub fn load(
    settings: &Settings,
    bound: &[(SocketAddr, SocketAddr)],
) -> Result<Loaded, SettingsError> {
    let mut certs = Vec::new();
    for (i, c) in settings.tls.iter().enumerate() {
        let cert = TlsCertificate::from_pem_files(&c.cert, &c.key)
            .map_err(|e| SettingsError::new(format!("tls[{i}]: {e}")))?;
        certs.push((cert, &c.listen));
    }
    let mut listeners = Vec::new();
    let mut plain = Vec::new();
    for (configured, bound) in bound {
        let mine: Vec<TlsCertificate> = certs
            .iter()
            .filter(|(_, on)| on.is_empty() || on.contains(configured))
            .map(|(c, _)| c.clone())
            .collect();
        if mine.is_empty() {
            plain.push(*bound);
            continue;
        }
        let tls = ServerTls::new(mine)
            .map_err(|e| SettingsError::new(format!("tls on {configured}: {e}")))?;
        listeners.push((*bound, tls));
    }
    let mut clients = Vec::new();
    for (group, t) in &settings.upstream_tls {
        let field = if group == proxy_core::DEFAULT_GROUP {
            "upstream".to_owned()
        } else {
            format!("upstream.{group}")
        };
        let verify = if t.insecure_skip_verify {
            Verify::Skip
        } else {
            Verify::Roots
        };
        let client = ClientTls::new(verify, &t.ca)
            .map_err(|e| SettingsError::new(format!("{field}.ca: {e}")))?;
        clients.push((group.clone(), client));
    }
    Ok(Loaded {
        listeners,
        plain,
        clients,
    })
}

impl Loaded {
    /// Puts these settings in force for new connections.
    pub fn apply(self, tls: &TlsSettings) {
        for addr in self.plain {
            tls.remove_listener(addr);
        }
        for (addr, server) in self.listeners {
            tls.set_listener(addr, server);
        }
        let names: Vec<String> = self.clients.iter().map(|(n, _)| n.clone()).collect();
        for (name, client) in self.clients {
            tls.set_client(&name, client);
        }
        tls.retain_clients(|n| names.iter().any(|k| k == n));
    }

    /// The bound addresses that terminate TLS.
    pub fn tls_listeners(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.listeners.iter().map(|(a, _)| *a)
    }
}

/// Warns, once per load, about every group that skips certificate verification.
pub fn warn_insecure(settings: &Settings) {
    for (group, t) in &settings.upstream_tls {
        if t.insecure_skip_verify {
            tracing::warn!(
                group = %group,
                "insecure_skip_verify: upstream certificates of this group are NOT verified; anyone on the path can impersonate its servers"
            );
        }
    }
}
