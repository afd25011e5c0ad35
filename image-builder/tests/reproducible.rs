//! The image-builder binary end to end: the same inputs give the same bytes, and bad inputs give
//! a clear error and leave no output behind.
//!
//! Inputs are a fake nodeos (any bytes), a fake modules directory, and the host's kernel when
//! /boot has one (else a fake bzImage, with a SKIPPED line saying so).

#![allow(clippy::unwrap_used)] // a test: a failed step should stop it

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_image-builder");

struct Inputs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    nodeos: PathBuf,
    kernel: PathBuf,
    kernel_version: String,
    modules_dir: PathBuf,
    modules: PathBuf,
    cmdline: PathBuf,
}

/// The newest host kernel, if any, and its version from the file name.
fn host_kernel() -> Option<(PathBuf, String)> {
    let mut found: Vec<(PathBuf, String)> = fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            Some((e.path(), version))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Bytes with a valid x86 boot header (HdrS, LOADED_HIGH, a version string).
fn fake_bzimage(version: &str) -> Vec<u8> {
    let mut b = vec![0u8; 0x4000];
    b[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x211] = 1;
    b[0x20e..0x210].copy_from_slice(&0x200u16.to_le_bytes());
    let text = format!("{version} (someone@example) #1 SMP");
    b[0x400..0x400 + text.len()].copy_from_slice(text.as_bytes());
    b
}

fn inputs(test: &str) -> Inputs {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let nodeos = root.join("nodeos");
    fs::write(&nodeos, b"\x7fELF not really nodeos, any bytes will do".repeat(1000)).unwrap();

    let (kernel, kernel_version) = match host_kernel() {
        Some(found) => found,
        None => {
            nodeos_types::testing::skip(test, "no kernel in /boot; using a fake bzImage instead");
            let path = root.join("vmlinuz-6.1.0-0-fake");
            fs::write(&path, fake_bzimage("6.1.0-0-fake")).unwrap();
            (path, "6.1.0-0-fake".to_owned())
        }
    };

    let modules_dir = root.join("modules");
    let dep = "\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/crypto/crc32c_generic.ko:
kernel/fs/ext4/ext4.ko:
";
    for line in dep.lines() {
        let path = modules_dir.join(line.split(':').next().unwrap());
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, format!("module {}", path.display()).repeat(50)).unwrap();
    }
    fs::write(modules_dir.join("modules.dep"), dep).unwrap();
    fs::write(modules_dir.join("modules.builtin"), "kernel/net/packet/af_packet.ko\n").unwrap();
    fs::write(modules_dir.join("modules.softdep"), "softdep ext4 pre: crypto-crc32c\n").unwrap();
    fs::write(modules_dir.join("modules.alias"), "alias crypto-crc32c crc32c_generic\n").unwrap();

    let modules = root.join("modules.txt");
    fs::write(&modules, "# test list\nvirtio_net\nvirtio_blk  # disks\next4\naf_packet\n").unwrap();
    let cmdline = root.join("cmdline.txt");
    fs::write(&cmdline, "# default\nconsole=ttyS0,115200 quiet\npanic=10\n").unwrap();

    Inputs { _tmp: tmp, root, nodeos, kernel, kernel_version, modules_dir, modules, cmdline }
}

/// Runs image-builder on `i`; `overrides` are (flag, value) pairs that replace the defaults.
fn run(i: &Inputs, out: &Path, overrides: &[(&str, &str)]) -> Output {
    let mut args: Vec<(&str, &std::ffi::OsStr)> = vec![
        ("--nodeos", i.nodeos.as_os_str()),
        ("--nodeos-version", "0.1.0-test".as_ref()),
        ("--kernel", i.kernel.as_os_str()),
        ("--modules-dir", i.modules_dir.as_os_str()),
        ("--modules", i.modules.as_os_str()),
        ("--cmdline", i.cmdline.as_os_str()),
        ("--out", out.as_os_str()),
    ];
    for (flag, value) in overrides {
        args.retain(|(f, _)| f != flag);
        args.push((flag, value.as_ref()));
    }
    let mut cmd = Command::new(BIN);
    for (flag, value) in args {
        cmd.arg(flag).arg(value);
    }
    cmd.output().unwrap()
}

fn ok(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "image-builder failed: {stderr}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn failed(output: &Output) -> String {
    assert!(!output.status.success(), "image-builder should have failed");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn manifest(out: &Path) -> Value {
    serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap()
}

/// The initramfs's entries: (path, mode, data).
fn unpack(initramfs: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(initramfs).read_to_end(&mut raw).unwrap();
    let mut rest = raw.as_slice();
    let mut entries = Vec::new();
    loop {
        let mut reader = cpio::newc::Reader::new(rest).unwrap();
        let entry = reader.entry().clone();
        if entry.is_trailer() {
            return entries;
        }
        assert_eq!((entry.mtime(), entry.uid(), entry.gid()), (0, 0, 0), "{}", entry.name());
        let mut data = Vec::new();
        reader.read_to_end(&mut data).unwrap();
        entries.push((entry.name().to_owned(), entry.mode(), data));
        rest = reader.finish().unwrap();
    }
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn the_same_inputs_give_the_same_image() {
    let i = inputs("the_same_inputs_give_the_same_image");
    let (first, second) = (i.root.join("out/first"), i.root.join("out/second"));
    let summary = ok(&run(&i, &first, &[]));
    ok(&run(&i, &second, &[]));

    let m = manifest(&first);
    assert_eq!(m, manifest(&second));
    let hash = m["image_hash"].as_str().unwrap();
    assert_eq!(hash.len(), 64);
    assert!(summary.starts_with(&format!("image {hash}\n")), "{summary}");
    for name in ["vmlinuz", "initramfs.img", "boot.ipxe", "manifest.json"] {
        assert_eq!(fs::read(first.join(name)).unwrap(), fs::read(second.join(name)).unwrap(), "{name}");
    }
    assert_eq!(dir_names(&first), ["boot.ipxe", "initramfs.img", "manifest.json", "vmlinuz"]);
    assert_eq!(dir_names(&i.root.join("out")), ["first", "second"], "no staging directories left");

    // Rebuilding over an existing image replaces it with identical bytes.
    let before = fs::read(first.join("initramfs.img")).unwrap();
    ok(&run(&i, &first, &[]));
    assert_eq!(fs::read(first.join("initramfs.img")).unwrap(), before);
    assert_eq!(manifest(&first)["image_hash"], hash);

    // The manifest describes the files and the image.
    assert_eq!(m["kernel_version"], i.kernel_version.as_str());
    assert_eq!(m["nodeos_version"], "0.1.0-test");
    assert_eq!(m["cmdline"], "console=ttyS0,115200 quiet panic=10");
    assert_eq!(m["builtin_modules"], serde_json::json!(["af_packet"]));
    let order = serde_json::json!([
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/net/virtio_net.ko",
        "kernel/drivers/block/virtio_blk.ko",
        "kernel/crypto/crc32c_generic.ko",
        "kernel/fs/ext4/ext4.ko",
    ]);
    assert_eq!(m["modules"], order);
    let files = m["files"].as_array().unwrap();
    assert_eq!(files[1]["name"], "initramfs.img");
    assert_eq!(files[1]["size"], before.len() as u64);
    assert_eq!(files[0]["size"], fs::metadata(&i.kernel).unwrap().len());
    let ipxe = fs::read_to_string(first.join("boot.ipxe")).unwrap();
    assert!(ipxe.starts_with("#!ipxe\n"), "{ipxe}");
    assert!(
        ipxe.contains(&format!(
            "\nkernel vmlinuz console=ttyS0,115200 quiet panic=10 nodeos.image={hash} initrd=initramfs.img\n"
        )),
        "{ipxe}"
    );

    // The initramfs holds what the layout promises.
    let entries = unpack(&before);
    let paths: Vec<&str> = entries.iter().map(|(p, _, _)| p.as_str()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
    let v = &i.kernel_version;
    for want in [
        "dev/console",
        "init",
        "sbin/nodeos",
        "proc",
        "sys",
        "run",
        "tmp",
        "var",
        "etc/nodeos/image.json",
        "etc/nodeos/cmdline.default",
        &format!("lib/modules/{v}/load.order"),
        &format!("lib/modules/{v}/kernel/fs/ext4/ext4.ko"),
    ] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
    let get = |path: &str| entries.iter().find(|(p, _, _)| p == path).unwrap();
    assert_eq!(get("init").1, 0o100755);
    assert_eq!(get("init").2, fs::read(&i.nodeos).unwrap());
    assert_eq!(get("sbin/nodeos").2, b"/init");
    assert_eq!(get("dev/console").1, 0o020600);
    let load_order = String::from_utf8(get(&format!("lib/modules/{v}/load.order")).2.clone()).unwrap();
    let expected: Vec<&str> = order.as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(load_order.lines().collect::<Vec<_>>(), expected);
    let identity: Value = serde_json::from_slice(&get("etc/nodeos/image.json").2).unwrap();
    assert_eq!(identity["nodeos"]["version"], "0.1.0-test");
    assert_eq!(identity["kernel"]["sha256"], files[0]["sha256"]);
}

#[test]
fn bad_inputs_fail_clearly_and_leave_nothing() {
    let i = inputs("bad_inputs_fail_clearly_and_leave_nothing");
    let parent = i.root.join("out");
    fs::create_dir(&parent).unwrap();
    let out = parent.join("image");

    let err = failed(&run(&i, &out, &[("--kernel", "/nonexistent/vmlinuz")]));
    assert!(err.contains("reading kernel /nonexistent/vmlinuz"), "{err}");
    assert!(err.contains("No such file"), "{err}");

    let nodeos = i.nodeos.to_str().unwrap();
    let err = failed(&run(&i, &out, &[("--kernel", nodeos)]));
    assert!(err.contains("is not a bzImage: no \"HdrS\" magic at offset 0x202"), "{err}");

    let list = i.root.join("bad-modules.txt");
    fs::write(&list, "virtio_net\nno_such_driver\n").unwrap();
    let err = failed(&run(&i, &out, &[("--modules", list.to_str().unwrap())]));
    assert!(err.contains("module `no_such_driver` is not in"), "{err}");

    fs::remove_file(i.modules_dir.join("kernel/fs/ext4/ext4.ko")).unwrap();
    let err = failed(&run(&i, &out, &[]));
    assert!(err.contains("kernel/fs/ext4/ext4.ko (from modules.dep) is missing"), "{err}");

    let err = failed(&run(&i, &out, &[("--nodeos", "/nonexistent/nodeos")]));
    assert!(err.contains("reading nodeos /nonexistent/nodeos"), "{err}");

    if Path::new("/bin/sh").exists() {
        let err = failed(&run(&i, &out, &[("--nodeos", "/bin/sh")]));
        assert!(err.contains("nodeos /bin/sh: dynamically linked (interpreter /lib"), "{err}");
    }

    let err = failed(&run(&i, Path::new("/proc/image-builder-test/image"), &[]));
    assert!(err.contains("output directory /proc/image-builder-test/image: cannot create"), "{err}");
    assert!(err.contains("(is it writable?)"), "{err}");
    assert!(!Path::new("/proc/image-builder-test").exists());

    let file = parent.join("a-file");
    fs::write(&file, b"").unwrap();
    let err = failed(&run(&i, &file, &[]));
    assert!(err.contains("exists and is not a directory"), "{err}");

    assert_eq!(dir_names(&parent), ["a-file"], "no output or staging directory left");
}

#[test]
fn a_failed_rebuild_keeps_the_previous_image() {
    let i = inputs("a_failed_rebuild_keeps_the_previous_image");
    let out = i.root.join("image");
    ok(&run(&i, &out, &[]));
    let before = manifest(&out);
    let err = failed(&run(&i, &out, &[("--kernel", "/nonexistent/vmlinuz")]));
    assert!(err.contains("reading kernel"), "{err}");
    assert_eq!(manifest(&out), before);
    assert_eq!(dir_names(&i.root).iter().filter(|n| n.starts_with('.')).count(), 0);
}
