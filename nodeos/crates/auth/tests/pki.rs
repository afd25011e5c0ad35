//! The pool CA end to end: derived keys, issued credentials, handshakes.

use std::time::Duration;

use nodeos_auth::identity::identity;
use nodeos_auth::tls::{self, TlsState};
use nodeos_auth::{PoolCa, Role, Subject};
use nodeos_types::auth::PoolKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn key(s: &str) -> PoolKey {
    PoolKey::from_secret(s.as_bytes()).expect("a valid key")
}

fn subject(name: &str, role: Role, tenant: Option<&str>) -> Subject {
    Subject { name: name.into(), role, tenant: tenant.map(str::to_owned) }
}

#[test]
fn every_holder_of_the_pool_key_derives_the_same_ca_and_no_one_else_does() {
    let a = PoolCa::derive(&key("0123456789abcdef-pool-a"), 1).expect("ca");
    let again = PoolCa::derive(&key("0123456789abcdef-pool-a"), 1).expect("ca");
    let next = PoolCa::derive(&key("0123456789abcdef-pool-a"), 2).expect("ca");
    let other = PoolCa::derive(&key("0123456789abcdef-pool-b"), 1).expect("ca");
    assert_eq!(a.cert_pem(), again.cert_pem());
    assert_ne!(a.cert_pem(), next.cert_pem());
    assert_ne!(a.cert_pem(), other.cert_pem());
    // A key handed to a VM worker (its derived bytes) authenticates messages
    // but cannot make the CA.
    let worker = PoolKey::from_derived(key("0123456789abcdef-pool-a").derived_bytes());
    assert!(PoolCa::derive(&worker, 1).is_err());
}

#[test]
fn a_credential_carries_its_name_role_and_tenant() {
    let ca = PoolCa::derive(&key("0123456789abcdef-pool-a"), 1).expect("ca");
    let c = ca
        .issue_client(&subject("alice", Role::Operator, Some("blue")), Duration::from_secs(3600))
        .expect("issue");
    let der = tls::certs("cert", &c.cert_pem).expect("pem");
    let id = identity(&der[0]).expect("identity");
    assert_eq!(id.subject, subject("alice", Role::Operator, Some("blue")));
    assert_eq!(id.serial.len(), 32);
    let n = ca.issue_node("00000000000000ab", &["10.0.0.1".parse().expect("ip")]).expect("node");
    let id = identity(&tls::certs("cert", &n.cert_pem).expect("pem")[0]).expect("identity");
    assert_eq!(id.subject, subject("00000000000000ab", Role::Node, None));
    // Lifetimes out of range are refused.
    assert!(ca.issue_client(&subject("x", Role::Reader, None), Duration::from_secs(1)).is_err());
}

#[test]
fn a_request_is_signed_for_the_pools_subject_not_the_requesters() {
    let ca = PoolCa::derive(&key("0123456789abcdef-pool-a"), 1).expect("ca");
    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let mut p = rcgen::CertificateParams::new(vec![]).expect("params");
    p.distinguished_name.push(rcgen::DnType::CommonName, "mallory");
    p.distinguished_name.push(rcgen::DnType::OrganizationName, "nodeos:admin");
    let csr = p.serialize_request(&k).expect("csr").pem().expect("pem");
    let pem =
        ca.sign_request(&csr, &subject("bob", Role::Reader, None), Duration::from_secs(600)).expect("sign");
    let id = identity(&tls::certs("cert", &pem).expect("pem")[0]).expect("identity");
    assert_eq!(id.subject, subject("bob", Role::Reader, None));
    assert!(
        ca.sign_request("not a request", &subject("bob", Role::Reader, None), Duration::from_secs(600))
            .is_err()
    );
}

/// One handshake: the server's view of the client, or the error either side saw.
async fn handshake(server: &TlsState, client: &TlsState) -> Result<String, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = tls::incoming(listener, server.clone());
    let srv = tokio::spawn(async move {
        let mut accepted = std::pin::pin!(accepted);
        let next = tokio::time::timeout(
            Duration::from_secs(2),
            std::future::poll_fn(|cx| futures_core::Stream::poll_next(accepted.as_mut(), cx)),
        );
        match next.await {
            Ok(Some(Ok(mut s))) => {
                let der = s.get_ref().1.peer_certificates().map(|c| c[0].to_vec()).unwrap_or_default();
                let mut b = [0u8; 2];
                let _ = s.read_exact(&mut b).await;
                let _ = s.write_all(b"ok").await;
                identity(&der).map(|i| i.subject.name).map_err(|e| e.to_string())
            }
            _ => Err("refused".to_owned()),
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(nodeos_auth::ca::NODE_DNS_NAME).expect("name");
    let r = tokio_rustls::TlsConnector::from(client.client()).connect(name, tcp).await;
    let client_side = match r {
        Ok(mut s) => {
            let _ = s.write_all(b"hi").await;
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.map(|_| ()).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    let server_side = srv.await.expect("join");
    client_side?;
    server_side
}

#[tokio::test]
async fn only_credentials_of_the_pools_ca_complete_a_handshake() {
    let ca = PoolCa::derive(&key("0123456789abcdef-pool-a"), 1).expect("ca");
    let other = PoolCa::derive(&key("0123456789abcdef-pool-b"), 1).expect("ca");
    let node = ca.issue_node("n1", &[]).expect("node");
    let server = TlsState::new(&node, ca.cert_pem()).expect("server");
    let alice =
        ca.issue_client(&subject("alice", Role::Admin, None), Duration::from_secs(600)).expect("alice");
    let ok = TlsState::new(&alice, ca.cert_pem()).expect("client");
    assert_eq!(handshake(&server, &ok).await, Ok("alice".to_owned()));
    // A client of another pool's CA is refused by the server.
    let eve = other.issue_client(&subject("eve", Role::Admin, None), Duration::from_secs(600)).expect("eve");
    let eve_trusting_us = TlsState::new(&eve, ca.cert_pem()).expect("client");
    assert!(handshake(&server, &eve_trusting_us).await.is_err());
    // A client does not trust a node of another pool.
    let rogue = other.issue_node("n9", &[]).expect("node");
    let rogue_server = TlsState::new(&rogue, other.cert_pem()).expect("server");
    assert!(handshake(&rogue_server, &ok).await.is_err());
    // A rotation's first step: the node trusts both generations and still
    // presents its old certificate; clients of either generation get in.
    let next = PoolCa::derive(&key("0123456789abcdef-pool-a"), 2).expect("ca");
    let both = format!("{}{}", ca.cert_pem(), next.cert_pem());
    let server2 = TlsState::new(&node, &both).expect("server");
    assert_eq!(handshake(&server2, &ok).await, Ok("alice".to_owned()));
    let bob = next.issue_client(&subject("bob", Role::Reader, None), Duration::from_secs(600)).expect("bob");
    let bob = TlsState::new(&bob, &both).expect("client");
    assert_eq!(handshake(&server2, &bob).await, Ok("bob".to_owned()));
}

#[tokio::test]
async fn a_node_stream_takes_only_the_roles_allowed() {
    let ca = PoolCa::derive(&key("0123456789abcdef-pool-a"), 1).expect("ca");
    let node = TlsState::new(&ca.issue_node("n1", &[]).expect("node"), ca.cert_pem()).expect("server");
    let worker = ca.issue_worker("n1", "vm1", Duration::from_secs(600)).expect("worker");
    let admin =
        ca.issue_client(&subject("root", Role::Admin, None), Duration::from_secs(600)).expect("admin");
    for (cred, ok) in [(worker, true), (admin, false)] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cfg = node.server();
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            tls::accept_from(cfg, tcp, &[Role::Node, Role::Worker]).await.map(|(_, id)| id.subject.role)
        });
        let client = TlsState::new(&cred, ca.cert_pem()).expect("client").client();
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = tls::connect_to(client, tcp).await;
        let got = srv.await.expect("join");
        assert_eq!(got.is_ok(), ok, "{got:?}");
    }
}
