//! Throw-away certificates for TLS tests: a CA, a server certificate for 127.0.0.1/localhost
//! and a client certificate, written as PEM files in a temp directory.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};

/// PEM files of one CA and the certificates it signed.
pub struct TestPki {
    /// The directory holding the files.
    pub dir: tempfile::TempDir,
    /// CA certificate.
    pub ca: PathBuf,
    /// Server certificate (SAN 127.0.0.1, ::1, localhost).
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate (CN `edgeward`).
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

impl TestPki {
    /// Generates a fresh CA with a server and a client certificate.
    pub fn generate(ca_name: &str) -> TestPki {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write pem");
            path
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, ca_name);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key"))
            .expect("ca cert");

        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        server
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        server
            .subject_alt_names
            .push(SanType::IpAddress("::1".parse().unwrap()));
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server_key = KeyPair::generate().expect("key");
        let server_cert = server.signed_by(&server_key, &ca).expect("server cert");

        let mut client = CertificateParams::new(Vec::<String>::new()).expect("params");
        client
            .distinguished_name
            .push(DnType::CommonName, "edgeward");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().expect("key");
        let client_cert = client.signed_by(&client_key, &ca).expect("client cert");

        TestPki {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert.pem()),
            server_key: write("server-key.pem", &server_key.serialize_pem()),
            client_cert: write("client.pem", &client_cert.pem()),
            client_key: write("client-key.pem", &client_key.serialize_pem()),
            dir,
        }
    }
}
