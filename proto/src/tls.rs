//! The client side of TLS (rustls through tonic), shared by worker daemons and the `coordinator
//! status|…` commands: an `https://` coordinator URL is verified against the CA of `--tls-ca`
//! (`KORMLM_TLS_CA`), and with mutual TLS the client presents `--tls-cert`/`--tls-key`
//! (`KORMLM_TLS_CERT`/`KORMLM_TLS_KEY`). A plain `http://` URL uses no TLS.

use clap::Args;
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The environment variable naming the CA file that verifies the coordinator.
pub const TLS_CA_ENV: &str = "KORMLM_TLS_CA";
/// The environment variables of a client certificate and key (mutual TLS).
pub const TLS_CERT_ENV: &str = "KORMLM_TLS_CERT";
pub const TLS_KEY_ENV: &str = "KORMLM_TLS_KEY";

/// How a client reaches the coordinator over TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct ClientTlsArgs {
    /// CA certificate (PEM) that verifies the coordinator's certificate; needed for an https:// URL.
    #[arg(long = "tls-ca", env = "KORMLM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a coordinator that requires mutual TLS (--tls-client-ca).
    #[arg(long = "tls-cert", env = "KORMLM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long = "tls-key", env = "KORMLM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: cannot read it: {error}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("coordinator URL {url}: {message}")]
    Url { url: String, message: String },
}

/// Reads a PEM file named by `flag`.
pub fn read_pem(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        error,
    })
}

/// `url` with a scheme (`http://` when it has none).
pub fn normalise_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// The endpoint of the coordinator at `url`: TLS for `https://` (which then needs a CA), none
/// for `http://` (a CA given with an `http://` URL is refused, so that TLS is never silently off).
pub fn endpoint(url: &str, tls: &ClientTlsArgs) -> Result<Endpoint, TlsError> {
    let url = normalise_url(url);
    let bad = |message: String| TlsError::Url {
        url: url.clone(),
        message,
    };
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| bad(e.to_string()))?;
    let https = url.starts_with("https://");
    match (&tls.tls_ca, https) {
        (None, false) => {
            if tls.tls_cert.is_some() {
                return Err(bad(
                    "--tls-cert/KORMLM_TLS_CERT is given but the URL is plain http://; use https://".into(),
                ));
            }
            Ok(endpoint)
        }
        (Some(ca), false) => Err(bad(format!(
            "--tls-ca/KORMLM_TLS_CA ({}) is given but the URL is plain http://; use https:// (the token would \
             otherwise travel in clear text)",
            ca.display()
        ))),
        (None, true) => Err(bad(
            "an https:// URL needs the CA that signed the coordinator's certificate: --tls-ca FILE or KORMLM_TLS_CA"
                .into(),
        )),
        (Some(ca), true) => {
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("--tls-ca", ca)?));
            if let (Some(cert), Some(key)) = (&tls.tls_cert, &tls.tls_key) {
                config = config.identity(Identity::from_pem(
                    read_pem("--tls-cert", cert)?,
                    read_pem("--tls-key", key)?,
                ));
            }
            endpoint.tls_config(config).map_err(|e| bad(format!("TLS set-up: {e}")))
        }
    }
}

/// An error with its causes (a transport error's own text is only "transport error").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

/// Whether a failed call failed to reach the coordinator (the connection, not the coordinator's
/// answer): Unavailable, Unknown ("transport error"), Cancelled, and the Internal "h2 protocol
/// error" of a plaintext client reading a TLS server's bytes as HTTP/2 frames.
pub fn is_connection_failure(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) || (status.code() == tonic::Code::Internal && status.message().contains("h2 protocol error"))
}

/// A hint for a failed connection, from the URL's scheme (a plaintext client to a TLS
/// coordinator, or the reverse, fails in ways that do not name TLS).
pub fn connect_hint(url: &str) -> &'static str {
    if normalise_url(url).starts_with("https://") {
        "a TLS connection that closes at once: if the coordinator requires client certificates (mutual TLS, \
         --tls-client-ca), give --tls-cert/--tls-key signed by its CA; if the certificate is not trusted, check \
         --tls-ca/KORMLM_TLS_CA; if the coordinator serves plain http, use an http:// URL"
    } else {
        "if the coordinator serves TLS (--tls-cert), use an https:// URL with --tls-ca/KORMLM_TLS_CA"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_told_from_the_coordinators_answers() {
        for status in [
            tonic::Status::unavailable("tcp connect error"),
            tonic::Status::unknown("transport error"),
            tonic::Status::internal(
                "h2 protocol error: http2 error: connection error detected: frame with invalid size",
            ),
        ] {
            assert!(is_connection_failure(&status), "{status:?}");
        }
        for status in [
            tonic::Status::internal("the state store failed"),
            tonic::Status::unauthenticated("missing token"),
            tonic::Status::failed_precondition("rank 1 is not registered"),
        ] {
            assert!(!is_connection_failure(&status), "{status:?}");
        }
    }

    #[test]
    fn tls_is_never_silently_off_or_unverified() {
        let ca = ClientTlsArgs {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert!(endpoint("127.0.0.1:1", &ClientTlsArgs::default()).is_ok());
        let plain_with_ca = endpoint("http://127.0.0.1:1", &ca).unwrap_err().to_string();
        assert!(plain_with_ca.contains("use https://"), "{plain_with_ca}");
        let https_without_ca = endpoint("https://127.0.0.1:1", &ClientTlsArgs::default())
            .unwrap_err()
            .to_string();
        assert!(https_without_ca.contains("--tls-ca"), "{https_without_ca}");
        let missing = endpoint("https://127.0.0.1:1", &ca).unwrap_err().to_string();
        assert!(
            missing.contains("--tls-ca /nonexistent/ca.pem: cannot read it"),
            "{missing}"
        );
    }
}
