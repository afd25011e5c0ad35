//! The pool's certificate authority and the certificates it signs.
//!
//! The CA key is *derived* from the pool key (ADR 0013): every node holding
//! the pool key computes the same Ed25519 CA key for a generation, so a node
//! makes its own certificate at start, before it can reach anyone, and no CA
//! key is ever sent or stored. Rotation moves to the next generation.
//!
//! Every certificate names its holder in the subject: `CN` the name (a node
//! id for nodes), `O` the role (`nodeos:admin`...), `OU` the tenant
//! (`tenant:NAME`) when there is one. Node certificates carry the DNS name
//! [`NODE_DNS_NAME`] and the node's addresses, so a client verifies any node
//! of the pool whatever address it dialled (a port forward, a NAT).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use nodeos_types::auth::PoolKey;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519, SanType, SerialNumber,
};
use rustls_pki_types::PrivatePkcs8KeyDer;

use crate::identity::{Role, Subject};

/// The DNS name in every node certificate; what clients verify nodes against.
pub const NODE_DNS_NAME: &str = "nodeos";
/// How long a node certificate is valid; a node renews it well before.
pub const NODE_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest credential the pool issues to an operator.
pub const MAX_CLIENT_TTL: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Certificates start this long before they are made, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(300);

const DERIVE_CONTEXT: &str = "nodeos pool CA v1 2026-12 ed25519 seed";
/// PKCS#8 v1 header of an Ed25519 private key (RFC 8410), followed by the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot make a certificate: {0}")]
    Make(#[from] rcgen::Error),
    #[error("this pool key holds no CA seed (a key handed to a VM worker signs nothing)")]
    NoSeed,
    #[error("the certificate request is not valid: {0}")]
    Request(String),
    #[error("a credential is valid for 1 minute to {} days, not {asked_s} s", MAX_CLIENT_TTL.as_secs() / 86400)]
    Ttl { asked_s: u64 },
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Credential {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// One generation of the pool CA.
pub struct PoolCa {
    generation: u32,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for PoolCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCa").field("generation", &self.generation).finish_non_exhaustive()
    }
}

impl PoolCa {
    /// Generation `generation` of the CA of the pool holding `key`. The same
    /// inputs give the same key and the same certificate bytes on every node.
    pub fn derive(key: &PoolKey, generation: u32) -> Result<Self, CaError> {
        let seed = key.ca_seed().ok_or(CaError::NoSeed)?;
        let mut material = seed.to_vec();
        material.extend_from_slice(&generation.to_be_bytes());
        let seed = blake3::derive_key(DERIVE_CONTEXT, &material);
        let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
        pkcs8.extend_from_slice(&seed);
        let signing = KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(pkcs8), &PKCS_ED25519)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("nodeos pool CA {} gen {generation}", key.fingerprint()));
        dn.push(DnType::OrganizationName, "nodeos");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2120, 1, 1);
        params.serial_number =
            Some(SerialNumber::from_slice(&[1, (generation >> 8) as u8, generation as u8]));
        let cert = params.self_signed(&signing)?;
        let cert_pem = cert.pem();
        Ok(PoolCa { generation, issuer: Issuer::new(params, signing), cert_pem })
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The CA certificate, PEM: what clients and nodes trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for node `node_id` reachable at `addresses`, with a key
    /// made here (it never leaves the node).
    pub fn issue_node(&self, node_id: &str, addresses: &[IpAddr]) -> Result<Credential, CaError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let subject = Subject { name: node_id.to_owned(), role: Role::Node, tenant: None };
        let mut params = leaf_params(&subject, NODE_CERT_TTL)?;
        params.subject_alt_names.push(SanType::DnsName(NODE_DNS_NAME.try_into()?));
        params.subject_alt_names.extend(addresses.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credential { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A credential for the VM worker of `vm` on node `node_id`: a client of
    /// the replica protocol only (role worker), valid `ttl`.
    pub fn issue_worker(&self, node_id: &str, vm: &str, ttl: Duration) -> Result<Credential, CaError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let subject = Subject { name: format!("{vm}@{node_id}"), role: Role::Worker, tenant: None };
        let mut params = leaf_params(&subject, ttl)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credential { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A client credential for `subject`, key made here: `nodeos auth
    /// bootstrap`, where the holder of the pool key makes the first admin.
    pub fn issue_client(&self, subject: &Subject, ttl: Duration) -> Result<Credential, CaError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let params = client_params(subject, ttl)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credential { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Signs the public key of a certificate request (PEM) for `subject`. Only
    /// the key is taken from the request: the subject, lifetime and usages are
    /// the pool's, whatever the request asks.
    pub fn sign_request(&self, csr_pem: &str, subject: &Subject, ttl: Duration) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Request(e.to_string()))?;
        let params = client_params(subject, ttl)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }
}

fn client_params(subject: &Subject, ttl: Duration) -> Result<CertificateParams, CaError> {
    if ttl < Duration::from_secs(60) || ttl > MAX_CLIENT_TTL {
        return Err(CaError::Ttl { asked_s: ttl.as_secs() });
    }
    let mut params = leaf_params(subject, ttl)?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

fn leaf_params(subject: &Subject, ttl: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject.distinguished_name();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ttl).into();
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f; // a positive INTEGER
    serial[0] |= 0x01; // never a leading zero octet to strip
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A new key pair and a certificate request for it, both PEM: what a client
/// sends to be issued a credential. The key stays with the caller.
pub fn new_request(name: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// The CA certificate generation new pools start at.
pub const FIRST_GENERATION: u32 = 1;
