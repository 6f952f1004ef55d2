//! Asset downloads against a real HTTP server on the loopback interface: a whole file, a server
//! that breaks off mid-file (resumed with Range), one that ignores Range (restarted), one that
//! serves wrong bytes (refused, nothing kept), a missing file; and `runner fetch` itself.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use runner::assets::Check;
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
    fetch::download(&url, &dest, Check::Sha256(&sha(&bytes))).unwrap();
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
    fetch::download(&url, &dest, Check::Sha256(&sha(&bytes))).unwrap();
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
    fetch::download(&url, &dest, Check::Sha256(&sha(&bytes))).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    assert_eq!(*server.ranges.lock().unwrap(), ["bytes=1000-"]);
    // A server without Range support sends it all again: the download restarts cleanly.
    let server = serve(root, Mode::NoRange);
    let dest = dir.path().join("b/x.safetensors");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(dest.with_file_name(".x.safetensors.part"), b"stale bytes").unwrap();
    let url = format!("{}/weights/x.safetensors", server.base);
    fetch::download(&url, &dest, Check::Sha256(&sha(&bytes))).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
}

#[test]
fn wrong_bytes_are_refused_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (root, bytes) = payload(dir.path());
    let server = serve(root, Mode::Wrong);
    let dest = dir.path().join("x.safetensors");
    let url = format!("{}/weights/x.safetensors", server.base);
    let e = fetch::download(&url, &dest, Check::Sha256(&sha(&bytes))).unwrap_err();
    let FetchError::Checksum {
        expected, found, ..
    } = &e
    else {
        panic!("{e}")
    };
    assert_eq!(expected, &format!("sha256 {}", sha(&bytes)));
    assert_ne!(found, expected);
    let text = e.to_string();
    assert!(
        text.contains(&url) && text.contains("checksum mismatch"),
        "{text}"
    );
    assert!(!dest.exists());
    assert!(leftovers(dir.path()).is_empty());

    let e = fetch::download(
        &format!("{}/weights/missing", server.base),
        &dest,
        Check::Sha256("00"),
    )
    .unwrap_err();
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
        // Never the network: the originals' hosts are replaced by a closed loopback port
        // (tests pass --upstream-base to reach their own server).
        .env("RUNNER_UPSTREAM_BASE", "http://127.0.0.1:9")
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

#[test]
fn originals_are_checked_the_way_their_publishers_check_them() {
    let dir = tempfile::tempdir().unwrap();
    let (root, bytes) = payload(dir.path());
    let server = serve(root, Mode::Normal);
    let url = format!("{}/weights/x.safetensors", server.base);
    let md5: String = md5::Md5::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let full = sha(&bytes);
    // Keras' MD5 and torch.hub's SHA-256 prefix: right ones land, wrong ones are refused.
    for (i, check) in [Check::Md5(&md5), Check::Sha256Prefix(&full[..8])]
        .into_iter()
        .enumerate()
    {
        let dest = dir.path().join(format!("ok{i}"));
        fetch::download(&url, &dest, check).unwrap();
        assert!(std::fs::read(&dest).unwrap() == bytes);
    }
    let dest = dir.path().join("bad");
    let e = fetch::download(&url, &dest, Check::Md5("6d6bbae143d832006294945121d1f1fc"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("expected md5 6d6bbae143d832006294945121d1f1fc (Keras' file_hash)")
            && e.contains(&format!("found md5 {md5}")),
        "{e}"
    );
    let e = fetch::download(&url, &dest, Check::Sha256Prefix("0676ba61"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("expected sha256 beginning 0676ba61") && e.contains(&full),
        "{e}"
    );
    assert!(!dest.exists());
    assert!(leftovers(dir.path()).is_empty());
}

/// A small stand-in for Microsoft's archive: `PetImages/{Cat,Dog}/<n>.jpg` for n in 0..2004
/// (tiny JPEGs), with an empty file, a broken one and a stray `Thumbs.db`, as the real one has.
fn pet_images_zip(path: &Path, broken: &[&str]) {
    let mut jpeg = Vec::new();
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 90]));
    image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
        .encode_image(&img)
        .unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for class in ["Cat", "Dog"] {
        for n in 0..2004 {
            let name = format!("PetImages/{class}/{n}.jpg");
            zip.start_file(name.as_str(), opts).unwrap();
            if name == "PetImages/Cat/5.jpg" {
                continue; // empty
            }
            if broken.contains(&name.as_str()) {
                zip.write_all(b"\xff\xd8 not really a jpeg").unwrap();
            } else {
                zip.write_all(&jpeg).unwrap();
            }
        }
        zip.start_file(format!("PetImages/{class}/Thumbs.db"), opts)
            .unwrap();
        zip.write_all(b"junk").unwrap();
    }
    zip.finish().unwrap();
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn fetch_builds_the_books_split_from_microsofts_archive() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    pet_images_zip(
        &served
            .join("download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip"),
        &["PetImages/Cat/17.jpg", "PetImages/Dog/1999.jpg"],
    );
    // The archive download breaks off once and is resumed.
    let server = serve(served, Mode::BreakOnce);
    let project = dir.path().join("project");
    let into = project.to_str().unwrap();
    let fetch_split = |base: &str| {
        runner_fetch(
            &[
                "cats_and_dogs_small",
                "--into",
                into,
                "--upstream-base",
                base,
            ],
            dir.path(),
        )
    };
    let out = fetch_split(&server.base);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 downloaded"));
    assert!(
        server
            .ranges
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.starts_with("bytes="))
    );
    let split = project.join("data/cats_and_dogs_small");
    let count = |s: &str, c: &str| names_in(&split.join(s).join(c)).len();
    for class in ["cats", "dogs"] {
        assert_eq!(
            [
                count("train", class),
                count("validation", class),
                count("test", class)
            ],
            [1000, 500, 500]
        );
    }
    // Numeric order, undecodable images skipped: cats 0..=1001 without 5 and 17 are train.
    let cats = split.join("train/cats");
    assert!(!cats.join("cat.5.jpg").exists() && !cats.join("cat.17.jpg").exists());
    assert!(cats.join("cat.0.jpg").exists() && cats.join("cat.1001.jpg").exists());
    assert!(split.join("validation/cats/cat.1002.jpg").exists());
    assert!(split.join("test/cats/cat.2001.jpg").exists());
    assert!(!split.join("test/cats/cat.2002.jpg").exists());
    assert!(split.join("train/dogs/dog.999.jpg").exists());
    assert!(split.join("validation/dogs/dog.1000.jpg").exists());
    assert!(!split.join("test/dogs/dog.1999.jpg").exists());
    assert!(split.join("test/dogs/dog.2000.jpg").exists());
    let record = std::fs::read_to_string(project.join("data/cats_and_dogs_small.BUILT")).unwrap();
    assert!(
        record.contains("PetImages/Cat/5.jpg")
            && record.contains("PetImages/Cat/17.jpg")
            && record.contains("PetImages/Dog/1999.jpg")
            && record.contains("sha256 "),
        "{record}"
    );
    assert!(leftovers(&project.join("data")).is_empty());
    // Built once: a second fetch needs no network.
    let out = fetch_split("http://127.0.0.1:9");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 already present"));

    // A folder of that name that runner did not build is never touched.
    let other = dir.path().join("other");
    let mine = other.join("data/cats_and_dogs_small/train/cats");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("my.jpg"), b"mine").unwrap();
    std::fs::create_dir_all(other.join("data")).unwrap();
    std::fs::copy(
        project.join("data/kagglecatsanddogs_5340.zip"),
        other.join("data/kagglecatsanddogs_5340.zip"),
    )
    .unwrap();
    let out = runner_fetch(
        &["cats_and_dogs_small", "--into", other.to_str().unwrap()],
        dir.path(),
    );
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("data/cats_and_dogs_small") && err.contains("move it away"),
        "{err}"
    );
    assert_eq!(names_in(&mine), ["my.jpg"]);
}
