//! Bad input to the binary: clear one-line errors, non-zero exits, nothing changed.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_nodeos");

/// The CLI, hermetic: no endpoint or context from the environment, and a
/// config file that does not exist unless the test passes `--config`.
fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("NODEOS_ENDPOINT")
        .env_remove("NODEOS_CONTEXT")
        .env("NODEOS_CONFIG", "/nonexistent/nodeos-tests/config.json")
        .output()
        .expect("nodeos runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn key_file(dir: &Path) -> String {
    let p = dir.join("pool.key");
    std::fs::write(&p, "test-pool-key-0123456789abcdef\n").expect("write key");
    p.display().to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

#[test]
fn daemon_flags_are_checked_with_clear_errors() {
    let d = tempfile::tempdir().expect("tempdir");
    let key = key_file(d.path());
    let data = d.path().join("data").display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["node"], "--data-dir is required"),
        (vec!["node", "--data-dir", &data], "--pool is required"),
        (
            vec!["node", "--data-dir", &data, "--pool", "Bad Name", "--pool-key-file", &key],
            "--pool \"Bad Name\"",
        ),
        (vec!["node", "--data-dir", &data, "--pool", "lab"], "--pool-key-file is required"),
        (
            vec!["node", "--data-dir", &data, "--pool", "lab", "--pool-key-file", "/nonexistent/key"],
            "cannot read pool key file",
        ),
        (
            vec![
                "node",
                "--data-dir",
                &data,
                "--pool",
                "lab",
                "--pool-key-file",
                &key,
                "--listen",
                "127.0.0.1:0",
                "--seeds",
                "nohost",
            ],
            "not host:port",
        ),
        (vec!["node", "--data-dir", &data, "--pool", "lab", "--pool-key-file", &key], "is a wildcard"),
    ];
    for (args, want) in cases {
        let o = run(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(want), "{args:?}: stderr {:?} lacks {want:?}", stderr(&o));
    }
    // Nothing was created for refused configurations.
    assert!(!d.path().join("data").exists());
    let short = d.path().join("short.key");
    std::fs::write(&short, "short").expect("write");
    let o =
        run(&["node", "--data-dir", &data, "--pool", "lab", "--pool-key-file", &short.display().to_string()]);
    assert!(stderr(&o).contains("16..=4096 bytes"), "{}", stderr(&o));
    let o = run(&[
        "node",
        "--data-dir",
        &data,
        "--pool",
        "lab",
        "--pool-key-file",
        &key,
        "--bootstrap-expect",
        "0",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bootstrap-expect"), "{}", stderr(&o));
}

#[test]
fn foreign_and_corrupt_data_dirs_are_refused_untouched() {
    let d = tempfile::tempdir().expect("tempdir");
    let key = key_file(d.path());
    let listen = format!("127.0.0.1:{}", free_port());
    // A data dir whose identity is not ours.
    let foreign = d.path().join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::fs::write(foreign.join("node.json"), b"{\"hello\": 1}").expect("write");
    let o = run(&[
        "node",
        "--data-dir",
        &foreign.display().to_string(),
        "--pool",
        "lab",
        "--pool-key-file",
        &key,
        "--listen",
        &listen,
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not a nodeos identity file"), "{}", stderr(&o));
    assert_eq!(std::fs::read(foreign.join("node.json")).expect("read"), b"{\"hello\": 1}");

    // A data dir of another pool.
    let other = d.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    std::fs::write(
        other.join("node.json"),
        b"{\"format\":1,\"node_id\":42,\"pool\":\"prod\",\"created_at_ms\":1}",
    )
    .expect("write");
    let o = run(&[
        "node",
        "--data-dir",
        &other.display().to_string(),
        "--pool",
        "lab",
        "--pool-key-file",
        &key,
        "--listen",
        &listen,
    ]);
    assert!(stderr(&o).contains("belongs to pool \"prod\""), "{}", stderr(&o));

    // Corrupted metadata database files.
    let corrupt = d.path().join("corrupt");
    let sled_dir = corrupt.join("meta").join("sled");
    std::fs::create_dir_all(&sled_dir).expect("mkdir");
    std::fs::write(
        corrupt.join("node.json"),
        b"{\"format\":1,\"node_id\":42,\"pool\":\"lab\",\"created_at_ms\":1}",
    )
    .expect("write");
    let junk: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(sled_dir.join("conf"), &junk[..512]).expect("write");
    std::fs::write(sled_dir.join("db"), &junk).expect("write");
    let o = run(&[
        "node",
        "--data-dir",
        &corrupt.display().to_string(),
        "--pool",
        "lab",
        "--pool-key-file",
        &key,
        "--listen",
        &listen,
    ]);
    assert!(!o.status.success(), "a corrupt database must stop the node");
    assert!(stderr(&o).contains("metadata"), "{}", stderr(&o));
    assert_eq!(std::fs::read(sled_dir.join("db")).expect("read"), junk, "corrupt files left as found");
}

#[test]
fn cli_reports_an_unreachable_endpoint_in_one_line() {
    let port = free_port();
    let o = run(&["--endpoint", &format!("127.0.0.1:{port}"), "pool", "status"]);
    assert_eq!(o.status.code(), Some(3));
    let e = stderr(&o);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.contains(&format!("cannot reach nodeos at 127.0.0.1:{port}")), "{e}");
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn single_node_pool_answers_bad_requests_with_clear_errors() {
    let d = tempfile::tempdir().expect("tempdir");
    let key = key_file(d.path());
    let addr = format!("127.0.0.1:{}", free_port());
    let data = d.path().join("n0").display().to_string();
    let log = std::fs::File::create(d.path().join("n0.log")).expect("log");
    let _node = Daemon(
        Command::new(BIN)
            .args([
                "node",
                "--data-dir",
                &data,
                "--pool",
                "solo",
                "--pool-key-file",
                &key,
                "--listen",
                &addr,
                "--bootstrap-expect",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn node"),
    );
    // The node speaks mutual TLS: an admin credential from the pool key.
    let cfg = d.path().join("cli.json").display().to_string();
    let o = run(&["--config", &cfg, "auth", "bootstrap", "--offline", "--pool-key-file", &key]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = |args: &[&str]| {
        let mut all = vec!["--config", cfg.as_str()];
        all.extend_from_slice(args);
        run(&all)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = run(&["--endpoint", &addr, "pool", "status", "-o", "json"]);
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json status");
            if v["pool_id"].as_str().is_some_and(|s| !s.is_empty())
                && v["leader_id"].as_str().is_some_and(|s| !s.is_empty())
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "single-node pool did not form: {}",
            std::fs::read_to_string(d.path().join("n0.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let o = run(&["--endpoint", &addr, "node", "show", "xyz"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("invalid argument: id: node id \"xyz\" must be exactly 16 hex digits"),
        "{}",
        stderr(&o)
    );
    let o = run(&["--endpoint", &addr, "node", "show", "00000000000000aa"]);
    assert!(stderr(&o).contains("not found: no node 00000000000000aa"), "{}", stderr(&o));
    let o = run(&["--endpoint", &addr, "meta", "put", "has space", "v"]);
    assert!(stderr(&o).contains("invalid argument: key"), "{}", stderr(&o));
    let big = d.path().join("big");
    std::fs::write(&big, vec![b'x'; 1024 * 1024 + 1]).expect("write");
    let o = run(&["--endpoint", &addr, "meta", "put", "big", "--from-file", &big.display().to_string()]);
    assert!(stderr(&o).contains("the limit is 1048576"), "{}", stderr(&o));
    // Nothing of the refused writes landed; a good write does.
    let o = run(&["--endpoint", &addr, "meta", "list", "-o", "json"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    let o = run(&["--endpoint", &addr, "meta", "put", "k", "v", "--expect-revision", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["--endpoint", &addr, "meta", "put", "k", "w", "--expect-revision", "0"]);
    assert!(stderr(&o).contains("compare failed"), "{}", stderr(&o));
    let o = run(&["--endpoint", &addr, "meta", "get", "k"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "v");

    // Garbage on the API port (not HTTP/2, then an HTTP/2 preface followed by
    // junk frames) is dropped; the node keeps serving.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n\x00\xff\xfe"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x09\x00\x00\x00\x00\x01garbage"[..],
    ] {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        let _ = std::io::Write::write_all(&mut s, junk);
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = std::io::Read::read(&mut s, &mut [0u8; 256]);
    }
    let o = run(&["--endpoint", &addr, "meta", "get", "k"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "v", "{}", stderr(&o));
}

#[test]
fn every_command_parses_its_flags() {
    // clap checks flag definitions against their use only when a command runs;
    // --help of each command exercises every definition without a node.
    for args in [
        vec!["vm", "stop", "x", "--force", "--timeout", "5", "--help"],
        vec!["vm", "create", "--help"],
        vec!["vm", "console", "--help"],
        vec!["meta", "put", "--help"],
        vec!["pool", "watch", "--help"],
        vec!["node", "--help"],
    ] {
        let o = run(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    // And a real parse of `vm stop` up to the network call.
    let o = run(&["--endpoint", "127.0.0.1:1", "vm", "stop", "x", "--timeout", "5"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
}

#[test]
fn volume_flags_are_checked_before_any_network() {
    // Nothing listens here: an answer naming the endpoint would mean the CLI went to the network.
    let endpoint = format!("127.0.0.1:{}", free_port());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["volume", "create", "x", "--size", "12345"],
            "size must be a multiple of 4 KiB (4096 bytes), got 12345",
        ),
        (vec!["volume", "create", "x", "--size", "1K"], "multiple of 4 KiB"),
        (vec!["volume", "create", "x", "--size", "0"], "size must be positive"),
        (vec!["volume", "create", "x", "--size", "10X"], "K, M, G or T suffix"),
        (vec!["volume", "create", "x", "--size", "99999999999T"], "too large"),
        (vec!["volume", "resize", "x", "--size", "1.5G"], "K, M, G or T suffix"),
        (vec!["volume", "create", "x", "--size", "1G", "--replicas", "4"], "1..=3"),
        (vec!["volume", "import", "disk.img"], "--name"),
        (vec!["volume", "import", "disk.img", "--name", "a", "--volume", "b"], "cannot be used with"),
    ];
    for (args, want) in cases {
        let mut all = vec!["--endpoint", &endpoint];
        all.extend(&args);
        let o = run(&all);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(e.contains(want), "{args:?}: stderr {e:?} lacks {want:?}");
        assert!(!e.contains("cannot reach"), "{args:?} tried the network: {e}");
    }
}

#[test]
fn an_unformatted_block_device_is_refused_untouched() {
    let d = tempfile::tempdir().expect("tempdir");
    let key = key_file(d.path());
    let dev = d.path().join("disk.img");
    let mut content = b"somebody's filesystem".to_vec();
    content.resize(64 << 20, 0);
    std::fs::write(&dev, &content).expect("write");
    let o = run(&[
        "node",
        "--data-dir",
        &d.path().join("data").display().to_string(),
        "--pool",
        "lab",
        "--pool-key-file",
        &key,
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--block-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--nbd-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--block-device",
        &dev.display().to_string(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("holds no nodeos block store"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&dev).expect("read"), content, "the device was changed");
}
