//! `scripts/fetch-corpora.sh` against a local HTTP mirror of the shared corpora: pinned
//! checksums, atomic placement, up-to-date skipping, and failures that leave nothing behind.

use kormlm_e2e::*;
use std::collections::BTreeSet;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

/// (dataset dir, OWNER/REPO/REF with the default ref, paths in the repo and under the dataset dir)
const DATASETS: [(&str, &str, &[&str]); 3] = [
    (
        "nsmc",
        "e9t/nsmc/master",
        &["ratings.txt", "ratings_train.txt", "ratings_test.txt", "synopses.json"],
    ),
    (
        "korean-hate-speech",
        "kocohub/korean-hate-speech/master",
        &[
            "labeled/train.tsv",
            "labeled/dev.tsv",
            "test.no_label.tsv",
            "news_title/train.news_title.txt",
            "news_title/dev.news_title.txt",
            "news_title/test.news_title.txt",
            "news_title/unlabeled_comments.news_title_5.txt",
            "unlabeled/unlabeled_comments_5.txt",
        ],
    ),
    (
        "korean_unsmile_dataset",
        "smilegate-ai/korean_unsmile_dataset/main",
        &["unsmile_train_v1.0.tsv", "unsmile_valid_v1.0.tsv"],
    ),
];

/// (`dataset/path`, mirror-relative `OWNER/REPO/REF/path`) of every corpus file.
fn files() -> Vec<(String, String)> {
    DATASETS
        .iter()
        .flat_map(|(dataset, repo_ref, paths)| {
            paths
                .iter()
                .map(move |p| (format!("{dataset}/{p}"), format!("{repo_ref}/{p}")))
        })
        .collect()
}

fn names() -> Vec<String> {
    files().into_iter().map(|(name, _)| name).collect()
}

fn mirror_path(name: &str) -> String {
    let found = files().into_iter().find(|(n, _)| n == name);
    found.unwrap_or_else(|| panic!("{name} is not a corpus file")).1
}

/// Lays out `root` as a raw.githubusercontent.com mirror of the shared corpora (symlinks).
fn build_mirror(root: &Path) {
    for name in names() {
        let link = root.join(mirror_path(&name));
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let source = shared_data().join(&name);
        assert!(source.is_file(), "{} is missing", source.display());
        std::os::unix::fs::symlink(&source, &link).unwrap();
    }
}

/// `python3 -m http.server` serving `root` on a free loopback port; killed when dropped.
struct Mirror {
    _server: Proc,
    url: String,
}

impl Mirror {
    /// Serves `root` on a port the server picks itself and names on its first line (a port
    /// found free beforehand could be taken by a parallel test's server in between).
    fn serve(root: &Path) -> Self {
        let mut command = Command::new("python3");
        command
            .args(["-u", "-m", "http.server", "--bind", "127.0.0.1", "0", "--directory"])
            .arg(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut server = Proc::spawn("python3 -m http.server", &mut command);
        let stdout = server.child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("python3 -m http.server names its port within 20 s");
        // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        let port: u16 = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in the server's first line: {line:?}"));
        wait_for("the mirror to listen", Duration::from_secs(20), || {
            assert!(server.is_running(), "python3 -m http.server exited early");
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Self {
            _server: server,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

struct Fetched {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `scripts/fetch-corpora.sh ARGS` against `mirror`, failing the test after a minute.
fn fetch(work: &Path, mirror: &str, args: &[&str]) -> Fetched {
    let (out_path, err_path) = (work.join("fetch.stdout"), work.join("fetch.stderr"));
    let mut command = Command::new(workspace_root().join("scripts/fetch-corpora.sh"));
    command
        .args(args)
        .current_dir(work)
        .env("KORMLM_CORPORA_MIRROR", mirror)
        .env_remove("KORMLM_NSMC_REF")
        .env_remove("KORMLM_KHS_REF")
        .env_remove("KORMLM_UNSMILE_REF")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let status = Proc::spawn("fetch-corpora.sh", &mut command).wait_exit(Duration::from_secs(60));
    Fetched {
        status,
        stdout: std::fs::read_to_string(out_path).unwrap(),
        stderr: std::fs::read_to_string(err_path).unwrap(),
    }
}

/// Every file under `dir` (names relative to it, temporary files included).
fn files_under(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.insert(path.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

fn assert_identical(dest: &Path, name: &str) {
    let got = std::fs::read(dest.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let want = std::fs::read(shared_data().join(name)).unwrap();
    assert!(got == want, "{name} differs from the shared copy");
}

#[test]
fn fetches_verifies_skips_and_rejects_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let mirror_root = dir.path().join("mirror");
    build_mirror(&mirror_root);
    let mirror = Mirror::serve(&mirror_root);
    let dest = dir.path().join("data/corpora");
    let all: BTreeSet<String> = names().into_iter().collect();
    let mut staged = files_under(&shared_data());
    staged.remove("README.md");
    assert_eq!(all, staged, "the script fetches every staged data file");

    // The default DEST is data/corpora under the current directory.
    let first = fetch(dir.path(), &mirror.url, &[]);
    assert!(first.status.success(), "{}\n{}", first.stdout, first.stderr);
    assert_eq!(files_under(&dest), all, "exactly the corpus files, no temporary files");
    for name in &all {
        assert_identical(&dest, name);
        assert!(
            first.stdout.contains(&format!("downloaded  {name}\n")),
            "{}",
            first.stdout
        );
    }
    for needle in [
        "CC0",
        "CC BY-SA 4.0",
        "BEEP!",
        "CC BY-NC-ND 4.0",
        "--data_path",
        "2,000,000",
    ] {
        assert!(first.stdout.contains(needle), "{needle}: {}", first.stdout);
    }

    let again = fetch(dir.path(), &mirror.url, &[dest.to_str().unwrap()]);
    assert!(again.status.success(), "{}\n{}", again.stdout, again.stderr);
    assert!(!again.stdout.contains("downloaded  "), "{}", again.stdout);
    for name in &all {
        assert!(
            again.stdout.contains(&format!("up to date  {name}\n")),
            "{}",
            again.stdout
        );
    }

    // A damaged local copy is replaced; the rest is left alone.
    std::fs::write(dest.join("nsmc/synopses.json"), "[]").unwrap();
    let repair = fetch(dir.path(), &mirror.url, &[dest.to_str().unwrap()]);
    assert!(repair.status.success(), "{}\n{}", repair.stdout, repair.stderr);
    assert!(
        repair.stdout.contains("downloaded  nsmc/synopses.json\n"),
        "{}",
        repair.stdout
    );
    assert_eq!(repair.stdout.matches("downloaded  ").count(), 1, "{}", repair.stdout);
    assert_identical(&dest, "nsmc/synopses.json");

    // The mirror serves a modified file: refused, and nothing is left under its name.
    let victim = "korean-hate-speech/labeled/dev.tsv";
    let served = mirror_root.join(mirror_path(victim));
    let mut bytes = std::fs::read(&served).unwrap();
    bytes[100] ^= 1;
    std::fs::remove_file(&served).unwrap();
    std::fs::write(&served, bytes).unwrap();
    std::fs::remove_file(dest.join(victim)).unwrap();
    let bad = fetch(dir.path(), &mirror.url, &[dest.to_str().unwrap()]);
    assert!(!bad.status.success(), "{}\n{}", bad.stdout, bad.stderr);
    assert!(bad.stderr.contains("checksum mismatch"), "{}", bad.stderr);
    assert!(bad.stderr.contains(victim), "{}", bad.stderr);
    assert!(
        bad.stderr.contains(&format!("{}/{}", mirror.url, mirror_path(victim))),
        "{}",
        bad.stderr
    );
    let expected: BTreeSet<String> = all.iter().filter(|n| *n != victim).cloned().collect();
    assert_eq!(
        files_under(&dest),
        expected,
        "no file under the final name, no temporary file"
    );
}

#[test]
fn a_missing_file_fails_naming_its_url() {
    let dir = tempfile::tempdir().unwrap();
    let mirror_root = dir.path().join("mirror");
    build_mirror(&mirror_root);
    let missing = "korean_unsmile_dataset/unsmile_valid_v1.0.tsv";
    std::fs::remove_file(mirror_root.join(mirror_path(missing))).unwrap();
    let mirror = Mirror::serve(&mirror_root);
    let dest = dir.path().join("dest");

    let out = fetch(dir.path(), &mirror.url, &[dest.to_str().unwrap()]);
    assert!(!out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let url = format!("{}/{}", mirror.url, mirror_path(missing));
    assert!(out.stderr.contains(&url), "{}", out.stderr);
    assert!(out.stderr.contains("download failed"), "{}", out.stderr);
    let expected: BTreeSet<String> = names().into_iter().filter(|n| n != missing).collect();
    assert_eq!(
        files_under(&dest),
        expected,
        "the files before it, and no temporary file"
    );
}

#[test]
fn help_and_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let script = workspace_root().join("scripts/fetch-corpora.sh");
    let help = run(Command::new(&script).arg("--help").current_dir(dir.path()));
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.starts_with("Usage:"), "{text}");
    assert!(
        text.contains("KORMLM_CORPORA_MIRROR") && text.contains("2,000,000"),
        "{text}"
    );

    for args in [&["--bogus"][..], &["a", "b"]] {
        let out = run(Command::new(&script).args(args).current_dir(dir.path()));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--help"), "{args:?}");
    }
    assert!(files_under(dir.path()).is_empty(), "a usage error downloads nothing");
}
