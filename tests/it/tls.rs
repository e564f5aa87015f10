//! TLS against an image server with a private CA, on 127.0.0.1: verification is on by default,
//! a CA file makes it trusted, and the explicit insecure switch accepts it; never downgrade.

use std::sync::Arc;

use crate::support::builder;
use crate::support::origin::{Origin, Route, volume};
use imgcache::{ErrorKind, ManualClock};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

struct TlsOrigin {
    url: String,
    ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An https origin whose certificate (for 127.0.0.1) is signed by a fresh private CA; every
/// request gets the raw HTTP `response`.
async fn tls_origin(path: &str, response: Vec<u8>) -> TlsOrigin {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "imgcache test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/{path}", listener.local_addr().unwrap());
    let response = Arc::new(response);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, response) = (acceptor.clone(), Arc::clone(&response));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = [0u8; 4096];
                let _ = tls.read(&mut head).await;
                let _ = tls.write_all(&response).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    TlsOrigin {
        url,
        ca_pem: ca.pem(),
        task,
    }
}

fn ok_response(body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_rejected_by_default_and_trusted_through_a_ca_file() {
    let body = volume(1, 200_000);
    let origin = tls_origin("secure.nii.gz", ok_response(&body)).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());

    let strict = builder(&dir.path().join("strict"), &clock)
        .network(|n| n.retries(0))
        .build()
        .await
        .unwrap();
    let err = strict.get(&origin.url).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Network, "{err}");

    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &origin.ca_pem).unwrap();
    let trusting = builder(&dir.path().join("ca"), &clock)
        .network(|n| n.ca_certificate(&ca_file))
        .build()
        .await
        .unwrap();
    let file = trusting.get(&origin.url).await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);

    let insecure = builder(&dir.path().join("insecure"), &clock)
        .network(|n| n.danger_accept_invalid_certs(true))
        .build()
        .await
        .unwrap();
    let file = insecure.get(&origin.url).await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_from_https_to_http_is_refused() {
    // An https origin that redirects to plain http on loopback.
    let plain = Origin::start().await;
    plain.route("x.nii.gz", Route::ok(volume(2, 1000)));
    let redirect = format!(
        "HTTP/1.1 302 Found\r\nLocation: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        plain.url("x.nii.gz")
    );
    let origin = tls_origin("x.nii.gz", redirect.into_bytes()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &origin.ca_pem).unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .network(|n| n.ca_certificate(&ca_file))
        .build()
        .await
        .unwrap();
    let err = cache.get(&origin.url).await.unwrap_err();
    assert!(err.to_string().contains("redirect"), "{err}");
    assert_eq!(plain.hits("x.nii.gz"), 0, "the http URL was never fetched");
}
