//! Trust for every outbound TLS connection, configured once.
//!
//! Every client hypertool opens — upstreams, OTLP, Langfuse, Alertmanager, MCP over HTTP,
//! PostgreSQL, Redis — trusts the webpki (Mozilla) roots plus the CA certificates of `[tls]
//! ca_file`, unless its own section names a `ca_file` of its own, which then replaces the shared
//! one for that client. [`Trust`] is that set of extra certificates, already checked when the
//! configuration was loaded; this module turns it into each library's TLS configuration.
//!
//! PostgreSQL follows libpq's `sslmode` and `sslrootcert` as users write them in their URLs
//! ([`PgConnector`]): tokio-postgres itself knows only `disable`, `prefer` and `require`, so the
//! verifying modes are read here and carried out by the rustls verifier they choose.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// The CA certificates a client trusts beside the webpki roots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trust {
    pub extra: Vec<CertificateDer<'static>>,
}

impl Trust {
    pub fn new(extra: Vec<CertificateDer<'static>>) -> Trust {
        Trust { extra }
    }

    /// This client's own certificates when it has any, else the shared ones.
    pub fn or(&self, shared: &Trust) -> Trust {
        if self.extra.is_empty() {
            shared.clone()
        } else {
            self.clone()
        }
    }

    /// The webpki roots and the extra certificates.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for cert in &self.extra {
            // Checked when the configuration was loaded.
            let _ = roots.add(cert.clone());
        }
        roots
    }

    /// A rustls client configuration verifying servers against [`Trust::root_store`].
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        Ok(builder()?
            .with_root_certificates(self.root_store())
            .with_no_client_auth())
    }

    /// `builder` trusting the extra certificates too (reqwest keeps its webpki roots).
    pub fn reqwest(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        self.extra
            .iter()
            .filter_map(|c| reqwest::Certificate::from_der(c).ok())
            .fold(builder, |b, cert| b.add_root_certificate(cert))
    }

    /// Redis's form of the trust: the extra certificates as one PEM bundle (the redis crate adds
    /// them to the system's roots).
    pub fn pem(&self) -> Option<Vec<u8>> {
        use base64::Engine;
        if self.extra.is_empty() {
            return None;
        }
        let mut out = String::new();
        for cert in &self.extra {
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
            for line in b64.as_bytes().chunks(64) {
                out.push_str(&String::from_utf8_lossy(line));
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        Some(out.into_bytes())
    }
}

fn builder() -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, String> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("no TLS protocol version available ({e})"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The CA certificates of a PEM file, each checked to be usable as a trust anchor.
pub fn read_ca_file(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(bytes) {
        let cert = cert.map_err(|e| format!("not a PEM certificate file ({e})"))?;
        let mut check = rustls::RootCertStore::empty();
        check
            .add(cert.clone())
            .map_err(|e| format!("a certificate in it cannot be a trust anchor ({e})"))?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err("it holds no `-----BEGIN CERTIFICATE-----` block".into());
    }
    Ok(certs)
}

/// libpq's `sslmode`, all five of the modes users write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, unverified (libpq's default).
    Prefer,
    /// TLS, unverified — verified as `verify-ca` when `sslrootcert` names a file (as libpq does).
    Require,
    /// TLS, the certificate signed by a trusted CA (any host name).
    VerifyCa,
    /// TLS, the certificate signed by a trusted CA and naming the host.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not one hypertool knows; write disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// How to reach one PostgreSQL: its configuration and the TLS its `sslmode` asks for.
#[derive(Clone)]
pub struct PgConnector {
    pub config: postgres::Config,
    pub mode: SslMode,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl std::fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnector")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl PgConnector {
    /// Reads `url` (`postgres://…?sslmode=verify-full&sslrootcert=ca.pem`, or libpq's
    /// `key=value` form): `sslrootcert` relative to `base` (the configuration's directory),
    /// `sslrootcert=system` for the webpki roots alone; without it, the verifying modes trust
    /// `trust` (the ledger's `ca_file`, else `[tls] ca_file`) beside the webpki roots.
    pub fn new(
        url: &str,
        trust: &Trust,
        base: Option<&Path>,
        application: &str,
        connect_timeout: Duration,
    ) -> Result<PgConnector, String> {
        let (rest, mode, root) = split_tls_params(url)?;
        let mode = match mode.as_deref() {
            Some(m) => SslMode::parse(m)?,
            None => SslMode::Prefer,
        };
        let mut config: postgres::Config = rest.parse().map_err(|e| {
            format!("not a PostgreSQL URL ({e}); write postgres://USER:PASSWORD@HOST:PORT/DATABASE")
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        config.application_name(application);
        let roots = match root.as_deref() {
            None => None,
            Some("system") => Some(Trust::default()),
            Some(file) => {
                let path = match base {
                    Some(b) => b.join(file),
                    None => Path::new(file).to_path_buf(),
                };
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("sslrootcert {}: cannot be read ({e})", path.display()))?;
                let certs = read_ca_file(&bytes)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                // libpq trusts the file alone; the webpki roots are in `Trust` regardless, but a
                // private CA's servers do not chain to them.
                Some(Trust::new(certs))
            }
        };
        // libpq: `require` with a root certificate file verifies as `verify-ca`.
        let mode = match (mode, &roots) {
            (SslMode::Require, Some(r)) if !r.extra.is_empty() => SslMode::VerifyCa,
            (m, _) => m,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            SslMode::Disable => {
                config.ssl_mode(postgres::config::SslMode::Disable);
                return Ok(PgConnector {
                    config,
                    mode,
                    tls: None,
                });
            }
            SslMode::Prefer | SslMode::Require => Arc::new(AnyCertificate(provider())),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let trust = roots.unwrap_or_else(|| trust.clone());
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(trust.root_store()),
                    provider(),
                )
                .build()
                .map_err(|e| format!("the trusted certificates cannot verify ({e})"))?;
                if mode == SslMode::VerifyCa {
                    Arc::new(AnyName(webpki))
                } else {
                    webpki
                }
            }
        };
        config.ssl_mode(match mode {
            SslMode::Prefer => postgres::config::SslMode::Prefer,
            _ => postgres::config::SslMode::Require,
        });
        let tls = builder()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(PgConnector {
            config,
            mode,
            tls: Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls)),
        })
    }

    /// A connection (blocking: the `postgres` client).
    pub fn connect(&self) -> Result<postgres::Client, postgres::Error> {
        match &self.tls {
            None => self.config.connect(postgres::NoTls),
            Some(tls) => self.config.connect(tls.clone()),
        }
    }
}

/// `url` without its `sslmode` and `sslrootcert` parameters, and their values (percent-decoded).
fn split_tls_params(url: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let (mut mode, mut root) = (None, None);
    let decode = |v: &str| {
        percent_encoding::percent_decode_str(v)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| format!("`{v}` is not UTF-8 once decoded"))
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((head, query)) = url.split_once('?') else {
            return Ok((url.to_string(), None, None));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", v)) => mode = Some(decode(v)?),
                Some(("sslrootcert", v)) => root = Some(decode(v)?),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            head.to_string()
        } else {
            format!("{head}?{}", kept.join("&"))
        };
        return Ok((rest, mode, root));
    }
    // libpq's `key=value key=value` form (values without spaces for these two keys).
    let mut kept = Vec::new();
    for token in url.split_whitespace() {
        match token.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.trim_matches('\'').to_string()),
            Some(("sslrootcert", v)) => root = Some(v.trim_matches('\'').to_string()),
            _ => kept.push(token),
        }
    }
    Ok((kept.join(" "), mode, root))
}

/// `prefer` and `require`: encrypted, the certificate not checked (libpq's meaning of them); the
/// handshake's signatures still are.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain to a trusted CA is checked, the host name is not.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_parameters_are_taken_out_of_both_url_forms() {
        let (rest, mode, root) = split_tls_params(
            "postgres://u:p@db:5432/h?sslmode=verify-full&connect_timeout=3&sslrootcert=ca%20x.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/h?connect_timeout=3");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("ca x.pem"));
        let (rest, mode, root) =
            split_tls_params("host=db user=u sslmode=require dbname=h").unwrap();
        assert_eq!(rest, "host=db user=u dbname=h");
        assert_eq!(mode.as_deref(), Some("require"));
        assert_eq!(root, None);
        assert_eq!(
            split_tls_params("postgres://db/h").unwrap(),
            ("postgres://db/h".to_string(), None, None)
        );
    }

    #[test]
    fn each_sslmode_chooses_its_tls() {
        let at = |url: &str| {
            PgConnector::new(url, &Trust::default(), None, "t", Duration::from_secs(1))
                .map(|c| c.mode)
        };
        assert_eq!(at("postgres://db/h"), Ok(SslMode::Prefer));
        assert_eq!(at("postgres://db/h?sslmode=disable"), Ok(SslMode::Disable));
        assert_eq!(
            at("postgres://db/h?sslmode=verify-ca"),
            Ok(SslMode::VerifyCa)
        );
        assert_eq!(
            at("postgres://db/h?sslmode=verify-full&sslrootcert=system"),
            Ok(SslMode::VerifyFull)
        );
        let err = at("postgres://db/h?sslmode=allow").unwrap_err();
        assert!(err.contains("sslmode=allow is not one"), "{err}");
        let err = at("postgres://db/h?sslmode=require&sslrootcert=/no/such.pem").unwrap_err();
        assert!(
            err.starts_with("sslrootcert /no/such.pem: cannot be read"),
            "{err}"
        );
    }
}
