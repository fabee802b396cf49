#!/usr/bin/env python3
"""custos benchmark driver: custos vs restic, borg and rustic on the same data.

Run it through `scripts/bench` (see bench/README.md). Standard library only.
"""

import argparse
import datetime
import hashlib
import hmac
import json
import lzma
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import corpus  # noqa: E402
import mail  # noqa: E402
import index_memory  # noqa: E402

MIB = corpus.MIB
GIB = corpus.GIB
S3_SH = os.path.join(ROOT, "scripts", "services", "s3.sh")
S3_NAME = "bench"
S3_BUCKET = "custos-a"
SCENARIOS = ["backup-first", "backup-nochange", "snapshots", "backup-1pct", "restore", "check-read-data"]
SCENARIO_LABEL = {
    "backup-first": "first backup",
    "backup-nochange": "re-backup, no change",
    "snapshots": "list snapshots (open only)",
    "backup-1pct": "re-backup, ~1 % changed",
    "restore": "full restore",
    "check-read-data": "check, read all data",
}
PASSWORD = "bench-password-not-secret"


class BenchError(Exception):
    pass


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def parse_size(s):
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B?)\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 64MiB, 1GiB, 500M)")
    num, unit, ib = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if (ib.lower().startswith("i") or ib == "") else 1000
    return int(num * base ** " KMGT".index(unit or " "))


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


# --------------------------------------------------------------------------- system helpers

_apt_updated = False


def apt_install(pkg):
    """apt-get install PKG (runs apt-get update once if the first try fails)."""
    global _apt_updated
    if not shutil.which("apt-get"):
        raise BenchError(f"{pkg} is missing and apt-get is not available; install it by hand")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None:
        raise BenchError(f"{pkg} is missing; install it (apt-get install {pkg}) as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for attempt in range(2):
        if attempt == 1:
            if _apt_updated:
                break
            log("apt-get update")
            subprocess.run(sudo + ["apt-get", "update", "-qq"], env=env, check=False,
                           stdout=subprocess.DEVNULL)
            _apt_updated = True
        log(f"apt-get install {pkg}")
        r = subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", pkg], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode == 0:
            return
    raise BenchError(f"apt-get install {pkg} failed: {r.stderr.strip()[-500:]}")


def ensure_binary(binary, pkg, install=True):
    path = shutil.which(binary)
    if path:
        return path
    if not install:
        return None
    apt_install(pkg)
    path = shutil.which(binary)
    if not path:
        raise BenchError(f"{binary} still missing after installing {pkg}")
    return path


def version_of(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def cpu_info():
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"model": model, "cores": os.cpu_count(), "memory": mem,
            "flags": sorted(flags & {"aes", "sha_ni", "avx2", "avx512f", "avx512vl", "vaes"}),
            "kernel": platform.release()}


def tree_usage(path):
    """(apparent bytes, file count) under path."""
    total, count = 0, 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
                count += 1
            except FileNotFoundError:
                pass
    return total, count


def rmtree(path):
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- S3 listing

class S3:
    """Minimal SigV4 client for listing a prefix (path-style, stdlib only)."""

    def __init__(self, endpoint, access, secret, region):
        self.endpoint, self.access, self.secret, self.region = endpoint.rstrip("/"), access, secret, region
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _sign(self, method, path, query):
        url = urllib.parse.urlsplit(self.endpoint)
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        empty = hashlib.sha256(b"").hexdigest()
        headers = {"host": url.netloc, "x-amz-content-sha256": empty, "x-amz-date": amz_date}
        q = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                     for k, v in sorted(query.items()))
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, urllib.parse.quote(path, safe="/-_.~"), q,
                               "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, empty])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + self.secret).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={sig}")
        del headers["host"]
        return q, headers

    def usage(self, bucket, prefix):
        """(total bytes, object count) under bucket/prefix."""
        total, count, token = 0, 0, None
        prefix = prefix.rstrip("/") + "/"
        while True:
            query = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if token:
                query["continuation-token"] = token
            q, headers = self._sign("GET", f"/{bucket}", query)
            req = urllib.request.Request(f"{self.endpoint}/{bucket}?{q}", headers=headers)
            try:
                with self.opener.open(req, timeout=60) as resp:
                    body = resp.read().decode()
            except urllib.error.HTTPError as e:
                raise BenchError(f"S3 list {bucket}/{prefix}: HTTP {e.code}: {e.read()[:300]!r}")
            for size in re.findall(r"<Size>(\d+)</Size>", body):
                total += int(size)
                count += 1
            if "<IsTruncated>true</IsTruncated>" not in body:
                return total, count
            m = re.search(r"<NextContinuationToken>([^<]+)</NextContinuationToken>", body)
            if not m:
                raise BenchError("S3 list: truncated answer without a continuation token")
            token = (m.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
                     .replace("&quot;", '"').replace("&apos;", "'"))


class S3Server:
    def __init__(self, port, quick):
        self.port, self.quick, self.started, self.env = port, quick, False, {}

    def start(self, state_file):
        ready_timeout = "30" if self.quick else "90"
        for i in range(10):
            port = self.port + 10 * i
            env = dict(os.environ, CUSTOS_S3_READY_TIMEOUT=ready_timeout)
            if state_file:
                with open(state_file, "w") as f:
                    f.write(S3_NAME + "\n")
            r = subprocess.run(["bash", S3_SH, "start", S3_NAME, str(port)], env=env,
                               capture_output=True, text=True, timeout=600)
            if r.returncode == 0:
                self.started = True
                break
            if r.returncode == 3:
                log(f"S3 ports near {port} busy, trying {port + 10}")
                continue
            raise BenchError(f"S3 server failed to start (exit {r.returncode}): {r.stderr.strip()[-800:]}")
        else:
            raise BenchError("no free port range for the S3 server")
        envfile = subprocess.run(["bash", S3_SH, "env", S3_NAME], capture_output=True, text=True,
                                 check=True).stdout.strip()
        with open(envfile) as f:
            for line in f:
                m = re.match(r"export (\w+)=(.*)$", line.strip())
                if m:
                    self.env[m.group(1)] = m.group(2)
        self.endpoint = self.env["CUSTOS_TEST_S3_ENDPOINT"]
        self.metrics = self.env.get("CUSTOS_TEST_S3_METRICS")
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self.client = S3(self.endpoint, self.env["AWS_ACCESS_KEY_ID"], self.env["AWS_SECRET_ACCESS_KEY"],
                         self.env["AWS_REGION"])
        log(f"S3 (SeaweedFS) at {self.endpoint}, bucket {S3_BUCKET}")

    def stop(self):
        if self.started:
            subprocess.run(["bash", S3_SH, "stop", S3_NAME], capture_output=True, timeout=120)
            self.started = False

    def aws_env(self):
        return {"AWS_ACCESS_KEY_ID": self.env["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": self.env["AWS_SECRET_ACCESS_KEY"],
                "AWS_REGION": self.env["AWS_REGION"], "AWS_DEFAULT_REGION": self.env["AWS_REGION"],
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}


# --------------------------------------------------------------------------- tools

class Tool:
    """One backup program on one target: how to call it and where its repo lives."""

    name = "?"
    targets = ("local", "s3")
    settings = ""

    def __init__(self, binary, ctx):
        self.bin, self.ctx = binary, ctx

    # repo: dict with kind ('local'|'s3'), path or prefix, cache dir
    def base_env(self, repo):
        return {}

    def init(self, repo):
        raise NotImplementedError

    def backup(self, repo, src, n):
        raise NotImplementedError

    def restore(self, repo, dest, n):
        raise NotImplementedError

    def check(self, repo):
        raise NotImplementedError

    def snapshots(self, repo):
        raise NotImplementedError

    def version(self):
        return version_of([self.bin, "version"])


class Custos(Tool):
    name = "custos"
    settings = ("zstd level 3 (`init --compression 3`, the default), FastCDC 64 KiB/256 KiB/4 MiB, "
                "format 3 (blobs up to 64 KiB sealed in ~256 KiB groups), "
                "16 MiB packs, XChaCha20-Poly1305, keyed BLAKE3; key from Argon2id 32 MiB x 4, 2 lanes (set at init, "
                "derived by every command); metadata cache in `--cache-dir`")

    def url(self, repo):
        return repo["path"] if repo["kind"] == "local" else f"s3://{S3_BUCKET}/{repo['prefix']}"

    def g(self, repo):
        return [self.bin, "-r", self.url(repo), "--cache-dir", repo["cache"]]

    def base_env(self, repo):
        return {"CUSTOS_PASSWORD": PASSWORD}

    def init(self, repo):
        # custos' default key derivation (Argon2id 32 MiB x 4, 2 lanes), zstd level 3.
        return self.g(repo) + ["-q", "init", "--compression", "3"]

    def backup(self, repo, src, n):
        return self.g(repo) + ["-q", "--json", "backup", src]

    def restore(self, repo, dest, n):
        return self.g(repo) + ["-q", "--json", "restore", "latest", dest]

    def check(self, repo):
        return self.g(repo) + ["-q", "--json", "check", "--read-data"]

    def snapshots(self, repo):
        return self.g(repo) + ["-q", "--json", "snapshots"]

    def version(self):
        return version_of([self.bin, "--version"])


class Restic(Tool):
    name = "restic"
    settings = ("repository format 2, `--compression auto` (zstd default level, ~3), 16 MiB packs "
                "(default), chunks 512 KiB-8 MiB avg 1 MiB, AES-256-CTR + Poly1305-AES, SHA-256 ids; "
                "scrypt KDF calibrated at init (not measured, but every command opens the key)")

    def url(self, repo):
        if repo["kind"] == "local":
            return repo["path"]
        return f"s3:{self.ctx.s3.endpoint}/{S3_BUCKET}/{repo['prefix']}"

    def g(self, repo):
        args = [self.bin, "-r", self.url(repo), "--cache-dir", repo["cache"]]
        if repo["kind"] == "s3":
            args += ["-o", f"s3.region={self.ctx.s3.env['AWS_REGION']}"]
        return args

    def base_env(self, repo):
        return {"RESTIC_PASSWORD": PASSWORD, "RESTIC_PROGRESS_FPS": "0.1"}

    def init(self, repo):
        return self.g(repo) + ["init", "--repository-version", "2"]

    def backup(self, repo, src, n):
        return self.g(repo) + ["--compression", "auto", "backup", "--host", "bench", "-q", src]

    def restore(self, repo, dest, n):
        return self.g(repo) + ["restore", "latest", "--target", dest]

    def check(self, repo):
        return self.g(repo) + ["check", "--read-data"]

    def snapshots(self, repo):
        return self.g(repo) + ["snapshots", "--json"]


class ResticStable(Restic):
    """Debian stable's restic beside the system one (Debian 12 ships 0.14, from
    2022): restic 0.17 and later verify every blob before upload (decrypt,
    decompress, hash; restic PR #4681), as custos does, so the current
    release is the like-for-like peer and the old one shows the cost."""

    settings = Restic.settings + "; verifies every blob before upload (decrypt, decompress, hash)"

    def __init__(self, binary, ctx, version):
        super().__init__(binary, ctx)
        self.name = f"restic-{version}"


def restic_version(binary):
    m = re.search(r"restic (\d+\.\d+\.\d+)", version_of([binary, "version"]))
    return m.group(1) if m else None


DEBIAN_MIRROR = "https://deb.debian.org/debian"


def find_restic_stable():
    """(binary, version) of the restic fetched by `install_restic_stable`, or None."""
    cached = os.path.join(HERE, ".cache", "restic-stable", "usr", "bin", "restic")
    if os.access(cached, os.X_OK):
        v = restic_version(cached)
        if v:
            return cached, v
    return None


def install_restic_stable():
    """Fetch restic from Debian stable's archive into bench/.cache/restic-stable.

    The .deb is checked against the SHA-256 in the suite's Packages index (both
    over HTTPS from deb.debian.org) and unpacked with dpkg-deb, not installed:
    restic is one static Go binary and the system's own restic stays as it is."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine())
    if not arch or not shutil.which("dpkg-deb"):
        raise BenchError(f"cannot fetch Debian's restic on {platform.machine()} without dpkg-deb")
    url = f"{DEBIAN_MIRROR}/dists/stable/main/binary-{arch}/Packages.xz"
    log(f"fetching {url}")
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            index = lzma.decompress(r.read()).decode("utf-8", "replace")
    except (OSError, lzma.LZMAError) as e:
        raise BenchError(f"fetching {url}: {e}") from e
    stanza = next((st for st in index.split("\n\n") if st.startswith("Package: restic\n")), None)
    if stanza is None:
        raise BenchError(f"no restic package in {url}")
    fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line)
    deb_url = f"{DEBIAN_MIRROR}/{fields['Filename']}"
    log(f"fetching {deb_url} (restic {fields.get('Version', '?')})")
    try:
        with urllib.request.urlopen(deb_url, timeout=300) as r:
            deb = r.read()
    except OSError as e:
        raise BenchError(f"fetching {deb_url}: {e}") from e
    if hashlib.sha256(deb).hexdigest() != fields.get("SHA256"):
        raise BenchError(f"{deb_url}: SHA-256 differs from the Packages index")
    dest = os.path.join(HERE, ".cache", "restic-stable")
    rmtree(dest)
    os.makedirs(dest)
    deb_path = os.path.join(dest, "restic.deb")
    with open(deb_path, "wb") as f:
        f.write(deb)
    r = subprocess.run(["dpkg-deb", "-x", deb_path, dest], capture_output=True, text=True)
    os.remove(deb_path)
    found = find_restic_stable()
    if r.returncode != 0 or not found:
        raise BenchError(f"unpacking {deb_url} failed: {r.stderr.strip()[-300:]}")
    return found


class Rustic(Tool):
    name = "rustic"
    settings = ("rustic defaults (restic format 2, zstd level 3), `--no-progress`; S3 through OpenDAL "
                "(`opendal:s3`)")

    def base_env(self, repo):
        env = {"RUSTIC_PASSWORD": PASSWORD, "RUSTIC_NO_PROGRESS": "true",
               # no user profile may change the settings
               "XDG_CONFIG_HOME": os.path.join(repo["cache"], "config")}
        if repo["kind"] == "s3":
            env.update({"RUSTIC_REPO_OPT_BUCKET": S3_BUCKET, "RUSTIC_REPO_OPT_ROOT": "/" + repo["prefix"],
                        "RUSTIC_REPO_OPT_ENDPOINT": self.ctx.s3.endpoint,
                        "RUSTIC_REPO_OPT_REGION": self.ctx.s3.env["AWS_REGION"],
                        "RUSTIC_REPO_OPT_ENABLE_VIRTUAL_HOST_STYLE": "false"})
        return env

    def g(self, repo):
        url = repo["path"] if repo["kind"] == "local" else "opendal:s3"
        return [self.bin, "-r", url, "--cache-dir", repo["cache"], "--no-progress"]

    def init(self, repo):
        return self.g(repo) + ["init"]

    def backup(self, repo, src, n):
        return self.g(repo) + ["backup", "--host", "bench", src]

    def restore(self, repo, dest, n):
        return self.g(repo) + ["restore", "latest", dest]

    def check(self, repo):
        return self.g(repo) + ["check", "--read-data"]

    def snapshots(self, repo):
        return self.g(repo) + ["snapshots", "--json"]

    def version(self):
        return version_of([self.bin, "--version"])


class Borg(Tool):
    name = "borg"
    targets = ("local",)

    def __init__(self, binary, ctx):
        super().__init__(binary, ctx)
        self.encryption = ctx.args.borg_encryption or (
            "repokey" if "sha_ni" in ctx.cpu["flags"] else "repokey-blake2")
        self.settings = (f"`--compression zstd,3`, `init -e {self.encryption}` (AES-256-CTR + "
                         f"{'HMAC-SHA256' if self.encryption == 'repokey' else 'BLAKE2b'}), default chunker "
                         "(avg 2 MiB), 500 MiB segments; PBKDF2 key derivation on every command")

    def base_env(self, repo):
        return {"BORG_PASSPHRASE": PASSWORD, "BORG_BASE_DIR": repo["cache"],
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_CHECK_I_KNOW_WHAT_I_AM_DOING": "NO"}

    def init(self, repo):
        return [self.bin, "init", "-e", self.encryption, repo["path"]]

    def backup(self, repo, src, n):
        return [self.bin, "create", "--compression", "zstd,3", f"{repo['path']}::snap{n}", src]

    def restore(self, repo, dest, n):
        return [self.bin, "extract", f"{repo['path']}::snap{n}"]  # run in dest

    def check(self, repo):
        return [self.bin, "check", "--verify-data", repo["path"]]

    def snapshots(self, repo):
        return [self.bin, "list", repo["path"]]

    def version(self):
        return version_of([self.bin, "--version"])


# --------------------------------------------------------------------------- measuring

TIME_FIELDS = {"User time (seconds)": "user", "System time (seconds)": "sys",
               "Maximum resident set size (kbytes)": "rss_kib"}


def clean_env(extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RESTIC_", "RUSTIC_", "BORG_", "CUSTOS_", "OPENDAL_"))}
    env.update(extra)
    return env


def run_measured(ctx, cmd, env, label, cwd=None):
    """Run cmd under /usr/bin/time -v. Returns a dict; raises BenchError on failure."""
    logpath = os.path.join(ctx.logdir, f"{label}.log")
    timefile = logpath[:-4] + ".time"
    full = [ctx.time_bin, "-v", "-o", timefile] + cmd
    t0 = time.monotonic()
    with open(logpath, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        try:
            r = subprocess.run(full, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=ctx.args.cmd_timeout)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.monotonic() - t0
    res = {"wall": wall, "rc": rc, "log": os.path.relpath(logpath, ctx.resdir)}
    try:
        with open(timefile) as f:
            for line in f:
                k, _, v = line.strip().rpartition(": ")
                if k in TIME_FIELDS:
                    res[TIME_FIELDS[k]] = float(v) if "." in v else int(v)
        os.unlink(timefile)
    except OSError:
        pass
    if rc != 0:
        with open(logpath, errors="replace") as f:
            tail = f.read()[-2000:]
        raise BenchError(f"{label}: exit {rc} after {wall:.1f} s: {' '.join(cmd)}\n{tail}")
    return res


def run_plain(ctx, cmd, env, label, cwd=None):
    logpath = os.path.join(ctx.logdir, f"{label}.log")
    with open(logpath, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        r = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=out,
                           stdin=subprocess.DEVNULL, timeout=ctx.args.cmd_timeout, text=True)
        out.write(r.stdout)
    if r.returncode != 0:
        raise BenchError(f"{label}: exit {r.returncode}: {' '.join(cmd)} (log {logpath})")
    return r.stdout


S3_REQUEST_METRIC = re.compile(
    r'^SeaweedFS_s3_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.e+]+)$')


def s3_requests(ctx):
    """Requests the S3 gateway has answered so far on the bench bucket, by type
    (GET, PUT, LIST, HEAD, DELETE, ...; every status code), from its Prometheus
    counters; None when the server exposes no metrics. Tools run one at a time,
    so the difference across a command is that command's requests."""
    url = getattr(ctx.s3, "metrics", None) if ctx.s3 else None
    if not url:
        return None
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as r:
            text = r.read().decode()
    except OSError as e:
        log(f"S3 metrics unreadable ({e}); request counts left out")
        return None
    counts = {}
    for line in text.splitlines():
        m = S3_REQUEST_METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if labels.get("bucket") != S3_BUCKET:
            continue
        t = labels.get("type", "?")
        counts[t] = counts.get(t, 0) + int(float(m.group("value")))
    return counts


def server_cpu(ctx):
    """CPU seconds (user + system) the S3 server process has used so far, from
    /proc; None when unknown. Tools run one at a time, so the difference
    across a command is the server's work for it (it shares the cores)."""
    if not ctx.s3:
        return None
    try:
        with open(os.path.join(ROOT, "target", "services", "s3", S3_NAME, "pid")) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def request_delta(before, after):
    if before is None or after is None:
        return None
    d = {t: after.get(t, 0) - before.get(t, 0) for t in set(before) | set(after)}
    return {t: n for t, n in sorted(d.items()) if n}


def storage(ctx, repo):
    if repo["kind"] == "local":
        return tree_usage(repo["path"])
    return ctx.s3.client.usage(S3_BUCKET, repo["prefix"])


def find_restored_root(dest, src, expected_top):
    """The directory inside dest that corresponds to src (tools differ)."""
    cands = [os.path.join(dest, src.lstrip("/")), os.path.join(dest, os.path.basename(src)), dest]
    for c in cands:
        if os.path.isdir(c) and expected_top <= set(os.listdir(c)):
            return c
    return None


def verify_restore(ctx, tool, dest, label):
    root = find_restored_root(dest, ctx.src, ctx.expected_top)
    if root is None:
        listing = sorted(os.listdir(dest))[:10] if os.path.isdir(dest) else "missing"
        return [f"restored tree not found under {dest} (top level: {listing})"]
    t0 = time.monotonic()
    got = corpus.manifest(root)
    diffs = corpus.compare(ctx.expected_mutated, got)
    log(f"{label}: restore verified in {time.monotonic() - t0:.1f} s: "
        f"{'byte-identical' if not diffs else str(len(diffs)) + ' difference(s)'}")
    return diffs


def scenario_record(tool, target, rep, scenario, res, before, after, src_bytes, requests=None,
                    server_cpu_s=None):
    user, sys_ = res.get("user"), res.get("sys")
    cpu = (user + sys_) if user is not None and sys_ is not None else None
    return {"tool": tool, "target": target, "rep": rep, "scenario": scenario,
            "wall_s": round(res["wall"], 4), "user_s": user, "sys_s": sys_,
            "cpu_s": cpu, "cpu_s_per_gib": cpu / (src_bytes / GIB) if cpu is not None and src_bytes else None,
            "mb_per_s": src_bytes / 1e6 / res["wall"] if res["wall"] > 0 and src_bytes else None,
            "peak_rss_kib": res.get("rss_kib"),
            "stored_bytes": after[0], "objects": after[1],
            "added_bytes": after[0] - before[0], "added_objects": after[1] - before[1],
            "requests": sum(requests.values()) if requests is not None else None,
            "requests_by_type": requests,
            "server_cpu_s": round(server_cpu_s, 2) if server_cpu_s is not None else None,
            "log": res["log"]}


def set_aside(ctx, path):
    """Move a restored tree out of the way instead of deleting it now.

    Deleting ~30 000 files frees their inodes, and ext4 then skips recently
    freed inodes when the next restore creates files (`recently_deleted`, a
    60 s window), which cost the next tool up to 3x its restore time: whoever
    restored right after a deletion lost. Restored trees are deleted once,
    after every measurement (`empty_aside`), or earlier when the disk runs
    short (`ensure_space`)."""
    aside = os.path.join(ctx.work, "restores-aside")
    os.makedirs(aside, exist_ok=True)
    os.rename(path, os.path.join(aside, f"{len(os.listdir(aside))}"))


def empty_aside(ctx):
    rmtree(os.path.join(ctx.work, "restores-aside"))


# ext4's recently-deleted inode window (see `set_aside`), with a margin.
RECENTLY_DELETED_S = 65


def ensure_space(ctx, tool, target):
    """Make room for one more tool run before it starts (unmeasured).

    A full run sets aside a restored copy of the source per tool, target and
    repetition (~27 GiB for 1 GiB x 3), and the S3 server keeps every
    repository: when the free space left would not hold this run's
    repository, restore and a margin, the restored trees go now, and the run
    waits out ext4's recently-deleted window so no tool's restore pays for
    the deletion. Too little space even then is an error naming the need."""
    src = max(ctx.mut_bytes, ctx.src_bytes)
    need = 2 * src + 2 * GIB  # repository (<= source) + restored tree + margin
    free = shutil.disk_usage(ctx.work).free
    if free >= need:
        return
    aside = os.path.join(ctx.work, "restores-aside")
    if os.path.isdir(aside) and os.listdir(aside):
        log(f"{human(free)} free before {tool.name} on {target}: deleting the restored trees set aside, "
            f"then waiting {RECENTLY_DELETED_S} s (ext4 recently-deleted inodes)")
        empty_aside(ctx)
        os.sync()
        time.sleep(RECENTLY_DELETED_S)
        free = shutil.disk_usage(ctx.work).free
    if free < need:
        raise BenchError(f"{human(free)} free on the disk of {ctx.work}, {human(need)} needed for "
                         f"{tool.name} on {target}: free space or pass --work-dir on a larger disk")


def evict(path):
    """Drop a local repository's files from the page cache (unmeasured).

    Restore and check read a cold repository, as they do long after the
    backup. Without this, a tool whose backup wrote through the page cache
    (restic, rustic, borg) restored from memory while custos, which writes
    packs with O_DIRECT, read its packs from the disk. Called after
    `os.sync()`: only clean pages can be dropped."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_tool(ctx, tool, target, rep):
    """All scenarios for one tool on one target, one repetition. Returns (records, failures)."""
    tag = f"{tool.name}-{target}-r{rep}"
    d = os.path.join(ctx.work, tag)
    rmtree(d)
    os.makedirs(d)
    repo = {"kind": target, "cache": os.path.join(d, "cache"), "path": os.path.join(d, "repo"),
            "prefix": f"bench/{ctx.run_id}/{tag}"}
    os.makedirs(repo["cache"])
    if target == "s3":
        aws = ctx.s3.aws_env()
    else:
        aws = {}
    env = clean_env({**aws, **tool.base_env(repo)})
    records, failures = [], []
    mutated = False

    def measure(scenario, cmd, src_bytes, cwd=None, cold=False):
        os.sync()
        if cold and target == "local":
            evict(repo["path"])
        before = storage(ctx, repo)
        label = f"{tag}-{scenario}"
        log(f"{label} ...")
        # After the listing above and before the one below: only the tool's requests.
        req0 = s3_requests(ctx) if target == "s3" else None
        cpu0 = server_cpu(ctx) if target == "s3" else None
        res = run_measured(ctx, cmd, env, label, cwd=cwd)
        cpu1 = server_cpu(ctx) if target == "s3" else None
        req1 = s3_requests(ctx) if target == "s3" else None
        after = storage(ctx, repo)
        rec = scenario_record(tool.name, target, rep, scenario, res, before, after, src_bytes,
                              request_delta(req0, req1),
                              cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None)
        records.append(rec)
        mbs = f"{rec['mb_per_s']:.1f} MB/s, " if rec["mb_per_s"] else ""
        reqs = (f", {rec['requests']} requests {rec['requests_by_type']}"
                if rec["requests"] is not None else "")
        if rec["server_cpu_s"] is not None:
            reqs += f", server cpu {rec['server_cpu_s']:.2f} s"
        log(f"{label}: {rec['wall_s']:.2f} s, {mbs}cpu {rec['cpu_s']:.2f} s, "
            f"rss {rec['peak_rss_kib'] / 1024:.0f} MiB, stored {human(rec['stored_bytes'])} "
            f"({rec['objects']} objects, +{rec['added_objects']}){reqs}")
        return rec

    try:
        log(f"{tag}: init")
        run_plain(ctx, tool.init(repo), env, f"{tag}-init")
        measure("backup-first", tool.backup(repo, ctx.src, 1), ctx.src_bytes)
        measure("backup-nochange", tool.backup(repo, ctx.src, 2), ctx.src_bytes)
        measure("snapshots", tool.snapshots(repo), None)
        ctx.mutation.apply()
        mutated = True
        measure("backup-1pct", tool.backup(repo, ctx.src, 3), ctx.mut_bytes)
        dest = os.path.join(d, "restore")
        os.makedirs(dest)
        measure("restore", tool.restore(repo, dest, 3), ctx.mut_bytes, cwd=dest, cold=True)
        diffs = verify_restore(ctx, tool, dest, tag)
        ctx.verifications.append({"tool": tool.name, "target": target, "rep": rep,
                                  "identical": not diffs, "differences": diffs})
        if diffs:
            failures.append(f"{tag}: restored tree differs from the source:\n  " + "\n  ".join(diffs))
        set_aside(ctx, dest)
        rec = measure("check-read-data", tool.check(repo), ctx.mut_bytes, cold=True)
        if tool.name == "custos":
            out = run_plain(ctx, tool.g(repo) + ["--json", "stats"], env, f"{tag}-stats")
            try:
                st = json.loads(out)
                rec["custos_stats"] = st
                ctx.custos_stats.append({"target": target, "rep": rep, **st})
            except ValueError:
                pass
            # check's JSON must report no errors
            try:
                with open(os.path.join(ctx.resdir, rec["log"])) as f:
                    text = f.read()
                j = json.loads(text[text.index("\n["):text.rindex("]") + 1])
                errs = [e for t in j for e in t.get("errors", [])]
                if errs:
                    failures.append(f"{tag}: custos check reported errors: {errs[:5]}")
            except (ValueError, OSError):
                pass
    except BenchError as e:
        failures.append(str(e))
        log(f"FAILED: {e}")
    finally:
        if mutated:
            ctx.mutation.revert()
        if not ctx.args.keep:
            rmtree(d)
    return records, failures


# --------------------------------------------------------------------------- physical reference

def reference(ctx):
    """Single-core throughput of zstd -3, BLAKE3 and ChaCha20-Poly1305 on this machine."""
    ref = {"sample_bytes": None}
    sample = os.path.join(ctx.work, "reference-sample.bin")
    limit = 32 * MIB if ctx.args.quick else 256 * MIB
    files = sorted(k for k, v in ctx.expected.items() if v[0] == "f")
    # Round-robin over the corpus so every kind of data is in the sample.
    n = 0
    with open(sample, "wb") as out:
        step = max(1, len(files) * 4 * MIB // max(1, ctx.src_bytes))
        for start in range(step):
            for rel in files[start::step]:
                with open(os.path.join(ctx.src, rel), "rb") as f:
                    data = f.read(limit - n)
                out.write(data)
                n += len(data)
                if n >= limit:
                    break
            if n >= limit:
                break
    ref["sample_bytes"] = n
    install = not ctx.args.quick
    zstd = ensure_binary("zstd", "zstd", install)
    if zstd:
        r = subprocess.run([zstd, "-b3", "-e3", "-T1", "-i3", sample], capture_output=True, text=True,
                           timeout=300)
        out = (r.stdout + r.stderr).replace("\r", "\n")
        m = re.findall(r"\(x?([0-9.]+)\),\s*([0-9.]+) MB/s,\s*([0-9.]+) MB/s", out)
        if m:
            ratio, comp, decomp = m[-1]
            ref["zstd3"] = {"compress_mb_s": float(comp), "decompress_mb_s": float(decomp),
                            "ratio": float(ratio), "tool": version_of([zstd, "--version"])}
    b3 = ensure_binary("b3sum", "b3sum", install)
    if b3:
        best = None
        for _ in range(3):
            t0 = time.monotonic()
            subprocess.run([b3, "--num-threads", "1", sample], capture_output=True, check=True, timeout=300)
            dt = time.monotonic() - t0
            best = dt if best is None else min(best, dt)
        ref["blake3"] = {"mb_s": n / 1e6 / best, "tool": version_of([b3, "--version"])}
    openssl = shutil.which("openssl")
    if openssl:
        r = subprocess.run([openssl, "speed", "-evp", "chacha20-poly1305", "-seconds", "2",
                            "-bytes", "16384", "-mr"], capture_output=True, text=True, timeout=120)
        m = re.search(r"\+F:\d+:[^:]+:([0-9.]+)", r.stdout)
        if m:
            ref["chacha20poly1305"] = {"mb_s": float(m.group(1)) / 1e6,
                                       "tool": version_of([openssl, "version"]),
                                       "note": "ChaCha20-Poly1305 (IETF), 16 KiB messages; XChaCha20 adds "
                                               "one HChaCha20 block per message"}
    os.unlink(sample)
    rates = [ref.get("zstd3", {}).get("compress_mb_s"), ref.get("blake3", {}).get("mb_s"),
             ref.get("chacha20poly1305", {}).get("mb_s")]
    if all(rates):
        serial = 1 / sum(1 / r for r in rates)
        ref["pipeline_1core_mb_s"] = serial
        ref["pipeline_ncore_mb_s"] = serial * (os.cpu_count() or 1)
    return ref


# --------------------------------------------------------------------------- report

def summarize(records):
    groups = {}
    for r in records:
        groups.setdefault((r["target"], r["scenario"], r["tool"]), []).append(r)
    out = []
    for (target, scenario, tool), rs in groups.items():
        s = {"target": target, "scenario": scenario, "tool": tool, "reps": len(rs)}
        for key in ("wall_s", "mb_per_s", "cpu_s", "cpu_s_per_gib", "peak_rss_kib", "stored_bytes",
                    "objects", "added_bytes", "added_objects", "requests", "server_cpu_s"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                s[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        out.append(s)
    return out


def med(summary, target, scenario, tool, key):
    for s in summary:
        if (s["target"], s["scenario"], s["tool"]) == (target, scenario, tool) and key in s:
            return s[key]["median"]
    return None


def ratios(summary, tools, targets):
    out = []
    for target in targets:
        for scenario in SCENARIOS:
            for peer in tools:
                if peer == "custos":
                    continue
                cw, pw = med(summary, target, scenario, "custos", "wall_s"), med(summary, target, scenario, peer, "wall_s")
                if cw is None or pw is None:
                    continue

                def rat(key):
                    a, b = med(summary, target, scenario, "custos", key), med(summary, target, scenario, peer, key)
                    return a / b if a is not None and b else None
                out.append({"target": target, "scenario": scenario, "peer": peer,
                            "throughput_x": pw / cw if cw else None,
                            "cpu_ratio": rat("cpu_s"), "rss_ratio": rat("peak_rss_kib"),
                            "stored_ratio": rat("stored_bytes")})
    return out


def is_restic(tool_name):
    """restic from the system (`restic`) or Debian stable's build (`restic-X.Y.Z`)."""
    return tool_name == "restic" or tool_name.startswith("restic-")


def target_checks(summary, tools, targets):
    """The performance targets of issue 3, evaluated on this run."""
    lines = []
    for target in targets:
        peers = [t for t in tools if t != "custos" and med(summary, target, "backup-first", t, "wall_s")]
        if med(summary, target, "backup-first", "custos", "wall_s") is None or not peers:
            continue

        def m(sc, tool, key="wall_s"):
            return med(summary, target, sc, tool, key)

        def line(ok, text):
            lines.append(f"- [{target}] {'met' if ok else 'MISSED'}: {text}")
        cf = m("backup-first", "custos")
        restics = [p for p in peers if is_restic(p)]
        for peer, want in [(p, 2.0) for p in restics] + [("rustic", 1.3)]:
            if peer in peers:
                x = m("backup-first", peer) / cf
                line(x >= want, f"first backup {x:.2f}x {peer} throughput (target >= {want}x)")
        cc = m("backup-first", "custos", "cpu_s")
        for peer in peers:
            pc = m("backup-first", peer, "cpu_s")
            if cc is not None and pc:
                line(cc < pc, f"first backup CPU-s: custos {cc:.1f} vs {peer} {pc:.1f} ({cc / pc:.2f}x, target < 1)")
        cs = m("backup-first", "custos", "stored_bytes")
        smallest = min((m("backup-first", p, "stored_bytes"), p) for p in peers)
        line(cs <= smallest[0], f"stored bytes after first backup {human(cs)} vs smallest peer {smallest[1]} "
             f"{human(smallest[0])} ({cs / smallest[0]:.3f}x, target <= 1)")
        cn = m("backup-nochange", "custos")
        line(cn <= 0.10 * cf, f"no-change re-backup {cn:.2f} s = {100 * cn / cf:.1f} % of first backup (target <= 10 %)")
        for peer in peers:
            pn = m("backup-nochange", peer)
            if pn:
                line(cn < pn, f"no-change re-backup {cn:.2f} s vs {peer} {pn:.2f} s ({pn / cn:.2f}x faster, target > 1)")
        for r in restics:
            if m("restore", r) and m("restore", "custos"):
                x = m("restore", r) / m("restore", "custos")
                line(x >= 2.0, f"restore {x:.2f}x {r} (target >= 2.0x)")
        for r in restics:
            worse = []
            for sc in SCENARIOS:
                a, b = m(sc, "custos", "peak_rss_kib"), m(sc, r, "peak_rss_kib")
                if a and b and a > b:
                    worse.append(f"{sc} {a / 1024:.0f} vs {b / 1024:.0f} MiB")
            line(not worse, f"peak RSS <= {r}'s on every scenario" + (f" (over on: {'; '.join(worse)})" if worse else ""))
        ao = m("backup-1pct", "custos", "added_objects")
        if ao is not None:
            lines.append(f"- [{target}] info: custos 1 % re-backup wrote {ao:.0f} new objects "
                         f"({human(m('backup-1pct', 'custos', 'added_bytes'))})")
        rq = m("backup-1pct", "custos", "requests")
        if rq is not None:
            peers_rq = [f"{p} {m('backup-1pct', p, 'requests'):.0f}" for p in peers
                        if m("backup-1pct", p, "requests") is not None]
            lines.append(f"- [{target}] info: custos 1 % re-backup sent {rq:.0f} S3 requests"
                         + (f" ({', '.join(peers_rq)})" if peers_rq else ""))
        cpu = [(t, m("backup-first", t, "cpu_s"), m("backup-first", t, "server_cpu_s"))
               for t in ["custos"] + peers]
        cpu = [f"{t} {a:.1f} + {b:.1f}" for t, a, b in cpu if a is not None and b is not None]
        if cpu:
            lines.append(f"- [{target}] info: first backup CPU-s, tool + S3 server (sharing the cores): "
                         + ", ".join(cpu))
    return lines


def fmt_stat(st, scale=1.0, digits=2):
    if not st:
        return "–"
    a, lo, hi = st["median"] * scale, st["min"] * scale, st["max"] * scale
    if lo == hi:
        return f"{a:.{digits}f}"
    return f"{a:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def markdown(meta, summary, rat, checks, failures, extra=()):
    L = []
    c = meta["corpus"]
    L.append(f"# custos benchmark {meta['run_id']}")
    L.append("")
    L.append(f"- machine: {meta['cpu']['model']}, {meta['cpu']['cores']} cores, "
             f"{human(meta['cpu']['memory'])} RAM, flags {' '.join(meta['cpu']['flags'])}, Linux {meta['cpu']['kernel']}")
    L.append(f"- corpus: {c['source']}: {c['files']} files, {c['dirs']} dirs, {human(c['bytes'])} "
             f"(manifest sha256 {c['digest'][:16]}…); 1 % step: {c['mutation']['modified']} files edited, "
             f"{c['mutation']['added']} added ({human(c['mutation']['added_bytes'])})")
    L.append(f"- repetitions: {meta['reps']} (median, min–max in brackets); mode: {'quick' if meta['quick'] else 'full'}; "
             f"source in page cache; each scenario runs after `sync`; local restore and check read a "
             f"cold repository (its files dropped from the page cache first)")
    L.append(f"- custos: `{meta['custos_bin']}` ({meta['custos_profile']}), {meta['versions'].get('custos', '')}")
    ref = meta.get("reference") or {}
    if ref:
        parts = []
        if "zstd3" in ref:
            z = ref["zstd3"]
            parts.append(f"zstd -3 {z['compress_mb_s']:.0f} MB/s compress, {z['decompress_mb_s']:.0f} MB/s decompress "
                         f"(ratio {z['ratio']:.2f} on a {human(ref['sample_bytes'])} corpus sample)")
        if "blake3" in ref:
            parts.append(f"BLAKE3 {ref['blake3']['mb_s']:.0f} MB/s (b3sum, 1 thread)")
        if "chacha20poly1305" in ref:
            parts.append(f"ChaCha20-Poly1305 {ref['chacha20poly1305']['mb_s']:.0f} MB/s (openssl speed, 16 KiB; "
                         f"XChaCha20 adds one HChaCha20 block per message)")
        L.append("- physical reference, one core: " + "; ".join(parts))
        if "pipeline_1core_mb_s" in ref:
            L.append(f"- serial zstd+BLAKE3+AEAD bound: {ref['pipeline_1core_mb_s']:.0f} MB/s per core, "
                     f"{ref['pipeline_ncore_mb_s']:.0f} MB/s on {meta['cpu']['cores']} cores "
                     f"(chunking, I/O and metadata not included)")
    L.append("")
    L.append("Settings (same compression class, zstd level 3 everywhere):")
    L.append("")
    for t, s in meta["settings"].items():
        L.append(f"- {t} ({meta['versions'].get(t, '?')}): {s}")
    L.append("")
    L.append("MB/s = source bytes (10^6) / wall time (for restore and check: the source size after the 1 % step); "
             "CPU = user + sys of the tool process; repo = stored bytes after the step (local: file sizes; "
             "S3: object sizes from a listing), +objects = objects written by the step; "
             "requests (S3) = requests the tool sent during the step, every type and status, from "
             "SeaweedFS' `SeaweedFS_s3_request_total` counters (types per step in results.json); "
             "server CPU-s (S3) = user + sys of the SeaweedFS process during the step (it shares the cores: "
             "on 2 cores a step's wall time is at least (tool CPU + server CPU) / 2).")
    for target in meta["targets"]:
        L.append("")
        L.append(f"## Target: {target}")
        L.append("")
        reqs = target == "s3" and any(s.get("requests") for s in summary if s["target"] == target)
        srv = target == "s3" and any(s.get("server_cpu_s") for s in summary if s["target"] == target)
        L.append("| scenario | tool | wall s | MB/s | CPU-s/GiB | peak RSS MiB | repo MiB | +MiB | objects | +objects |"
                 + (" requests |" if reqs else "") + (" server CPU-s |" if srv else ""))
        L.append("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if reqs else "") + ("---|" if srv else ""))
        for sc in SCENARIOS:
            for tool in meta["tools"]:
                s = next((x for x in summary if (x["target"], x["scenario"], x["tool"]) == (target, sc, tool)), None)
                if not s:
                    continue
                L.append(f"| {SCENARIO_LABEL[sc]} | {tool} | {fmt_stat(s.get('wall_s'))} | "
                         f"{fmt_stat(s.get('mb_per_s'), digits=1)} | {fmt_stat(s.get('cpu_s_per_gib'), digits=1)} | "
                         f"{fmt_stat(s.get('peak_rss_kib'), 1 / 1024, 0)} | "
                         f"{fmt_stat(s.get('stored_bytes'), 1 / MIB, 1)} | {fmt_stat(s.get('added_bytes'), 1 / MIB, 1)} | "
                         f"{fmt_stat(s.get('objects'), digits=0)} | {fmt_stat(s.get('added_objects'), digits=0)} |"
                         + (f" {fmt_stat(s.get('requests'), digits=0)} |" if reqs else "")
                         + (f" {fmt_stat(s.get('server_cpu_s'), digits=2)} |" if srv else ""))
        rs = [r for r in rat if r["target"] == target]
        if rs:
            L.append("")
            L.append("custos relative to each peer (medians of this run): speed > 1 = custos faster; "
                     "CPU, RSS, stored < 1 = custos uses less.")
            L.append("")
            L.append("| scenario | peer | speed custos/peer (peer time / custos time) | CPU-s custos/peer | peak RSS custos/peer | stored custos/peer |")
            L.append("|---|---|---|---|---|---|")

            def f(x):
                return "–" if x is None else f"{x:.2f}"
            for r in rs:
                L.append(f"| {SCENARIO_LABEL[r['scenario']]} | {r['peer']} | {f(r['throughput_x'])}x | "
                         f"{f(r['cpu_ratio'])} | {f(r['rss_ratio'])} | {f(r['stored_ratio'])} |")
    if checks:
        L.append("")
        L.append("## Issue 3 targets on this run")
        L.append("")
        L.append("(The ratio targets are defined on >= 1 GiB of generated data, median of several runs.)")
        L.append("")
        L.extend(checks)
    L.extend(extra)
    L.append("")
    L.append("## Restore verification")
    L.append("")
    for v in meta["verifications"]:
        L.append(f"- {v['tool']} / {v['target']} / rep {v['rep']}: "
                 f"{'byte-identical' if v['identical'] else 'DIFFERS: ' + '; '.join(v['differences'][:3])}")
    if failures:
        L.append("")
        L.append("## FAILURES")
        L.append("")
        for f_ in failures:
            L.append("```")
            L.append(f_.strip()[:3000])
            L.append("```")
    L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------- main

class Ctx:
    pass


def build_custos(profile):
    cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
    cmd = [cargo, "build", "--locked", "-p", "custos-agent", "--bin", "custos"]
    if profile == "release":
        cmd.insert(2, "--release")
    log("building custos: " + " ".join(cmd[1:]))
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        raise BenchError("building custos failed")
    return os.path.join(ROOT, "target", profile if profile == "release" else "debug", "custos")


def find_rustic():
    cached = os.path.join(HERE, ".cache", "rustic", "bin", "rustic")
    if os.access(cached, os.X_OK):
        return cached
    return shutil.which("rustic")


def install_rustic():
    cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
    dest = os.path.join(HERE, ".cache", "rustic")
    env = dict(os.environ, CARGO_PROFILE_RELEASE_LTO="false")
    log(f"installing rustic-rs into {dest} (takes ~20 minutes on 2 cores)")
    r = subprocess.run([cargo, "install", "rustic-rs", "--locked", "--root", dest], env=env)
    if r.returncode != 0:
        raise BenchError("cargo install rustic-rs failed")
    return os.path.join(dest, "bin", "rustic")


def main(argv):
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: ~64 MiB, 1 repetition, custos and restic, local (+S3 if it starts)")
    p.add_argument("--size", type=parse_size, help="generated corpus size (default 1GiB, quick 64MiB)")
    p.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    p.add_argument("--corpus", help="benchmark this folder (copied into the work dir) instead of generated data")
    p.add_argument("--tools", help="comma list of custos,restic,restic-stable,borg,rustic (default: all; quick: custos,restic); "
                        "restic-stable is Debian stable's restic, fetched into bench/.cache")
    p.add_argument("--targets", help="comma list of local,s3 (default local,s3)")
    p.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    p.add_argument("--custos-bin", help="custos binary (default: build release; quick: target/debug/custos)")
    p.add_argument("--install-rustic", action="store_true",
                   help="cargo install rustic-rs into bench/.cache/rustic if missing (~20 min)")
    p.add_argument("--borg-encryption", help="borg init -e MODE (default repokey with SHA-NI, else repokey-blake2)")
    p.add_argument("--change-pct", type=float, default=1.0, help="share of files edited+added in the 1 %% step")
    p.add_argument("--s3-port", type=int, default=18500)
    p.add_argument("--cmd-timeout", type=int, help="seconds per measured command (default 3600, quick 240)")
    p.add_argument("--work-dir", default=os.path.join(HERE, ".work"))
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--no-reference", action="store_true", help="skip the zstd/BLAKE3/AEAD reference")
    p.add_argument("--keep", action="store_true", help="keep repositories, restores and the generated corpus")
    p.add_argument("--mail-messages", type=int,
                   help="messages in the IMAP pull / mbox import scenarios (default 20000, quick 2000)")
    p.add_argument("--no-mail", action="store_true", help="skip the IMAP pull and mbox import scenarios")
    p.add_argument("--index-records", type=int,
                   help="small records in the index-memory scenario (default 1000000, quick 20000; 0 skips it)")
    p.add_argument("--imap-port", type=int, default=18510, help="Dovecot port (next ones tried if busy)")
    p.add_argument("--imap-name", default="bench-imap", help="scripts/services/imap.sh instance name")
    p.add_argument("--s3-state-file", help=argparse.SUPPRESS)
    p.add_argument("--imap-state-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    quick = args.quick
    args.size = args.size or (64 * MIB if quick else GIB)
    args.reps = args.reps or (1 if quick else 3)
    args.cmd_timeout = args.cmd_timeout or (240 if quick else 3600)
    args.mail_messages = args.mail_messages or (2000 if quick else 20000)
    if args.index_records is None:
        args.index_records = 20000 if quick else 1_000_000
    t_start = time.monotonic()

    ctx = Ctx()
    ctx.args = args
    ctx.cpu = cpu_info()
    ctx.run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    ctx.resdir = os.path.join(args.results_dir, ctx.run_id)
    ctx.logdir = os.path.join(ctx.resdir, "logs")
    os.makedirs(ctx.logdir)
    ctx.work = os.path.join(os.path.abspath(args.work_dir), ctx.run_id)
    os.makedirs(ctx.work)
    ctx.verifications, ctx.custos_stats = [], []
    ctx.s3 = None
    failures = []

    # -- tools
    ctx.time_bin = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
    if not ctx.time_bin:
        apt_install("time")
        ctx.time_bin = "/usr/bin/time"
    explicit_tools = args.tools is not None
    wanted = (args.tools or ("custos,restic" if quick else "custos,restic,restic-stable,borg,rustic")).split(",")
    wanted = [t.strip() for t in wanted if t.strip()]
    unknown = set(wanted) - {"custos", "restic", "restic-stable", "borg", "rustic"}
    if unknown:
        raise BenchError(f"unknown tools: {', '.join(sorted(unknown))}")
    targets_explicit = args.targets is not None
    targets = [t.strip() for t in (args.targets or "local,s3").split(",") if t.strip()]
    if set(targets) - {"local", "s3"}:
        raise BenchError(f"unknown targets in {args.targets!r}")

    tools = []
    if "custos" in wanted:
        if args.custos_bin:
            cbin = os.path.abspath(args.custos_bin)
            profile = "given"
        elif quick and os.access(os.path.join(ROOT, "target", "debug", "custos"), os.X_OK):
            cbin, profile = os.path.join(ROOT, "target", "debug", "custos"), "dev profile (opt-level 2), existing binary"
        elif quick:
            cbin, profile = build_custos("debug"), "dev profile (opt-level 2)"
        else:
            cbin, profile = build_custos("release"), "release (thin LTO)"
        if not os.access(cbin, os.X_OK):
            raise BenchError(f"custos binary {cbin} is not executable")
        ctx.custos_bin, ctx.custos_profile = cbin, profile
        tools.append(Custos(cbin, ctx))
    else:
        ctx.custos_bin, ctx.custos_profile = "-", "-"
    if "restic" in wanted:
        tools.append(Restic(ensure_binary("restic", "restic"), ctx))
    if "restic-stable" in wanted:
        try:
            found = find_restic_stable() or install_restic_stable()
        except BenchError as e:
            if explicit_tools:
                raise
            found = None
            log(f"Debian stable's restic not available ({e}): skipped")
        system = next((t for t in tools if t.name == "restic"), None)
        if found and system and restic_version(system.bin) == found[1]:
            log(f"Debian stable's restic is the system's ({found[1]}): measured once")
        elif found:
            tools.append(ResticStable(found[0], ctx, found[1]))
    if "borg" in wanted:
        tools.append(Borg(ensure_binary("borg", "borgbackup"), ctx))
    if "rustic" in wanted:
        rb = find_rustic()
        if not rb and args.install_rustic:
            rb = install_rustic()
        if rb:
            tools.append(Rustic(rb, ctx))
        elif explicit_tools:
            raise BenchError("rustic not found: pass --install-rustic (cargo install into bench/.cache/rustic)")
        else:
            log("rustic not installed: skipped (use --install-rustic to build it, ~20 min)")

    # -- S3
    if "s3" in targets:
        weed = os.path.join(ROOT, ".venv", "bin", "weed")
        if quick and not targets_explicit and not os.access(weed, os.X_OK):
            log("quick mode: SeaweedFS not installed (scripts/test.sh installs it): S3 target skipped")
            targets.remove("s3")
        else:
            ctx.s3 = S3Server(args.s3_port, quick)
            try:
                ctx.s3.start(args.s3_state_file)
            except (BenchError, subprocess.SubprocessError) as e:
                if quick and not targets_explicit:
                    log(f"quick mode: S3 did not start ({e}); S3 target skipped")
                    targets.remove("s3")
                    ctx.s3.stop()
                    ctx.s3 = None
                else:
                    raise

    try:
        # -- corpus
        if args.corpus:
            srcdir = os.path.abspath(args.corpus)
            if not os.path.isdir(srcdir):
                raise BenchError(f"--corpus {srcdir} is not a directory")
            ctx.src = os.path.join(ctx.work, "src", os.path.basename(srcdir.rstrip("/")) or "corpus")
            log(f"copying {srcdir} to {ctx.src} (the 1 % step edits the copy)")
            os.makedirs(os.path.dirname(ctx.src))
            r = subprocess.run(["cp", "-a", srcdir, ctx.src], capture_output=True, text=True)
            if r.returncode != 0:
                raise BenchError(f"copying {srcdir} failed: {r.stderr.strip()[-500:]}")
            source_desc = f"folder {srcdir}"
            corpus_cache = None
        else:
            name = f"gen-v{corpus.GEN_VERSION}-s{args.seed}-{args.size}"
            corpus_cache = os.path.join(os.path.abspath(args.work_dir), "corpus", name)
            ctx.src = os.path.join(corpus_cache, "data")
            source_desc = f"generated (seed {args.seed}, {human(args.size)}, generator v{corpus.GEN_VERSION})"
        t0 = time.monotonic()
        if corpus_cache:
            marker = os.path.join(corpus_cache, "digest")
            reuse = False
            if os.path.exists(marker):
                log(f"checking cached corpus {corpus_cache}")
                ctx.expected = corpus.manifest(ctx.src)
                with open(marker) as f:
                    reuse = f.read().strip() == corpus.manifest_digest(ctx.expected)
                if not reuse:
                    log("cached corpus changed: generating again")
            if not reuse:
                rmtree(corpus_cache)
                os.makedirs(corpus_cache)
                log(f"generating {human(args.size)} corpus (seed {args.seed}) in {ctx.src}")
                corpus.generate(ctx.src, args.size, args.seed, log=log)
                ctx.expected = corpus.manifest(ctx.src)
                with open(marker, "w") as f:
                    f.write(corpus.manifest_digest(ctx.expected) + "\n")
        else:
            ctx.expected = corpus.manifest(ctx.src)
        totals = corpus.manifest_totals(ctx.expected)
        ctx.src_bytes = totals["bytes"]
        ctx.expected_top = {k for k in ctx.expected if "/" not in k}
        ctx.mutation = corpus.Mutation(ctx.src, ctx.expected, os.path.join(ctx.work, "mutation-aside"),
                                       args.seed, args.change_pct)
        ctx.mutation.apply()
        try:
            ctx.expected_mutated = corpus.manifest(ctx.src)
        finally:
            ctx.mutation.revert()
        ctx.mut_bytes = corpus.manifest_totals(ctx.expected_mutated)["bytes"]
        if corpus.compare(ctx.expected, corpus.manifest(ctx.src)):
            raise BenchError("the 1 % mutation did not revert cleanly")
        digest = corpus.manifest_digest(ctx.expected)
        log(f"corpus ready in {time.monotonic() - t0:.1f} s: {totals['files']} files, {human(totals['bytes'])}, "
            f"digest {digest[:16]}")

        meta = {"run_id": ctx.run_id, "quick": quick, "reps": args.reps, "targets": targets,
                "tools": [t.name for t in tools], "cpu": ctx.cpu,
                "custos_bin": ctx.custos_bin, "custos_profile": ctx.custos_profile,
                "versions": {t.name: t.version() for t in tools},
                "settings": {t.name: t.settings for t in tools},
                "corpus": {"source": source_desc, "seed": args.seed, "size_param": args.size,
                           "generator_version": corpus.GEN_VERSION, "digest": digest, **totals,
                           "bytes_after_1pct": ctx.mut_bytes,
                           "mutation": {"pct": args.change_pct, **ctx.mutation.stats()}},
                "s3": {"endpoint": ctx.s3.endpoint, "bucket": S3_BUCKET, "server": "SeaweedFS (weed mini)"}
                if ctx.s3 else None,
                "verifications": ctx.verifications}
        meta["reference"] = None if args.no_reference else reference(ctx)

        # -- the runs: tools interleaved within each repetition
        records = []
        for rep in range(1, args.reps + 1):
            for target in targets:
                for tool in tools:
                    if target not in tool.targets:
                        continue
                    ensure_space(ctx, tool, target)
                    recs, fails = run_tool(ctx, tool, target, rep)
                    records += recs
                    failures += fails
        empty_aside(ctx)
        if not records:
            failures.append("no measurement succeeded")
        # -- IMAP pull and mbox import (messages/s), local target only
        ctx.tools, ctx.versions_extra, ctx.mail_corpus = tools, {}, None
        mail_records, mail_notes = [], []
        if not args.no_mail:
            mail_records, fails, mail_notes = mail.run(ctx, sys.modules[__name__])
            failures += fails
        index_rec, fails = index_memory.run(ctx, sys.modules[__name__])
        failures += fails
        mail_summary = mail.summarize(mail_records)
        meta["versions"].update(ctx.versions_extra)
        meta["mail"] = {"corpus": ctx.mail_corpus, "notes": mail_notes}
        if ctx.mutation.applied:
            ctx.mutation.revert()

        summary = summarize(records)
        active_targets = [t for t in targets if any(r["target"] == t for r in records)] or targets
        meta["targets"] = active_targets
        rat = ratios(summary, meta["tools"], active_targets)
        checks = target_checks(summary, meta["tools"], active_targets)
        meta["custos_stats"] = ctx.custos_stats
        meta["duration_s"] = round(time.monotonic() - t_start, 1)
        result = {"meta": meta, "records": records, "summary": summary, "ratios": rat,
                  "targets_check": checks, "mail_records": mail_records, "mail_summary": mail_summary,
                  "index_memory": index_rec,
                  "failures": failures, "ok": not failures}
        with open(os.path.join(ctx.resdir, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
        mail_md = [] if args.no_mail else mail.markdown(mail_summary, ctx.mail_corpus, mail_notes,
                                                         meta["versions"], fmt_stat)
        md = markdown(meta, summary, rat, checks, failures, mail_md + index_memory.markdown(index_rec))
        md += f"\nTotal run time: {meta['duration_s']} s.\n"
        with open(os.path.join(ctx.resdir, "results.md"), "w") as f:
            f.write(md)
        print(md)
        log(f"results: {os.path.relpath(ctx.resdir, os.getcwd())}/results.md and results.json "
            f"({meta['duration_s']} s)")
    finally:
        if ctx.s3:
            ctx.s3.stop()
        if not args.keep:
            rmtree(ctx.work)
            if not args.corpus and 'corpus_cache' in locals() and corpus_cache:
                rmtree(corpus_cache)
            for d in (os.path.join(os.path.abspath(args.work_dir), "corpus"), os.path.abspath(args.work_dir)):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
    if failures:
        log(f"{len(failures)} failure(s):")
        for f_ in failures:
            log("  " + f_.splitlines()[0])
        return 1
    return 0


def _term(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _term)
    try:
        sys.exit(main(sys.argv[1:]))
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        log(f"error: {e}")
        sys.exit(1)
