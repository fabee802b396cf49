//! Logs carry ids, never content: with the most logging there is (`-vvv`,
//! and `CUSTOS_LOG=trace`, which turns on every crate's trace output too),
//! a backup, restore and check of files and email records holding a canary
//! body and a canary address, with the repository password, an S3 secret
//! key and a second target's secret key as canaries, print none of them on
//! stdout or stderr, also in a failing run (a source that cannot be read, a
//! target that cannot be reached).

use std::ffi::OsStr;
use std::fmt::Write as _;

use rand::Rng;

use crate::support::*;

struct Canaries {
    body: String,
    address: String,
    password: String,
    dead_secret: String,
    /// The S3 test server's secret key (S3 runs only).
    s3_secret: Option<String>,
}

impl Canaries {
    fn all(&self) -> Vec<(&'static str, &str)> {
        let mut v = vec![
            ("record/file body", self.body.as_str()),
            ("email address", self.address.as_str()),
            ("repository password", self.password.as_str()),
            (
                "secret key of the failing target",
                self.dead_secret.as_str(),
            ),
        ];
        if let Some(s) = &self.s3_secret {
            v.push(("S3 secret access key", s.as_str()));
        }
        v
    }

    #[track_caller]
    fn absent(&self, out: &Out) {
        for (what, canary) in self.all() {
            for (stream, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
                assert!(
                    !text.contains(canary),
                    "the {what} ({canary}) appears on {stream} of {}",
                    out.what
                );
            }
        }
    }
}

fn message(from: &str, body: &str) -> Vec<u8> {
    format!(
        "From {from} Mon Nov  2 09:15:00 2026\n\
         Message-ID: <log-canary@example.org>\r\nDate: Mon, 02 Nov 2026 09:15:00 +0100\r\n\
         From: Canary Person <{from}>\r\nTo: support@example.com\r\nSubject: help\r\n\r\n\
         Hello, {body}, write to {from}\r\n\n"
    )
    .into_bytes()
}

fn no_content_in_logs(kind: Kind, test: &str) {
    let Some(mut repo) = Repo::new(kind, test) else {
        return;
    };
    let tag: u64 = rng(test).gen();
    let c = Canaries {
        body: format!("CANARY-BODY-{tag:016x}"),
        address: format!("canary.{tag:016x}@customer.example"),
        password: format!("CANARY-PASSWORD-{tag:016x}"),
        dead_secret: format!("CANARYDEADSECRET{tag:016x}"),
        s3_secret: repo
            .s3
            .as_ref()
            .and_then(|_| std::env::var("AWS_SECRET_ACCESS_KEY").ok()),
    };
    repo.password = c.password.clone();
    repo.env("CUSTOS_E2E_DEAD_SECRET", &c.dead_secret);
    let repo = repo.with_repository_settings("").init();

    let files = repo.p("files");
    write_file(
        &files.join("letter.txt"),
        format!("Dear {}, {}\n", c.address, c.body).as_bytes(),
    );
    let mbox = repo.p("mail.mbox");
    write_file(&mbox, &message(&c.address, &c.body));
    let mut cfg = std::fs::read_to_string(repo.config_path()).unwrap();
    let _ = write!(
        cfg,
        "\n[[source]]\nname = \"files\"\ntype = \"directory\"\npaths = [{}]\n\
         \n[[source]]\nname = \"mail\"\ntype = \"mbox\"\npath = {}\n",
        toml_str(&files.display().to_string()),
        toml_str(&mbox.display().to_string()),
    );
    let good = cfg.clone();
    std::fs::write(repo.config_path(), &cfg).unwrap();

    let trace = |args: &[&OsStr]| {
        let mut cmd = repo.cmd(args);
        cmd.env("CUSTOS_LOG", "trace");
        let out = run_cmd(cmd);
        c.absent(&out);
        out
    };
    let verbose = |args: &[&OsStr]| {
        let mut all: Vec<&OsStr> = vec![OsStr::new("-vvv")];
        all.extend_from_slice(args);
        let out = repo.run(all);
        c.absent(&out);
        out
    };

    // A clean run of each command at the most verbose level.
    let out = verbose(&[OsStr::new("--json"), OsStr::new("backup")]);
    out.expect_ok();
    let out = trace(&[OsStr::new("backup"), OsStr::new("--force")]);
    out.expect_ok();
    let lines = out
        .stderr
        .lines()
        .filter(|l| {
            [" TRACE ", " DEBUG ", " INFO "]
                .iter()
                .any(|x| l.contains(x))
        })
        .count();
    eprintln!("{test}: CUSTOS_LOG=trace backup: {lines} info/debug/trace lines");
    assert!(
        lines > 0,
        "no log output: the test would prove nothing\n{out}"
    );
    let dest = repo.p("restore");
    let out = trace(&[
        OsStr::new("restore"),
        OsStr::new("latest"),
        dest.as_os_str(),
    ]);
    out.expect_ok();
    // The canaries really went through the repository.
    let restored = read_all_files(&dest);
    assert!(
        restored
            .iter()
            .any(|(_, b)| contains(b, c.body.as_bytes()) && contains(b, c.address.as_bytes())),
        "the canaries were not backed up and restored: {:?}",
        restored.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for args in [
        vec![OsStr::new("check"), OsStr::new("--read-data")],
        vec![OsStr::new("snapshots")],
        vec![OsStr::new("ls"), OsStr::new("latest")],
    ] {
        trace(&args).expect_ok();
        verbose(&args).expect_ok();
    }

    // A failing run: a source file that cannot be read and a target that
    // cannot be reached (its secret key from the environment).
    std::fs::remove_file(&mbox).unwrap();
    let _ = write!(
        cfg,
        "\n[[target]]\nname = \"dead\"\nurl = \"s3://dead-bucket/x\"\n\
         endpoint = \"http://127.0.0.1:9\"\naccess_key_id = \"AKIDEADTARGET\"\n\
         secret_access_key_env = \"CUSTOS_E2E_DEAD_SECRET\"\nrequest_timeout = \"2s\"\n"
    );
    std::fs::write(repo.config_path(), &cfg).unwrap();
    for out in [
        verbose(&[OsStr::new("backup")]),
        trace(&[OsStr::new("backup")]),
    ] {
        out.expect_failure();
        assert!(
            out.stderr.contains("dead"),
            "the failing target is not named\n{out}"
        );
    }
    std::fs::write(repo.config_path(), &good).unwrap();
    let out = trace(&[OsStr::new("backup")]);
    out.expect_failure().expect_stderr("mail");
}

#[test]
fn no_content_in_logs_local() {
    no_content_in_logs(Kind::Local, "logs-canary-local");
}

#[test]
fn no_content_in_logs_s3() {
    no_content_in_logs(Kind::S3, "logs-canary-s3");
}
