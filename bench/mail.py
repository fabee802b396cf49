"""Mail scenarios of the benchmark: IMAP pull and mbox import, in messages/s.

- IMAP pull: N generated messages are delivered into a Dovecot INBOX
  (`scripts/services/imap.sh`, 127.0.0.1, plaintext); `custos backup` of an
  `imap` source is timed against `mbsync` (Debian `isync`) pulling the same
  mailbox into an empty local Maildir. Both start from nothing each repetition
  (fresh repository / fresh Maildir and sync state).
- mbox import: the same N messages in one mboxrd file; `custos backup` of an
  `mbox` source against `restic backup` of the file as a file.

Every run is verified: custos' restored `.eml` files must be the messages byte
for byte (as a multiset), mbsync's Maildir must hold every message (mbsync
stores LF line ends in a Maildir, so it is compared with CRLF turned into LF),
restic's restored mbox must be the file. Called by driver.py with the driver
module (for run_measured, apt, logging) so this file stays self-contained.
"""

import collections
import hashlib
import imaplib
import os
import random
import re
import statistics
import subprocess
import time

import corpus

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMAP_SH = os.path.join(ROOT, "scripts", "services", "imap.sh")
MAIL_LABEL = {"imap-pull": "IMAP pull (Dovecot INBOX → backup)", "mbox-import": "mbox import (one mboxrd file)"}
PEER = {"imap-pull": "mbsync", "mbox-import": "restic"}


def messages(n, seed):
    """N deterministic messages (CRLF, as Dovecot serves them); every 10th has
    `From ` lines in its body (mboxrd-quoted in the mbox), every 20th a
    50-200 KB attachment."""
    rng = random.Random(f"custos-bench/mail/{seed}/{n}")
    text = corpus.TextSource(rng, 8 * corpus.MIB)
    out = []
    for i in range(n):
        att = ()
        if i % 20 == 7:
            kind = corpus.pick_weighted(rng, corpus.ATTACH_KINDS)
            size = rng.randint(50_000, 200_000)
            att = ((f"doc{i}.{kind[1]}", corpus.attachment_bytes(rng, text, kind, size)),)
        m = corpus.email_message(rng, text, corpus.EPOCH + i * 61, attachments=att)
        # The generator's subject may hold paragraph breaks: one header line;
        # every line end CRLF (Dovecot serves bare LF as CRLF).
        m = re.sub(rb"(?s)\r\nSubject: (.*?)\r\nMIME-Version",
                   lambda g: b"\r\nSubject: " + re.sub(rb"\s+", b" ", g.group(1)).strip() + b"\r\nMIME-Version",
                   m, count=1)
        m = re.sub(rb"(?<!\r)\n", b"\r\n", m)
        if i % 10 == 3 and not att:
            m += b"From the archive of the sender\r\n>From a quoted reply\r\n"
        out.append(m)
    return out


def mboxrd(msgs):
    """The messages as one mboxrd file (as `custos export --format mbox` writes it)."""
    parts = []
    for m in msgs:
        parts.append(b"From bench@example.org Mon Nov  2 09:15:00 2026\n")
        for line in m.splitlines(keepends=True):
            if line.lstrip(b">").startswith(b"From "):
                parts.append(b">")
            parts.append(line)
        if not m.endswith(b"\n"):
            parts.append(b"\n")
        parts.append(b"\n")
    return b"".join(parts)


def digests(blobs):
    return collections.Counter(hashlib.sha256(b).hexdigest() for b in blobs)


def files_under(root, pred=lambda p: True):
    for d, _, names in os.walk(root):
        for name in names:
            p = os.path.join(d, name)
            if pred(p):
                yield p


def read(p):
    with open(p, "rb") as f:
        return f.read()


def compare_sets(want, got, what):
    if want == got:
        return []
    missing = sum((want - got).values())
    extra = sum((got - want).values())
    return [f"{what}: {missing} message(s) missing or different, {extra} unexpected "
            f"(want {sum(want.values())}, got {sum(got.values())})"]


class Imap:
    """The Dovecot instance of the IMAP scenario."""

    def __init__(self, name, port, state_file, D):
        self.name, self.port, self.state_file, self.D = name, port, state_file, D
        self.started, self.env = False, {}

    def start(self):
        for i in range(10):
            port = self.port + 10 * i
            if self.state_file:
                with open(self.state_file, "w") as f:
                    f.write(self.name + "\n")
            r = subprocess.run(["bash", IMAP_SH, "start", self.name, str(port)],
                               capture_output=True, text=True, timeout=900)
            if r.returncode == 0:
                self.started = True
                break
            if r.returncode == 3:
                self.D.log(f"IMAP port {port} busy, trying {port + 10}")
                continue
            raise self.D.BenchError(f"Dovecot failed to start (exit {r.returncode}): {r.stderr.strip()[-800:]}")
        else:
            raise self.D.BenchError("no free port for Dovecot")
        envfile = subprocess.run(["bash", IMAP_SH, "env", self.name], capture_output=True, text=True,
                                 check=True).stdout.strip()
        with open(envfile) as f:
            for line in f:
                m = re.match(r"export (\w+)=(.*)$", line.strip())
                if m:
                    self.env[m.group(1)] = m.group(2)
        self.port = int(self.env["CUSTOS_TEST_IMAP_PORT"])
        self.user, self.password = self.env["CUSTOS_TEST_IMAP_USER"], self.env["CUSTOS_TEST_IMAP_PASSWORD"]
        self.maildir = self.env["CUSTOS_TEST_IMAP_MAILDIR"]
        self.D.log(f"IMAP (Dovecot) at 127.0.0.1:{self.port}")

    def stop(self):
        if self.started:
            subprocess.run(["bash", IMAP_SH, "stop", self.name], capture_output=True, timeout=120)
            self.started = False

    def _session(self):
        c = imaplib.IMAP4("127.0.0.1", self.port)
        c.login(self.user, self.password)
        return c

    def load(self, msgs):
        """Deliver the messages into INBOX (Maildir delivery: tmp/ then cur/), then
        let Dovecot index them (UIDs, sizes) so no tool pays for that."""
        c = self._session()
        c.select("INBOX")
        c.logout()
        for sub in ("tmp", "cur"):
            os.makedirs(os.path.join(self.maildir, sub), exist_ok=True)
        for i, m in enumerate(msgs):
            uniq = f"{corpus.EPOCH + i}.M{i}P1.custos-bench"
            tmp = os.path.join(self.maildir, "tmp", uniq)
            with open(tmp, "wb") as f:
                f.write(m)
            os.rename(tmp, os.path.join(self.maildir, "cur", uniq + ":2,S"))
        c = self._session()
        typ, data = c.select("INBOX", readonly=True)
        count = int(data[0])
        if count != len(msgs):
            raise self.D.BenchError(f"Dovecot INBOX holds {count} messages, {len(msgs)} delivered")
        c.uid("FETCH", "1:*", "(RFC822.SIZE FLAGS INTERNALDATE)")
        c.logout()


def custos_config(path, repo, source_toml):
    with open(path, "w") as f:
        f.write('[repository]\npassword_env = "CUSTOS_PASSWORD"\ncompression = 3\n\n'
                f'[[target]]\nname = "bench"\nurl = "{repo}"\n\n{source_toml}\n')


def run(ctx, D):
    """The mail scenarios. Returns (records, failures, notes)."""
    args = ctx.args
    n = args.mail_messages
    records, failures, notes = [], [], []
    work = os.path.join(ctx.work, "mail")
    os.makedirs(work, exist_ok=True)
    t0 = time.monotonic()
    msgs = messages(n, args.seed)
    total = sum(len(m) for m in msgs)
    want = digests(msgs)
    want_lf = digests(m.replace(b"\r\n", b"\n") for m in msgs)
    D.log(f"mail: {n} messages, {D.human(total)}, generated in {time.monotonic() - t0:.1f} s")
    ctx.mail_corpus = {"messages": n, "bytes": total, "seed": args.seed}
    custos = next((t for t in ctx.tools if t.name == "custos"), None)
    restic = next((t for t in ctx.tools if t.name == "restic"), None)
    if custos is None:
        notes.append("custos not among the tools: mail scenarios skipped")
        return records, failures, notes

    def measure(scenario, tool, rep, cmd, env, verify):
        label = f"mail-{scenario}-{tool}-r{rep}"
        os.sync()
        D.log(f"{label} ...")
        try:
            res = D.run_measured(ctx, cmd, env, label)
        except D.BenchError as e:
            failures.append(str(e))
            D.log(f"FAILED: {e}")
            return
        diffs = verify()
        user, sys_ = res.get("user"), res.get("sys")
        rec = {"scenario": scenario, "tool": tool, "rep": rep, "messages": n, "bytes": total,
               "wall_s": round(res["wall"], 4), "msgs_per_s": n / res["wall"],
               "mb_per_s": total / 1e6 / res["wall"],
               "cpu_s": user + sys_ if user is not None and sys_ is not None else None,
               "peak_rss_kib": res.get("rss_kib"), "verified": not diffs, "differences": diffs,
               "log": res["log"]}
        records.append(rec)
        D.log(f"{label}: {rec['wall_s']:.2f} s, {rec['msgs_per_s']:.0f} msg/s, {rec['mb_per_s']:.1f} MB/s, "
              f"rss {(rec['peak_rss_kib'] or 0) / 1024:.0f} MiB, "
              f"{'verified' if not diffs else 'DIFFERS: ' + '; '.join(diffs)}")
        if diffs:
            failures.append(f"{label}: " + "; ".join(diffs))

    def custos_run(scenario, rep, source_toml, extra_env):
        d = os.path.join(work, f"custos-{scenario}-r{rep}")
        D.rmtree(d)
        os.makedirs(d)
        cfg, repo, cache = os.path.join(d, "custos.toml"), os.path.join(d, "repo"), os.path.join(d, "cache")
        custos_config(cfg, repo, source_toml)
        env = D.clean_env({**custos.base_env(None), **extra_env})
        g = [custos.bin, "-c", cfg, "--cache-dir", cache]
        try:
            D.run_plain(ctx, g + ["-q", "init"], env, f"mail-{scenario}-custos-r{rep}-init")
        except D.BenchError as e:
            failures.append(str(e))
            return

        def verify():
            dest = os.path.join(d, "restore")
            try:
                D.run_plain(ctx, g + ["-q", "restore", "latest", dest], env,
                            f"mail-{scenario}-custos-r{rep}-restore")
            except D.BenchError as e:
                return [str(e)]
            got = digests(read(p) for p in files_under(dest, lambda p: p.endswith(".eml")))
            return compare_sets(want, got, "custos restore")
        measure(scenario, "custos", rep, g + ["-q", "--json", "backup", "--source", "mail"], env, verify)
        if not args.keep:
            D.rmtree(d)

    # -- IMAP pull
    imap = None
    mbsync = None
    try:
        mbsync = D.ensure_binary("mbsync", "isync")
    except D.BenchError as e:
        msg = f"mbsync (Debian isync) could not be installed ({str(e).splitlines()[0]}): IMAP pull measured for custos only"
        notes.append(msg)
        D.log(msg)
        if not args.quick:
            failures.append(msg)
    if mbsync:
        ctx.versions_extra["mbsync"] = D.version_of([mbsync, "--version"])
    try:
        imap = Imap(args.imap_name, args.imap_port, args.imap_state_file, D)
        imap.start()
        t1 = time.monotonic()
        imap.load(msgs)
        D.log(f"mail: {n} messages delivered to Dovecot and indexed in {time.monotonic() - t1:.1f} s")
    except (D.BenchError, OSError, imaplib.IMAP4.error, subprocess.SubprocessError) as e:
        msg = f"IMAP pull skipped: Dovecot unavailable ({str(e).splitlines()[0][:300]})"
        notes.append(msg)
        D.log(msg)
        if not args.quick:
            failures.append(msg)
        if imap:
            imap.stop()
        imap = None
    try:
        for rep in range(1, args.reps + 1):
            if imap:
                custos_run("imap-pull", rep,
                           '[[source]]\nname = "mail"\ntype = "imap"\nhost = "127.0.0.1"\n'
                           f'port = {imap.port}\ntls = false\nusername = "{imap.user}"\n'
                           'password_env = "BENCH_IMAP_PASSWORD"\nfolders = ["INBOX"]\n',
                           {"BENCH_IMAP_PASSWORD": imap.password})
                # mbsync as installed (FSync yes: an fsync per message) and without fsync.
                for tool, fsync in (("mbsync", "yes"), ("mbsync-nofsync", "no")):
                    if not mbsync:
                        break
                    d = os.path.join(work, f"{tool}-r{rep}")
                    D.rmtree(d)
                    os.makedirs(os.path.join(d, "Mail"))
                    os.makedirs(os.path.join(d, "state"))
                    conf = os.path.join(d, "mbsyncrc")
                    with open(conf, "w") as f:
                        f.write(f"FSync {fsync}\n\n"
                                f"IMAPAccount bench\nHost 127.0.0.1\nPort {imap.port}\nUser {imap.user}\n"
                                f"Pass {imap.password}\nSSLType None\nAuthMechs LOGIN\n\n"
                                "IMAPStore remote\nAccount bench\n\n"
                                f"MaildirStore local\nPath {d}/Mail/\nInbox {d}/Mail/INBOX\n\n"
                                "Channel bench\nFar :remote:\nNear :local:\nPatterns INBOX\n"
                                f"Create Near\nSync Pull\nSyncState {d}/state/\n")
                    os.chmod(conf, 0o600)

                    def verify_mbsync(d=d):
                        blobs = []
                        for p in files_under(os.path.join(d, "Mail")):
                            if os.path.basename(os.path.dirname(p)) not in ("cur", "new"):
                                continue  # mbsync's own files (.uidvalidity …)
                            b = read(p).replace(b"\r\n", b"\n")
                            b = re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", b, count=1)
                            blobs.append(b)
                        return compare_sets(want_lf, digests(blobs), "mbsync Maildir (LF)")
                    measure("imap-pull", tool, rep, [mbsync, "-c", conf, "-q", "-a"],
                            D.clean_env({"HOME": d}), verify_mbsync)
                    if not args.keep:
                        D.rmtree(d)
            # -- mbox import
            mdir = os.path.join(work, "mbox")
            mbox_path = os.path.join(mdir, "export.mbox")
            if not os.path.exists(mbox_path):
                os.makedirs(mdir, exist_ok=True)
                with open(mbox_path, "wb") as f:
                    f.write(mboxrd(msgs))
                ctx.mail_corpus["mbox_bytes"] = os.path.getsize(mbox_path)
            custos_run("mbox-import", rep,
                       f'[[source]]\nname = "mail"\ntype = "mbox"\npath = "{mbox_path}"\n', {})
            if restic:
                d = os.path.join(work, f"restic-mbox-r{rep}")
                D.rmtree(d)
                os.makedirs(d)
                repo = {"kind": "local", "path": os.path.join(d, "repo"), "cache": os.path.join(d, "cache")}
                env = D.clean_env(restic.base_env(repo))
                try:
                    D.run_plain(ctx, restic.init(repo), env, f"mail-mbox-import-restic-r{rep}-init")
                except D.BenchError as e:
                    failures.append(str(e))
                    continue

                def verify_restic(d=d, repo=repo, env=env):
                    dest = os.path.join(d, "restore")
                    try:
                        D.run_plain(ctx, restic.restore(repo, dest, 1), env,
                                    f"mail-mbox-import-restic-r{rep}-restore")
                    except D.BenchError as e:
                        return [str(e)]
                    got = [p for p in files_under(dest) if p.endswith("export.mbox")]
                    if len(got) != 1 or read(got[0]) != read(mbox_path):
                        return [f"restic restore: export.mbox missing or different ({got})"]
                    return []
                measure("mbox-import", "restic", rep, restic.backup(repo, mdir, 1), env, verify_restic)
                if not args.keep:
                    D.rmtree(d)
    finally:
        if imap:
            imap.stop()
    return records, failures, notes


def summarize(records):
    groups = collections.OrderedDict()
    for r in records:
        groups.setdefault((r["scenario"], r["tool"]), []).append(r)
    out = []
    for (scenario, tool), rs in groups.items():
        s = {"scenario": scenario, "tool": tool, "reps": len(rs),
             "verified": all(r["verified"] for r in rs)}
        for key in ("wall_s", "msgs_per_s", "mb_per_s", "cpu_s", "peak_rss_kib"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                s[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        out.append(s)
    return out


def markdown(summary, corpus_meta, notes, versions, fmt_stat):
    L = ["", "## Mail: IMAP pull and mbox import (local target)", ""]
    if corpus_meta:
        L.append(f"{corpus_meta['messages']} generated messages ({corpus_meta['bytes'] / 1e6:.1f} MB, CRLF, "
                 f"text bodies 2–50 KB, every 20th with a 50–200 KB attachment, every 10th with quoted `From ` "
                 f"lines; seed {corpus_meta['seed']}). IMAP pull: Dovecot INBOX on 127.0.0.1 (plaintext), "
                 f"custos `backup` of an `imap` source into a fresh repository vs `mbsync` "
                 f"({versions.get('mbsync', 'not installed')}) into an empty Maildir "
                 f"(`Sync Pull`, fresh state; `mbsync` = its default `FSync yes`, an fsync per message; "
                 f"`mbsync-nofsync` = `FSync no`). mbox import: custos `backup` of an `mbox` source vs "
                 f"`restic backup` of the same file as a file. msg/s = messages / wall time; every run verified "
                 f"(custos restore = the messages byte for byte; mbsync Maildir = the messages with LF line ends; "
                 f"restic restore = the file).")
    for note in notes:
        L.append("")
        L.append(f"- note: {note}")
    if not summary:
        return L
    L.append("")
    L.append("| scenario | tool | wall s | msg/s | MB/s | CPU-s | peak RSS MiB | verified |")
    L.append("|---|---|---|---|---|---|---|---|")
    for s in summary:
        L.append(f"| {MAIL_LABEL[s['scenario']]} | {s['tool']} | {fmt_stat(s.get('wall_s'))} | "
                 f"{fmt_stat(s.get('msgs_per_s'), digits=0)} | {fmt_stat(s.get('mb_per_s'), digits=1)} | "
                 f"{fmt_stat(s.get('cpu_s'))} | {fmt_stat(s.get('peak_rss_kib'), 1 / 1024, 0)} | "
                 f"{'yes' if s['verified'] else 'NO'} |")
    for scenario, peer in [*PEER.items(), ("imap-pull", "mbsync-nofsync")]:
        c = next((s for s in summary if (s["scenario"], s["tool"]) == (scenario, "custos")), None)
        p = next((s for s in summary if (s["scenario"], s["tool"]) == (scenario, peer)), None)
        if c and p and "msgs_per_s" in c and "msgs_per_s" in p:
            x = c["msgs_per_s"]["median"] / p["msgs_per_s"]["median"]
            if not L[-1].startswith("- "):
                L.append("")
            L.append(f"- {MAIL_LABEL[scenario]}: custos {c['msgs_per_s']['median']:.0f} msg/s vs {peer} "
                     f"{p['msgs_per_s']['median']:.0f} msg/s = {x:.2f}x")
    return L
