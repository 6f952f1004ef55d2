//! Asset downloads against a real HTTP server on the loopback interface: a whole file, a server
//! that breaks off mid-file (resumed with Range), one that ignores Range (restarted), one that
//! serves wrong bytes (refused, nothing kept), a missing file; and `runner fetch` itself.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use runner::fetch::{self, FetchError};
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Normal,
    /// The first response announces the whole file, sends half and closes.
    BreakOnce,
    /// Range requests are answered with the whole file (200).
    NoRange,
    /// Every byte at an odd offset is flipped.
    Wrong,
}

struct Server {
    base: String,
    /// The Range header of each request ("" when none).
    ranges: Arc<Mutex<Vec<String>>>,
}

fn serve(root: PathBuf, mode: Mode) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = ranges.clone();
    let served = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap_or_default();
            let mut range = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("range")
                {
                    range = v.trim().to_string();
                }
            }
            seen.lock().unwrap().push(range.clone());
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            let Ok(mut data) = std::fs::read(root.join(path.trim_start_matches('/'))) else {
                let _ = stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            if mode == Mode::Wrong {
                for (i, b) in data.iter_mut().enumerate() {
                    if i % 2 == 1 {
                        *b ^= 0xFF;
                    }
                }
            }
            let start: usize = range
                .strip_prefix("bytes=")
                .and_then(|r| r.trim_end_matches('-').parse().ok())
                .filter(|_| mode != Mode::NoRange)
                .unwrap_or(0);
            let n = data.len();
            let head = if start >= n && start > 0 {
                let _ = stream.write_all(
                    b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            } else if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{n}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    n - 1,
                    n - start
                )
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n")
            };
            let body = &data[start..];
            let first = served.fetch_add(1, Ordering::SeqCst) == 0;
            let body = if mode == Mode::BreakOnce && first {
                &body[..body.len() / 2]
            } else {
                body
            };
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
            let _ = stream.flush();
        }
    });
    Server { base, ranges }
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A served folder with one 3 MB file; returns (folder, bytes).
fn payload(dir: &Path) -> (PathBuf, Vec<u8>) {
    let root = dir.join("served");
    std::fs::create_dir_all(root.join("weights")).unwrap();
    let mut rng = common::Rng::new(5);
    let bytes: Vec<u8> = (0..3_000_000).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(root.join("weights/x.safetensors"), &bytes).unwrap();
    (root, bytes)
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".part"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_whole_download_lands_verified_and_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let (root, bytes) = payload(dir.path());
    let server = serve(root, Mode::Normal);
    let dest = dir.path().join("project/weights/x.safetensors");
    let url = format!("{}/weights/x.safetensors", server.base);
    fetch::download(&url, &dest, &sha(&bytes)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    assert!(leftovers(dest.parent().unwrap()).is_empty());
    assert_eq!(*server.ranges.lock().unwrap(), [""]);
}

#[test]
fn a_download_broken_off_mid_file_resumes_with_range() {
    let dir = tempfile::tempdir().unwrap();
    let (root, bytes) = payload(dir.path());
    let server = serve(root, Mode::BreakOnce);
    let dest = dir.path().join("x.safetensors");
    let url = format!("{}/weights/x.safetensors", server.base);
    fetch::download(&url, &dest, &sha(&bytes)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    let ranges = server.ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], "");
    let offset: usize = ranges[1]
        .strip_prefix("bytes=")
        .unwrap()
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(offset > 0 && offset < bytes.len(), "resumed at {offset}");
}

#[test]
fn a_partial_file_from_an_earlier_attempt_is_resumed_or_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let (root, bytes) = payload(dir.path());
    // Resumed where the earlier attempt stopped.
    let server = serve(root.clone(), Mode::Normal);
    let dest = dir.path().join("a/x.safetensors");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(dest.with_file_name(".x.safetensors.part"), &bytes[..1000]).unwrap();
    let url = format!("{}/weights/x.safetensors", server.base);
    fetch::download(&url, &dest, &sha(&bytes)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    assert_eq!(*server.ranges.lock().unwrap(), ["bytes=1000-"]);
    // A server without Range support sends it all again: the download restarts cleanly.
    let server = serve(root, Mode::NoRange);
    let dest = dir.path().join("b/x.safetensors");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(dest.with_file_name(".x.safetensors.part"), b"stale bytes").unwrap();
    let url = format!("{}/weights/x.safetensors", server.base);
    fetch::download(&url, &dest, &sha(&bytes)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
}

#[test]
fn wrong_bytes_are_refused_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (root, bytes) = payload(dir.path());
    let server = serve(root, Mode::Wrong);
    let dest = dir.path().join("x.safetensors");
    let url = format!("{}/weights/x.safetensors", server.base);
    let e = fetch::download(&url, &dest, &sha(&bytes)).unwrap_err();
    let FetchError::Checksum {
        expected, found, ..
    } = &e
    else {
        panic!("{e}")
    };
    assert_eq!(expected, &sha(&bytes));
    assert_ne!(found, expected);
    let text = e.to_string();
    assert!(
        text.contains(&url) && text.contains("checksum mismatch"),
        "{text}"
    );
    assert!(!dest.exists());
    assert!(leftovers(dir.path()).is_empty());

    let e = fetch::download(&format!("{}/weights/missing", server.base), &dest, "00").unwrap_err();
    assert!(e.to_string().contains("HTTP 404"), "{e}");
    assert!(!dest.exists());
}

fn runner_fetch(args: &[&str], cwd: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .arg("fetch")
        .args(args)
        .current_dir(cwd)
        .env_remove("RUNNER_ASSETS")
        .env_remove("RUNNER_ASSETS_URL")
        .output()
        .unwrap()
}

#[test]
fn fetch_names_unknown_assets_and_says_what_to_do_offline() {
    let dir = tempfile::tempdir().unwrap();
    let out = runner_fetch(&["vgg16/imagenett"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown asset \"vgg16/imagenett\" (did you mean \"vgg16/imagenet\"?)"),
        "{err}"
    );
    let out = runner_fetch(&["vgg16/imagenet"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("weights/vgg16_imagenet_notop.safetensors")
            && err.contains("RUNNER_ASSETS")
            && err.contains("storage.googleapis.com"),
        "{err}"
    );
    let out = runner_fetch(&["--list"], dir.path());
    assert!(String::from_utf8_lossy(&out.stdout).contains("cats_and_dogs_small"));
}

#[test]
fn fetch_copies_from_a_mirror_or_downloads_from_an_http_mirror() {
    let Some(mirror) = common::mirror() else {
        eprintln!("skipped: no asset mirror");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    let m = mirror.to_str().unwrap();
    let into = project.to_str().unwrap();
    let out = runner_fetch(
        &["vgg16/imagenet", "--assets", m, "--into", into],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 copied from the mirror"));
    let out = runner_fetch(&["vgg16/imagenet", "--into", into], dir.path());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 already present"));

    let server = serve(mirror.clone(), Mode::BreakOnce);
    let other = dir.path().join("other");
    let out = runner_fetch(
        &[
            "mobilenet_v2/imagenet",
            "--assets-url",
            &server.base,
            "--into",
            other.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 downloaded"));
    let got = std::fs::read(other.join("weights/mobilenet_v2_imagenet.safetensors")).unwrap();
    let want = std::fs::read(mirror.join("weights/mobilenet_v2_imagenet.safetensors")).unwrap();
    assert!(got == want);
    let mut s = String::new();
    std::fs::File::open(mirror.join("weights/SHA256SUMS"))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert!(s.contains(&sha(&got)));
}
