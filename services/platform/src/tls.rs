//! TLS on the gRPC listener and on calls to peers (`[tls]`), and callers named by their
//! client certificates.
//!
//! - With `tls.cert_file` and `tls.key_file` the listener speaks TLS only.
//! - With `tls.client_ca_file` it also asks for a client certificate signed by that CA. A
//!   certificate whose subject common name is an API key's id (`0123456789abcdef`, or
//!   `lk_0123456789abcdef`) acts as that key: its role, tenant and bindings, and it stops
//!   working when the key is revoked. A `Bearer` key sent over the same connection wins.
//! - Calls to `https://` peers check the peer against `tls.peer_ca_file` (or the web PKI
//!   roots) and, when `tls.require_client_cert` is on, present this process's certificate.

use std::path::Path;

use anyhow::Context as _;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

use crate::config::TlsConfig;

fn read(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("bad configuration: cannot read `{key}` {}", path.display()))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        anyhow::bail!(
            "bad configuration: `{key}` {} is not a PEM file",
            path.display()
        );
    }
    Ok(bytes)
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn identity(tls: &TlsConfig) -> anyhow::Result<Option<Identity>> {
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(
            read("tls.cert_file", cert)?,
            read("tls.key_file", key)?,
        ))),
        _ => Ok(None),
    }
}

/// The metrics listener's TLS, with `tls.metrics`; `None`: plain text.
pub fn metrics_acceptor(tls: &TlsConfig) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    if !tls.metrics {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) else {
        anyhow::bail!("bad configuration: `tls.metrics` needs `tls.cert_file` and `tls.key_file`");
    };
    let chain = CertificateDer::pem_slice_iter(&read("tls.cert_file", cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("bad configuration: `tls.cert_file`: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&read("tls.key_file", key)?)
        .map_err(|e| anyhow::anyhow!("bad configuration: `tls.key_file`: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| {
        anyhow::anyhow!(
            "bad configuration: `tls.cert_file` and `tls.key_file` do not make a TLS server for metrics: {e}"
        )
    })?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(
        config,
    ))))
}

/// The listener's TLS settings; `None` when `tls.cert_file` is unset (plain text).
pub fn server_config(tls: &TlsConfig) -> anyhow::Result<Option<ServerTlsConfig>> {
    let Some(identity) = identity(tls)? else {
        return Ok(None);
    };
    // A client that stalls its handshake is dropped, not kept waiting on a task.
    let mut config = ServerTlsConfig::new()
        .identity(identity)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = &tls.client_ca_file {
        config = config
            .client_ca_root(Certificate::from_pem(read("tls.client_ca_file", ca)?))
            .client_auth_optional(!tls.require_client_cert);
    }
    // Built once here so a key that does not match its certificate is named at start.
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| {
            anyhow::anyhow!(
                "bad configuration: `tls.cert_file`, `tls.key_file` and `tls.client_ca_file` do not make a TLS server: {}",
                error_chain(&e)
            )
        })?;
    Ok(Some(config))
}

/// TLS for calls to a peer at `https://{domain}…`.
pub fn client_config(tls: &TlsConfig, domain: &str) -> anyhow::Result<ClientTlsConfig> {
    let mut config = ClientTlsConfig::new().domain_name(domain);
    config = match &tls.peer_ca_file {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read("tls.peer_ca_file", ca)?)),
        None => config.with_webpki_roots(),
    };
    if let Some(identity) = client_identity(tls)? {
        config = config.identity(identity);
    }
    Ok(config)
}

/// What this process presents to peers as its client certificate: its own certificate,
/// when the deployment uses client certificates (`tls.client_ca_file`). That certificate must
/// then allow client authentication.
pub fn client_identity(tls: &TlsConfig) -> anyhow::Result<Option<Identity>> {
    if tls.client_ca_file.is_none() {
        return Ok(None);
    }
    identity(tls)
}

/// A channel to `url` for the command line: `https://` URLs are checked against the PEM CA
/// in `ca_file` (or the web PKI roots) and are presented `identity` as a client certificate.
pub async fn connect(
    url: &str,
    ca_file: Option<&Path>,
    identity: Option<Identity>,
) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("{url:?} is not a URL such as http://127.0.0.1:50051"))?;
    if endpoint.uri().scheme_str() == Some("https") {
        let mut tls = ClientTlsConfig::new();
        tls = match ca_file {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read("--ca", ca)?)),
            None => tls.with_webpki_roots(),
        };
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        endpoint = endpoint.tls_config(tls)?;
    } else if ca_file.is_some() || identity.is_some() {
        anyhow::bail!(
            "{url} is plain text: a CA or client certificate needs an https:// address, or the key would travel in clear"
        );
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// A client certificate from PEM files (`--cert`, `--key`).
pub fn identity_from(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    Ok(Identity::from_pem(
        read("--cert", cert)?,
        read("--key", key)?,
    ))
}

/// The API key id a verified client certificate (DER) names in its subject common name.
pub fn certified_key_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let id = cn
        .strip_prefix(crate::access::KEY_PREFIX)
        .unwrap_or(cn)
        .to_ascii_lowercase();
    crate::access::is_key_id(&id).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_garbled_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let garbled = dir.path().join("cert.pem");
        std::fs::write(&garbled, "not a certificate").unwrap();
        let tls = TlsConfig {
            cert_file: Some(garbled),
            key_file: Some(dir.path().join("missing.pem")),
            ..TlsConfig::default()
        };
        let err = server_config(&tls).unwrap_err().to_string();
        assert!(
            err.contains("`tls.cert_file`") && err.contains("not a PEM file"),
            "{err}"
        );
        let tls = TlsConfig {
            peer_ca_file: Some(dir.path().join("missing.pem")),
            ..TlsConfig::default()
        };
        let err = client_config(&tls, "identity").unwrap_err().to_string();
        assert!(err.contains("`tls.peer_ca_file`"), "{err}");
    }

    fn cert_for(common_name: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_common_name_names_a_key_id() {
        let id = "0123456789abcdef";
        assert_eq!(certified_key_id(&cert_for(id)).as_deref(), Some(id));
        assert_eq!(
            certified_key_id(&cert_for("lk_0123456789ABCDEF")).as_deref(),
            Some(id)
        );
        for other in ["till-7", "0123456789abcde", "lk_0123456789abcdef_00", ""] {
            assert_eq!(certified_key_id(&cert_for(other)), None, "{other:?}");
        }
        assert_eq!(certified_key_id(b"not a certificate"), None);
    }
}
