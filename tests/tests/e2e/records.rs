//! Record sources through the CLI: an mbox export (archive mode: deletions
//! kept and marked) and a real IMAP mailbox (Dovecot from scripts/test.sh):
//! backup, incremental backup fetching only changes, byte-identical `.eml`
//! restore, `find` by customer, and restore back into the IMAP server.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::support::*;

/// A message; `body_line` may start with "From " (mboxrd-escaped in the file).
fn message(i: usize, from: &str, to: &str, body_line: &str) -> Vec<u8> {
    format!(
        "Message-ID: <e2e-{i}@example.org>\r\nDate: Mon, 02 Nov 2026 09:{:02}:00 +0100\r\nFrom: {from}\r\nTo: {to}\r\nSubject: case {i}\r\n\r\nHello {i}\r\n{body_line}\r\nBye\r\n",
        i % 60
    )
    .into_bytes()
}

/// mboxrd: a `From ` separator per message, `>`-quoting of `From ` lines.
fn mbox(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        out.extend_from_slice(b"From sender@example.org Mon Nov  2 09:15:00 2026\n");
        for line in m.split_inclusive(|b| *b == b'\n') {
            let trimmed: &[u8] = {
                let mut s = line;
                while s.first() == Some(&b'>') {
                    s = &s[1..];
                }
                s
            };
            if trimmed.starts_with(b"From ") {
                out.push(b'>');
            }
            out.extend_from_slice(line);
        }
        out.push(b'\n');
    }
    out
}

fn add_source(repo: &Repo, toml: &str) {
    let mut cfg = std::fs::read_to_string(repo.config_path()).unwrap();
    let _ = write!(cfg, "\n{toml}\n");
    std::fs::write(repo.config_path(), cfg).unwrap();
}

/// Every restored `.eml` file's bytes.
fn emls(dir: &Path) -> BTreeSet<Vec<u8>> {
    read_all_files(dir)
        .into_iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "eml"))
        .map(|(_, b)| b)
        .collect()
}

fn summary(v: &Value) -> &Value {
    &v["summary"]
}

#[test]
fn mbox_archive_local() {
    let repo = Repo::new(Kind::Local, "rec-mbox")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let path = repo.p("export.mbox");
    let mut msgs = vec![
        message(
            1,
            "Ana Lima <ana.lima@example.org>",
            "support@example.com",
            "plain",
        ),
        message(
            2,
            "support@example.com",
            "Ana Lima <Ana.Lima@example.org>",
            "From the desk of support",
        ),
        message(
            3,
            "bo@example.net",
            "support@example.com",
            ">From quoted already",
        ),
    ];
    std::fs::write(&path, mbox(&msgs)).unwrap();
    add_source(
        &repo,
        &format!(
            "[[source]]\nname = \"old-mail\"\ntype = \"mbox\"\npath = {}\nmode = \"archive\"",
            toml_str(&path.display().to_string())
        ),
    );
    repo.ok(["sources", "check"]);

    let r1 = single_report(&repo.run(["--json", "backup"]));
    assert_eq!(u(summary(&r1), "records_new"), 3, "{r1}");
    assert_eq!(u(summary(&r1), "records_total"), 3, "{r1}");

    // Restored .eml files are the messages, byte for byte (mboxrd quoting undone).
    let dest = repo.p("restore1");
    repo.restore("latest", &dest);
    assert_eq!(emls(&dest), msgs.iter().cloned().collect::<BTreeSet<_>>());

    // find by customer reads metadata only; the address matches case-insensitively.
    let hits = repo.json(["find", "--customer", "ana.lima@example.org"]);
    assert_eq!(hits.as_array().unwrap().len(), 2, "{hits}");
    let none = repo.json(["find", "--customer", "nobody@example.org"]);
    assert!(none.as_array().unwrap().is_empty());

    // Appended message: only it is new.
    msgs.push(message(4, "cy@example.org", "support@example.com", "four"));
    std::fs::write(&path, mbox(&msgs)).unwrap();
    let r2 = single_report(&repo.run(["--json", "backup"]));
    assert_eq!(
        (
            u(summary(&r2), "records_new"),
            u(summary(&r2), "records_total")
        ),
        (1, 4),
        "{r2}"
    );

    // A message removed from the export stays in archive mode, marked deleted.
    msgs.remove(0);
    std::fs::write(&path, mbox(&msgs)).unwrap();
    let r3 = single_report(&repo.run(["--json", "backup"]));
    assert_eq!(u(summary(&r3), "records_deleted"), 1, "{r3}");
    assert_eq!(u(summary(&r3), "records_total"), 4, "{r3}");
    let ana = repo.json(["find", "--customer", "email:ana.lima@example.org"]);
    let deleted: Vec<&Value> = ana
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["meta"]["deleted"] == "true")
        .collect();
    assert_eq!(deleted.len(), 1, "{ana}");
    repo.ok(["check", "--read-data"]);

    // Export: eml files are the messages; the mbox reads back to the same
    // messages (round trip through the mbox connector); jsonl has one line each.
    let eml_dir = repo.p("export-eml");
    repo.ok([
        "export",
        "--format",
        "eml",
        "--out",
        eml_dir.to_str().unwrap(),
        "--customer",
        "ana.lima@example.org",
    ]);
    let exported = emls(&eml_dir);
    assert_eq!(exported.len(), 2);
    let all_msgs: BTreeSet<Vec<u8>> = [
        message(
            1,
            "Ana Lima <ana.lima@example.org>",
            "support@example.com",
            "plain",
        ),
        msgs[0].clone(),
    ]
    .into_iter()
    .collect();
    assert_eq!(exported, all_msgs);
    let mbox_out = repo.p("export.mbox");
    let rep = repo.json([
        "export",
        "--format",
        "mbox",
        "--out",
        mbox_out.to_str().unwrap(),
    ]);
    assert_eq!(u(&rep, "records"), 4, "{rep}");
    add_source(
        &repo,
        &format!(
            "[[source]]\nname = \"reimport\"\ntype = \"mbox\"\npath = {}",
            toml_str(&mbox_out.display().to_string())
        ),
    );
    let back = single_report(&repo.run(["--json", "backup", "--source", "reimport"]));
    assert_eq!(u(summary(&back), "records_new"), 4, "{back}");
    let dest2 = repo.p("restore-reimport");
    repo.restore(s(&back, "snapshot_id"), &dest2);
    let mut every: BTreeSet<Vec<u8>> = msgs.iter().cloned().collect();
    every.insert(message(
        1,
        "Ana Lima <ana.lima@example.org>",
        "support@example.com",
        "plain",
    ));
    assert_eq!(emls(&dest2), every);
    let jsonl = repo.p("export.jsonl");
    repo.ok([
        "export",
        "--format",
        "jsonl",
        "--out",
        jsonl.to_str().unwrap(),
        "--source",
        "old-mail",
    ]);
    let lines: Vec<Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert!(lines
        .iter()
        .all(|l| l["kind"] == "email" && l["payload_text"].is_string()));
}

struct Imap {
    host: String,
    port: u16,
    user: String,
    password: String,
}

fn imap_env(test: &str) -> Option<Imap> {
    match std::env::var("CUSTOS_TEST_IMAP_HOST") {
        Ok(host) if !host.is_empty() => Some(Imap {
            host,
            port: std::env::var("CUSTOS_TEST_IMAP_PORT")
                .unwrap()
                .parse()
                .unwrap(),
            user: std::env::var("CUSTOS_TEST_IMAP_USER").unwrap(),
            password: std::env::var("CUSTOS_TEST_IMAP_PASSWORD").unwrap(),
        }),
        _ => {
            assert!(
                std::env::var("CUSTOS_REQUIRE_IMAP").as_deref() != Ok("1"),
                "{test}: CUSTOS_REQUIRE_IMAP=1 but CUSTOS_TEST_IMAP_HOST is not set"
            );
            eprintln!(
                "SKIP {test}: CUSTOS_TEST_IMAP_HOST is not set (scripts/test.sh starts Dovecot)"
            );
            None
        }
    }
}

fn imap_toml(name: &str, imap: &Imap, folder: &str) -> String {
    format!(
        "[[source]]\nname = \"{name}\"\ntype = \"imap\"\nhost = \"{}\"\nport = {}\ntls = false\nusername = \"{}\"\npassword_env = \"E2E_IMAP_PASSWORD\"\nfolders = [\"{folder}\"]\nmode = \"mirror\"",
        imap.host, imap.port, imap.user
    )
}

#[test]
fn imap_backup_restore_and_back_into_the_mailbox() {
    let Some(imap) = imap_env("rec-imap") else {
        return;
    };
    let folder = format!("e2e-{}", unique("imap").replace(['/', '.'], "-"));
    let restored_folder = format!("{folder}-restored");
    let mut repo = Repo::new(Kind::Local, "rec-imap")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1");
    repo.env("E2E_IMAP_PASSWORD", &imap.password);
    let repo = repo.init();
    add_source(&repo, &imap_toml("mailbox", &imap, &folder));
    add_source(&repo, &imap_toml("restored", &imap, &restored_folder));

    // The loader reads the password from this process's environment.
    std::env::set_var("E2E_IMAP_PASSWORD", &imap.password);
    let conn = custos_connectors::imap::ImapConnector::new(
        toml::from_str(&format!(
            "name = \"loader\"\nhost = \"{}\"\nport = {}\ntls = false\nusername = \"{}\"\npassword_env = \"E2E_IMAP_PASSWORD\"",
            imap.host, imap.port, imap.user
        ))
        .unwrap(),
    );
    let conn = conn.unwrap();
    // One runtime for the loader: its IMAP connection lives across calls.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let msgs: Vec<Vec<u8>> = (0..6)
        .map(|i| {
            message(
                100 + i,
                &format!("c{i}@example.org"),
                "support@example.com",
                "body",
            )
        })
        .collect();
    rt.block_on(async {
        conn.create_folder_if_missing(&folder).await.unwrap();
        for (i, m) in msgs.iter().enumerate() {
            let flags = if i == 0 {
                vec!["\\Flagged".to_string()]
            } else {
                vec![]
            };
            conn.append(&folder, m, &flags, None).await.unwrap();
        }
    });

    let r1 = single_report(&repo.run(["--json", "backup", "--source", "mailbox"]));
    assert_eq!(u(summary(&r1), "records_new"), 6, "{r1}");
    let dest = repo.p("restore1");
    repo.restore(s(&r1, "snapshot_id"), &dest);
    assert_eq!(emls(&dest), msgs.iter().cloned().collect::<BTreeSet<_>>());

    // Two more: only they are fetched.
    let more: Vec<Vec<u8>> = (0..2)
        .map(|i| message(200 + i, "d@example.org", "support@example.com", "late"))
        .collect();
    rt.block_on(async {
        for m in &more {
            conn.append(&folder, m, &[], None).await.unwrap();
        }
    });
    let r2 = single_report(&repo.run(["--json", "backup", "--source", "mailbox"]));
    assert_eq!(u(summary(&r2), "records_new"), 2, "{r2}");
    assert_eq!(u(summary(&r2), "records_unchanged"), 6, "{r2}");

    // Back into the mailbox (another folder), flags kept; a backup of that folder
    // gives the same messages byte for byte.
    let id = s(&r2, "snapshot_id").to_string();
    let out = repo.run([
        "--json",
        "restore",
        &id,
        "-",
        "--to-source",
        "mailbox",
        "--folder",
        &restored_folder,
    ]);
    out.expect_ok();
    assert_eq!(u(&out.json()["appended"], &restored_folder), 8, "{out}");
    let r3 = single_report(&repo.run(["--json", "backup", "--source", "restored"]));
    assert_eq!(u(summary(&r3), "records_new"), 8, "{r3}");
    let dest3 = repo.p("restore3");
    repo.restore(s(&r3, "snapshot_id"), &dest3);
    let mut all: BTreeSet<Vec<u8>> = msgs.iter().cloned().collect();
    all.extend(more.iter().cloned());
    assert_eq!(emls(&dest3), all);
    let flagged = repo.json([
        "find",
        "--source",
        "restored",
        "--customer",
        "c0@example.org",
    ]);
    assert!(
        flagged[0]["meta"]["m.flags"]
            .as_str()
            .unwrap()
            .contains("\\Flagged"),
        "{flagged}"
    );
}

/// A record backup killed with SIGKILL at random moments, then run again,
/// loses nothing and duplicates nothing: the cursors live in the snapshot, so
/// an interrupted run is repeated from the last committed state.
#[test]
fn killed_record_backup_reruns_without_loss_or_duplicates_local() {
    let repo = Repo::new(Kind::Local, "rec-kill")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let path = repo.p("big.mbox");
    let mut msgs: Vec<Vec<u8>> = (0..1500)
        .map(|i| {
            let mut m = message(
                i,
                &format!("c{i}@example.org"),
                "support@example.com",
                "text",
            );
            m.extend(std::iter::repeat_n(b'x', 2000 + (i * 37) % 3000));
            m.extend_from_slice(b"\r\n");
            m
        })
        .collect();
    std::fs::write(&path, mbox(&msgs)).unwrap();
    add_source(
        &repo,
        &format!(
            "[[source]]\nname = \"mail\"\ntype = \"mbox\"\npath = {}",
            toml_str(&path.display().to_string())
        ),
    );
    // Measure one run, then kill later (full-listing) runs at random points of that span.
    let start = std::time::Instant::now();
    let r0 = single_report(&repo.run(["--json", "backup"]));
    let span = start.elapsed();
    assert_eq!(u(summary(&r0), "records_total"), 1500, "{r0}");
    let mut rng = rng("rec-kill");
    let mut killed_mid_run = 0;
    for trial in 0..knob("CUSTOS_TEST_CRASH_TRIALS", 6) {
        // New messages each trial, so the killed run has real work to lose.
        for j in 0..50 {
            let i = 10_000 + trial * 100 + j;
            msgs.push(message(
                i,
                "late@example.org",
                "support@example.com",
                "late",
            ));
        }
        std::fs::write(&path, mbox(&msgs)).unwrap();
        let delay = span.mul_f64(rand::Rng::gen_range(&mut rng, 0.05..1.0));
        let mut child = spawn(repo.cmd(["backup", "--force"]));
        std::thread::sleep(delay);
        // Killed only if it died by the signal: it may exit on its own
        // between a check and the kill.
        let _ = child.kill();
        if child.wait().unwrap().code().is_none() {
            killed_mid_run += 1;
        }
        let out = repo.run(["--json", "backup"]);
        out.expect_ok();
        let r = single_report(&out);
        assert_eq!(
            u(summary(&r), "records_total"),
            msgs.len() as u64,
            "trial {trial}: {r}"
        );
    }
    assert!(killed_mid_run >= 1, "no trial killed a running backup");
    repo.ok(["check", "--read-data"]);
    let dest = repo.p("restore");
    repo.restore("latest", &dest);
    let restored = read_all_files(&dest);
    assert_eq!(restored.len(), msgs.len(), "no duplicates, nothing lost");
    assert_eq!(emls(&dest), msgs.iter().cloned().collect::<BTreeSet<_>>());
}

/// A minimal in-house CRM on 127.0.0.1 (std threads, HTTP/1.1, one request
/// per connection): `GET /v1/items` answers a page of records to
/// `Authorization: Bearer good`, 401 otherwise.
fn tiny_crm() -> String {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut authorized = false;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line
                    .to_ascii_lowercase()
                    .starts_with("authorization: bearer good")
                {
                    authorized = true;
                }
                if line == "\r\n" {
                    break;
                }
                line.clear();
            }
            let (status, body) = if authorized {
                ("200 OK", r#"{"data":[{"id":1,"email":"ana@example.org"}]}"#)
            } else {
                ("401 Unauthorized", r#"{"error":"invalid_token"}"#)
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}/")
}

#[test]
fn sources_check_reports_http_sources() {
    let repo = Repo::new(Kind::Local, "rec-sources-check")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let url = tiny_crm();
    // A port nothing listens on: bind, note, close.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/", l.local_addr().unwrap())
    };
    let source = |name: &str, base: &str, token: &str| {
        format!(
            "[[source]]\nname = \"{name}\"\ntype = \"rest\"\nbase_url = \"{base}\"\nbearer_token_command = \"printf {token}\"\nhttp = {{ max_attempts = 1, timeout_secs = 5 }}\n\
             [[source.endpoints]]\ncollection = \"items\"\npath = \"v1/items\"\nrecords = \"/data\"\nid = \"/id\"\ncustomer_fields = [\"email:/email\"]\n\
             [[source.endpoints]]\ncollection = \"items-again\"\npath = \"v1/items\"\nrecords = \"/data\"\nid = \"/id\""
        )
    };
    add_source(&repo, &source("crm-good", &url, "good"));
    add_source(&repo, &source("crm-badtoken", &url, "bad"));
    add_source(&repo, &source("crm-down", &closed, "good"));
    let out = repo.run(["--json", "sources", "check"]);
    assert_ne!(out.code, Some(0), "failures are an error exit\n{out}");
    let rows = out.json();
    let row = |n: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["source"] == n)
            .unwrap_or_else(|| panic!("{n} missing: {rows}"))
            .clone()
    };
    let good = row("crm-good");
    assert_eq!(good["ok"], true, "{good}");
    assert_eq!(good["type"], "rest");
    assert_eq!(
        (&good["reachable"], &good["authenticated"]),
        (&Value::Bool(true), &Value::Bool(true))
    );
    assert_eq!(good["collections"]["count"], 2);
    assert_eq!(
        good["collections"]["names"],
        serde_json::json!(["items", "items-again"])
    );
    let bad = row("crm-badtoken");
    assert_eq!(
        (&bad["ok"], &bad["reachable"], &bad["authenticated"]),
        (&Value::Bool(false), &Value::Bool(true), &Value::Bool(false)),
        "{bad}"
    );
    assert!(!bad["detail"].as_str().unwrap().contains("bad\""), "{bad}");
    let down = row("crm-down");
    assert_eq!(
        (&down["ok"], &down["reachable"]),
        (&Value::Bool(false), &Value::Bool(false)),
        "{down}"
    );
    // Human output: one line per source with the same facts.
    let human = repo.run(["sources", "check", "--source", "crm-good"]);
    assert!(
        human.stdout.contains(
            "ok   crm-good (rest): reachable, authenticated, 2 collection(s): items, items-again"
        ),
        "{human}"
    );
}

/// Peak resident memory (`VmHWM`, KiB) of a running process, if readable.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `custos --json backup` of `repo`, with the peak RSS (KiB) of the process:
/// its `VmHWM` (its own high-water mark), polled while it runs.
fn backup_with_peak_rss(repo: &Repo, what: &str) -> (Out, u64) {
    let start = std::time::Instant::now();
    let mut child = spawn(repo.cmd(["--json", "backup"]));
    let pid = child.id();
    let mut peak_kib = 0;
    loop {
        if let Some(k) = vm_hwm_kib(pid) {
            peak_kib = peak_kib.max(k);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    (finish(child, what, start), peak_kib)
}

/// A Maildir holding one large message (`CUSTOS_TEST_STREAM_MB`, default 200
/// MiB; random base64 lines, written piece by piece) is backed up by a
/// `custos backup` whose peak RSS stays far below the message size (the
/// message is streamed from the file, never held in memory), and restores
/// byte-identical.
#[test]
fn large_maildir_message_is_streamed_with_bounded_memory() {
    use std::io::Write as _;
    if !Path::new("/proc/self/status").exists() {
        println!("skipping: no /proc to read VmHWM from");
        return;
    }
    let mb = knob("CUSTOS_TEST_STREAM_MB", 200);
    let repo = Repo::new(Kind::Local, "rec-maildir-big")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let md = repo.p("Maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(md.join(sub)).unwrap();
    }
    let big_path = md.join("cur/1700000000.M1P1.host:2,S");
    let mut hasher = blake3::Hasher::new();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big_path).unwrap());
        let mut put = |b: &[u8]| {
            hasher.update(b);
            f.write_all(b).unwrap();
        };
        put(b"From: Big Sender <big@example.org>\r\nTo: support@example.com\r\nSubject: large scan\r\nMessage-ID: <big-e2e@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nscan attached\r\n--B\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Disposition: attachment; filename=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n");
        let mut rng = rng("large_maildir_message");
        let engine = base64::engine::general_purpose::STANDARD;
        let mut line = String::with_capacity(80);
        let piece = 57 * 1024; // raw bytes per generated piece (1024 lines of 78)
        for _ in 0..(mb << 20).div_ceil(78 * 1024) {
            let raw = random_bytes(&mut rng, piece);
            let mut out = Vec::with_capacity(piece * 4 / 3 + 2048);
            for chunk in raw.chunks(57) {
                line.clear();
                base64::Engine::encode_string(&engine, chunk, &mut line);
                out.extend_from_slice(line.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            put(&out);
        }
        put(b"--B--\r\n");
        f.flush().unwrap();
    }
    let big_digest = hasher.finalize();
    let big_len = std::fs::metadata(&big_path).unwrap().len();
    let small = message(1, "ana@example.org", "support@example.com", "small");
    std::fs::write(md.join("cur/1700000001.M2P1.host:2,S"), &small).unwrap();
    add_source(
        &repo,
        &format!(
            "[[source]]\nname = \"big-mail\"\ntype = \"maildir\"\npath = {}",
            toml_str(&md.display().to_string())
        ),
    );

    let (out, peak_kib) = backup_with_peak_rss(&repo, "backup of a large Maildir message");
    out.expect_ok();
    let report = single_report(&out);
    assert_eq!(u(summary(&report), "records_new"), 2, "{report}");
    let peak_mib = peak_kib / 1024;
    println!(
        "large maildir message: {} MiB backed up in {:.1}s, custos peak RSS (VmHWM) {peak_mib} MiB",
        big_len >> 20,
        out.elapsed.as_secs_f64()
    );
    assert!(peak_kib > 0, "VmHWM was never read");
    // Holding the message needs at least its size (measured: 363 MiB peak
    // for 200 MiB with `stream_threshold_mib = 1024`); streamed, about 70 MiB
    // (once over 120 MiB while other e2e tests ran in parallel: packs
    // queue up in the pipeline when the cores are busy).
    let bound_mib = 160;
    assert!(
        peak_mib < bound_mib,
        "peak RSS {peak_mib} MiB for a {} MiB message (bound {bound_mib} MiB): the message is not streamed",
        big_len >> 20
    );

    // Byte-identical restore; metadata from the parsed first MiB.
    let dest = repo.p("restore");
    repo.restore("latest", &dest);
    let restored: Vec<(std::path::PathBuf, u64)> = walk(&dest)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .map(|p| {
            let n = std::fs::metadata(&p).unwrap().len();
            (p, n)
        })
        .collect();
    assert_eq!(restored.len(), 2, "{restored:?}");
    let (big_restored, _) = restored.iter().find(|(_, n)| *n == big_len).unwrap();
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(big_restored).unwrap())
        .unwrap();
    assert_eq!(h.finalize(), big_digest, "restored large message differs");
    let hits = repo.json(["find", "--customer", "big@example.org"]);
    let hits = hits.as_array().unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["meta"]["m.size"], big_len.to_string(), "{hits:?}");
}

/// An mbox holding one large message (`CUSTOS_TEST_STREAM_MB`, default 200
/// MiB, with `From ` lines past its first MiB that the file quotes as
/// `>From `) between two small ones is backed up by a `custos backup` whose
/// peak RSS stays far below the message size (the message is cut, hashed and
/// unescaped in one pass, then streamed from its range of the file), and the
/// restored `.eml` is the original message, byte for byte.
#[test]
fn large_mbox_message_is_streamed_with_bounded_memory() {
    use std::io::Write as _;
    if !Path::new("/proc/self/status").exists() {
        println!("skipping: no /proc to read VmHWM from");
        return;
    }
    let mb = knob("CUSTOS_TEST_STREAM_MB", 200);
    let repo = Repo::new(Kind::Local, "rec-mbox-big")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let small = [
        message(
            1,
            "ana@example.org",
            "support@example.com",
            "From the start",
        ),
        message(2, "bo@example.org", "support@example.com", ">From quoted"),
    ];
    let path = repo.p("export.mbox");
    let mut hasher = blake3::Hasher::new(); // of the big message as it is (unescaped)
    let mut big_len = 0u64;
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        f.write_all(&mbox(&small[..1])).unwrap();
        f.write_all(b"From big@example.org Mon Nov  2 09:15:00 2026\n")
            .unwrap();
        // `msg` = message bytes, `file` = how the mbox holds them.
        let mut put = |msg: &[u8], file: &[u8]| {
            hasher.update(msg);
            big_len += msg.len() as u64;
            f.write_all(file).unwrap();
        };
        let head = b"From: Big Sender <big@example.org>\r\nTo: support@example.com\r\nSubject: large mbox scan\r\nMessage-ID: <big-mbox-e2e@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Disposition: attachment; filename=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n";
        put(head, head);
        let mut rng = rng("large_mbox_message");
        let engine = base64::engine::general_purpose::STANDARD;
        let mut line = String::with_capacity(80);
        let piece = 57 * 1024;
        for _ in 0..(mb << 20).div_ceil(78 * 1024) {
            let raw = random_bytes(&mut rng, piece);
            let mut out = Vec::with_capacity(piece * 4 / 3 + 2048);
            for chunk in raw.chunks(57) {
                line.clear();
                base64::Engine::encode_string(&engine, chunk, &mut line);
                out.extend_from_slice(line.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            put(&out, &out);
        }
        put(
            b"--B\r\nContent-Type: text/plain\r\n\r\nFrom the scanner\r\n>From a reply\r\n--B--\r\n",
            b"--B\r\nContent-Type: text/plain\r\n\r\n>From the scanner\r\n>>From a reply\r\n--B--\r\n",
        );
        f.write_all(b"\n").unwrap(); // the separating blank line
        f.write_all(&mbox(&small[1..])).unwrap();
        f.flush().unwrap();
    }
    let big_digest = hasher.finalize();
    add_source(
        &repo,
        &format!(
            "[[source]]\nname = \"big-mbox\"\ntype = \"mbox\"\npath = {}",
            toml_str(&path.display().to_string())
        ),
    );

    let (out, peak_kib) = backup_with_peak_rss(&repo, "backup of a large mbox message");
    out.expect_ok();
    let report = single_report(&out);
    assert_eq!(u(summary(&report), "records_new"), 3, "{report}");
    let peak_mib = peak_kib / 1024;
    println!(
        "large mbox message: {} MiB backed up in {:.1}s, custos peak RSS (VmHWM) {peak_mib} MiB",
        big_len >> 20,
        out.elapsed.as_secs_f64()
    );
    assert!(peak_kib > 0, "VmHWM was never read");
    // Held whole: 364 MiB peak (measured with `stream_threshold_mib = 1024`);
    // streamed, about 70 MiB; the bound as for Maildir.
    let bound_mib = 160;
    assert!(
        peak_mib < bound_mib,
        "peak RSS {peak_mib} MiB for a {} MiB message (bound {bound_mib} MiB): the message is not streamed",
        big_len >> 20
    );

    // Restored: the message (unescaped, no separator), byte for byte.
    let dest = repo.p("restore");
    repo.restore("latest", &dest);
    let restored: Vec<(std::path::PathBuf, u64)> = walk(&dest)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .map(|p| {
            let n = std::fs::metadata(&p).unwrap().len();
            (p, n)
        })
        .collect();
    assert_eq!(restored.len(), 3, "{restored:?}");
    let (big_restored, _) = restored
        .iter()
        .find(|(_, n)| *n == big_len)
        .unwrap_or_else(|| panic!("no restored file of {big_len} bytes: {restored:?}"));
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(big_restored).unwrap())
        .unwrap();
    assert_eq!(h.finalize(), big_digest, "restored large message differs");
    let smalls: BTreeSet<Vec<u8>> = restored
        .iter()
        .filter(|(_, n)| *n != big_len)
        .map(|(p, _)| std::fs::read(p).unwrap())
        .collect();
    assert_eq!(smalls, small.iter().cloned().collect());
    let hits = repo.json(["find", "--customer", "big@example.org"]);
    let hits = hits.as_array().unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["meta"]["m.size"], big_len.to_string(), "{hits:?}");
    assert_eq!(
        hits[0]["meta"]["m.parsed_bytes"],
        (1 << 20).to_string(),
        "{hits:?}"
    );
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A REST source's server that takes `delay` per request and records the
/// highest number of requests in flight at once.
fn slow_crm(
    delay: std::time::Duration,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let inflight = std::sync::Arc::new(AtomicUsize::new(0));
    let peak = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = peak.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (inflight, peak) = (inflight.clone(), peak.clone());
            std::thread::spawn(move || {
                let now = inflight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line == "\r\n" {
                        break;
                    }
                    line.clear();
                }
                std::thread::sleep(delay);
                // Done before answering: once the client has the answer it
                // may start the next source's request at once, and this
                // thread may not run again before that request is counted.
                inflight.fetch_sub(1, Ordering::SeqCst);
                let body = r#"{"data":[{"id":1,"email":"ana@example.org"},{"id":2,"email":"bo@example.org"}]}"#;
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    (format!("http://{addr}/"), seen)
}

/// `custos backup` of several configured sources runs them at once
/// (`--parallel`, default 4): two slow API sources overlap at their server;
/// with `--parallel 1` they never do. Both commit either way.
#[test]
fn configured_sources_are_backed_up_concurrently() {
    let repo = Repo::new(Kind::Local, "rec-parallel")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let (url, peak) = slow_crm(std::time::Duration::from_millis(400));
    for name in ["crm-a", "crm-b"] {
        add_source(
            &repo,
            &format!(
                "[[source]]\nname = \"{name}\"\ntype = \"rest\"\nbase_url = \"{url}\"\n\
                 [[source.endpoints]]\ncollection = \"items\"\npath = \"v1/items\"\nrecords = \"/data\"\nid = \"/id\"\ncustomer_fields = [\"email:/email\"]"
            ),
        );
    }
    let out = repo.run(["--json", "backup", "--parallel", "1"]);
    out.expect_ok();
    assert_eq!(
        peak.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one source at a time"
    );
    let out = repo.run(["--json", "backup", "--force"]);
    out.expect_ok();
    let reports = out.json();
    let sources: Vec<&str> = reports
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["crm-a", "crm-b"], "reports in config order");
    assert!(
        peak.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the two sources overlapped at their server"
    );
    assert_eq!(repo.snapshots().len(), 4);
}

/// An API whose list grows: `GET /v1/items?offset=O&limit=L` pages through
/// `count` records (each page takes `delay`), `{"data": [...]}`.
fn paged_crm(
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    delay: std::time::Duration,
) -> String {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let query = first.split_whitespace().nth(1).unwrap_or("").to_string();
                let param = |k: &str| -> usize {
                    query
                        .split(['?', '&'])
                        .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                let (offset, limit) = (param("offset"), param("limit").max(1));
                let n = count.load(std::sync::atomic::Ordering::SeqCst);
                let items: Vec<serde_json::Value> = (offset..n.min(offset + limit))
                    .map(|i| serde_json::json!({"id": i, "email": format!("c{i}@example.org"), "note": "x".repeat(200 + i % 300)}))
                    .collect();
                std::thread::sleep(delay);
                let body = serde_json::json!({ "data": items }).to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    format!("http://{addr}/")
}

/// An API source's backup killed with SIGKILL at random points of a full
/// listing, then run again: every record the API holds is in the snapshot
/// once, and restores.
#[test]
fn killed_api_backup_reruns_without_loss_or_duplicates_local() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let repo = Repo::new(Kind::Local, "rec-api-kill")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let count = std::sync::Arc::new(AtomicUsize::new(2000));
    let url = paged_crm(count.clone(), std::time::Duration::from_millis(40));
    add_source(
        &repo,
        &format!(
            "[[source]]\nname = \"crm\"\ntype = \"rest\"\nbase_url = \"{url}\"\n\
             http = {{ requests_per_second = 500 }}\n\
             [[source.endpoints]]\ncollection = \"items\"\npath = \"v1/items\"\nrecords = \"/data\"\nid = \"/id\"\n\
             customer_fields = [\"email:/email\"]\n\
             pagination = {{ style = \"offset\", offset_param = \"offset\", limit_param = \"limit\", limit = 100 }}"
        ),
    );
    let start = std::time::Instant::now();
    let r0 = single_report(&repo.run(["--json", "backup"]));
    let span = start.elapsed();
    assert_eq!(u(summary(&r0), "records_total"), 2000, "{r0}");
    let mut rng = rng("rec-api-kill");
    let mut killed_mid_run = 0;
    for trial in 0..knob("CUSTOS_TEST_CRASH_TRIALS", 4) {
        count.fetch_add(100, Ordering::SeqCst);
        let delay = span.mul_f64(rand::Rng::gen_range(&mut rng, 0.1..0.9));
        let mut child = spawn(repo.cmd(["backup", "--force"]));
        std::thread::sleep(delay);
        // Killed only if it died by the signal: it may exit on its own
        // between a check and the kill.
        let _ = child.kill();
        if child.wait().unwrap().code().is_none() {
            killed_mid_run += 1;
        }
        let out = repo.run(["--json", "backup"]);
        out.expect_ok();
        let r = single_report(&out);
        assert_eq!(
            u(summary(&r), "records_total"),
            count.load(Ordering::SeqCst) as u64,
            "trial {trial}: {r}"
        );
    }
    assert!(killed_mid_run >= 1, "no run was killed mid-way");
    let dest = repo.p("restore");
    repo.restore("latest", &dest);
    let restored = read_all_files(&dest);
    assert_eq!(
        restored.len(),
        count.load(Ordering::SeqCst),
        "no duplicates, nothing lost"
    );
    repo.ok(["check", "--read-data"]);
}

/// A record backup with `CUSTOS_LOG=info` for the connectors: (report, log
/// without ANSI colours).
fn logged_backup(repo: &Repo) -> (Value, String) {
    let mut cmd = repo.cmd(["--json", "backup"]);
    cmd.env("CUSTOS_LOG", "custos_connectors=info,warn");
    let out = run_cmd(cmd);
    out.expect_ok();
    let mut log = String::new();
    let mut chars = out.stderr.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            log.push(c);
        }
    }
    (single_report(&out), log)
}

/// An mbox of thousands of messages: its cursor (16 hex digits per message)
/// is stored in tree blobs, so the snapshot object stays small; the next
/// backup reads it back and reads only the appended messages; prune after
/// forgetting the older snapshot keeps the newer one's cursor blobs, so a
/// further incremental backup still reads only what was appended.
#[test]
fn mbox_cursor_in_blobs_local() {
    let repo = Repo::new(Kind::Local, "rec-cursor-blobs")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let path = repo.p("big.mbox");
    let msg = |i: usize| {
        message(
            i,
            &format!("c{i}@example.org"),
            "support@example.com",
            "text",
        )
    };
    let mut msgs: Vec<Vec<u8>> = (0..5000).map(msg).collect();
    std::fs::write(&path, mbox(&msgs)).unwrap();
    add_source(
        &repo,
        &format!(
            "[[source]]\nname = \"mail\"\ntype = \"mbox\"\npath = {}\nmode = \"archive\"",
            toml_str(&path.display().to_string())
        ),
    );
    let (r1, log1) = logged_backup(&repo);
    assert_eq!(u(summary(&r1), "records_new"), 5000, "{r1}");
    assert!(log1.contains("fetched=5000"), "{log1}");

    // The snapshot names its cursor blobs; the object holds no 80 KB of digests.
    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 1);
    let cursors = snaps[0]["cursors"].as_object().unwrap();
    assert_eq!(cursors.len(), 1, "{cursors:?}");
    let c = cursors.values().next().unwrap();
    assert!(c["cursor"].is_null(), "{c}");
    assert!(!c["cursor_blobs"].as_array().unwrap().is_empty(), "{c}");
    let sizes = repo.raw().list("snapshots/");
    assert_eq!(sizes.len(), 1);
    assert!(
        sizes[0].1 < 8 * 1024,
        "snapshot object of {} bytes",
        sizes[0].1
    );

    // Incremental: the cursor is read back from its blobs; only the tail is read.
    msgs.extend((5000..5100).map(msg));
    std::fs::write(&path, mbox(&msgs)).unwrap();
    let (r2, log2) = logged_backup(&repo);
    assert_eq!(u(summary(&r2), "records_new"), 100, "{r2}");
    assert_eq!(u(summary(&r2), "records_total"), 5100, "{r2}");
    assert!(log2.contains("fetched=100"), "{log2}");
    assert!(!log2.contains("listed in full"), "{log2}");

    // Forget the first snapshot, prune (mark, then sweep): the second keeps its cursor.
    let first = s(&snaps[0], "id").to_string();
    repo.ok(["forget", &first[..8]]);
    // A low repack threshold: packs holding both snapshots' blobs are rewritten.
    let prune = ["prune", "--grace", "0s", "--repack-threshold", "1"];
    repo.json(prune);
    let swept = repo.json(prune);
    assert!(u(&swept, "packs_deleted") >= 1, "{swept}");
    repo.ok(["check", "--read-data"]);
    msgs.extend((5100..5150).map(msg));
    std::fs::write(&path, mbox(&msgs)).unwrap();
    let (r3, log3) = logged_backup(&repo);
    assert_eq!(u(summary(&r3), "records_new"), 50, "{r3}");
    assert_eq!(u(summary(&r3), "records_total"), 5150, "{r3}");
    assert!(log3.contains("fetched=50"), "{log3}");
    assert!(!log3.contains("listed in full"), "{log3}");
    repo.ok(["check", "--read-data"]);
    let dest = repo.p("restore");
    repo.restore("latest", &dest);
    assert_eq!(emls(&dest), msgs.iter().cloned().collect::<BTreeSet<_>>());
}
