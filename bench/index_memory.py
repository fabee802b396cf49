"""Index memory with many small records (issue 3: resident index memory
≤ 40 bytes per blob, measured with 1 M small records).

N tiny e-mails (one ~250-byte message each, unique bodies, so one content blob
per record) in one mboxrd file are backed up by custos into a fresh local
repository. Then `custos stats --json` runs twice under `/usr/bin/time -v`: on
that repository and on an empty one. Reported:

- `index_memory_bytes / blobs`: what the merged index holds in memory after
  loading (the sorted blob table, 32 bytes per blob, plus the pack list) —
  the figure the target is about;
- `(peak RSS with the index − peak RSS of the empty repository) / blobs`: the
  whole process's extra peak while loading (index documents being parsed, the
  table growing), a stricter upper bound;
- the backup's own wall time, msg/s and peak RSS (record state of one
  collection is held in memory until the run ends: see ARCHITECTURE.md).

Verified: the snapshot's record count equals N and the restored `.eml` files
are the messages byte for byte (as a multiset). Called by driver.py with the
driver module, like mail.py.
"""

import collections
import hashlib
import json
import os
import time

TARGET_BYTES_PER_BLOB = 40


def message(i):
    # Unique body per message; header sizes as in short support replies.
    return (f"From: sender{i % 977}@example.com\nTo: c{i % 5003}@example.org\n"
            f"Subject: ticket {i}\nMessage-ID: <m{i}@bench.example.com>\n"
            f"Date: Mon, 1 Jan 2024 00:00:00 +0000\n\n"
            f"Hello customer {i}, your ticket {i * 2654435761 % 2**32:08x} is resolved.\n").encode()


def write_mbox(path, n):
    """Stream the mbox (1 M messages are ~250 MB: never all in memory)."""
    want = collections.Counter()
    with open(path, "wb") as f:
        for i in range(n):
            m = message(i)
            want[hashlib.sha256(m).hexdigest()] += 1
            f.write(b"From sender@example.com Mon Jan  1 00:00:00 2024\n")
            f.write(m)
            f.write(b"\n")
    return want


def run(ctx, D):
    """Returns (record or None, failures)."""
    n = ctx.args.index_records
    custos = next((t for t in ctx.tools if t.name == "custos"), None)
    if custos is None or n <= 0:
        return None, []
    work = os.path.join(ctx.work, "index-memory")
    os.makedirs(work, exist_ok=True)
    mbox = os.path.join(work, "records.mbox")
    t0 = time.monotonic()
    want = write_mbox(mbox, n)
    D.log(f"index memory: {n} records, {D.human(os.path.getsize(mbox))} mbox, "
          f"written in {time.monotonic() - t0:.1f} s")
    env = D.clean_env(custos.base_env(None))
    failures = []

    def repo_cmd(name):
        d = os.path.join(work, name)
        cfg = os.path.join(work, f"{name}.toml")
        with open(cfg, "w") as f:
            f.write('[repository]\npassword_env = "CUSTOS_PASSWORD"\ncompression = 3\n\n'
                    f'[[target]]\nname = "bench"\nurl = "{d}"\n\n'
                    f'[[source]]\nname = "records"\ntype = "mbox"\npath = "{mbox}"\n')
        return [custos.bin, "-c", cfg]

    try:
        full, empty = repo_cmd("repo"), repo_cmd("empty")
        for g, name in ((full, "repo"), (empty, "empty")):
            D.run_plain(ctx, g + ["-q", "init"], env, f"index-memory-{name}-init")
        os.sync()
        backup = D.run_measured(ctx, full + ["-q", "--json", "backup", "--source", "records"], env,
                                "index-memory-backup")
        stats_full = D.run_measured(ctx, full + ["-q", "--json", "stats"], env, "index-memory-stats")
        stats_empty = D.run_measured(ctx, empty + ["-q", "--json", "stats"], env, "index-memory-stats-empty")
        stats = json.loads(D.run_plain(ctx, full + ["-q", "--json", "stats"], env, "index-memory-stats-json"))
        snaps = json.loads(D.run_plain(ctx, full + ["-q", "--json", "snapshots"], env,
                                       "index-memory-snapshots"))
    except D.BenchError as e:
        return None, [str(e)]

    diffs = []
    records_total = snaps[-1].get("summary", {}).get("records_total") if snaps else None
    if records_total != n:
        diffs.append(f"snapshot holds {records_total} records, {n} backed up")
    dest = os.path.join(work, "restore")
    try:
        D.run_plain(ctx, full + ["-q", "restore", "latest", dest], env, "index-memory-restore")
        got = collections.Counter()
        for d, _, names in os.walk(dest):
            for name in names:
                if name.endswith(".eml"):
                    with open(os.path.join(d, name), "rb") as f:
                        got[hashlib.sha256(f.read()).hexdigest()] += 1
        if got != want:
            diffs.append(f"restore: {sum((want - got).values())} message(s) missing or different, "
                         f"{sum((got - want).values())} unexpected")
    except D.BenchError as e:
        diffs.append(str(e))
    D.rmtree(dest)

    blobs = stats["blobs"]
    rec = {
        "records": n, "mbox_bytes": os.path.getsize(mbox), "blobs": blobs, "packs": stats["packs"],
        "index_memory_bytes": stats["index_memory_bytes"],
        "index_bytes_per_blob": stats["index_memory_bytes"] / blobs,
        "stats_rss_kib": stats_full.get("rss_kib"), "empty_stats_rss_kib": stats_empty.get("rss_kib"),
        "stats_wall_s": round(stats_full["wall"], 3),
        "backup_wall_s": round(backup["wall"], 3), "backup_msgs_per_s": n / backup["wall"],
        "backup_rss_kib": backup.get("rss_kib"),
        "verified": not diffs, "differences": diffs,
    }
    if rec["stats_rss_kib"] and rec["empty_stats_rss_kib"]:
        rec["rss_delta_bytes_per_blob"] = (rec["stats_rss_kib"] - rec["empty_stats_rss_kib"]) * 1024 / blobs
    D.log(f"index memory: {blobs} blobs, index {rec['index_bytes_per_blob']:.1f} B/blob, "
          f"stats peak RSS delta {rec.get('rss_delta_bytes_per_blob', float('nan')):.1f} B/blob, "
          f"backup {rec['backup_msgs_per_s']:.0f} msg/s, {(rec['backup_rss_kib'] or 0) / 1024:.0f} MiB, "
          f"{'verified' if not diffs else 'DIFFERS: ' + '; '.join(diffs)}")
    if diffs:
        failures.append("index memory: " + "; ".join(diffs))
    if not ctx.args.quick and rec["index_bytes_per_blob"] > TARGET_BYTES_PER_BLOB:
        failures.append(f"index memory: {rec['index_bytes_per_blob']:.1f} bytes per blob "
                        f"(target ≤ {TARGET_BYTES_PER_BLOB})")
    if not ctx.args.keep:
        D.rmtree(work)
    return rec, failures


def markdown(rec):
    if not rec:
        return []
    L = ["", "## Index memory with many small records (local target)", "",
         f"{rec['records']} generated e-mails of ~250 bytes in one mbox ({rec['mbox_bytes'] / 1e6:.0f} MB), "
         f"one custos backup into a fresh repository: {rec['blobs']} blobs in {rec['packs']} packs. "
         "Index memory = what the merged index holds after loading (`stats --json` "
         "`index_memory_bytes`); RSS delta = peak RSS of `custos stats` on this repository minus on an "
         "empty one (includes the index documents being parsed). Verified: record count and every "
         "restored message byte for byte.", "",
         "| figure | value |", "|---|---|",
         f"| index memory per blob | {rec['index_bytes_per_blob']:.1f} B (target ≤ {TARGET_BYTES_PER_BLOB} B: "
         f"{'met' if rec['index_bytes_per_blob'] <= TARGET_BYTES_PER_BLOB else 'MISSED'}) |"]
    if "rss_delta_bytes_per_blob" in rec:
        L.append(f"| `stats` peak RSS delta per blob | {rec['rss_delta_bytes_per_blob']:.1f} B "
                 f"({rec['empty_stats_rss_kib'] / 1024:.0f} → {rec['stats_rss_kib'] / 1024:.0f} MiB) |")
    L += [f"| `stats` wall time | {rec['stats_wall_s']:.2f} s |",
          f"| backup | {rec['backup_wall_s']:.1f} s, {rec['backup_msgs_per_s']:.0f} msg/s, peak RSS "
          f"{(rec['backup_rss_kib'] or 0) / 1024:.0f} MiB |",
          f"| verified | {'yes' if rec['verified'] else 'NO'} |"]
    return L
