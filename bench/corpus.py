"""Deterministic communication-like corpus, tree hashing and a reversible mutation.

Standard library only. Everything random comes from `random.Random(seed)` and
integer draws (no libm-dependent distributions), so the same seed, size and
GEN_VERSION give the same bytes, names and mtimes on any machine with the same
CPython major version; the manifest digest recorded in every result lets a
reader check that two runs measured the same data.

Layout (shares of the byte budget):
  mail/<mailbox>/<folder>/NNNNNN.eml   50 %  RFC 5322 messages, text bodies in ten
                                             languages, quoted replies, 10 % with
                                             base64 attachments (100 KB-5 MB, a few
                                             10-20 MB); 15 % of attachments are
                                             forwarded again (duplicate content)
  attachments/<yyyy>/<mm>/<name>       20 %  raw files: PDF/JPEG/ZIP-like
                                             (incompressible), CSV/TXT/LOG (text);
                                             some are the decoded bytes of mail
                                             attachments, some saved twice
  chat/<workspace>/<channel>/<day>.json 15 % Slack-style JSON exports
  crm/accounts/<xx>/<id>.json           15 % CRM records (accounts, contacts,
  crm/exports/tickets-NNN.ndjson             deals, notes) and NDJSON ticket dumps
"""

import base64
import hashlib
import json
import os
import random
import shutil
import stat

GEN_VERSION = 1
KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB
EPOCH = 1672531200  # 2023-01-01T00:00:00Z, base of the generated mtimes

# --------------------------------------------------------------------------- text

# A few hundred common words per language plus syllable-made words with a
# Zipf-like weight: compresses roughly like real prose (zstd -3: ~2.5-3.5x).
COMMON = {
    "en": "the of and to in is that for it with as was on be by this are from at or have an "
    "they which you one had not but what all were when we there can more if out so said "
    "will about would their them then our your please thanks regards order invoice meeting "
    "customer account payment delivery contract attached update call tomorrow today week "
    "issue ticket support team project report review question answer price offer",
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als "
    "auch es an werden aus er hat dass sie nach wird bei einer um am sind noch wie einem "
    "über einen so zum war haben nur oder aber vor zur bis mehr durch man Rechnung Kunde "
    "Auftrag Lieferung Vertrag Termin Angebot bitte danke Grüße Anhang morgen heute Woche",
    "fr": "le de un être et à il avoir ne je son que se qui ce dans en du elle au pour pas "
    "que vous par sur faire plus dire me on mon lui nous comme mais pouvoir avec tout "
    "facture client commande livraison contrat réunion merci cordialement pièce jointe",
    "es": "el la de que y a en un ser se no haber por con su para como estar tener le lo "
    "todo pero más hacer o poder decir este ir otro ese si me ya ver porque dar cuando "
    "factura cliente pedido entrega contrato reunión gracias saludos adjunto mañana hoy",
    "pt": "o a de que e do da em um para é com não uma os no se na por mais as dos como "
    "mas foi ao ele das tem à seu sua ou ser quando muito nos já está eu também fatura "
    "cliente pedido entrega contrato reunião obrigado cumprimentos anexo amanhã hoje",
    "it": "il di che e la a per un in è non sono da una con si le lo mi ma come io ci questo "
    "qui anche del della fattura cliente ordine consegna contratto riunione grazie saluti",
    "nl": "de van een het en in is dat op te zijn met voor niet aan er om ook als dan bij "
    "factuur klant bestelling levering contract vergadering bedankt groeten bijlage",
    "pl": "i w nie na się z do to że jest o jak ale po co tak za od faktura klient "
    "zamówienie dostawa umowa spotkanie dziękuję pozdrawiam załącznik jutro dzisiaj",
    "ru": "и в не на я быть он с что а по это она этот к но они мы как из у который то за "
    "свой что весь год от так о для ты же все счёт клиент заказ доставка договор встреча "
    "спасибо вложение завтра сегодня",
    "ja": "こんにちは ありがとう ございます お世話になっております 請求書 注文 配送 契約 会議 "
    "よろしく お願いします 添付 明日 今日 確認 お客様 担当 連絡 対応 予定 資料 送付",
}
SYLLABLES = {
    "en": "ba be bi bo ca co de di fa fe ga go ha he in la le li lo ma me mi mo na ne no "
    "pa pe pi po ra re ri ro sa se si so ta te ti to un ver ter ing tion ment able".split(),
    "de": "ge be ver zu an auf aus ein un ter en er ung keit heit lich bar schaft stra "
    "ben den gen hal ken lan mer nen sch spr tr wer zei".split(),
    "fr": "la le de re con pro com tion ment eur ique able ais ait ant ette elle oire ons "
    "par pre sur tra vou mai".split(),
    "es": "la lo de re con pro com ción mente dor ado ida ero era ando iendo par pre "
    "tra sal mar".split(),
    "pt": "la lo de re con pro com ção mente dor ado ida eiro eira ando endo par pre tra".split(),
    "it": "la lo de re con pro com zione mente tore ato ita ero era ando endo par pre".split(),
    "nl": "ge be ver on aan uit in en er ing heid lijk baar schap st ka me".split(),
    "pl": "prze po na za wy roz nie owa ość anie enie ski cki ny ła ło ta".split(),
    "ru": "по на за вы раз не ова ость ание ение ский цкий ный ла ло та про ст".split(),
    "ja": "か き く け こ さ し す せ そ た ち つ て と な に ぬ ね の は ひ ふ へ ほ ま み む め も".split(),
}
# Share of messages per language (integer weights).
LANG_WEIGHTS = [("en", 50), ("de", 12), ("fr", 10), ("es", 10), ("pt", 5), ("it", 4),
                ("nl", 3), ("pl", 2), ("ru", 2), ("ja", 2)]

FIRST = ("Anna Ben Chloé David Elena Farid Greta Hugo Ines Jonas Karin Luca Maria Noah Olga "
         "Pedro Quinn Rosa Sven Tanja Uwe Vera Wei Xenia Yusuf Zoe Akira Bea Carlos Dmitri").split()
LAST = ("Müller Smith García Rossi Dubois Kowalski Ivanov Tanaka Jansen Silva Schmidt Brown "
        "Martin Bianchi Novak Costa Weber Moreau Nowak Petrov Sato Bakker Santos Fischer").split()
DOMAINS = ("example.com example.org acme-corp.example globex.example initech.example "
           "umbrella.example hooli.example contoso.example").split()

# Size buckets: (weight, low, high) in bytes; drawn with integers only.
MAIL_BODY_SIZES = [(30, 2 * KIB, 4 * KIB), (30, 4 * KIB, 8 * KIB), (22, 8 * KIB, 16 * KIB),
                   (13, 16 * KIB, 32 * KIB), (5, 32 * KIB, 50 * KIB)]
ATTACH_SIZES = [(45, 100 * KIB, 300 * KIB), (35, 300 * KIB, MIB), (14, MIB, 5 * MIB // 2),
                (6, 5 * MIB // 2, 5 * MIB)]
BIG_SIZES = [(1, 10 * MIB, 20 * MIB)]
CHAT_DAY_SIZES = [(40, 2 * KIB, 16 * KIB), (35, 16 * KIB, 64 * KIB), (20, 64 * KIB, 160 * KIB),
                  (5, 160 * KIB, 300 * KIB)]
CRM_RECORD_SIZES = [(50, KIB, 4 * KIB), (35, 4 * KIB, 10 * KIB), (15, 10 * KIB, 20 * KIB)]
NDJSON_SIZES = [(1, MIB, 8 * MIB)]
# (weight, extension, compressible)
ATTACH_KINDS = [(35, "pdf", False), (25, "jpg", False), (15, "docx", False),
                (15, "csv", True), (10, "txt", True)]


def pick_weighted(rng, items):
    """items: [(weight, ...)] -> the chosen tuple (integer arithmetic)."""
    total = sum(i[0] for i in items)
    r = rng.randrange(total)
    for it in items:
        r -= it[0]
        if r < 0:
            return it
    return items[-1]


def draw_size(rng, buckets):
    _, lo, hi = pick_weighted(rng, buckets)
    return rng.randint(lo, hi)


class TextSource:
    """Per-language streams of pseudo-prose; a message takes a slice of one."""

    def __init__(self, rng, total_bytes):
        self.rng = rng
        self.langs = [l for l, _ in LANG_WEIGHTS]
        self.weights = [(w, l) for l, w in LANG_WEIGHTS]
        self.streams = {}
        # Streams sized so slices rarely overlap inside one compression window.
        en_len = max(2 * MIB, min(24 * MIB, total_bytes // 24))
        for lang, w in LANG_WEIGHTS:
            self.streams[lang] = self._stream(lang, max(256 * KIB, en_len * w // 50))

    def _vocab(self, lang):
        rng = self.rng
        words = COMMON[lang].split()
        syl = SYLLABLES[lang]
        made = set()
        while len(made) < 3000:
            made.add("".join(rng.choice(syl) for _ in range(rng.randint(1, 4))))
        made = sorted(made)
        rng.shuffle(made)
        vocab = words + made
        # Zipf-like integer weights: common words heavy, made words by rank.
        weights = [400] * len(words) + [max(1, 3000 // (i + 1)) for i in range(len(made))]
        cum, acc = [], 0
        for w in weights:
            acc += w
            cum.append(acc)
        return vocab, cum

    def _stream(self, lang, length):
        rng = self.rng
        vocab, cum = self._vocab(lang)
        sep = "" if lang == "ja" else " "
        end = "。" if lang == "ja" else "."
        parts, size = [], 0
        while size < length:
            n = rng.randint(5, 18)
            words = rng.choices(vocab, cum_weights=cum, k=n)
            if rng.randrange(4) == 0:
                words[rng.randrange(n)] = str(rng.randrange(100000))
            s = sep.join(words)
            s = s[:1].upper() + s[1:] + (end if rng.randrange(8) else "?")
            if rng.randrange(6) == 0:
                s += "\n\n"
            else:
                s += sep
            parts.append(s)
            size += len(s)
        return "".join(parts)

    def lang(self):
        return pick_weighted(self.rng, self.weights)[1]

    def take(self, lang, nchars):
        s = self.streams[lang]
        nchars = min(nchars, len(s) - 1)
        start = self.rng.randrange(len(s) - nchars)
        return s[start:start + nchars]


def person(rng):
    f, l = rng.choice(FIRST), rng.choice(LAST)
    user = (f[0] + "." + l).lower().encode("ascii", "ignore").decode() or "user"
    return f"{f} {l}", f"{user}@{rng.choice(DOMAINS)}"


def rfc_date(ts):
    import time as _t
    return _t.strftime("%a, %d %b %Y %H:%M:%S +0000", _t.gmtime(ts))


def iso(ts):
    import time as _t
    return _t.strftime("%Y-%m-%dT%H:%M:%SZ", _t.gmtime(ts))


def attachment_bytes(rng, text, kind, size):
    """Content of an attachment of this kind and size."""
    ext = kind[1]
    if ext == "csv":
        rows, n = ["id,date,customer,amount,currency,status,comment"], 0
        while n < size:
            r = (f"{rng.randrange(10**7)},{iso(EPOCH + rng.randrange(10**8))[:10]},"
                 f"{rng.choice(LAST)} {rng.choice(('GmbH', 'Ltd', 'SA', 'Inc', 'BV'))},"
                 f"{rng.randrange(10**6) / 100:.2f},{rng.choice(('EUR', 'USD', 'GBP'))},"
                 f"{rng.choice(('open', 'paid', 'overdue'))},\"{text.take('en', rng.randint(10, 60))}\"")
            rows.append(r)
            n += len(r) + 1
        return "\n".join(rows).encode()[:size]
    if ext == "txt":
        return text.take(text.lang(), size).encode()[:size]
    header = {"pdf": b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n", "jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
              "docx": b"PK\x03\x04\x14\x00\x06\x00"}[ext]
    if ext == "pdf":
        # Mostly compressed streams (random), some plain-text objects.
        out, n = [header], len(header)
        while n < size:
            if rng.randrange(6) == 0:
                chunk = (b"1 0 obj\n<< /Type /Page >>\nBT /F1 12 Tf (" +
                         text.take("en", rng.randint(200, 2000)).encode() + b") Tj ET\nendobj\n")
            else:
                chunk = b"stream\n" + rng.randbytes(rng.randint(8 * KIB, 64 * KIB)) + b"\nendstream\n"
            out.append(chunk)
            n += len(chunk)
        return b"".join(out)[:size]
    return header + rng.randbytes(max(0, size - len(header)))


class Writer:
    def __init__(self, root):
        self.root = root
        self.count = 0
        self.bytes = 0
        self.made = set()

    def write(self, rel, data):
        path = os.path.join(self.root, rel)
        d = os.path.dirname(path)
        if d not in self.made:
            os.makedirs(d, exist_ok=True)
            self.made.add(d)
        with open(path, "wb") as f:
            f.write(data)
        ts = EPOCH + self.count * 37
        os.utime(path, (ts, ts))
        self.count += 1
        self.bytes += len(data)


def email_message(rng, text, ts, attachments=(), thread=None, body_size=None):
    """One RFC 5322 message as bytes; `attachments`: [(filename, bytes)]."""
    lang = text.lang()
    frm, frm_addr = person(rng)
    to, to_addr = person(rng)
    subject = thread["subject"] if thread else text.take(lang, rng.randint(20, 70)).strip()
    if thread:
        subject = "Re: " + subject
    msgid = f"<{rng.getrandbits(64):016x}.{rng.getrandbits(32):08x}@{rng.choice(DOMAINS)}>"
    hops = []
    for i in range(rng.randint(2, 4)):
        hops.append(f"Received: from mx{rng.randrange(50)}.{rng.choice(DOMAINS)} "
                    f"([10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}])\r\n"
                    f"\tby mail{rng.randrange(20)}.{rng.choice(DOMAINS)} with ESMTPS id "
                    f"{rng.getrandbits(48):012x};\r\n\t{rfc_date(ts - i * 3)}")
    headers = [f"Return-Path: <{frm_addr}>", *hops,
               f"Message-ID: {msgid}", f"Date: {rfc_date(ts)}",
               f"From: {frm} <{frm_addr}>", f"To: {to} <{to_addr}>"]
    if rng.randrange(3) == 0:
        cc, cc_addr = person(rng)
        headers.append(f"Cc: {cc} <{cc_addr}>")
    headers += [f"Subject: {subject}", "MIME-Version: 1.0",
                f"X-Mailer: {rng.choice(('Outlook 16.0', 'Thunderbird 115.4', 'Apple Mail', 'Roundcube'))}"]
    if thread:
        headers.append(f"In-Reply-To: {thread['msgid']}")
    size = body_size or draw_size(rng, MAIL_BODY_SIZES)
    body = text.take(lang, max(200, size - 900))
    if thread and thread.get("body"):
        quoted = "\n".join("> " + line for line in thread["body"][:20000].splitlines())
        body = body[: max(200, len(body) // 2)] + f"\n\nOn {rfc_date(ts - 3600)}, wrote:\n" + quoted
    body += f"\n\n-- \n{frm}\n{rng.choice(('Sales', 'Support', 'Accounts', 'Legal'))}\n"
    if thread is not None:
        thread.update(msgid=msgid, body=body, subject=subject.removeprefix("Re: "))
    charset_body = body.replace("\n", "\r\n").encode()
    if not attachments:
        headers.append("Content-Type: text/plain; charset=utf-8")
        headers.append("Content-Transfer-Encoding: 8bit")
        return ("\r\n".join(headers) + "\r\n\r\n").encode() + charset_body
    boundary = f"----=_Part_{rng.getrandbits(40):010x}"
    headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    parts = [("\r\n".join(headers) + "\r\n\r\n").encode(),
             f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
             f"Content-Transfer-Encoding: 8bit\r\n\r\n".encode(), charset_body, b"\r\n"]
    for name, data in attachments:
        parts.append(f"--{boundary}\r\nContent-Type: application/octet-stream; name=\"{name}\"\r\n"
                     f"Content-Transfer-Encoding: base64\r\n"
                     f"Content-Disposition: attachment; filename=\"{name}\"\r\n\r\n".encode())
        parts.append(base64.encodebytes(data).replace(b"\n", b"\r\n"))
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)


def generate(root, size, seed, log=print):
    """Write the corpus of about `size` bytes under `root` (must not exist)."""
    rng = random.Random(f"custos-bench/{GEN_VERSION}/{seed}/{size}")
    os.makedirs(root)
    w = Writer(root)
    text = TextSource(rng, size)
    budget = {"mail": size * 50 // 100, "attachments": size * 20 // 100,
              "chat": size * 15 // 100, "crm": size - size * 85 // 100}
    n_big = max(1, size * 6 // GIB)
    big_mail = n_big // 2
    big_raw = n_big - big_mail
    forwarded = []  # recent attachments, some sent again
    decoded = []  # attachments also saved raw (subset)

    # -- mail
    mailboxes = [person(rng)[1].split("@")[0] for _ in range(max(4, size // (64 * MIB)))]
    folders = ["INBOX", "Sent", "Archive/2023", "Archive/2024", "Customers", "Support"]
    used, i, thread, att_used = 0, 0, None, 0
    while used < budget["mail"]:
        ts = EPOCH + i * 611
        atts = []
        if big_mail > 0 and used >= budget["mail"] * (n_big - big_mail + 1) // (n_big + 1):
            kind = pick_weighted(rng, ATTACH_KINDS[:3])
            big = min(draw_size(rng, BIG_SIZES), max(MIB, (budget["mail"] - used) * 3 // 4))
            atts.append((f"archive-{i}.{kind[1]}", attachment_bytes(rng, text, kind, big)))
            big_mail -= 1
        elif att_used * 100 < used * 60 and rng.randrange(8) == 0:
            for _ in range(1 + (rng.randrange(4) == 0) + (rng.randrange(10) == 0)):
                if forwarded and rng.randrange(100) < 15:
                    atts.append(rng.choice(forwarded))
                    continue
                kind = pick_weighted(rng, ATTACH_KINDS)
                data = attachment_bytes(rng, text, kind, draw_size(rng, ATTACH_SIZES))
                att = (f"{rng.choice(('invoice', 'contract', 'scan', 'photo', 'report', 'export'))}"
                       f"-{i}.{kind[1]}", data)
                atts.append(att)
                forwarded.append(att)
                if len(forwarded) > 40:
                    forwarded.pop(0)
                if rng.randrange(100) < 40:
                    decoded.append(att)
        # threads: a third of messages reply to the previous one
        if thread is None or rng.randrange(3) != 0:
            thread = {} if rng.randrange(2) == 0 else None
        msg = email_message(rng, text, ts, atts, thread)
        att_used += sum(len(a[1]) * 4 // 3 for a in atts)
        box = mailboxes[i % len(mailboxes)]
        folder = folders[(i // 7) % len(folders)]
        w.write(f"mail/{box}/{folder}/{i:06d}.eml", msg)
        used += len(msg)
        i += 1
    log(f"corpus: mail {i} messages, {used / MIB:.1f} MiB")

    # -- raw attachments
    used, j = 0, 0
    saved = []
    while used < budget["attachments"]:
        ts = EPOCH + j * 86400 // 7
        import time as _t
        ym = _t.strftime("%Y/%m", _t.gmtime(ts))
        if big_raw > 0 and used >= budget["attachments"] // 3:
            kind = pick_weighted(rng, ATTACH_KINDS)
            big = min(draw_size(rng, BIG_SIZES), max(MIB, budget["attachments"] - used))
            name, data = f"backup-{j}.{kind[1]}", attachment_bytes(rng, text, kind, big)
            big_raw -= 1
        elif decoded and rng.randrange(100) < 30:
            name, data = decoded.pop(0)
        elif saved and rng.randrange(100) < 10:
            name, data = rng.choice(saved)  # the same document saved in two places
            name = "copy-of-" + name
        else:
            kind = pick_weighted(rng, ATTACH_KINDS)
            name = f"doc-{j}.{kind[1]}"
            data = attachment_bytes(rng, text, kind, draw_size(rng, ATTACH_SIZES))
            if len(saved) < 30:
                saved.append((name, data))
            elif rng.randrange(4) == 0:
                saved[rng.randrange(30)] = (name, data)
        w.write(f"attachments/{ym}/{j:05d}-{name}", data)
        used += len(data)
        j += 1
    log(f"corpus: attachments {j} files, {used / MIB:.1f} MiB")

    # -- chat exports
    users = [{"id": f"U{rng.getrandbits(40):010X}", "name": person(rng)[0]} for _ in range(40)]
    channels = ["general", "support", "sales", "escalations", "random", "eng-oncall", "customers-eu",
                "customers-us"]
    workspaces = ["acme", "globex"]
    w.write("chat/users.json", json.dumps(users, indent=4, ensure_ascii=False).encode())
    w.write("chat/channels.json", json.dumps(
        [{"name": c, "created": EPOCH, "purpose": text.take("en", 60)} for c in channels],
        indent=4, ensure_ascii=False).encode())
    used, day = 0, 0
    while used < budget["chat"]:
        ws = workspaces[day % 2]
        ch = channels[(day // 2) % len(channels)]
        date = iso(EPOCH + (day // 16) * 86400)[:10]
        target = draw_size(rng, CHAT_DAY_SIZES)
        msgs, n, ts = [], 0, EPOCH + (day // 16) * 86400
        while n < target:
            u = rng.choice(users)
            ts += rng.randint(5, 900)
            m = {"type": "message", "user": u["id"], "user_name": u["name"],
                 "text": text.take(text.lang(), rng.randint(20, 600)),
                 "ts": f"{ts}.{rng.randrange(10**6):06d}"}
            if rng.randrange(5) == 0:
                m["reactions"] = [{"name": rng.choice(("+1", "eyes", "white_check_mark", "tada")),
                                   "users": [rng.choice(users)["id"]], "count": 1}]
            if rng.randrange(4) == 0:
                m["thread_ts"] = m["ts"]
                m["reply_count"] = rng.randint(1, 9)
            if rng.randrange(30) == 0:
                m["files"] = [{"id": f"F{rng.getrandbits(40):010X}", "name": f"screenshot-{day}.png",
                               "size": rng.randint(10**4, 10**6), "mimetype": "image/png"}]
            msgs.append(m)
            n += len(m["text"]) + 200
        data = json.dumps(msgs, indent=4, ensure_ascii=False).encode()
        w.write(f"chat/{ws}/{ch}/{date}.json", data)
        used += len(data)
        day += 1
    log(f"corpus: chat {day} day files, {used / MIB:.1f} MiB")

    # -- CRM
    used, k, nd = 0, 0, 0
    while used < budget["crm"]:
        if used >= budget["crm"] * 6 // 10 and rng.randrange(4) == 0 or (nd == 0 and used >= budget["crm"] // 2):
            target, lines, n = draw_size(rng, NDJSON_SIZES), [], 0
            while n < target:
                t = {"ticket_id": rng.randrange(10**8), "created": iso(EPOCH + rng.randrange(10**8)),
                     "status": rng.choice(("new", "open", "pending", "solved", "closed")),
                     "priority": rng.choice(("low", "normal", "high", "urgent")),
                     "requester": person(rng)[1], "subject": text.take("en", rng.randint(20, 80)),
                     "description": text.take(text.lang(), rng.randint(100, 3000)),
                     "tags": rng.sample(("billing", "refund", "login", "bug", "gdpr", "vip", "shipping"), 2)}
                line = json.dumps(t, ensure_ascii=False)
                lines.append(line)
                n += len(line) + 1
            data = ("\n".join(lines) + "\n").encode()
            w.write(f"crm/exports/tickets-{nd:03d}.ndjson", data)
            nd += 1
        else:
            target = draw_size(rng, CRM_RECORD_SIZES)
            aid = f"{rng.getrandbits(64):016x}"
            rec = {"id": aid, "name": f"{rng.choice(LAST)} {rng.choice(('GmbH', 'Ltd', 'SA', 'Inc', 'BV'))}",
                   "industry": rng.choice(("retail", "logistics", "health", "finance", "media")),
                   "created": iso(EPOCH + rng.randrange(10**8)), "owner": person(rng)[1],
                   "contacts": [], "deals": [], "notes": []}
            n = 400
            while n < target:
                r = rng.randrange(3)
                if r == 0:
                    name, addr = person(rng)
                    rec["contacts"].append({"name": name, "email": addr,
                                            "phone": f"+{rng.randint(1, 99)} {rng.randrange(10**9):09d}"})
                    n += 120
                elif r == 1:
                    rec["deals"].append({"id": rng.randrange(10**6), "stage": rng.choice(
                        ("lead", "qualified", "proposal", "won", "lost")),
                        "amount": rng.randrange(10**7) / 100, "currency": "EUR",
                        "close_date": iso(EPOCH + rng.randrange(10**8))[:10]})
                    n += 110
                else:
                    t = text.take(text.lang(), rng.randint(100, 1500))
                    rec["notes"].append({"at": iso(EPOCH + rng.randrange(10**8)), "by": person(rng)[1], "text": t})
                    n += len(t) + 80
            data = json.dumps(rec, indent=2, ensure_ascii=False).encode()
            w.write(f"crm/accounts/{aid[:2]}/{aid}.json", data)
            k += 1
        used += len(data)
    log(f"corpus: crm {k} records, {nd} exports, {used / MIB:.1f} MiB")
    return {"files": w.count, "bytes": w.bytes}


# --------------------------------------------------------------------------- hashing

def manifest(root):
    """{relpath: (kind, size, perm, digest)} for everything under root.

    kind: 'f' file (digest = sha256 of content), 'd' directory, 'l' symlink
    (digest = link target), 'o' other (ignored by comparisons of content).
    """
    out = {}

    def walk(dirpath, rel):
        with os.scandir(dirpath) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[r] = ("l", 0, 0, os.readlink(e.path))
            elif stat.S_ISDIR(st.st_mode):
                out[r] = ("d", 0, perm, "")
                walk(e.path, r)
            elif stat.S_ISREG(st.st_mode):
                with open(e.path, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                out[r] = ("f", st.st_size, perm, digest)
            else:
                out[r] = ("o", 0, perm, "")
    walk(root, "")
    return out


def manifest_digest(m):
    h = hashlib.sha256()
    for k in sorted(m):
        kind, size, perm, digest = m[k]
        h.update(f"{k}\0{kind}\0{size}\0{perm:o}\0{digest}\n".encode())
    return h.hexdigest()


def manifest_totals(m):
    files = sum(1 for v in m.values() if v[0] == "f")
    dirs = sum(1 for v in m.values() if v[0] == "d")
    size = sum(v[1] for v in m.values() if v[0] == "f")
    return {"files": files, "dirs": dirs, "bytes": size}


def compare(expected, actual, limit=10):
    """List of human-readable differences (empty = byte-identical tree)."""
    diffs = []
    for k in sorted(expected.keys() | actual.keys()):
        e, a = expected.get(k), actual.get(k)
        if e == a:
            continue
        if e is None:
            diffs.append(f"extra in restore: {k} ({a[0]})")
        elif a is None:
            diffs.append(f"missing in restore: {k} ({e[0]})")
        elif e[0] != a[0]:
            diffs.append(f"type differs: {k}: {e[0]} vs {a[0]}")
        elif e[0] == "f" and (e[1], e[3]) != (a[1], a[3]):
            diffs.append(f"content differs: {k}: size {e[1]} vs {a[1]}, sha256 {e[3][:12]} vs {a[3][:12]}")
        elif e[0] == "l" and e[3] != a[3]:
            diffs.append(f"symlink target differs: {k}: {e[3]!r} vs {a[3]!r}")
        elif e[0] in "fd" and e[2] != a[2]:
            diffs.append(f"permissions differ: {k}: {e[2]:o} vs {a[2]:o}")
        else:
            continue
        if len(diffs) >= limit:
            diffs.append("... (more differences not shown)")
            break
    return diffs


# --------------------------------------------------------------------------- mutation

class Mutation:
    """A deterministic change of ~pct % of the files: half edited, half added.

    `apply()` edits files in place (the original moves aside by rename, so its
    bytes and mtime come back unchanged on `revert()`), `revert()` restores
    the original tree. Works on any corpus; new files are e-mail-like text.
    """

    def __init__(self, root, m, side_dir, seed, pct=1.0):
        self.root, self.side = root, side_dir
        rng = random.Random(f"custos-bench/mutation/{seed}")
        files = sorted(k for k, v in m.items() if v[0] == "f" and v[1] > 0)
        n = len(files)
        k = max(1, round(n * pct / 200))
        self.modified = []
        for rel in rng.sample(files, min(k, n)):
            size = m[rel][1]
            off = size * rng.randint(10, 90) // 100
            insert = ("\n[edited %d] " % rng.randrange(10**9)).encode() + rng.randbytes(rng.randint(32, 256)).hex().encode()
            self.modified.append((rel, off, insert))
        text = TextSource(rng, 4 * MIB)
        dirs = sorted({os.path.dirname(f) for f in files})
        self.added = []
        for i in range(k):
            d = rng.choice(dirs)
            rel = f"{d}/zz-added-{i:04d}.eml" if d else f"zz-added-{i:04d}.eml"
            self.added.append((rel, email_message(rng, text, EPOCH + 10**8 + i)))
        self.applied = False

    def stats(self):
        return {"modified": len(self.modified), "added": len(self.added),
                "added_bytes": sum(len(d) for _, d in self.added),
                "inserted_bytes": sum(len(ins) for _, _, ins in self.modified)}

    def apply(self):
        assert not self.applied
        os.makedirs(self.side, exist_ok=True)
        ts = EPOCH + 2 * 10**8
        for i, (rel, off, insert) in enumerate(self.modified):
            path = os.path.join(self.root, rel)
            aside = os.path.join(self.side, str(i))
            os.rename(path, aside)
            with open(aside, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data[:off] + insert + data[off:])
            shutil.copymode(aside, path)
            os.utime(path, (ts, ts))
        for rel, data in self.added:
            path = os.path.join(self.root, rel)
            with open(path, "xb") as f:
                f.write(data)
            os.utime(path, (ts, ts))
        self.applied = True

    def revert(self):
        if not self.applied:
            return
        for rel, _ in self.added:
            try:
                os.unlink(os.path.join(self.root, rel))
            except FileNotFoundError:
                pass
        for i, (rel, _, _) in enumerate(self.modified):
            aside = os.path.join(self.side, str(i))
            if os.path.exists(aside):
                os.replace(aside, os.path.join(self.root, rel))
        self.applied = False
